"""PatchGAN discriminator (pix2pix's ``NLayerDiscriminator``): real/fake logits per overlapping patch.
(Details: docs/architecture.md, "models".)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.config import ConfigMixin, resolve_preset
from models.pix2pix import NORMS, norm_layer


@dataclass(frozen=True)
class PatchGANConfig(ConfigMixin):
    """Discriminator hyper-parameters. Defaults are the small CPU preset ``"default"``.

    Attributes:
        input_nc: channels of the input (condition + image).
        ndf: filters of the first conv; doubled per layer up to ``8 * ndf``.
        n_layers: stride-2 conv layers (3: 70 x 70 patches).
        norm: ``"batch"`` or ``"instance"``.
    """

    input_nc: int = 2
    ndf: int = 16
    n_layers: int = 3
    norm: str = "instance"

    def __post_init__(self) -> None:
        for name in ("input_nc", "ndf", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PatchGANConfig.{name} must be a positive int, got {value!r}")
        if self.norm not in NORMS:
            raise ValueError(f"PatchGANConfig.norm = {self.norm!r}; expected one of {NORMS}")


PATCHGAN_PRESETS: dict[str, PatchGANConfig] = {
    "default": PatchGANConfig(),
    "tiny": PatchGANConfig(ndf=4, n_layers=2),
    # The paper's 70x70 PatchGAN.
    "pix2pix_70": PatchGANConfig(ndf=64, n_layers=3, norm="batch"),
}


def receptive_field(n_layers: int) -> int:
    """Receptive field in input pixels of one output logit: 70 for ``n_layers = 3``, 34 for 2, 142 for 4."""
    rf = 1
    for stride in [1, 1] + [2] * n_layers:  # walk back from the output: two stride-1 convs, then stride 2
        rf = rf * stride + (4 - stride)
    return rf


class PatchGANDiscriminator(nn.Module):
    """``forward(condition (B, c, S, S), image (B, input_nc - c, S, S), both in [0, 1]) -> logits (B, 1, h, w)``.

    Inputs are mapped to ``[-1, 1]`` first; ``h = w ~ S / 2 ** n_layers - 2`` patch logits (unbounded).
    """

    def __init__(self, config: PatchGANConfig) -> None:
        super().__init__()
        self.config = config
        ndf, norm = config.ndf, config.norm
        use_bias = norm == "instance"
        layers: list[nn.Module] = [nn.Conv2d(config.input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, config.n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < config.n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=use_bias),
                       norm_layer(norm, ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, condition: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = torch.cat([condition, image], dim=1)
        if x.shape[1] != self.config.input_nc:
            raise ValueError(f"PatchGANDiscriminator: condition + image have {x.shape[1]} channels; "
                             f"expected input_nc = {self.config.input_nc}")
        return self.model(x * 2.0 - 1.0)


def build_patchgan(name_or_config: str | PatchGANConfig | dict[str, Any] = "default") -> PatchGANDiscriminator:
    """Build a discriminator from a preset name (``PATCHGAN_PRESETS``), a config or a config dict."""
    config = resolve_preset(name_or_config, PATCHGAN_PRESETS, PatchGANConfig,
                            family="PatchGAN", builder="build_patchgan")
    return PatchGANDiscriminator(config)


__all__ = ["PATCHGAN_PRESETS", "PatchGANConfig", "PatchGANDiscriminator", "build_patchgan", "receptive_field"]
