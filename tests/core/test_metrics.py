"""core.metrics: hand-computed overlaps, empty-mask conventions, HD95, accumulation, threshold sweep."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.metrics import (
    SegmentationMetrics,
    case_metrics,
    dice,
    hd95,
    image_diagonal,
    iou,
    precision,
    recall,
    threshold_sweep,
)


def _box(shape, top, left, height, width) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[top : top + height, left : left + width] = 1
    return mask


def test_overlap_metrics_by_hand():
    gt = _box((10, 10), 0, 0, 4, 4)  # 16 pixels
    pred = _box((10, 10), 0, 2, 4, 4)  # 16 pixels, 8 overlapping
    assert dice(pred, gt) == pytest.approx(2 * 8 / 32)
    assert iou(pred, gt) == pytest.approx(8 / 24)
    assert precision(pred, gt) == pytest.approx(8 / 16)
    small = _box((10, 10), 0, 0, 2, 4)  # 8 pixels, all inside gt
    assert precision(small, gt) == 1.0 and recall(small, gt) == pytest.approx(0.5)
    assert dice(gt, gt) == iou(gt, gt) == precision(gt, gt) == recall(gt, gt) == 1.0


def test_empty_mask_conventions():
    empty = np.zeros((6, 8), bool)
    lesion = _box((6, 8), 1, 1, 2, 2)
    both = case_metrics(empty, empty)
    assert both == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "hd95": 0.0}
    for pred, gt in ((empty, lesion), (lesion, empty)):  # missed lesion, hallucinated lesion
        one = case_metrics(pred, gt, spacing=(0.5, 2.0))
        assert one["dice"] == one["iou"] == one["precision"] == one["recall"] == 0.0
        assert one["hd95"] == pytest.approx(10.0)  # sqrt(6**2 + 8**2)
        assert one["hd95_mm"] == pytest.approx(math.hypot(6 * 0.5, 8 * 2.0))
    assert image_diagonal((6, 8)) == pytest.approx(10.0)


def test_hd95_on_known_shifts_in_pixels_and_mm():
    gt = np.zeros((20, 20), bool)
    gt[5, 3:15] = True  # a horizontal line
    pred = np.zeros((20, 20), bool)
    pred[9, 3:15] = True  # the same line 4 rows lower: every surface distance is 4
    assert hd95(pred, gt) == pytest.approx(4.0)
    assert hd95(pred, gt, spacing=(2.5, 0.1)) == pytest.approx(10.0)  # rows are 2.5 mm apart
    assert hd95(gt, gt) == 0.0
    # Symmetric, and equal to a brute-force pooled 95th percentile over all surface-pixel pairs.
    square = _box((40, 40), 10, 10, 10, 10).astype(bool)
    shifted = _box((40, 40), 12, 13, 10, 10).astype(bool)
    assert hd95(square, shifted) == pytest.approx(hd95(shifted, square))
    assert hd95(square, shifted) == pytest.approx(_brute_force_hd95(square, shifted))
    rng = np.random.default_rng(0)
    blob_a, blob_b = rng.random((24, 24)) > 0.7, rng.random((24, 24)) > 0.8
    assert hd95(blob_a, blob_b, spacing=(1.5, 0.5)) == pytest.approx(
        _brute_force_hd95(blob_a, blob_b, (1.5, 0.5))
    )


def _brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing=(1.0, 1.0)) -> float:
    def surface(mask):
        padded = np.pad(mask, 1)
        inner = (
            padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        )
        return np.argwhere(mask & ~inner) * np.asarray(spacing)

    sa, sb = surface(a), surface(b)
    pairwise = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([pairwise.min(1), pairwise.min(0)]), 95))


def test_hd95_percentile_ignores_a_small_outlier_fraction():
    gt = np.zeros((64, 64), bool)
    gt[10:50, 10:50] = True
    pred = gt.copy()
    pred[60, 60] = True  # one stray pixel far away: 1 of ~157 surface pixels
    assert hd95(pred, gt) == pytest.approx(0.0)
    assert dice(pred, gt) == pytest.approx(2 * 1600 / 3201)


def test_inputs_are_validated():
    with pytest.raises(ValueError, match=r"pred shape \(4, 4\) differs from gt shape \(4, 5\)"):
        dice(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="must be binary"):
        iou(np.full((4, 4), 0.5), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="spacing must be"):
        hd95(np.ones((4, 4)), np.ones((4, 4)), spacing=(0.0, 1.0))


def test_accumulator_batches_names_threshold_and_reset():
    gt = np.stack([_box((8, 8), 0, 0, 4, 4), np.zeros((8, 8), np.uint8), _box((8, 8), 2, 2, 2, 2)])
    probs = np.stack([gt[0] * 0.9, np.full((8, 8), 0.2), np.zeros((8, 8))]).astype(np.float32)
    metrics = SegmentationMetrics(threshold=0.5)
    added = metrics.update(
        torch.from_numpy(probs[:2, None]), torch.from_numpy(gt[:2, None]), names=["p", "q"]
    )
    assert [c["name"] for c in added] == ["p", "q"] and added[0]["dice"] == 1.0 and added[1]["dice"] == 1.0
    metrics.update(probs[2], gt[2], spacing=(2.0, 2.0))  # single case, default name, with spacing
    report = metrics.aggregate()
    assert len(metrics) == 3 and report.cases[2]["name"] == "case2"
    assert report.means["dice"] == pytest.approx(2 / 3)  # third case missed: dice 0
    assert report.means["hd95"] == pytest.approx(np.mean([0.0, 0.0, math.hypot(8, 8)]))
    assert report.means["hd95_mm"] == pytest.approx(math.hypot(16, 16))  # only the case with spacing
    assert report.stds["dice"] == pytest.approx(np.std([1, 1, 0]))
    assert report.to_dict()["cases"][0]["name"] == "p"
    metrics.reset()
    with pytest.raises(ValueError, match="before any update"):
        metrics.aggregate()
    with pytest.raises(ValueError, match="must be binary"):
        SegmentationMetrics().update(probs, gt)  # probabilities need a threshold


def test_threshold_sweep_finds_the_separating_threshold():
    gt = np.zeros((2, 16, 16), np.uint8)
    gt[:, 4:12, 4:12] = 1
    probs = np.where(gt == 1, 0.62, 0.0).astype(np.float32)
    probs[:, 0:3, :] = 0.58  # a band of confident background: included for every t < 0.58
    best, scores = threshold_sweep(probs, gt)
    assert best == pytest.approx(0.6)
    assert scores[0.6] == pytest.approx(1.0)
    assert scores[0.55] < 1.0 and scores[0.65] == 0.0
    assert len(scores) == 19 and min(scores) == pytest.approx(0.05) and max(scores) == pytest.approx(0.95)
    # A plateau of perfect thresholds resolves to the one closest to 0.5.
    best_flat, _ = threshold_sweep([gt[0].astype(np.float32)], [gt[0]])
    assert best_flat == pytest.approx(0.5)
    # Cases of different sizes are fine as lists.
    best_list, _ = threshold_sweep(
        [probs[0], probs[1, :8, :8]], [gt[0], gt[1, :8, :8]], thresholds=[0.3, 0.6]
    )
    assert best_list == pytest.approx(0.6)
