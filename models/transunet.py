"""TransUNet: hybrid CNN + ViT encoder with a cascaded upsampler (Chen et al., 2021).
(Details: docs/architecture.md, "models".)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.config import ConfigMixin, resolve_preset
from models.resnet import ResNetV2


@dataclass(frozen=True)
class TransUNetConfig(ConfigMixin):
    """TransUNet hyper-parameters. Defaults are the small CPU preset ``"default"``.

    Attributes:
        img_size: square input side S in pixels (divisible by 16; the position table is fixed to (S/16)^2).
        in_channels: image channels the stem takes (1 gray, 3 for ImageNet-pretrained R50 weights).
        resnet_units: units in the three ResNet stages ((3, 4, 9) for R50).
        resnet_width: root width of the ResNet (64 for R50).
        gn_groups: GroupNorm groups in the ResNet (32 for R50; must divide ``resnet_width``).
        hidden_size: transformer width.
        num_layers: transformer blocks.
        num_heads: attention heads (must divide ``hidden_size``).
        mlp_dim: transformer MLP width.
        dropout_rate: dropout on embeddings and MLPs.
        attention_dropout_rate: dropout on attention weights.
        head_channels: channels of ``decoder.conv_more`` (512 in the official model).
        decoder_channels: output channels of the four decoder blocks.
        n_skip: how many skips (1/8, 1/4, 1/2, deepest first) the decoder concatenates, 0..3.
    """

    img_size: int = 128
    in_channels: int = 1
    resnet_units: tuple[int, int, int] = (1, 1, 1)
    resnet_width: int = 16
    gn_groups: int = 8
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_dim: int = 256
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    head_channels: int = 64
    decoder_channels: tuple[int, int, int, int] = (64, 32, 16, 8)
    n_skip: int = 3

    def __post_init__(self) -> None:
        for name in ("resnet_units", "decoder_channels"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"TransUNetConfig.{name} must be a list of ints, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        positive_ints = (
            "img_size", "in_channels", "resnet_width", "gn_groups", "hidden_size",
            "num_layers", "num_heads", "mlp_dim", "head_channels",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransUNetConfig.{name} must be a positive int, got {value!r}")
        if self.img_size % 16:
            raise ValueError(f"TransUNetConfig.img_size must be divisible by 16, got {self.img_size}")
        if len(self.resnet_units) != 3 or not all(isinstance(u, int) and u >= 1 for u in self.resnet_units):
            raise ValueError(f"TransUNetConfig.resnet_units must be three positive ints, got {self.resnet_units!r}")
        if self.resnet_width % self.gn_groups:
            raise ValueError(
                f"TransUNetConfig.gn_groups ({self.gn_groups}) must divide resnet_width ({self.resnet_width})"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"TransUNetConfig.num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})"
            )
        if len(self.decoder_channels) != 4 or not all(
            isinstance(c, int) and c >= 1 for c in self.decoder_channels
        ):
            raise ValueError(
                f"TransUNetConfig.decoder_channels must be four positive ints, got {self.decoder_channels!r}"
            )
        if not isinstance(self.n_skip, int) or not 0 <= self.n_skip <= 3:
            raise ValueError(f"TransUNetConfig.n_skip must be an int in 0..3, got {self.n_skip!r}")
        for name in ("dropout_rate", "attention_dropout_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"TransUNetConfig.{name} must be in [0, 1), got {value!r}")


TRANSUNET_PRESETS: dict[str, TransUNetConfig] = {
    # Small CPU model: trains in minutes on two cores.
    "default": TransUNetConfig(),
    # The official R50+ViT-B/16 hybrid (ImageNet-21k weights exist for it).
    "r50-vit-b16": TransUNetConfig(
        img_size=224,
        in_channels=3,
        resnet_units=(3, 4, 9),
        resnet_width=64,
        gn_groups=32,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        mlp_dim=3072,
        dropout_rate=0.1,
        attention_dropout_rate=0.0,
        head_channels=512,
        decoder_channels=(256, 128, 64, 16),
        n_skip=3,
    ),
    # Seconds-long runs and tests: the run preset "tiny" and the tests' exported artifacts.
    "tiny": TransUNetConfig(img_size=64, resnet_width=8, gn_groups=4, hidden_size=32, num_layers=1, num_heads=2,
                            mlp_dim=64, head_channels=32, decoder_channels=(32, 16, 8, 8)),
}


class Attention(nn.Module):
    """Multi-head self-attention with separate ``query``/``key``/``value``/``out`` projections (official names)."""

    def __init__(self, config: TransUNetConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.attn_dropout = config.attention_dropout_rate
        self.proj_dropout = nn.Dropout(config.attention_dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> (B, N, D)."""
        b, n, d = x.shape
        # (B, N, D) -> (B, heads, N, D/heads)
        q, k, v = (
            proj(x).view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)
            for proj in (self.query, self.key, self.value)
        )
        drop = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        y = y.transpose(1, 2).reshape(b, n, d)
        return self.proj_dropout(self.out(y))


class Mlp(nn.Module):
    """Transformer MLP ``fc1 -> GELU -> fc2`` (official init: Xavier weights, near-zero biases)."""

    def __init__(self, config: TransUNetConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout_rate)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: TransUNetConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.ffn = Mlp(config)
        self.attn = Attention(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attention_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class Encoder(nn.Module):
    def __init__(self, config: TransUNetConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.encoder_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = block(x)
        return self.encoder_norm(x)


class Embeddings(nn.Module):
    """ResNet stem, 1x1 patch embedding of its 1/16 map, learned position embeddings."""

    def __init__(self, config: TransUNetConfig) -> None:
        super().__init__()
        self.hybrid_model = ResNetV2(
            config.resnet_units, config.resnet_width, config.in_channels, config.gn_groups
        )
        grid = config.img_size // 16
        self.patch_embeddings = nn.Conv2d(self.hybrid_model.out_channels, config.hidden_size, kernel_size=1)
        self.position_embeddings = nn.Parameter(torch.zeros(1, grid * grid, config.hidden_size))
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, C, S, S) -> tokens (B, (S/16)^2, D) and the ResNet skips (deepest first)."""
        x, features = self.hybrid_model(x)
        x = self.patch_embeddings(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)
        return self.dropout(x + self.position_embeddings), features


class Transformer(nn.Module):
    def __init__(self, config: TransUNetConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tokens, features = self.embeddings(x)
        return self.encoder(tokens), features


class Conv2dReLU(nn.Sequential):
    """``conv(3x3, no bias) -> BatchNorm -> ReLU`` (indices 0, 1, 2 as the official module)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DecoderBlock(nn.Module):
    """x2 bilinear upsampling (align_corners=True, as ``nn.UpsamplingBilinear2d``), concat skip, two convs."""

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int = 0) -> None:
        super().__init__()
        self.conv1 = Conv2dReLU(in_channels + skip_channels, out_channels)
        self.conv2 = Conv2dReLU(out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class DecoderCup(nn.Module):
    """Cascaded upsampler from the (S/16)^2 token grid to full resolution."""

    def __init__(self, config: TransUNetConfig, skip_channels: tuple[int, ...]) -> None:
        super().__init__()
        self.n_skip = config.n_skip
        self.grid = config.img_size // 16
        self.conv_more = Conv2dReLU(config.hidden_size, config.head_channels)
        in_channels = [config.head_channels, *config.decoder_channels[:-1]]
        skips = [c if i < config.n_skip else 0 for i, c in enumerate([*skip_channels, 0])]
        self.blocks = nn.ModuleList(
            DecoderBlock(i, o, s) for i, o, s in zip(in_channels, config.decoder_channels, skips, strict=True)
        )

    def forward(self, tokens: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """Tokens (B, (S/16)^2, D) and skips (deepest first) -> (B, decoder_channels[-1], S, S)."""
        b, n, d = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, d, self.grid, self.grid)  # (B, N, D) -> (B, D, h, w)
        x = self.conv_more(x)
        for i, block in enumerate(self.blocks):
            x = block(x, features[i] if i < self.n_skip else None)
        return x


class TransUNet(nn.Module):
    """Binary-segmentation TransUNet.

    Args:
        config: a ``TransUNetConfig`` (see ``TRANSUNET_PRESETS``).
    """

    def __init__(self, config: TransUNetConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.decoder = DecoderCup(config, self.transformer.embeddings.hybrid_model.skip_channels)
        self.segmentation_head = nn.Sequential(
            nn.Conv2d(config.decoder_channels[-1], 1, kernel_size=3, padding=1)
        )
        nn.init.normal_(self.transformer.embeddings.position_embeddings, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment a batch.

        Args:
            x: (B, in_channels, S, S) float32 in [0, 1], S = ``config.img_size``.

        Returns:
            (B, 1, S, S) logits; ``sigmoid`` gives the foreground probability.

        Raises:
            ValueError: when the channels or size differ from the config.
        """
        c, s = self.config.in_channels, self.config.img_size
        if x.dim() != 4 or x.shape[1] != c or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(f"TransUNet expects (B, {c}, {s}, {s}) input, got {tuple(x.shape)}")
        tokens, features = self.transformer(x)
        return self.segmentation_head(self.decoder(tokens, features))


def num_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def build_transunet(name_or_config: str | TransUNetConfig | dict[str, Any] = "default") -> TransUNet:
    """Build a TransUNet from a preset name (``TRANSUNET_PRESETS``), a config, or a config dict.

    Raises:
        ValueError: unknown preset name or invalid config field.
    """
    config = resolve_preset(name_or_config, TRANSUNET_PRESETS, TransUNetConfig,
                            family="TransUNet", builder="build_transunet")
    return TransUNet(config)


__all__ = ["TRANSUNET_PRESETS", "TransUNet", "TransUNetConfig", "build_transunet", "num_parameters"]
