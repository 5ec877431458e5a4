"""Segmentation metrics on binary ``(H, W)`` masks: Dice, IoU, precision, recall and HD95, per case and
accumulated (definitions and empty-mask rules: docs/architecture.md, "core").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

METRIC_NAMES = ("dice", "iou", "precision", "recall", "hd95")
DEFAULT_THRESHOLDS = np.linspace(0.05, 0.95, 19)


def _as_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # torch.Tensor, without importing torch
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _binary(mask: Any, label: str) -> np.ndarray:
    array = _as_numpy(mask)
    if array.dtype == np.bool_:
        return array
    if np.any((array != 0) & (array != 1)):
        raise ValueError(
            f"{label} must be binary (bool or values in {{0, 1}}); threshold probabilities first"
        )
    return array.astype(bool)


def _pair(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    p, g = _binary(pred, "pred"), _binary(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred shape {p.shape} differs from gt shape {g.shape}")
    if p.ndim != 2:
        raise ValueError(f"masks must be (H, W), got shape {p.shape}")
    return p, g


def _counts(p: np.ndarray, g: np.ndarray) -> tuple[int, int, int]:
    tp = int(np.count_nonzero(p & g))
    return tp, int(np.count_nonzero(p)), int(np.count_nonzero(g))


def dice(pred: Any, gt: Any) -> float:
    """Dice ``2 TP / (|P| + |G|)`` of binary ``(H, W)`` masks; 1 if both empty, 0 if one is.

    The project's one Dice: :func:`dice_per_case` is the same over a batch; ``core.losses.soft_dice_loss``
    is its differentiable relaxation (a loss, on probabilities).
    """
    tp, n_p, n_g = _counts(*_pair(pred, gt))
    return float(_dice_from_counts(np.float64(tp), np.float64(n_p + n_g)))


def dice_per_case(pred: Any, gt: Any) -> np.ndarray:
    """:func:`dice` of each case of binary masks ``(N, ...)`` (numpy or torch): ``(N,) float64``."""
    p, g = _binary(pred, "pred"), _binary(gt, "gt")
    if p.shape != g.shape or p.ndim < 1:
        raise ValueError(f"pred shape {p.shape} and gt shape {g.shape} must be one (N, ...) shape")
    p, g = p.reshape(p.shape[0], -1), g.reshape(g.shape[0], -1)
    tp = np.count_nonzero(p & g, axis=1).astype(np.float64)
    total = (np.count_nonzero(p, axis=1) + np.count_nonzero(g, axis=1)).astype(np.float64)
    return _dice_from_counts(tp, total)


def _dice_from_counts(tp: np.ndarray, total: np.ndarray) -> np.ndarray:
    """``2 TP / (|P| + |G|)``, 1 where both masks are empty (``total == 0``)."""
    return np.where(total == 0, 1.0, 2.0 * tp / np.maximum(total, 1.0))


def iou(pred: Any, gt: Any) -> float:
    """IoU (Jaccard) ``TP / |P | G|`` of binary ``(H, W)`` masks; 1 if both empty, 0 if one is."""
    tp, n_p, n_g = _counts(*_pair(pred, gt))
    union = n_p + n_g - tp
    return 1.0 if union == 0 else tp / union


def precision(pred: Any, gt: Any) -> float:
    """Precision ``TP / |P|``; 1 if both masks are empty, 0 if exactly one is."""
    tp, n_p, n_g = _counts(*_pair(pred, gt))
    if n_p == 0 or n_g == 0:
        return 1.0 if n_p == n_g else 0.0
    return tp / n_p


def recall(pred: Any, gt: Any) -> float:
    """Recall (sensitivity) ``TP / |G|``; 1 if both masks are empty, 0 if exactly one is."""
    tp, n_p, n_g = _counts(*_pair(pred, gt))
    if n_p == 0 or n_g == 0:
        return 1.0 if n_p == n_g else 0.0
    return tp / n_g


def image_diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """``sqrt((H * row)**2 + (W * col)**2)`` with spacing ``(row, col)`` (1 pixel when None): the HD95 of a
    case where exactly one mask is empty."""
    row, col = (1.0, 1.0) if spacing is None else (float(spacing[0]), float(spacing[1]))
    return float(np.hypot(shape[0] * row, shape[1] * col))


def _surface(mask: np.ndarray) -> np.ndarray:
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1), border_value=0)
    return mask & ~eroded


def hd95(pred: Any, gt: Any, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between binary ``(H, W)`` masks.

    Args:
        spacing: ``(row_mm, col_mm)``; with it the result is in mm, without it in pixels.

    Returns 0 when both masks are empty and :func:`image_diagonal` when exactly one is (module docstring).
    """
    p, g = _pair(pred, gt)
    if spacing is not None and (len(spacing) != 2 or min(spacing) <= 0):
        raise ValueError(f"spacing must be (row_mm, col_mm) > 0, got {spacing!r}")
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return 0.0
    if has_p != has_g:
        return image_diagonal(p.shape, spacing)
    sampling = None if spacing is None else (float(spacing[0]), float(spacing[1]))
    surface_p, surface_g = _surface(p), _surface(g)
    # Distance from every pixel to the nearest surface pixel of the other mask.
    to_g = ndimage.distance_transform_edt(~surface_g, sampling=sampling)
    to_p = ndimage.distance_transform_edt(~surface_p, sampling=sampling)
    distances = np.concatenate([to_g[surface_p], to_p[surface_g]])
    return float(np.percentile(distances, 95))


def case_metrics(pred: Any, gt: Any, spacing: Sequence[float] | None = None) -> dict[str, float]:
    """One case: ``dice, iou, precision, recall, hd95`` (pixels), plus ``hd95_mm`` given a spacing."""
    p, g = _pair(pred, gt)
    result = {
        "dice": dice(p, g),
        "iou": iou(p, g),
        "precision": precision(p, g),
        "recall": recall(p, g),
        "hd95": hd95(p, g),
    }
    if spacing is not None:
        result["hd95_mm"] = hd95(p, g, spacing)
    return result


@dataclass(frozen=True)
class MetricsReport:
    """Result of :meth:`SegmentationMetrics.aggregate`.

    Attributes:
        means: metric -> mean over cases (``hd95_mm`` averages only the cases that had a spacing).
        stds: metric -> population standard deviation over the same cases.
        cases: one dict per case, ``{"name": ..., "dice": ..., ...}`` in update order.
    """

    means: dict[str, float]
    stds: dict[str, float]
    cases: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"means": ..., "stds": ..., "cases": [...]}``."""
        return {"means": dict(self.means), "stds": dict(self.stds), "cases": [dict(c) for c in self.cases]}


class SegmentationMetrics:
    """Accumulates per-case metrics over batches, like MONAI: ``update`` ... ``aggregate()``, ``reset()``.

    Example::

        metrics = SegmentationMetrics(threshold=0.5)
        for probs, masks, names in loader:       # (B, 1, H, W) probabilities and {0, 1} targets
            metrics.update(probs, masks, names=names)
        report = metrics.aggregate()             # report.means["dice"], report.cases[i]["hd95"]

    Args:
        threshold: when set, predictions are ``pred > threshold`` (probabilities allowed); when None,
            predictions must already be binary.
    """

    def __init__(self, threshold: float | None = None):
        self.threshold = threshold
        self._cases: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self._cases)

    def reset(self) -> None:
        """Forget every case."""
        self._cases = []

    def update(
        self,
        pred: Any,
        gt: Any,
        names: Sequence[str] | str | None = None,
        spacing: Sequence[float] | Sequence[Sequence[float] | None] | None = None,
    ) -> list[dict[str, Any]]:
        """Add a case ``(H, W)`` or a batch ``(B, H, W)`` / ``(B, 1, H, W)``; returns the new cases' metrics.

        Args:
            pred: binary masks (or probabilities when ``threshold`` is set), numpy or torch.
            gt: binary ground truth of the same shape.
            names: case name(s); default ``"case<N>"`` by update order.
            spacing: ``(row_mm, col_mm)`` for all cases, or one per case (None entries allowed).
        """
        p, g = _as_numpy(pred), _as_numpy(gt)
        if p.shape != g.shape:
            raise ValueError(f"pred shape {p.shape} differs from gt shape {g.shape}")
        if p.ndim == 4 and p.shape[1] == 1:
            p, g = p[:, 0], g[:, 0]
        elif p.ndim == 2:
            p, g = p[None], g[None]
        elif p.ndim != 3:
            raise ValueError(f"expected (H, W), (B, H, W) or (B, 1, H, W) masks, got shape {p.shape}")
        if self.threshold is not None:
            p = p > self.threshold
        batch = p.shape[0]
        if names is None:
            names = [f"case{len(self._cases) + i}" for i in range(batch)]
        elif isinstance(names, str):
            names = [names]
        if len(names) != batch:
            raise ValueError(f"{len(names)} names for a batch of {batch}")
        spacings = _spacings(spacing, batch)
        added = []
        for i in range(batch):
            added.append({"name": str(names[i]), **case_metrics(p[i], g[i], spacings[i])})
        self._cases.extend(added)
        return added

    def aggregate(self) -> MetricsReport:
        """Means, standard deviations and the per-case list of everything added since the last ``reset``.

        Raises:
            ValueError: no case was added.
        """
        if not self._cases:
            raise ValueError("SegmentationMetrics.aggregate() called before any update()")
        keys = [*METRIC_NAMES, "hd95_mm"]
        means, stds = {}, {}
        for key in keys:
            values = [c[key] for c in self._cases if key in c]
            if values:
                means[key] = float(np.mean(values))
                stds[key] = float(np.std(values))
        return MetricsReport(means, stds, [dict(c) for c in self._cases])


def _spacings(spacing: Any, batch: int) -> list[Sequence[float] | None]:
    if spacing is None:
        return [None] * batch
    if len(spacing) == 2 and all(isinstance(s, (int, float, np.floating, np.integer)) for s in spacing):
        return [tuple(spacing)] * batch
    if len(spacing) != batch:
        raise ValueError(f"{len(spacing)} spacings for a batch of {batch}")
    return list(spacing)


def threshold_sweep(
    probs: Iterable[Any] | np.ndarray,
    gts: Iterable[Any] | np.ndarray,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
) -> tuple[float, dict[float, float]]:
    """Mean Dice of ``prob > t`` for each threshold ``t``; pick the best (validation threshold tuning).

    Args:
        probs: per-case probability maps ``(H, W)`` in [0, 1] (a list, possibly of different sizes, or an
            array ``(N, H, W)`` / ``(N, 1, H, W)``).
        gts: the matching binary ground truths.
        thresholds: candidates, default ``0.05, 0.10, ..., 0.95``.

    Returns:
        ``(best_threshold, {threshold: mean_dice})`` with thresholds rounded to 6 decimals. Ties go to the
        threshold closest to 0.5, then to the lower one.
    """
    prob_list = [np.squeeze(_as_numpy(p)) for p in probs]
    gt_list = [np.squeeze(_binary(g, "gt")) for g in gts]
    if len(prob_list) != len(gt_list) or not prob_list:
        raise ValueError(
            f"need equally many (>0) probability maps and ground truths, got {len(prob_list)} "
            f"and {len(gt_list)}"
        )
    candidates = [round(float(t), 6) for t in thresholds]
    if not candidates:
        raise ValueError("thresholds is empty")
    scores: dict[float, float] = {}
    for t in candidates:
        scores[t] = float(np.mean([dice(p > t, g) for p, g in zip(prob_list, gt_list, strict=True)]))
    best_score = max(scores.values())
    best = min((t for t, s in scores.items() if s >= best_score - 1e-12), key=lambda t: (abs(t - 0.5), t))
    return best, scores
