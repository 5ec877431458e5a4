"""Builders for SAM models: one private builder holding the wiring, public entry points per preset, and a
plain registry ``sam_model_registry`` (name -> zero-argument builder)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from .config import SAM_PRESETS, SamConfig, get_sam_config
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .transformer import TwoWayTransformer


def _build_sam(config: SamConfig) -> Sam:
    grid = config.embedding_size
    image_encoder = ImageEncoderViT(
        img_size=config.img_size,
        patch_size=config.patch_size,
        embed_dim=config.encoder_embed_dim,
        depth=config.encoder_depth,
        num_heads=config.encoder_num_heads,
        mlp_ratio=config.mlp_ratio,
        out_chans=config.out_chans,
        qkv_bias=True,
        use_rel_pos=True,
        rel_pos_zero_init=True,
        window_size=config.window_size,
        global_attn_indexes=config.encoder_global_attn_indexes,
        attn_impl=config.attn_impl,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=config.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(config.img_size, config.img_size),
        mask_in_chans=config.mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=config.prompt_embed_dim,
        transformer=TwoWayTransformer(
            depth=config.decoder_depth,
            embedding_dim=config.prompt_embed_dim,
            num_heads=config.decoder_num_heads,
            mlp_dim=config.decoder_mlp_dim,
        ),
        num_multimask_outputs=config.num_multimask_outputs,
        iou_head_depth=config.iou_head_depth,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )
    return Sam(image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder, config=config)


def build_sam(name_or_config: str | SamConfig | Mapping[str, Any], *, attn_impl: str | None = None) -> Sam:
    """Build an (untrained, official-initialised) SAM.

    Args:
        name_or_config: preset name ("tiny", "default", "vit_b", "vit_l", "vit_h", "medsam_vit_b"), a SamConfig,
            or a ``SamConfig.to_dict()`` dict.
        attn_impl: override the config's image-encoder attention ("reference" | "sdpa").

    Returns:
        Sam whose state dict has the official parameter names and shapes for its sizes.

    Raises:
        ValueError: unknown preset or invalid config field.
    """
    config = get_sam_config(name_or_config)
    if attn_impl is not None:
        config = config.replace(attn_impl=attn_impl)
    return _build_sam(config)


sam_model_registry: dict[str, Callable[[], Sam]] = {name: partial(build_sam, name) for name in SAM_PRESETS}
