"""Pre-activation ResNet (v2) stem of the TransUNet hybrid encoder.
(Details: docs/architecture.md, "models".)
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class StdConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised (zero mean, unit variance per output channel) on every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        var, mean = torch.var_mean(w, dim=[1, 2, 3], keepdim=True, unbiased=False)
        w = (w - mean) / torch.sqrt(var + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def conv3x3(cin: int, cout: int, stride: int = 1) -> StdConv2d:
    return StdConv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> StdConv2d:
    return StdConv2d(cin, cout, kernel_size=1, stride=stride, padding=0, bias=False)


class PreActBottleneck(nn.Module):
    """Bottleneck unit ``1x1 -> 3x3(stride) -> 1x1`` with GroupNorm; projection shortcut when the shape changes.

    Args:
        cin: input channels.
        cout: output channels.
        cmid: bottleneck channels.
        stride: stride of the 3x3 convolution (and of the projection).
        gn_groups: GroupNorm groups for ``gn1..gn3`` (32 in the official model; must divide cmid and cout).
    """

    def __init__(self, cin: int, cout: int, cmid: int, stride: int = 1, gn_groups: int = 32) -> None:
        super().__init__()
        self.gn1 = nn.GroupNorm(gn_groups, cmid, eps=1e-6)
        self.conv1 = conv1x1(cin, cmid)
        self.gn2 = nn.GroupNorm(gn_groups, cmid, eps=1e-6)
        self.conv2 = conv3x3(cmid, cmid, stride)
        self.gn3 = nn.GroupNorm(gn_groups, cout, eps=1e-6)
        self.conv3 = conv1x1(cmid, cout)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.downsample = conv1x1(cin, cout, stride)
            self.gn_proj = nn.GroupNorm(cout, cout)  # one group per channel, default eps: as the official model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        if hasattr(self, "downsample"):
            residual = self.gn_proj(self.downsample(x))
        y = self.relu(self.gn1(self.conv1(x)))
        y = self.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return self.relu(residual + y)


def _stage(cin: int, cout: int, cmid: int, units: int, stride: int, gn_groups: int) -> nn.Sequential:
    layers = [("unit1", PreActBottleneck(cin, cout, cmid, stride, gn_groups))]
    layers += [(f"unit{i}", PreActBottleneck(cout, cout, cmid, 1, gn_groups)) for i in range(2, units + 1)]
    return nn.Sequential(OrderedDict(layers))


class ResNetV2(nn.Module):
    """Three-stage pre-activation ResNet returning the 1/16 feature map and the skip features.

    Args:
        block_units: units per stage, e.g. ``(3, 4, 9)`` for the R50 of R50+ViT-B/16.
        width: root width (64 for R50); stage outputs have ``4*width``, ``8*width``, ``16*width`` channels.
        in_channels: image channels.
        gn_groups: GroupNorm groups (32 for R50; must divide ``width``).
    """

    def __init__(self, block_units: tuple[int, ...], width: int, in_channels: int = 3, gn_groups: int = 32) -> None:
        super().__init__()
        if len(block_units) != 3 or min(block_units) < 1:
            raise ValueError(f"block_units must be three positive ints, got {block_units!r}")
        if width % gn_groups:
            raise ValueError(f"width {width} must be divisible by gn_groups {gn_groups}")
        self.width = width
        self.root = nn.Sequential(
            OrderedDict(
                [
                    ("conv", StdConv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)),
                    ("gn", nn.GroupNorm(gn_groups, width, eps=1e-6)),
                    ("relu", nn.ReLU(inplace=True)),
                ]
            )
        )
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0)  # no parameters; as the official forward
        self.body = nn.Sequential(
            OrderedDict(
                [
                    ("block1", _stage(width, width * 4, width, block_units[0], 1, gn_groups)),
                    ("block2", _stage(width * 4, width * 8, width * 2, block_units[1], 2, gn_groups)),
                    ("block3", _stage(width * 8, width * 16, width * 4, block_units[2], 2, gn_groups)),
                ]
            )
        )

    @property
    def skip_channels(self) -> tuple[int, int, int]:
        """Channels of the skip features at 1/8, 1/4, 1/2 (the order ``forward`` returns them in)."""
        return (self.width * 8, self.width * 4, self.width)

    @property
    def out_channels(self) -> int:
        """Channels of the 1/16 feature map."""
        return self.width * 16

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode an image.

        Args:
            x: (B, C, S, S) image, S divisible by 16.

        Returns:
            (B, 16*width, S/16, S/16) features and the skips
            ``[(B, 8*width, S/8, S/8), (B, 4*width, S/4, S/4), (B, width, S/2, S/2)]`` (deepest first).
            The unpadded max-pool makes the 1/4 map one pixel short; it is zero-padded at the bottom/right
            exactly as the official model does.
        """
        size = x.shape[-1]
        features = []
        x = self.root(x)
        features.append(x)
        x = self.pool(x)
        for i, stage in enumerate(self.body[:-1]):
            x = stage(x)
            right = size // 4 // (i + 1)
            pad = right - x.shape[-1]
            features.append(F.pad(x, (0, pad, 0, pad)) if pad else x)
        x = self.body[-1](x)
        return x, features[::-1]
