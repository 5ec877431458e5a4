"""Selector: a small CNN that names an image's modality and scores how real it looks (MINIM's selector).
(Details: docs/architecture.md, "models".)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from core.config import ConfigMixin, resolve_preset
from models.text2image import DEFAULT_MODALITIES


@dataclass(frozen=True)
class SelectorConfig(ConfigMixin):
    """Attributes:
    image_size: side the input is resized to.
    channels: conv widths; each stage is conv3x3-GroupNorm-SiLU twice, then 2x2 max-pool.
    modalities: class names, in logit order.
    """

    image_size: int = 32
    channels: tuple[int, ...] = (16, 32, 64)
    modalities: tuple[str, ...] = DEFAULT_MODALITIES

    def __post_init__(self) -> None:
        for name in ("channels", "modalities"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"SelectorConfig.{name} must be a non-empty list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not isinstance(self.image_size, int) or self.image_size < 2 ** len(self.channels):
            raise ValueError(f"SelectorConfig.image_size must be an int >= {2 ** len(self.channels)}, "
                             f"got {self.image_size!r}")
        if not all(isinstance(c, int) and c >= 4 and c % 4 == 0 for c in self.channels):
            raise ValueError(f"SelectorConfig.channels must be multiples of 4, got {self.channels}")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"SelectorConfig.modalities must be distinct, got {self.modalities}")


SELECTOR_PRESETS: dict[str, SelectorConfig] = {
    "default": SelectorConfig(),
    "tiny": SelectorConfig(image_size=16, channels=(4, 8)),
}


class SelectorOutput(NamedTuple):
    modality_logits: torch.Tensor
    real_logit: torch.Tensor
    features: torch.Tensor


def fit_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, 1, H, W)`` -> ``(B, 1, size, size)``: bilinear with antialiasing, the identity at that size already.

    The selector's input resize, shared with the ONNX-backed selector of the service (whose graph takes
    ``size`` x ``size`` images only).
    """
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class Selector(nn.Module):
    """Modality classifier + realness score (see the module docstring)."""

    def __init__(self, config: SelectorConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        prev = 1
        for width in config.channels:
            for _ in range(2):
                layers += [nn.Conv2d(prev, width, 3, padding=1), nn.GroupNorm(4, width), nn.SiLU()]
                prev = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.modality_head = nn.Linear(prev, len(config.modalities))
        self.real_head = nn.Linear(prev, 1)

    @property
    def feature_dim(self) -> int:
        return self.config.channels[-1]

    def forward(self, images: torch.Tensor) -> SelectorOutput:
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"Selector: images shape {tuple(images.shape)}; expected (B, 1, H, W)")
        images = fit_size(images, self.config.image_size)
        feats = self.features(images * 2.0 - 1.0).mean(dim=(2, 3))  # (B, F) global average pool
        return SelectorOutput(self.modality_head(feats), self.real_head(feats)[:, 0], feats)

    def score(self, images: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        """``log p(modality_ids | x) + log p(real | x)`` per image: ``(B,)``, higher is better."""
        out = self(images)
        log_p = F.log_softmax(out.modality_logits, dim=1).gather(1, modality_ids[:, None])[:, 0]
        return log_p + F.logsigmoid(out.real_logit)


def build_selector(name_or_config: str | SelectorConfig | dict[str, Any] = "default") -> Selector:
    """Build from a preset name (``SELECTOR_PRESETS``), a config or a config dict."""
    config = resolve_preset(name_or_config, SELECTOR_PRESETS, SelectorConfig,
                            family="selector", builder="build_selector")
    return Selector(config)


__all__ = ["SELECTOR_PRESETS", "Selector", "SelectorConfig", "SelectorOutput", "build_selector", "fit_size"]
