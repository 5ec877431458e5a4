"""Gated residual refinement: ``refined = coarse + gate * (sam - coarse)``.
(Details: docs/architecture.md, "models".)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from core.config import ConfigMixin, resolve_preset

GATE_TYPES = ("none", "uncertainty", "learned", "hybrid")


@dataclass(frozen=True)
class GateConfig(ConfigMixin):
    """Gate settings (defaults = preset ``"default"``: the uncertainty gate with upstream's CLI defaults).

    Attributes:
        type: one of ``GATE_TYPES``.
        gate_gamma: uncertainty curve exponent (> 0); the gate 1 - |2c - 1|^gamma grows with gamma (gamma < 1
            narrows the open region around c = 0.5, gamma > 1 widens it). Saved as ``gamma`` before; that
            key still loads.
        gate_min: smallest gate value, in [0, 1].
        gate_max: largest gate value, in [gate_min, 1].
        hidden_channels: width of the learned gate's CNN.
        use_image: feed the image to the learned gate (3 input channels instead of 2).
    """

    renamed_fields: ClassVar[Mapping[str, str]] = {"gamma": "gate_gamma"}

    type: str = "uncertainty"
    gate_gamma: float = 1.0
    gate_min: float = 0.0
    gate_max: float = 0.8
    hidden_channels: int = 16
    use_image: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        if self.type not in GATE_TYPES:
            raise ValueError(f"GateConfig.type must be one of {GATE_TYPES}, got {self.type!r}")
        if isinstance(self.gate_gamma, bool) or not isinstance(self.gate_gamma, (int, float)) or self.gate_gamma <= 0:
            raise ValueError(f"GateConfig.gate_gamma must be > 0, got {self.gate_gamma!r}")
        for name in ("gate_min", "gate_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"GateConfig.{name} must be in [0, 1], got {value!r}")
        if self.gate_min > self.gate_max:
            raise ValueError(f"GateConfig.gate_min ({self.gate_min}) must be <= gate_max ({self.gate_max})")
        if (
            isinstance(self.hidden_channels, bool)
            or not isinstance(self.hidden_channels, int)
            or self.hidden_channels < 1
        ):
            raise ValueError(f"GateConfig.hidden_channels must be a positive int, got {self.hidden_channels!r}")
        if not isinstance(self.use_image, bool):
            raise ValueError(f"GateConfig.use_image must be a bool, got {self.use_image!r}")


GATE_PRESETS: dict[str, GateConfig] = {
    "default": GateConfig(),
    "none": GateConfig(type="none"),
    "uncertainty": GateConfig(type="uncertainty"),
    # upstream's advice for an un-fine-tuned SAM: cap corrections at 50%
    "conservative": GateConfig(type="uncertainty", gate_max=0.5),
    "learned": GateConfig(type="learned"),
    "hybrid": GateConfig(type="hybrid"),
}


def uncertainty(coarse: torch.Tensor, gamma: float) -> torch.Tensor:
    """``1 - |2c - 1|^gamma`` in [0, 1] for c in [0, 1] (same shape as ``coarse``).

    |x| is computed as sqrt(x^2 + 1e-12) so the gradient stays finite at c = 0.5 for any gamma > 0. Where no
    gradient is recorded (inference) the same operations run in place on one buffer: the same values.
    """
    if _records_grad(coarse):
        return 1.0 - ((2.0 * coarse - 1.0).square() + 1e-12).pow(gamma / 2.0)
    return (2.0 * coarse - 1.0).square_().add_(1e-12).pow_(gamma / 2.0).neg_().add_(1.0)


def _records_grad(*xs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def apply_gate(coarse: torch.Tensor, sam: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``coarse + gate * (sam - coarse)``: (B, 1, H, W) probabilities in, the same out (in [0, 1] when all are).

    Where no gradient is recorded (inference) it runs in place on the one buffer ``sam - coarse`` allocates:
    the same values.
    """
    if _records_grad(coarse, sam, gate):
        return coarse + gate * (sam - coarse)
    return (sam - coarse).mul_(gate).add_(coarse)


class Gate(nn.Module):
    """Per-pixel gate.

    Args:
        config: a ``GateConfig``. ``learned`` / ``hybrid`` own ``net`` (~3k parameters at 16 channels).
    """

    def __init__(self, config: GateConfig) -> None:
        super().__init__()
        self.config = config
        if config.type in ("learned", "hybrid"):
            c = config.hidden_channels
            self.net = nn.Sequential(
                nn.Conv2d(3 if config.use_image else 2, c, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, c, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, 1, kernel_size=1),
            )
            # start at the middle of the range: sigmoid(0) = 0.5 everywhere
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(
        self, coarse: torch.Tensor, sam: torch.Tensor, image: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Compute the gate.

        Args:
            coarse: (B, 1, H, W) coarse probability in [0, 1].
            sam: (B, 1, H, W) refiner probability in [0, 1].
            image: (B, 1, H, W) image in [0, 1]; required by learned / hybrid gates with ``use_image``.

        Returns:
            (B, 1, H, W) gate in [gate_min, gate_max] (exactly 1 for ``"none"``).
        """
        cfg = self.config
        if cfg.type == "none":
            return torch.ones_like(coarse)
        if cfg.type == "uncertainty":
            gate = uncertainty(coarse, cfg.gate_gamma)
            if _records_grad(coarse):
                return torch.clamp(gate, cfg.gate_min, cfg.gate_max)
            return gate.clamp_(cfg.gate_min, cfg.gate_max)  # a fresh buffer: clamped in place
        inputs = [coarse, sam]
        if cfg.use_image:
            if image is None:
                raise ValueError(f"Gate({cfg.type!r}) with use_image=True needs the image")
            inputs.append(image)
        learned = torch.sigmoid(self.net(torch.cat(inputs, dim=1)))
        if cfg.type == "hybrid":
            learned = learned * uncertainty(coarse, cfg.gate_gamma)
        return cfg.gate_min + (cfg.gate_max - cfg.gate_min) * learned


def build_gate(name_or_config: str | GateConfig | dict[str, Any] = "default") -> Gate:
    """Build a gate from a preset name (``GATE_PRESETS``), a ``GateConfig`` or a config dict.

    Raises:
        ValueError: unknown preset or invalid field.
    """
    config = resolve_preset(name_or_config, GATE_PRESETS, GateConfig, family="gate", builder="build_gate")
    return Gate(config)
