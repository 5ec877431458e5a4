"""Differentiable SAM prompts (points, box, mask prompt) from a soft mask (the construction:
docs/architecture.md, "models").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MASK_PROMPT_STYLES = ("direct", "gaussian")
NEGATIVE_POINT_STYLES = ("corner", "centroid")
MASK_LOGIT_SCALE = 10.0  # (2P - 1) * 10 maps [0, 1] to [-10, 10] logits


@dataclass
class PromptSet:
    """One prompt set per image, in one frame (named by whoever returns it).

    Attributes:
        points: (B, 2, 2) float32 xy: [positive point, negative point].
        point_labels: (B, 2) float32 SAM codes = [1, 0].
        box: (B, 4) float32 xyxy.
        mask_logits: (B, 1, h, w) float32 mask prompt logits in [-10, 10].
    """

    points: torch.Tensor
    point_labels: torch.Tensor
    box: torch.Tensor
    mask_logits: torch.Tensor


def _check_prob(prob: torch.Tensor) -> None:
    if prob.dim() != 4 or prob.shape[1] != 1:
        raise ValueError(f"prob must be (B, 1, H, W), got {tuple(prob.shape)}")


def _grids(prob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-frame coordinates: xs (1, 1, 1, W), ys (1, 1, H, 1) in the dtype/device of ``prob``."""
    h, w = prob.shape[-2:]
    xs = torch.arange(w, dtype=prob.dtype, device=prob.device).view(1, 1, 1, w)
    ys = torch.arange(h, dtype=prob.dtype, device=prob.device).view(1, 1, h, 1)
    return xs, ys


def _weighted_mean(
    weights: torch.Tensor, fallback: torch.Tensor, prior_mass: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted centroid with a prior of ``prior_mass`` at ``fallback``.

    Args:
        weights: (B, 1, H, W) non-negative.
        fallback: (B, 2) xy pixel frame.

    Returns:
        centroid (B, 2) xy and total mass (B,).
    """
    xs, ys = _grids(weights)
    mass = weights.sum(dim=(1, 2, 3))
    sx = (weights * xs).sum(dim=(1, 2, 3))
    sy = (weights * ys).sum(dim=(1, 2, 3))
    denom = mass + prior_mass
    centroid = torch.stack([sx, sy], dim=1) + prior_mass * fallback
    return centroid / denom.unsqueeze(1), mass


def image_centre(prob: torch.Tensor) -> torch.Tensor:
    """(B, 2) xy of the centre of an (B, 1, H, W) map in the pixel frame: ((W-1)/2, (H-1)/2)."""
    h, w = prob.shape[-2:]
    centre = torch.tensor([(w - 1) / 2.0, (h - 1) / 2.0], dtype=prob.dtype, device=prob.device)
    return centre.expand(prob.shape[0], 2)


def positive_point(prob: torch.Tensor, prior_mass: float = 0.1) -> torch.Tensor:
    """Soft-argmax: the probability-weighted centroid of the mask.

    Args:
        prob: (B, 1, H, W) float in [0, 1].
        prior_mass: pixels of prior mass at the image centre (the empty-mask fallback).

    Returns:
        (B, 2) xy in the pixel frame of ``prob``.
    """
    _check_prob(prob)
    return _weighted_mean(prob, image_centre(prob), prior_mass)[0]


def soft_box(
    prob: torch.Tensor,
    std_scale: float = 2.5,
    prior_mass: float = 0.1,
    *,
    centroid: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Box = weighted mean +- ``std_scale`` weighted std per axis, clamped into the image.

    The fallback (prior) is the whole image: centre ((W-1)/2, (H-1)/2) with a std of half the side / std_scale,
    so an empty mask gives [0, 0, W-1, H-1].

    Args:
        prob: (B, 1, H, W) float in [0, 1].
        std_scale: half-width of the box in standard deviations.
        prior_mass: pixels of prior mass.
        centroid: (``positive_point(prob, prior_mass)``, sum(P) (B,)) when the caller has them (``point_and_box``).

    Returns:
        (B, 4) xyxy in the pixel frame, 0 <= x0 <= x1 <= W-1, 0 <= y0 <= y1 <= H-1.
    """
    _check_prob(prob)
    h, w = prob.shape[-2:]
    xs, ys = _grids(prob)
    mean, mass = centroid if centroid is not None else _weighted_mean(prob, image_centre(prob), prior_mass)
    mx, my = mean[:, 0].view(-1, 1, 1, 1), mean[:, 1].view(-1, 1, 1, 1)
    denom = mass + prior_mass
    prior_var_x = ((w - 1) / 2.0 / std_scale) ** 2
    prior_var_y = ((h - 1) / 2.0 / std_scale) ** 2
    var_x = ((prob * (xs - mx) ** 2).sum(dim=(1, 2, 3)) + prior_mass * prior_var_x) / denom
    var_y = ((prob * (ys - my) ** 2).sum(dim=(1, 2, 3)) + prior_mass * prior_var_y) / denom
    half_x = std_scale * torch.sqrt(var_x + 1e-12)
    half_y = std_scale * torch.sqrt(var_y + 1e-12)
    cx, cy = mean[:, 0], mean[:, 1]
    box = torch.stack([cx - half_x, cy - half_y, cx + half_x, cy + half_y], dim=1)
    upper = torch.tensor([w - 1, h - 1, w - 1, h - 1], dtype=prob.dtype, device=prob.device)
    return torch.minimum(torch.clamp(box, min=0.0), upper)


def soft_box_mask(box: torch.Tensor, hw: tuple[int, int], temperature: float) -> torch.Tensor:
    """Sigmoid-edged indicator of a box.

    Args:
        box: (B, 4) xyxy in the pixel frame of an (H, W) map.
        hw: (H, W).
        temperature: edge width in pixels (> 0); 0.5 at the edge, ~0.73 one temperature inside.

    Returns:
        (B, 1, H, W) in (0, 1).
    """
    h, w = hw
    xs = torch.arange(w, dtype=box.dtype, device=box.device).view(1, 1, 1, w)
    ys = torch.arange(h, dtype=box.dtype, device=box.device).view(1, 1, h, 1)
    x0, y0, x1, y1 = (box[:, i].view(-1, 1, 1, 1) for i in range(4))
    inside_x = torch.sigmoid((xs - x0) / temperature) * torch.sigmoid((x1 - xs) / temperature)
    inside_y = torch.sigmoid((ys - y0) / temperature) * torch.sigmoid((y1 - ys) / temperature)
    return inside_x * inside_y


def negative_point(
    prob: torch.Tensor,
    box: torch.Tensor,
    pos_point: torch.Tensor,
    style: str = "corner",
    box_temperature: float = 0.01,
    prior_mass: float = 0.1,
    *,
    fg_mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Background point.

    Styles:
        ``"corner"``: the corner of ``box`` farthest from ``pos_point`` (the choice of corner is hard, its
            coordinates are differentiable through the box). The box spans +-2.5 std, so its corners lie outside
            compact masks. (The later upstream UltraRefiner choice.)
        ``"centroid"``: centroid of (1 - P) inside the soft box mask (edge width ``box_temperature * max(H, W)``
            pixels), with a prior of ``prior_mass`` at the top-left box corner (a box full of foreground).
            Note: for a mask symmetric about its centroid this point coincides with the positive point.

    Both are blended towards the box's top-left corner by the foreground mass, weight
    ``prior_mass / (sum(P) + prior_mass)``, so an empty mask gives exactly that corner, (0, 0).

    Args:
        prob: (B, 1, H, W) float in [0, 1].
        box: (B, 4) xyxy pixel frame (``soft_box``).
        pos_point: (B, 2) xy pixel frame (``positive_point``).
        style: ``"corner"`` or ``"centroid"``.
        box_temperature: soft-box edge width as a fraction of max(H, W) (``"centroid"`` only).
        prior_mass: pixels of prior mass (``"centroid"`` only).
        fg_mass: sum(P) (B,) when the caller has it.

    Returns:
        (B, 2) xy in the pixel frame.
    """
    _check_prob(prob)
    corner = box[:, :2]  # top-left: the fallback
    if style == "corner":
        x0, y0, x1, y1 = box.unbind(dim=1)
        corners = torch.stack(
            [torch.stack(c, dim=1) for c in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))], dim=1
        )  # (B, 4, 2)
        far = (corners - pos_point.unsqueeze(1)).square().sum(dim=2).argmax(dim=1)  # (B,)
        point = torch.gather(corners, 1, far.view(-1, 1, 1).expand(-1, 1, 2)).squeeze(1)
    elif style == "centroid":
        h, w = prob.shape[-2:]
        inverse = (1.0 - prob) * soft_box_mask(box, (h, w), max(box_temperature * max(h, w), 1e-3))
        point, _ = _weighted_mean(inverse, corner, prior_mass)
    else:
        raise ValueError(f"negative point style must be one of {NEGATIVE_POINT_STYLES}, got {style!r}")
    fg_mass = prob.sum(dim=(1, 2, 3)) if fg_mass is None else fg_mass
    fg_weight = (fg_mass / (fg_mass + prior_mass)).unsqueeze(1)
    return fg_weight * point + (1.0 - fg_weight) * corner


def point_and_box(
    prob: torch.Tensor, std_scale: float = 2.5, prior_mass: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``positive_point``, ``soft_box`` and sum(P) from one weighted mean (the values of the separate calls).

    For inference: with autograd recording, the shared mean would sum the two branches' gradients in another
    order than separate calls do, so training calls them separately.

    Returns:
        positive point (B, 2) xy, box (B, 4) xyxy (pixel frame), foreground mass (B,).
    """
    _check_prob(prob)
    point, mass = _weighted_mean(prob, image_centre(prob), prior_mass)
    return point, soft_box(prob, std_scale, prior_mass, centroid=(point, mass)), mass


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with replicate padding (differentiable).

    Args:
        x: (B, C, H, W).
        sigma: standard deviation in pixels (> 0); the kernel has 2*ceil(3*sigma)+1 taps.

    Returns:
        (B, C, H, W).
    """
    radius = max(1, math.ceil(3.0 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(taps**2) / (2.0 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    kx = kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kx, groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), ky, groups=c)


def mask_prompt(
    prob: torch.Tensor,
    size: tuple[int, int] | None = None,
    style: str = "direct",
    gaussian_sigma: float = 2.0,
) -> torch.Tensor:
    """SAM mask prompt: (2P - 1) * 10 logits, optionally Gaussian-blurred first, resized bilinearly.

    Args:
        prob: (B, 1, H, W) float in [0, 1].
        size: output (h, w); SAM wants (4 * embedding side) = img_size / 4. ``None`` keeps (H, W).
        style: ``"direct"`` (no blur; for a refiner fine-tuned on such prompts) or ``"gaussian"``
            (blur with ``gaussian_sigma`` pixels of ``prob`` first; for an un-fine-tuned SAM).
        gaussian_sigma: blur std in pixels of ``prob``.

    Returns:
        (B, 1, h, w) logits in [-10, 10].
    """
    _check_prob(prob)
    if style == "gaussian":
        prob = gaussian_blur(prob, gaussian_sigma)
    elif style != "direct":
        raise ValueError(f"mask prompt style must be one of {MASK_PROMPT_STYLES}, got {style!r}")
    logits = (2.0 * prob - 1.0) * MASK_LOGIT_SCALE
    if size is not None and tuple(size) != tuple(prob.shape[-2:]):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits


def extract_prompts(
    prob: torch.Tensor,
    *,
    mask_size: tuple[int, int] | None = None,
    mask_style: str = "direct",
    gaussian_sigma: float = 2.0,
    negative_style: str = "corner",
    std_scale: float = 2.5,
    box_temperature: float = 0.01,
    prior_mass: float = 0.1,
) -> PromptSet:
    """All prompts from one soft mask, in its pixel frame.

    Args:
        prob: (B, 1, H, W) float in [0, 1].
        mask_size: size (h, w) of the mask prompt; ``None`` keeps (H, W).
        mask_style, gaussian_sigma: see ``mask_prompt``.
        negative_style, box_temperature: see ``negative_point``.
        std_scale: see ``soft_box``.
        prior_mass: pixels of prior mass at the fallbacks (see module docstring).

    Returns:
        ``PromptSet``: points (B, 2, 2) [positive, negative] xy, point_labels (B, 2) = [1, 0],
        box (B, 4) xyxy, mask_logits (B, 1, h, w) — all in the pixel frame of ``prob``.
    """
    _check_prob(prob)
    pos = positive_point(prob, prior_mass)
    box = soft_box(prob, std_scale, prior_mass)
    neg = negative_point(prob, box, pos, negative_style, box_temperature, prior_mass)
    labels = torch.tensor([[1.0, 0.0]], dtype=prob.dtype, device=prob.device).repeat(prob.shape[0], 1)
    return PromptSet(
        points=torch.stack([pos, neg], dim=1),
        point_labels=labels,
        box=box,
        mask_logits=mask_prompt(prob, mask_size, mask_style, gaussian_sigma),
    )
