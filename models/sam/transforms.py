"""Frame transforms between an original image (H, W) and SAM's square S x S input frame."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def get_preprocess_shape(old_h: int, old_w: int, long_side_length: int) -> tuple[int, int]:
    """(h, w) of an (old_h, old_w) image after resizing its longest side to ``long_side_length`` (rounded)."""
    scale = long_side_length * 1.0 / max(old_h, old_w)
    new_h, new_w = old_h * scale, old_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def input_size_for(original_size: tuple[int, int], img_size: int, preprocess: str) -> tuple[int, int]:
    """(h, w) of the valid (unpadded) image region in the S x S input frame for an (H, W) original."""
    h, w = int(original_size[0]), int(original_size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"original_size must be positive, got {original_size!r}")
    if preprocess == "sam":
        return get_preprocess_shape(h, w, img_size)
    if preprocess == "medsam":
        return img_size, img_size
    raise ValueError(f"preprocess must be 'sam' or 'medsam', got {preprocess!r}")


def transform_coords(
    coords: torch.Tensor, original_size: tuple[int, int], img_size: int, preprocess: str = "sam"
) -> torch.Tensor:
    """Map xy pixel coordinates from the original image frame to the input frame.

    Args:
        coords: (..., 2) xy in pixels of the (H, W) original image, float.
        original_size: (H, W).
        img_size: S.
        preprocess: "sam" or "medsam".

    Returns:
        (..., 2) xy in pixels of the S x S input frame (a new tensor).
    """
    new_h, new_w = input_size_for(original_size, img_size, preprocess)
    old_h, old_w = original_size
    scale = torch.tensor([new_w / old_w, new_h / old_h], dtype=coords.dtype, device=coords.device)
    return coords * scale


def transform_boxes(
    boxes: torch.Tensor, original_size: tuple[int, int], img_size: int, preprocess: str = "sam"
) -> torch.Tensor:
    """Map (..., 4) xyxy boxes from original-image pixels to input-frame pixels (see :func:`transform_coords`)."""
    out = transform_coords(boxes.reshape(*boxes.shape[:-1], 2, 2), original_size, img_size, preprocess)
    return out.reshape(boxes.shape)


def resize_image(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W) images to ``size`` (h, w); antialiased when shrinking.

    Returns the input unchanged when it already has that size, so the common "already S x S" path is exact
    and exports without a Resize node.
    """
    h, w = images.shape[-2:]
    if (h, w) == tuple(size):
        return images
    shrinking = size[0] < h or size[1] < w
    return F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrinking)
