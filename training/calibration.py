"""Validation choices behind an answer's ``lesion_found`` and ``needs_review``, stored in run.json.

``no_finding``: a final mask smaller than ``min_area_fraction`` of the image is answered as "no lesion"
(emptied); the fraction maximises validation Dice over lesion and normal cases alike.
``review``: ``needs_review = predicted IoU < iou_threshold``; the threshold maximises Youden's J
(sensitivity + specificity - 1) for catching validation cases with Dice < ``REVIEW_DICE``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

REVIEW_DICE = 0.7  # a case "needs review" when its Dice with the truth is below this
# Dice 0.7 <=> IoU 0.7 / 1.3: the threshold of a calibrated IoU head, used when validation has too few bad cases.
CALIBRATED_IOU_THRESHOLD = REVIEW_DICE / (2 - REVIEW_DICE)
MIN_AREA_FRACTIONS = (0.0, 0.0005, 0.001, 0.002, 0.004, 0.008)
MIN_CASES = 2  # bad and good validation cases each needed to fit the review threshold


def case_dice(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-case Dice (N,) of binary (N, 1, H, W) masks; 1 when both are empty."""
    p, g = pred.flatten(1).float(), (gt > 0.5).flatten(1).float()
    inter, denom = (p * g).sum(1), p.sum(1) + g.sum(1)
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1e-9), torch.ones_like(denom))


def apply_min_area(masks: torch.Tensor, fraction: float) -> torch.Tensor:
    """Binary masks (N, 1, H, W) with those under ``fraction`` of the image area emptied."""
    area = masks.flatten(1).float().sum(1)
    keep = area >= fraction * masks.shape[-1] * masks.shape[-2]
    return masks * keep.view(-1, 1, 1, 1).to(masks.dtype)


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``score`` (higher = more likely positive); None without both classes.
    Ties count one half (the Mann-Whitney statistic)."""
    pos, neg = score[positive], score[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def choose_review_threshold(pred_iou: np.ndarray, dice: np.ndarray) -> dict[str, Any]:
    """The predicted-IoU threshold below which a case is flagged, from validation cases.

    Args:
        pred_iou: (N,) the IoU head's predictions.
        dice: (N,) the actual Dice of each final mask.

    Returns:
        ``{"iou_threshold", "method", "dice_below", "val": {sensitivity, specificity, auroc, n_bad, n}}``.
    """
    bad = dice < REVIEW_DICE
    n_bad, n_good = int(bad.sum()), int((~bad).sum())
    if n_bad >= MIN_CASES and n_good >= MIN_CASES:
        candidates = np.unique(np.concatenate([pred_iou, [CALIBRATED_IOU_THRESHOLD]]))
        best_j, threshold = -2.0, CALIBRATED_IOU_THRESHOLD
        for t in candidates + 1e-6:  # flag pred_iou < t, so t just above each candidate
            flagged = pred_iou < t
            j = flagged[bad].mean() + (~flagged[~bad]).mean() - 1
            if j > best_j + 1e-12:
                best_j, threshold = float(j), float(t)
        method = "youden_j"
    else:
        threshold, method = CALIBRATED_IOU_THRESHOLD, "calibrated_iou_for_dice_0.7"
    flagged = pred_iou < threshold
    return {
        "iou_threshold": round(threshold, 6), "method": method, "dice_below": REVIEW_DICE,
        "val": {
            "n": int(len(dice)), "n_bad": n_bad,
            "sensitivity": float(flagged[bad].mean()) if n_bad else None,
            "specificity": float((~flagged[~bad]).mean()) if n_good else None,
            "auroc": roc_auc(-pred_iou, bad),
        },
    }


def calibrate_answers(probs: dict[str, torch.Tensor], masks: torch.Tensor, threshold: float) -> dict[str, Any]:
    """Choose ``no_finding`` and ``review`` on validation (module docstring).

    Args:
        probs: ``"refined"`` (N, 1, H, W) final probabilities and ``"iou"`` (N, 1) predicted IoU.
        masks: (N, 1, H, W) ground truth {0, 1} (empty for normal cases).
        threshold: the final mask's probability threshold.

    Returns:
        ``{"no_finding": {...}, "review": {...}}`` for run.json.
    """
    binary = (probs["refined"] > threshold).float()
    scores = {f: float(case_dice(apply_min_area(binary, f), masks).mean()) for f in MIN_AREA_FRACTIONS}
    best = max(scores.values())
    fraction = min(f for f, v in scores.items() if v >= best - 1e-9)
    final = apply_min_area(binary, fraction)
    normal = masks.flatten(1).amax(1) <= 0.5
    found = final.flatten(1).amax(1) > 0
    no_finding = {
        "min_area_fraction": fraction,
        "val_dice": {f"{f:g}": round(v, 6) for f, v in scores.items()},
        "val_normal_cases": int(normal.sum()),
        "val_normal_false_positive_rate": float(found[normal].float().mean()) if normal.any() else None,
    }
    dice = case_dice(final, masks).numpy()
    review = choose_review_threshold(probs["iou"][:, 0].numpy().astype(np.float64), dice)
    return {"no_finding": no_finding, "review": review}
