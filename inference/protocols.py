"""The seams of inference/: what a pipeline holds and what serving holds of a pipeline, as Protocols.

Torch modules and their ONNX stand-ins (``inference.generator_artifacts``) both satisfy them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

    from inference.embedding_cache import CacheStats
    from inference.pipeline import RefineResult, SegmentOptions, SegmentResult
    from models.pix2pix import Pix2PixConfig
    from models.reward import RewardConfig
    from models.selector import SelectorConfig
    from models.text2image import Text2ImageConfig

__all__ = ["BEST_OF_RANKERS", "Denoiser", "ImageScorer", "MaskToImage", "Segmenter", "TextEncoder"]

# What ranks a best-of-N request: the selector (log p(modality) + log p(real)), or the RLHF reward model (the
# predicted 1-5 rating) where the generators hold one.
BEST_OF_RANKERS = ("selector", "reward")


@runtime_checkable
class Segmenter(Protocol):
    """A segmentation pipeline as serving drives it (``inference.pipeline.SegmentationPipeline``)."""

    def segment(self, images: Sequence[np.ndarray], options: SegmentOptions | None = None, *,
                spacings: Sequence[Sequence[float] | None] | None = None) -> list[SegmentResult]:
        """``images``: each ``(H, W) float32 in [0, 1]``; one result per image."""
        ...

    def refine(self, image: np.ndarray, box: Sequence[float] | np.ndarray | None = None,
               points: Sequence[Sequence[float]] | np.ndarray | None = None,
               point_labels: Sequence[float] | np.ndarray | None = None, prior_mask: np.ndarray | None = None,
               image_key: str | None = None, *, threshold: float | None = None,
               spacing: Sequence[float] | None = None) -> RefineResult:
        """Prompts in the image's pixel frame: ``box`` (4,) xyxy, ``points`` (N, 2) xy, ``prior_mask`` (H, W)."""
        ...

    def model_info(self) -> dict[str, Any]:
        """At least ``version`` (the artifact manifest's)."""
        ...

    def cache_stats(self) -> CacheStats:
        ...

    @property
    def preferred_batch_sizes(self) -> tuple[int, ...]:
        """Batch sizes ``segment`` runs best, ascending; empty: any size."""
        ...


class TextEncoder(Protocol):
    """Prompts -> ``(hidden (B, T, D) float32, mask (B, T) bool)`` with ``T = max_tokens``, ``D = dim``."""

    dim: int
    max_tokens: int

    def count_tokens(self, prompt: str) -> int:
        ...

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ...


class Denoiser(Protocol):
    """``models.text2image.Text2ImageModel`` or ``OnnxDenoiser``: ``(noisy (B, *sample_shape), timesteps (B,),
    text_hidden (B, T, D), text_mask (B, T), modality_ids (B,)) -> prediction (B, *sample_shape)``."""

    config: Text2ImageConfig

    @property
    def null_modality(self) -> int:
        ...

    def modality_ids(self, modalities: list[str]) -> torch.Tensor:
        ...

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Model space ``(B, *config.sample_shape)`` -> images ``(B, 1, S, S)`` in [0, 1]."""
        ...

    def eval(self) -> Denoiser:
        ...

    def __call__(self, noisy: torch.Tensor, timesteps: torch.Tensor, text_hidden: torch.Tensor,
                 text_mask: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        ...


class MaskToImage(Protocol):
    """``models.pix2pix.Pix2PixGenerator`` or ``OnnxPix2Pix``: ``mask (B, 1, S, S) in {0, 1} -> image
    (B, 1, S, S) in [0, 1]`` at ``config.image_size``."""

    config: Pix2PixConfig

    def eval(self) -> MaskToImage:
        ...

    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        ...


class ImageScorer(Protocol):
    """``models.selector.Selector``, ``models.reward.RewardModel`` or their ``OnnxScorer``: ``score(images
    (B, 1, H, W) in [0, 1], modality_ids (B,)) -> (B,)`` (higher: a better image of that modality)."""

    config: SelectorConfig | RewardConfig

    def eval(self) -> ImageScorer:
        ...

    def score(self, images: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        ...
