"""core.losses: values at perfect / worst / known predictions, equivalences, gradients, build_loss specs."""

from __future__ import annotations

import math

import pytest
import torch

from core.losses import (
    CombinedLoss,
    bce_loss,
    build_loss,
    focal_loss,
    parse_loss_spec,
    soft_dice_loss,
    tversky_loss,
    weighted_bce_loss,
)

ALL = [soft_dice_loss, bce_loss, weighted_bce_loss, focal_loss, tversky_loss]


def _target() -> torch.Tensor:
    target = torch.zeros(2, 1, 8, 8)
    target[0, 0, 2:6, 2:6] = 1.0
    target[1, 0, 0:3, :] = 1.0
    return target


@pytest.mark.parametrize("loss", ALL)
def test_perfect_prediction_costs_nothing_and_worst_costs_most(loss):
    target = _target()
    perfect = (target * 2 - 1) * 30.0  # logits of +-30
    worst = -perfect
    assert loss(perfect, target).item() == pytest.approx(0.0, abs=1e-4)
    assert (
        loss(worst, target).item() > loss(torch.zeros_like(target), target).item()
    )  # worse than a coin flip


def test_known_values():
    target = _target()
    zero_logits = torch.zeros_like(target)
    assert bce_loss(zero_logits, target).item() == pytest.approx(math.log(2), rel=1e-6)
    # p = 0.5 everywhere: dice per sample = (2 * 0.5 * |T| + 1) / (0.5 * 64 + |T| + 1)
    sizes = target.flatten(1).sum(1)
    expected = (1 - (sizes + 1) / (32 + sizes + 1)).mean()
    assert soft_dice_loss(zero_logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert soft_dice_loss(torch.full_like(target, 30.0), target, smooth=0.0).item() == pytest.approx(
        (1 - 2 * sizes / (64 + sizes)).mean().item(), rel=1e-5
    )
    worst = (1 - 2 * target) * 30.0
    assert soft_dice_loss(worst, target).item() == pytest.approx(1 - 1 / (64 + 1), abs=1e-3)
    # Weighted BCE at p = 0.5: positives cost pos_weight * ln 2.
    positives = target.mean().item()
    expected_w = math.log(2) * (5.0 * positives + (1 - positives))
    assert weighted_bce_loss(zero_logits, target, pos_weight=5.0).item() == pytest.approx(
        expected_w, rel=1e-6
    )
    # Focal at p = 0.5, gamma = 2, alpha = 0.25: alpha_t * 0.25 * ln 2.
    expected_f = 0.25 * math.log(2) * (0.25 * positives + 0.75 * (1 - positives))
    assert focal_loss(zero_logits, target).item() == pytest.approx(expected_f, rel=1e-6)


def test_equivalences_between_losses():
    torch.manual_seed(0)
    logits, target = torch.randn(3, 1, 10, 10), (torch.rand(3, 1, 10, 10) > 0.6).float()
    # alpha = beta = 0.5 is soft Dice (numerator and denominator halved, hence Dice's doubled smoothing).
    assert tversky_loss(logits, target, alpha=0.5, beta=0.5, smooth=1.0).item() == pytest.approx(
        soft_dice_loss(logits, target, smooth=2.0).item(), rel=1e-6
    )
    assert weighted_bce_loss(logits, target, pos_weight=1.0).item() == pytest.approx(
        bce_loss(logits, target).item(), rel=1e-6
    )
    assert focal_loss(logits, target, alpha=None, gamma=0.0).item() == pytest.approx(
        bce_loss(logits, target).item(), rel=1e-6
    )
    # Tversky with beta > alpha punishes a missed lesion more than a hallucinated one.
    miss = torch.full_like(target, -30.0)
    extra = torch.full_like(target, 30.0)
    assert tversky_loss(miss, target).item() > tversky_loss(extra, target).item()


@pytest.mark.parametrize("loss", ALL)
def test_probability_inputs_match_logits(loss):
    torch.manual_seed(1)
    logits, target = torch.randn(2, 1, 6, 6), torch.rand(2, 1, 6, 6)  # soft targets allowed
    from_logits = loss(logits, target)
    from_probs = loss(torch.sigmoid(logits), target, from_logits=False)
    assert from_probs.item() == pytest.approx(from_logits.item(), rel=1e-4)


@pytest.mark.parametrize("loss", ALL)
def test_gradients_are_finite_even_at_saturation(loss):
    target = _target()
    logits = (torch.randn_like(target) * 50).requires_grad_()
    loss(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    probs = torch.cat([torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)]).requires_grad_()  # exact 0 and 1
    loss(probs, target, from_logits=False).backward()
    assert torch.isfinite(probs.grad).all()


def test_build_loss_specs():
    target = _target()
    torch.manual_seed(2)
    logits = torch.randn_like(target)
    default = build_loss()
    assert isinstance(default, CombinedLoss) and default.spec == "dice:1+bce:1"
    total = soft_dice_loss(logits, target) + bce_loss(logits, target)
    assert default(logits, target).item() == pytest.approx(total.item(), rel=1e-6)
    weighted = build_loss("dice:0.5+bce:2.0")
    expected = 0.5 * soft_dice_loss(logits, target) + 2.0 * bce_loss(logits, target)
    assert weighted(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    for name, fn in (("focal", focal_loss), ("tversky", tversky_loss), ("wbce", weighted_bce_loss)):
        assert build_loss(name)(logits, target).item() == pytest.approx(fn(logits, target).item(), rel=1e-6)
    custom = build_loss("Tversky(alpha=0.2, beta=0.8) + wbce(pos_weight=50):0.5")
    assert custom.spec == "tversky(alpha=0.2,beta=0.8):1+wbce(pos_weight=50):0.5"
    assert build_loss(custom.spec).terms == custom.terms  # canonical spec round-trips
    expected = tversky_loss(logits, target, alpha=0.2, beta=0.8) + 0.5 * weighted_bce_loss(
        logits, target, pos_weight=50.0
    )
    assert custom(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    components = custom.components(logits, target)
    assert set(components) == {"tversky", "wbce"}
    probs = build_loss("dice+bce", from_logits=False)
    assert probs(torch.sigmoid(logits), target).item() == pytest.approx(
        default(logits, target).item(), rel=1e-4
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("dice+hinge", r"unknown loss 'hinge' in 'dice\+hinge'; known: dice, bce, wbce, focal, tversky"),
        ("", "non-empty string"),
        ("dice:abc", r"weight of 'dice' in 'dice:abc' must be a number, got 'abc'"),
        ("focal(beta=1)", r"loss 'focal' has no parameter beta \(allowed: alpha, gamma\)"),
        ("dice+dice", "appears twice"),
        ("dice:-1", "must be >= 0"),
        ("dice((", "malformed loss term"),
        ("wbce(pos_weight)", "must be KEY=VALUE"),
    ],
)
def test_bad_specs_raise(spec, message):
    with pytest.raises(ValueError, match=message):
        build_loss(spec)


def test_shape_mismatch_raises():
    with pytest.raises(
        ValueError, match=r"input shape \(1, 1, 4, 4\) differs from target shape \(1, 1, 4, 5\)"
    ):
        soft_dice_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    assert parse_loss_spec("bce") == [("bce", 1.0, {})]
