"""Segment Anything (SAM / MedSAM) re-implemented with official parameter names, see :func:`build_sam`."""

from .build import build_sam, sam_model_registry
from .common import LayerNorm2d, MLPBlock
from .config import SAM_PRESETS, SamConfig, get_sam_config
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PositionEmbeddingRandom, PromptEncoder
from .sam import Sam
from .transformer import TwoWayTransformer
from .transforms import get_preprocess_shape, input_size_for, transform_boxes, transform_coords

__all__ = [
    "SAM_PRESETS",
    "ImageEncoderViT",
    "LayerNorm2d",
    "MLPBlock",
    "MaskDecoder",
    "PositionEmbeddingRandom",
    "PromptEncoder",
    "Sam",
    "SamConfig",
    "TwoWayTransformer",
    "build_sam",
    "get_preprocess_shape",
    "get_sam_config",
    "input_size_for",
    "sam_model_registry",
    "transform_boxes",
    "transform_coords",
]
