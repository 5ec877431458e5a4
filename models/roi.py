"""Differentiable square region of interest: choose, crop (grid_sample), paste back, map coordinates.
(Details: docs/architecture.md, "models".)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_roi(roi: torch.Tensor, batch: int) -> None:
    if roi.dim() != 2 or roi.shape != (batch, 4):
        raise ValueError(f"roi must be ({batch}, 4) xyxy, got {tuple(roi.shape)}")


def roi_from_box(
    box: torch.Tensor,
    image_hw: tuple[int, int],
    expand_ratio: float = 0.2,
    min_fraction: float = 0.25,
) -> torch.Tensor:
    """Square ROI around a box.

    The box (pixel frame, inclusive pixel extent) covers continuous [x0, x1 + 1] x [y0, y1 + 1]. Its longer side is
    expanded by ``expand_ratio`` of itself on each side (side * (1 + 2 * expand_ratio), as upstream UltraRefiner),
    clamped to [min_fraction * L, L] with L = max(H, W), and the square is centred on the box. The centre is then
    shifted (clamped) so the square lies inside the image on every axis where it fits; on an axis shorter than the
    square (non-square images) it is centred on the image and the crop is zero-padded there. ``torch.clamp`` passes
    no gradient where it is active (e.g. a box larger than the image).

    Args:
        box: (B, 4) xyxy in the pixel frame of an (H, W) image.
        image_hw: (H, W).
        expand_ratio: context added on each side, as a fraction of the box side (>= 0).
        min_fraction: smallest ROI side as a fraction of max(H, W), in (0, 1].

    Returns:
        (B, 4) xyxy square ROI in the continuous frame.
    """
    h, w = image_hw
    if box.dim() != 2 or box.shape[1] != 4:
        raise ValueError(f"box must be (B, 4) xyxy, got {tuple(box.shape)}")
    if expand_ratio < 0:
        raise ValueError(f"expand_ratio must be >= 0, got {expand_ratio}")
    if not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    longest = float(max(h, w))
    x0, y0, x1, y1 = box.unbind(dim=1)
    cx, cy = (x0 + x1 + 1.0) / 2.0, (y0 + y1 + 1.0) / 2.0
    side = torch.maximum(x1 - x0, y1 - y0) + 1.0
    side = torch.clamp(side * (1.0 + 2.0 * expand_ratio), min=min_fraction * longest, max=longest)
    half = side / 2.0

    def _fit(c: torch.Tensor, extent: float) -> torch.Tensor:
        lo = torch.minimum(half, torch.full_like(half, extent / 2.0))
        hi = torch.maximum(extent - half, torch.full_like(half, extent / 2.0))
        return torch.minimum(torch.maximum(c, lo), hi)

    cx, cy = _fit(cx, float(w)), _fit(cy, float(h))
    return torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1)


def full_image_roi(batch: int, image_hw: tuple[int, int], *, dtype=torch.float32, device=None) -> torch.Tensor:
    """ROI covering the whole image: [0, 0, L, L], L = max(H, W) (anchored top-left, so a non-square image is
    zero-padded bottom/right, like SAM's resize-longest-side + pad).

    Returns:
        (B, 4) xyxy in the continuous frame.
    """
    side = float(max(image_hw))
    return torch.tensor([[0.0, 0.0, side, side]], dtype=dtype, device=device).repeat(batch, 1)


def _axis(start: torch.Tensor, length: torch.Tensor, n: int, extent: float) -> torch.Tensor:
    """Normalised grid_sample coordinates (B, n) of the n cell centres of [start, start + length] in [0, extent]."""
    t = (torch.arange(n, dtype=start.dtype, device=start.device) + 0.5) / n
    pos = start.unsqueeze(1) + t.unsqueeze(0) * length.unsqueeze(1)
    return 2.0 * pos / extent - 1.0


def crop_roi(images: torch.Tensor, roi: torch.Tensor, out_size: int) -> torch.Tensor:
    """Crop an ROI and resample it to a square (bilinear, zeros outside the image).

    Args:
        images: (B, C, H, W) float.
        roi: (B, 4) xyxy continuous frame.
        out_size: side S of the output.

    Returns:
        (B, C, S, S): output pixel (v, u) samples the image at continuous
        (x0 + (u + 0.5) * (x1 - x0) / S, y0 + (v + 0.5) * (y1 - y0) / S).
    """
    b, _, h, w = images.shape
    _check_roi(roi, b)
    roi = roi.to(images.dtype)
    gx = _axis(roi[:, 0], roi[:, 2] - roi[:, 0], out_size, float(w))  # (B, S)
    gy = _axis(roi[:, 1], roi[:, 3] - roi[:, 1], out_size, float(h))
    grid = torch.cat(
        [gx[:, None, :, None].expand(b, out_size, out_size, 1), gy[:, :, None, None].expand(b, out_size, out_size, 1)],
        dim=-1,
    )  # (B, S, S, 2) xy (cat of expanded views: the values of a stack, copied faster)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def paste_roi(mask: torch.Tensor, roi: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``crop_roi``: resample an ROI-frame map back into the image (zeros outside the ROI).

    Args:
        mask: (B, C, S, S) float, ROI frame (e.g. probabilities; pasting logits would put logit 0 outside).
        roi: (B, 4) xyxy continuous frame.
        out_hw: (H, W) of the image.

    Returns:
        (B, C, H, W); image pixel centre x + 0.5 reads ROI coordinate (x + 0.5 - x0) * S / (x1 - x0).
    """
    b, _, s, _ = mask.shape
    _check_roi(roi, b)
    h, w = out_hw
    roi = roi.to(mask.dtype)
    width = torch.clamp(roi[:, 2] - roi[:, 0], min=1e-6)
    height = torch.clamp(roi[:, 3] - roi[:, 1], min=1e-6)
    # image pixel centres expressed in [0, 1] ROI units, then in grid_sample's [-1, 1]
    xs = (torch.arange(w, dtype=mask.dtype, device=mask.device) + 0.5).unsqueeze(0)
    ys = (torch.arange(h, dtype=mask.dtype, device=mask.device) + 0.5).unsqueeze(0)
    gx = 2.0 * (xs - roi[:, :1]) / width.unsqueeze(1) - 1.0  # (B, W)
    gy = 2.0 * (ys - roi[:, 1:2]) / height.unsqueeze(1) - 1.0  # (B, H)
    grid = torch.cat([gx[:, None, :, None].expand(b, h, w, 1), gy[:, :, None, None].expand(b, h, w, 1)], dim=-1)
    return F.grid_sample(mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _as_points(coords: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if coords.dim() == 2 and coords.shape[1] == 4:
        return coords.view(-1, 2, 2), True
    if coords.dim() == 3 and coords.shape[2] == 2:
        return coords, False
    raise ValueError(f"coords must be (B, N, 2) points or (B, 4) boxes, got {tuple(coords.shape)}")


def to_roi_frame(coords: torch.Tensor, roi: torch.Tensor, out_size: int) -> torch.Tensor:
    """Map image pixel-frame coordinates into the pixel frame of the (S, S) ROI crop.

    ``x' = (x + 0.5 - x0) * S / (x1 - x0) - 0.5`` (pixel centres map to pixel centres), same for y.

    Args:
        coords: (B, N, 2) xy points or (B, 4) xyxy boxes, image pixel frame.
        roi: (B, 4) xyxy continuous frame.
        out_size: S.

    Returns:
        Same shape as ``coords``, ROI pixel frame (may lie outside [0, S) for points outside the ROI).
    """
    points, is_box = _as_points(coords)
    _check_roi(roi, points.shape[0])
    origin = roi[:, None, :2]
    scale = out_size / torch.clamp(roi[:, None, 2:] - origin, min=1e-6)
    out = (points + 0.5 - origin) * scale - 0.5
    return out.reshape(coords.shape) if is_box else out


def from_roi_frame(coords: torch.Tensor, roi: torch.Tensor, out_size: int) -> torch.Tensor:
    """Inverse of ``to_roi_frame``: ROI pixel frame -> image pixel frame; same shapes."""
    points, is_box = _as_points(coords)
    _check_roi(roi, points.shape[0])
    origin = roi[:, None, :2]
    scale = (roi[:, None, 2:] - origin) / out_size
    out = (points + 0.5) * scale + origin - 0.5
    return out.reshape(coords.shape) if is_box else out
