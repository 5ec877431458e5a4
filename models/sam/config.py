"""SamConfig: the sizes of one SAM model plus its preprocessing style, with named presets.
(Details: docs/architecture.md, "models".)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.config import ConfigMixin, resolve_preset

from .image_encoder import ATTN_IMPLS

PREPROCESS_STYLES = ("sam", "medsam")
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamConfig(ConfigMixin):
    """Sizes and preprocessing of a SAM model.

    Attributes:
        img_size: side S of the square input frame (pixels).
        patch_size: ViT patch side; the embedding grid is S / patch_size.
        encoder_embed_dim, encoder_depth, encoder_num_heads: ViT width, blocks, heads.
        encoder_global_attn_indexes: blocks with global attention (the others are windowed).
        window_size: window side (in tokens) of windowed blocks.
        mlp_ratio: ViT MLP width / encoder_embed_dim.
        out_chans: image embedding channels (must equal prompt_embed_dim).
        prompt_embed_dim: prompt / decoder width D.
        mask_in_chans: hidden channels of the mask-prompt downscaler.
        decoder_depth, decoder_mlp_dim, decoder_num_heads: two-way transformer sizes.
        iou_head_depth, iou_head_hidden_dim: IoU MLP sizes.
        num_multimask_outputs: masks returned in multimask mode.
        pixel_mean, pixel_std: per-channel normalisation in [0, 255] units ("sam" preprocessing only).
        preprocess: "sam" (resize longest side, normalise, pad bottom-right) or "medsam" (resize to S x S,
            min-max to [0, 1]).
        attn_impl: image-encoder attention, "reference" (official numerics) or "sdpa" (fused kernel + bias).
    """

    img_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    out_chans: int = 256
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN_255
    pixel_std: tuple[float, float, float] = IMAGENET_STD_255
    preprocess: str = "sam"
    attn_impl: str = "reference"

    def __post_init__(self) -> None:
        # normalise sequences to tuples so configs from JSON compare equal and stay hashable
        object.__setattr__(self, "encoder_global_attn_indexes", tuple(self.encoder_global_attn_indexes))
        object.__setattr__(self, "pixel_mean", tuple(float(v) for v in self.pixel_mean))
        object.__setattr__(self, "pixel_std", tuple(float(v) for v in self.pixel_std))
        self.validate()
        object.__setattr__(self, "mlp_ratio", float(self.mlp_ratio))

    @property
    def embedding_size(self) -> int:
        """Side h = w of the image embedding grid (img_size / patch_size)."""
        return self.img_size // self.patch_size

    def validate(self) -> None:
        """Raise ValueError naming the first field with an invalid value."""
        positive = (
            "img_size", "patch_size", "encoder_embed_dim", "encoder_depth", "encoder_num_heads", "out_chans",
            "prompt_embed_dim", "mask_in_chans", "decoder_depth", "decoder_mlp_dim", "decoder_num_heads",
            "iou_head_depth", "iou_head_hidden_dim", "num_multimask_outputs",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SamConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.window_size, bool) or not isinstance(self.window_size, int) or self.window_size < 0:
            raise ValueError(f"SamConfig.window_size must be an int >= 0, got {self.window_size!r}")
        if not isinstance(self.mlp_ratio, int | float) or self.mlp_ratio <= 0:
            raise ValueError(f"SamConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if self.img_size % self.patch_size != 0:
            raise ValueError(
                f"SamConfig.img_size {self.img_size} must be a multiple of patch_size {self.patch_size}"
            )
        if self.encoder_embed_dim % self.encoder_num_heads != 0:
            raise ValueError(
                f"SamConfig.encoder_embed_dim {self.encoder_embed_dim} must be divisible by "
                f"encoder_num_heads {self.encoder_num_heads}"
            )
        for i in self.encoder_global_attn_indexes:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.encoder_depth:
                raise ValueError(
                    f"SamConfig.encoder_global_attn_indexes entry {i!r} is not a block index in "
                    f"[0, {self.encoder_depth})"
                )
        if self.out_chans != self.prompt_embed_dim:
            raise ValueError(
                f"SamConfig.out_chans {self.out_chans} must equal prompt_embed_dim {self.prompt_embed_dim} "
                "(the decoder consumes the image embeddings directly)"
            )
        if self.prompt_embed_dim % 8 != 0:
            raise ValueError(f"SamConfig.prompt_embed_dim must be a multiple of 8, got {self.prompt_embed_dim}")
        if (self.prompt_embed_dim // 2) % self.decoder_num_heads != 0:
            raise ValueError(
                f"SamConfig.decoder_num_heads {self.decoder_num_heads} must divide prompt_embed_dim / 2 "
                f"= {self.prompt_embed_dim // 2}"
            )
        if self.mask_in_chans % 4 != 0:
            raise ValueError(f"SamConfig.mask_in_chans must be a multiple of 4, got {self.mask_in_chans}")
        for name in ("pixel_mean", "pixel_std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ValueError(f"SamConfig.{name} must have 3 entries, got {value!r}")
        if any(v <= 0 for v in self.pixel_std):
            raise ValueError(f"SamConfig.pixel_std entries must be > 0, got {self.pixel_std!r}")
        if self.preprocess not in PREPROCESS_STYLES:
            raise ValueError(f"SamConfig.preprocess must be one of {PREPROCESS_STYLES}, got {self.preprocess!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"SamConfig.attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")

    def replace(self, **changes: Any) -> SamConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


_VIT_B = SamConfig()

# The official reference fixture's config (tests/fixtures/sam/tiny_config.json).
_TINY = SamConfig(
    img_size=256,
    patch_size=16,
    encoder_embed_dim=96,
    encoder_depth=4,
    encoder_num_heads=4,
    encoder_global_attn_indexes=(1, 3),
    window_size=4,
    mlp_ratio=4.0,
    out_chans=64,
    prompt_embed_dim=64,
    mask_in_chans=16,
    decoder_depth=2,
    decoder_mlp_dim=256,
    decoder_num_heads=4,
    iou_head_depth=3,
    iou_head_hidden_dim=64,
    num_multimask_outputs=3,
)

SAM_PRESETS: dict[str, SamConfig] = {
    "tiny": _TINY,
    # Our CPU default refiner: the tiny architecture, wider (128) with 8x8 attention windows.
    "default": _TINY.replace(encoder_embed_dim=128, window_size=8),
    "vit_b": _VIT_B,
    "vit_l": _VIT_B.replace(
        encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16, encoder_global_attn_indexes=(5, 11, 17, 23)
    ),
    "vit_h": _VIT_B.replace(
        encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16, encoder_global_attn_indexes=(7, 15, 23, 31)
    ),
    "medsam_vit_b": _VIT_B.replace(preprocess="medsam"),
}


def get_sam_config(name_or_config: str | SamConfig | Mapping[str, Any]) -> SamConfig:
    """Resolve a preset name, a SamConfig or a dict (``to_dict`` form) to a SamConfig.

    Raises:
        ValueError: unknown preset name (the known ones are listed) or invalid dict.
    """
    return resolve_preset(name_or_config, SAM_PRESETS, SamConfig, family="SAM", builder="get_sam_config")
