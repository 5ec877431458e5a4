"""The simulated annotator's choices (loadtest/annotator.py): its click lands inside the largest error region with
the label that fixes it, its box covers the lesion within the jitter, and the shifted phantom domains are what
they say (angular lesions, the scanner shift)."""

from __future__ import annotations

import numpy as np

from loadtest.annotator import dice, jittered_box, worst_error_click
from loadtest.corrections import phantom_set


def test_click_goes_to_the_largest_error_with_the_fixing_label():
    truth = np.zeros((64, 64), np.uint8)
    truth[10:40, 10:40] = 1
    pred = truth.copy()
    pred[10:40, 30:40] = 0  # a missed strip of 300 px
    pred[50:55, 50:55] = 1  # a false blob of 25 px
    point, label = worst_error_click(pred, truth)
    x, y = int(point[0]), int(point[1])
    assert 30 <= x < 40 and 10 <= y < 40 and label == 1
    pred[10:40, 30:40] = 1
    point, label = worst_error_click(pred, truth)
    assert (50 <= point[0] < 55) and (50 <= point[1] < 55) and label == 0
    assert worst_error_click(truth, truth) is None


def test_box_covers_the_lesion_within_the_jitter():
    truth = np.zeros((64, 64), np.uint8)
    truth[20:30, 15:45] = 1
    for seed in range(20):
        box = jittered_box(truth, np.random.default_rng(seed), 3)
        assert all(abs(a - b) <= 3 for a, b in zip(box, (15, 20, 45, 30), strict=True))
    assert dice(truth, truth) == 1.0 and dice(truth, np.zeros_like(truth)) == 0.0


def test_shifted_domain_differs_from_the_original():
    images_in, masks_in = phantom_set(6, 5, 96, "in")
    images_shift, masks_shift = phantom_set(6, 5, 96, "ood+shape")
    assert images_shift.dtype == np.uint8 and set(np.unique(masks_shift)) <= {0, 1}
    assert not np.array_equal(images_in, images_shift)
    assert all(m.sum() > 0 for m in masks_shift)  # every shifted case has a lesion to correct
    assert sum(not np.array_equal(a, b) for a, b in zip(masks_in, masks_shift, strict=True)) >= 5  # angular shapes
    assert np.array_equal(phantom_set(6, 5, 96, "ood+shape")[0], images_shift)  # deterministic per seed
