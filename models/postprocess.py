"""Validation-chosen rules on the automatic answer: the flip-averaged coarse pass and the largest component
(chosen by ``training.calibration``, served by ``inference.pipeline``)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

# 8-connectivity: pixels touching at a corner belong to one component.
_EIGHT = np.ones((3, 3), dtype=bool)


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a binary mask (ties: the first in raster order).

    Args:
        mask: (H, W) bool or {0, 1} integers.

    Returns:
        (H, W) of ``mask``'s dtype: 1 on the largest component, 0 elsewhere; an empty mask stays empty.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    foreground = mask > 0
    rows, cols = np.flatnonzero(foreground.any(axis=1)), np.flatnonzero(foreground.any(axis=0))
    if rows.size == 0:
        return mask.copy()
    # Labelled inside the foreground's bounding box only: the same components, numbered in the same raster order.
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    labels, count = ndimage.label(foreground[window], structure=_EIGHT)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())[1:]  # pixels per label 1..count
    out = np.zeros_like(mask)
    out[window] = labels == 1 + int(np.argmax(sizes))
    return out


def flip_average(logits: torch.Tensor, flipped_logits: torch.Tensor) -> torch.Tensor:
    """Mean of a map's logits and those of the left-right mirrored image, mirrored back.

    Args:
        logits: (B, 1, H, W) of the image.
        flipped_logits: (B, 1, H, W) of ``image.flip(-1)``.

    Returns:
        (B, 1, H, W) logits in the image's frame.
    """
    if logits.shape != flipped_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and flipped_logits {tuple(flipped_logits.shape)} differ")
    return (logits + flipped_logits.flip(-1)) / 2.0
