"""genseg-errors: the error profile and lesion contrast it reports, on constructed cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from training.generators import PairSet
from training.genseg_errors import error_profile, lesion_contrast


def _pairs() -> PairSet:
    masks = np.zeros((4, 32, 32), np.float32)
    masks[:, 10:18, 12:20] = 1.0  # an 8 x 8 lesion
    images = np.full_like(masks, 0.6) - 0.25 * masks  # lesion 0.25 darker than its surround
    return PairSet(images, masks, [f"p{i}" for i in range(4)], "constructed")


class _Predicts(nn.Module):
    """Logits that reproduce a fixed mask, whatever the image."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (self.mask.expand_as(image) * 2 - 1) * 10.0


def test_lesion_contrast_is_the_surround_minus_the_lesion():
    images, masks = _pairs().tensors()
    assert lesion_contrast(images, masks) == pytest.approx(np.full(4, 0.25), abs=1e-6)


def test_error_profile_counts_recall_false_positives_and_empty_masks():
    pairs = _pairs()
    truth = pairs.tensors()[1][:1]
    perfect = error_profile(_Predicts(truth), pairs)
    assert perfect["dice"] == pytest.approx(1.0) and perfect["recall"] == pytest.approx(1.0)
    assert perfect["false_positive_per_lesion_area"] == 0.0 and perfect["empty_predictions"] == 0.0
    empty = error_profile(_Predicts(torch.zeros_like(truth)), pairs)
    assert empty["recall"] == 0.0 and empty["empty_predictions"] == 1.0
    half = truth.clone()
    half[..., 14:18, :] = 0  # the lower half of the lesion missed...
    half[..., 0:4, 0:8] = 1  # ...and 32 false-positive pixels elsewhere
    shrunk = error_profile(_Predicts(half), pairs)
    assert shrunk["recall"] == pytest.approx(0.5) and shrunk["false_positive_per_lesion_area"] == pytest.approx(0.5)
    assert shrunk["predicted_per_lesion_area"] == pytest.approx(1.0)
    assert shrunk["dice"] == pytest.approx(2 * 32 / (2 * 32 + 32 + 32))
