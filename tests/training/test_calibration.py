"""training.calibration: the automatic answer's rules and the minimum area, chosen by Dice on known masks."""

from __future__ import annotations

import torch

from training.calibration import (
    COARSE_FLIP_MIN_GAIN,
    calibrate_answers,
    choose_segment_rules,
    final_masks,
)

SIDE = 64


def _truth() -> torch.Tensor:
    """(4, 1, 64, 64): three square lesions (256 px) and one lesion-free case."""
    masks = torch.zeros(4, 1, SIDE, SIDE)
    for i, (y, x) in enumerate(((10, 10), (30, 20), (20, 40))):
        masks[i, 0, y : y + 16, x : x + 16] = 1.0
    return masks


def _answers(refined: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"refined": refined, "iou": torch.full((len(refined), 1), 0.9)}


def test_a_flip_pass_that_gains_is_chosen_and_a_spurious_blob_calls_for_the_largest_component():
    truth = _truth()
    single = truth.clone()
    single[0, 0, 50:56, 50:56] = 1.0  # a second blob beside lesion 0: Dice 0.877 there
    single[1, 0, 30:34, 20:36] = 0.0  # lesion 1 a quarter short: Dice 0.857
    flipped = truth.clone()
    flipped[0, 0, 50:56, 50:56] = 1.0
    rules = choose_segment_rules({False: _answers(single), True: _answers(flipped)}, truth, 0.5)
    assert rules["coarse_flip"] and rules["largest_component"]
    assert rules["val_dice"]["coarse_flip+largest_component"] == 1.0
    served = final_masks(flipped, 0.5, 0.0, rules["largest_component"])
    assert torch.equal(served, truth)  # the served rule on these answers gives the truth, pixel for pixel


def test_a_flip_pass_gaining_less_than_the_minimum_is_not_chosen():
    truth = _truth()
    single = truth.clone()
    single[1, 0, 30, 20:22] = 0.0  # 2 px short: the flip pass gains under COARSE_FLIP_MIN_GAIN
    rules = choose_segment_rules({False: _answers(single), True: _answers(truth.clone())}, truth, 0.5)
    gain = rules["val_dice"]["coarse_flip"] - rules["val_dice"]["plain"]
    assert 0 < gain < COARSE_FLIP_MIN_GAIN
    assert not rules["coarse_flip"] and not rules["largest_component"]  # no blob to remove: no gain, not chosen


def test_the_minimum_area_sees_the_small_blobs_of_the_other_pass():
    truth = _truth()
    clean = truth.clone()  # the chosen pass: nothing on the lesion-free case, every minimum area ties
    other = truth.clone()
    other[3, 0, 5:10, 5:10] = 1.0  # 25 px (0.6 % of the image) on the lesion-free case
    alone = calibrate_answers(_answers(clean), truth, 0.5)["no_finding"]
    pooled = calibrate_answers(_answers(clean), truth, 0.5, other_passes=(other,))["no_finding"]
    assert alone["min_area_fraction"] == 0.0
    assert pooled["min_area_fraction"] == 0.008 and pooled["val_passes"] == 2  # the smallest that empties 25 px
    assert pooled["val_normal_false_positive_rate"] == 0.0
