"""User-like prompts for training the refiner in ``/refine``'s framing (MedSAM-style), and SAM's IoU loss."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from models.interactive import decode_tokens, pack_tokens
from models.prompts import mask_prompt
from models.roi import crop_roi, full_image_roi, to_roi_frame
from models.ultrarefiner import UltraRefiner, paste_refiner_logits

# Prompt kinds and their sampling weights: what users do in the UI and through /refine.
# (Half box-alone, with 18 refiner epochs and no phase 3, was measured and not kept: README, Training.)
PROMPT_KINDS: dict[str, float] = {
    "box": 0.3,  # a box alone
    "box+prior": 0.2,  # a box over the automatic mask
    "point": 0.2,  # one foreground click
    "points": 0.15,  # 1-3 foreground and 0-2 background clicks
    "prior+error": 0.15,  # the automatic mask plus 1-2 clicks in its error regions
}
BOX_JITTER = 0.1  # each box edge moves by U(-j, j) * the box side (MedSAM: up to 20 px at 1024)


@dataclass
class PromptBatch:
    """Prompts for B images in the image pixel frame (the refiner frame when H = W = S).

    Attributes:
        points: (B, P, 2) xy, padded with label -1 where a sample has fewer points.
        labels: (B, P) 1 foreground, 0 background, -1 padding.
        box: (B, 4) xyxy; rows of samples without a box are ignored (``has_box`` 0).
        has_box: (B,) bool.
        prior: (B, 1, H, W) in [0, 1]; ``has_prior`` 0 rows are unused.
        has_prior: (B,) float 0 / 1.
        kinds: the prompt kind of each sample.
    """

    points: torch.Tensor
    labels: torch.Tensor
    box: torch.Tensor
    has_box: torch.Tensor
    prior: torch.Tensor
    has_prior: torch.Tensor
    kinds: list[str]


def jittered_box(mask: np.ndarray, rng: np.random.Generator, jitter: float = BOX_JITTER) -> np.ndarray:
    """(4,) xyxy box of a non-empty (H, W) mask with each edge moved by U(-jitter, jitter) * side, clipped to
    the image and kept non-empty (pixel frame: x1 = the last column inside)."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = float(xs.min()), float(xs.max()), float(ys.min()), float(ys.max())
    sw, sh = x1 - x0 + 1.0, y1 - y0 + 1.0
    d = rng.uniform(-jitter, jitter, 4) * np.array([sw, sh, sw, sh])
    x0, y0, x1, y1 = x0 + d[0], y0 + d[1], x1 + d[2], y1 + d[3]
    x0, x1 = np.clip([x0, x1], 0.0, w - 1.0)
    y0, y1 = np.clip([y0, y1], 0.0, h - 1.0)
    return np.array([min(x0, x1 - 1.0), min(y0, y1 - 1.0), max(x1, x0 + 1.0), max(y1, y0 + 1.0)], dtype=np.float32)


def _pick(region: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """xy of a uniformly drawn pixel of a boolean (H, W) region, or None if it is empty."""
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        return None
    i = int(rng.integers(len(ys)))
    return np.array([xs[i], ys[i]], dtype=np.float32)


def _inside(mask: np.ndarray) -> np.ndarray:
    """Where a user clicks "on the lesion": the mask eroded by 2 px (the mask itself if that empties it)."""
    inner = ndimage.binary_erosion(mask, iterations=2)
    return inner if inner.any() else mask


def _near_outside(mask: np.ndarray) -> np.ndarray:
    """Background a user would click to stop a leak: outside the mask, within 3 lesion radii of it."""
    radius = max(2, int(np.sqrt(mask.sum() / np.pi)))
    return ndimage.binary_dilation(mask, iterations=radius * 2) & ~mask


def sample_prompts(
    masks: np.ndarray, priors: np.ndarray, rng: np.random.Generator, jitter: float = BOX_JITTER
) -> PromptBatch:
    """User-like prompts for ground-truth masks.

    Args:
        masks: (B, H, W) bool, every one non-empty.
        priors: (B, H, W) float in [0, 1]: a coarse prediction per case (the "automatic mask").
        rng: the sampling generator.
        jitter: box edge jitter as a fraction of the side.

    Returns:
        ``PromptBatch`` (points padded to the batch's largest count with label -1).
    """
    kinds = list(PROMPT_KINDS)
    weights = np.array([PROMPT_KINDS[k] for k in kinds])
    b, h, w = masks.shape
    rows: list[tuple[list[np.ndarray], list[float]]] = []
    boxes = np.zeros((b, 4), dtype=np.float32)
    has_box = np.zeros(b, dtype=bool)
    has_prior = np.zeros(b, dtype=np.float32)
    chosen: list[str] = []
    for i in range(b):
        mask = masks[i]
        kind = str(rng.choice(kinds, p=weights / weights.sum()))
        pts: list[np.ndarray] = []
        labels: list[float] = []
        if kind in ("box", "box+prior"):
            boxes[i], has_box[i] = jittered_box(mask, rng, jitter), True
        if kind in ("box+prior", "prior+error"):
            has_prior[i] = 1.0
        if kind == "point":
            pts, labels = [_pick(_inside(mask), rng)], [1.0]
        elif kind == "points":
            for _ in range(int(rng.integers(1, 4))):
                pts.append(_pick(_inside(mask), rng))
                labels.append(1.0)
            for _ in range(int(rng.integers(0, 3))):
                p = _pick(_near_outside(mask), rng)
                if p is not None:
                    pts.append(p)
                    labels.append(0.0)
        elif kind == "prior+error":
            prior = priors[i] > 0.5
            for _ in range(int(rng.integers(1, 3))):
                missed, leaked = mask & ~prior, prior & ~mask
                positive = missed.sum() >= leaked.sum()
                p = _pick(missed if positive else leaked, rng)
                if p is None:  # the prior is exact: a confirming click inside
                    p, positive = _pick(_inside(mask), rng), True
                pts.append(p)
                labels.append(1.0 if positive else 0.0)
        chosen.append(kind)
        rows.append((pts, labels))
    n = max(1, max(len(p) for p, _ in rows))
    points = np.zeros((b, n, 2), dtype=np.float32)
    codes = -np.ones((b, n), dtype=np.float32)
    for i, (pts, labels) in enumerate(rows):
        if pts:
            points[i, : len(pts)] = np.stack(pts)
            codes[i, : len(pts)] = labels
    # Half the priors binarised: /refine gets soft probabilities and binary masks alike.
    prior_t = torch.from_numpy(priors.astype(np.float32))[:, None]
    binary = torch.from_numpy(rng.random(b) < 0.5)
    prior_t[binary] = (prior_t[binary] > 0.5).float()
    return PromptBatch(
        points=torch.from_numpy(points), labels=torch.from_numpy(codes), box=torch.from_numpy(boxes),
        has_box=torch.from_numpy(has_box), prior=prior_t, has_prior=torch.from_numpy(has_prior), kinds=chosen,
    )


def mask_iou(prob: torch.Tensor, gt: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """IoU (B,) of ``prob > threshold`` with {0, 1} ``gt`` (B, 1, H, W); 1 when both are empty. No gradient."""
    p = (prob.detach() > threshold).float().flatten(1)
    g = (gt > 0.5).float().flatten(1)
    inter, union = (p * g).sum(1), ((p + g) > 0).float().sum(1)
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


def iou_loss(pred_iou: torch.Tensor, prob: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """SAM's IoU-head loss: MSE between the predicted IoU (B, 1) and the actual IoU of the predicted mask."""
    return torch.mean((pred_iou[:, 0] - mask_iou(prob, gt)) ** 2)


def interactive_forward(
    model: UltraRefiner, image: torch.Tensor, prompts: PromptBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """The refiner on the whole image with user prompts, as ``/refine`` serves it.

    Args:
        model: the UltraRefiner (its refiner is used).
        image: (B, 1, H, W) in [0, 1].
        prompts: ``PromptBatch`` in the image pixel frame, on ``image``'s device.

    Returns:
        probability (B, 1, H, W) in [0, 1] and predicted IoU (B, 1).
    """
    b, _, h, w = image.shape
    s, m = model.refiner_size, model.mask_prompt_size
    roi = full_image_roi(b, (h, w), dtype=image.dtype, device=image.device)
    crop = crop_roi(image, roi, s)
    embeddings = model.refiner.encode(model.refiner.preprocess(crop.expand(-1, 3, -1, -1) * 255.0))
    points = to_roi_frame(prompts.points, roi, s)
    box = to_roi_frame(prompts.box, roi, s)
    # Samples without a box get their corners as padding tokens (label -1: position ignored).
    corner_labels = torch.where(prompts.has_box[:, None], torch.tensor([2.0, 3.0], device=image.device),
                                torch.tensor([-1.0, -1.0], device=image.device))
    coords, labels = pack_tokens(
        torch.cat([points, box.reshape(b, 2, 2)], dim=1), torch.cat([prompts.labels, corner_labels], dim=1), None,
        batch=b,
    )
    mask_input = mask_prompt(crop_roi(prompts.prior, roi, m), None, "direct")
    low, iou = decode_tokens(model.refiner, embeddings, coords, labels, mask_input, prompts.has_prior)
    return paste_refiner_logits(low, roi, (h, w), s), iou
