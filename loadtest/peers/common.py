"""What every peer server shares: the pipeline built from an artifact directory, and uint8 masks out of it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["load_pipeline", "model_side", "segment_masks", "to_unit"]

# 8-bit gray level -> [0, 1] exactly as core.imageio decodes an 8-bit upload (float64 division, then float32).
_UINT8_TO_UNIT = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)


def load_pipeline(art_dir: str | Path, *, threads: int):
    """``SegmentationPipeline`` on ONNX Runtime over ``art_dir`` with ``threads`` intra-op (and torch) threads."""
    import torch

    from inference.pipeline import SegmentationPipeline

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)  # the glue between graphs runs in torch, as in our service
    return SegmentationPipeline.from_artifacts(art_dir, backend="onnxruntime", intra_op_threads=threads)


def to_unit(image: np.ndarray) -> np.ndarray:
    """``(H, W) uint8`` -> ``(H, W) float32 in [0, 1]`` (what our REST decoder gives for an 8-bit PNG)."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"image must be (H, W) uint8, got {image.dtype} {image.shape}")
    return _UINT8_TO_UNIT[image]


def segment_masks(pipeline, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Masks of ``images`` (each ``(H, W) float32 in [0, 1]``), one pipeline call: each ``(H, W) uint8 {0, 1}``."""
    from inference.pipeline import SegmentOptions

    results = pipeline.segment(list(images), SegmentOptions(outputs=("mask",)))
    return [np.asarray(r.mask, dtype=np.uint8) for r in results]



def model_side(art_dir: str | Path) -> int:
    """The side ``S`` a fixed-shape peer resizes uploads to: the refiner's input (``refiner_size`` in the manifest)."""
    from inference.artifacts import load_artifacts

    return int(load_artifacts(art_dir, verify=False).pipeline.refiner_size)
