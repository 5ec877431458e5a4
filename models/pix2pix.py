"""pix2pix U-Net generator: a binary mask in, a gray image out (Isola et al., 2017; GenSeg's generator).
(Details: docs/architecture.md, "models".)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.config import ConfigMixin, resolve_preset

NORMS = ("batch", "instance")


def norm_layer(norm: str, channels: int) -> nn.Module:
    """``BatchNorm2d`` (affine, running stats) or ``InstanceNorm2d`` (no affine, no running stats), as pix2pix."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    raise ValueError(f"norm = {norm!r}; expected one of {NORMS}")


@dataclass(frozen=True)
class Pix2PixConfig(ConfigMixin):
    """U-Net generator hyper-parameters. Defaults are the small CPU preset ``"default"``.

    Attributes:
        image_size: square side S the generator is trained at (must be divisible by ``2 ** num_downs``).
        input_nc: input channels (1: the mask).
        output_nc: output channels (1: the gray image).
        ngf: filters of the outermost conv; deeper blocks use up to ``8 * ngf``.
        num_downs: number of stride-2 downsamplings (7 for 128 px, 8 for 256 px in the paper).
        max_mult: width cap of the deep blocks in multiples of ``ngf`` (8 in the paper; 1, 2, 4 or 8).
        norm: ``"batch"`` (official default) or ``"instance"``.
        use_dropout: dropout(0.5) in the three blocks below the innermost (pix2pix's noise source).
    """

    image_size: int = 128
    input_nc: int = 1
    output_nc: int = 1
    ngf: int = 16
    num_downs: int = 7
    max_mult: int = 4
    norm: str = "instance"
    use_dropout: bool = True

    def __post_init__(self) -> None:
        for name in ("image_size", "input_nc", "output_nc", "ngf", "num_downs", "max_mult"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Pix2PixConfig.{name} must be a positive int, got {value!r}")
        if self.num_downs < 5:
            raise ValueError(f"Pix2PixConfig.num_downs must be >= 5 (the U-Net's four outer levels + one), "
                             f"got {self.num_downs}")
        if self.image_size % (2**self.num_downs):
            raise ValueError(
                f"Pix2PixConfig.image_size ({self.image_size}) must be divisible by 2 ** num_downs "
                f"({2**self.num_downs})"
            )
        if self.max_mult not in (1, 2, 4, 8):
            raise ValueError(f"Pix2PixConfig.max_mult must be 1, 2, 4 or 8, got {self.max_mult!r}")
        if self.norm not in NORMS:
            raise ValueError(f"Pix2PixConfig.norm = {self.norm!r}; expected one of {NORMS}")


PIX2PIX_PRESETS: dict[str, Pix2PixConfig] = {
    # Small CPU generator for the 128 px TransUNet (0.7 M parameters, 2.8 MB).
    "default": Pix2PixConfig(),
    # Test-sized.
    "tiny": Pix2PixConfig(image_size=32, ngf=4, num_downs=5),
    # The paper's generators: unet_128 and unet_256 with ngf 64 and batch norm.
    "unet_128": Pix2PixConfig(image_size=128, ngf=64, num_downs=7, max_mult=8, norm="batch"),
    "unet_256": Pix2PixConfig(image_size=256, ngf=64, num_downs=8, max_mult=8, norm="batch"),
}


class UnetSkipConnectionBlock(nn.Module):
    """``x -> cat(x, up(inner(down(x))))``; the outermost block returns ``up(...)`` without the skip.

    Args:
        outer_nc: channels of the block's input (and of its output before concatenation).
        inner_nc: channels after the down conv.
        input_nc: input channels when they differ from ``outer_nc`` (the outermost block).
        submodule: the nested inner block (None for the innermost).
    """

    def __init__(
        self,
        outer_nc: int,
        inner_nc: int,
        *,
        input_nc: int | None = None,
        submodule: nn.Module | None = None,
        outermost: bool = False,
        innermost: bool = False,
        norm: str = "batch",
        use_dropout: bool = False,
    ) -> None:
        super().__init__()
        self.outermost = outermost
        use_bias = norm == "instance"  # batch norm has its own shift
        input_nc = outer_nc if input_nc is None else input_nc
        downconv = nn.Conv2d(input_nc, inner_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
        downrelu = nn.LeakyReLU(0.2, True)
        uprelu = nn.ReLU(True)
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1)
            layers: list[nn.Module] = [downconv, submodule, uprelu, upconv, nn.Tanh()]  # type: ignore[list-item]
        elif innermost:
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
            layers = [downrelu, downconv, uprelu, upconv, norm_layer(norm, outer_nc)]
        else:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
            layers = [downrelu, downconv, norm_layer(norm, inner_nc), submodule,  # type: ignore[list-item]
                      uprelu, upconv, norm_layer(norm, outer_nc)]
            if use_dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class Pix2PixGenerator(nn.Module):
    """Mask-to-image U-Net.

    ``forward(mask (B, input_nc, S, S) float32 in [0, 1]) -> image (B, output_nc, S, S) float32 in [0, 1]``;
    ``S`` divisible by ``2 ** config.num_downs`` (any such S works; ``config.image_size`` is the trained one).
    """

    def __init__(self, config: Pix2PixConfig) -> None:
        super().__init__()
        self.config = config
        ngf, norm = config.ngf, config.norm
        width = [ngf * min(m, config.max_mult) for m in (1, 2, 4, 8)]  # paper: ngf, 2, 4, 8 x ngf
        block = UnetSkipConnectionBlock(width[3], width[3], innermost=True, norm=norm)
        for _ in range(config.num_downs - 5):  # the deepest blocks, with dropout
            block = UnetSkipConnectionBlock(width[3], width[3], submodule=block, norm=norm,
                                            use_dropout=config.use_dropout)
        for level in (2, 1, 0):  # 8 -> 4 -> 2 -> 1 x ngf on the way out
            block = UnetSkipConnectionBlock(width[level], width[level + 1], submodule=block, norm=norm)
        self.model = UnetSkipConnectionBlock(config.output_nc, ngf, input_nc=config.input_nc, submodule=block,
                                             outermost=True, norm=norm)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        if mask.ndim != 4 or mask.shape[1] != self.config.input_nc:
            raise ValueError(f"Pix2PixGenerator: mask shape {tuple(mask.shape)}; expected (B, "
                             f"{self.config.input_nc}, S, S)")
        factor = 2**self.config.num_downs
        if mask.shape[-1] % factor or mask.shape[-2] % factor:
            raise ValueError(f"Pix2PixGenerator: spatial size {tuple(mask.shape[-2:])} must be divisible by {factor}")
        out = self.model(mask * 2.0 - 1.0)  # [0, 1] -> [-1, 1] in, tanh out
        return (out + 1.0) * 0.5


def build_pix2pix(name_or_config: str | Pix2PixConfig | dict[str, Any] = "default") -> Pix2PixGenerator:
    """Build a generator from a preset name (``PIX2PIX_PRESETS``), a config or a config dict."""
    config = resolve_preset(name_or_config, PIX2PIX_PRESETS, Pix2PixConfig,
                            family="pix2pix", builder="build_pix2pix")
    return Pix2PixGenerator(config)


__all__ = ["PIX2PIX_PRESETS", "Pix2PixConfig", "Pix2PixGenerator", "UnetSkipConnectionBlock", "build_pix2pix"]
