"""Mask augmentor: each error type makes its characteristic change; presets; soft masks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from core.metrics import dice
from training.augment import (
    AUGMENTOR_PRESETS,
    ERROR_TYPES,
    AugmentorConfig,
    build_augmentor,
    signed_distance,
    soft_mask,
)


def _ellipse(h: int = 96, w: int = 96) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((yy - 44) ** 2 / 18.0**2 + (xx - 50) ** 2 / 24.0**2) <= 1.0


GT = _ellipse()
AREA = int(GT.sum())


def _hard(name: str, seed: int = 0) -> tuple[np.ndarray, dict]:
    aug = build_augmentor("default", secondary_prob=0.0, soft_mask_prob=0.0)
    coarse, info = aug(GT, np.random.default_rng(seed), force_error_type=name)
    assert coarse.dtype == np.float32 and coarse.shape == GT.shape
    assert set(np.unique(coarse)) <= {0.0, 1.0}
    assert info["error_type"] == name and info["soft"] is False and info["secondary"] == []
    return coarse > 0.5, info


def _components(m: np.ndarray) -> int:
    return int(ndimage.label(m)[1])


def _centroid(m: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(m)
    return np.array([ys.mean(), xs.mean()])


SEEDS = range(4)


def test_identity_is_exact():
    out, info = _hard("identity")
    assert np.array_equal(out, GT) and info["dice"] == 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_over_segmentation_grows_within_range(seed):
    out, info = _hard("over_segmentation", seed)
    assert np.all(out[GT])  # a superset of the lesion
    assert 1.19 * AREA <= out.sum() <= 3.01 * AREA
    assert info["dice"] < 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_giant_over_segmentation_grows_at_least_3x(seed):
    out, _ = _hard("giant_over_segmentation", seed)
    assert np.all(out[GT])
    assert out.sum() >= 2.99 * AREA
    assert out.sum() <= 0.9 * GT.size + 1  # capped by max_area_fraction


@pytest.mark.parametrize("seed", SEEDS)
def test_under_segmentation_shrinks_within_range(seed):
    out, _ = _hard("under_segmentation", seed)
    assert not np.any(out & ~GT)  # a subset
    assert 0.39 * AREA <= out.sum() <= 0.91 * AREA


@pytest.mark.parametrize("seed", SEEDS)
def test_missing_chunk_removes_5_to_30_percent(seed):
    out, _ = _hard("missing_chunk", seed)
    assert not np.any(out & ~GT)
    removed = (AREA - out.sum()) / AREA
    assert 0.045 <= removed <= 0.305


@pytest.mark.parametrize("seed", SEEDS)
def test_internal_holes_are_inside(seed):
    out, _ = _hard("internal_holes", seed)
    assert not np.any(out & ~GT)
    assert out.sum() < AREA
    # Filling the holes restores the lesion exactly: every removed pixel was enclosed.
    assert np.array_equal(ndimage.binary_fill_holes(out), GT)


@pytest.mark.parametrize("seed", SEEDS)
def test_bridge_adds_an_attached_blob(seed):
    out, _ = _hard("bridge", seed)
    assert np.all(out[GT])
    extra = out & ~GT
    assert extra.sum() > 0.02 * AREA
    assert _components(out) == 1  # the blob is connected to the lesion by the band


@pytest.mark.parametrize("seed", SEEDS)
def test_false_positive_islands_are_outside(seed):
    out, _ = _hard("false_positive_islands", seed)
    assert np.all(out[GT])
    assert _components(out) >= 2
    # The lesion is still one component of its own: islands never touch it.
    labels, _ = ndimage.label(out)
    lesion_labels = set(np.unique(labels[GT]))
    assert len(lesion_labels) == 1
    assert np.array_equal(labels == lesion_labels.pop(), GT)


@pytest.mark.parametrize("seed", SEEDS)
def test_fragmentation_splits_the_lesion(seed):
    out, _ = _hard("fragmentation", seed)
    assert not np.any(out & ~GT)
    assert out.sum() < AREA
    assert _components(out) >= 2


@pytest.mark.parametrize("seed", SEEDS)
def test_shift_moves_the_centroid(seed):
    out, info = _hard("shift", seed)
    moved = np.linalg.norm(_centroid(out) - _centroid(GT))
    size = 48  # bounding-box size of the ellipse
    assert 0.04 * size <= moved <= 0.31 * size + 1.0
    assert abs(int(out.sum()) - AREA) <= 0.05 * AREA  # same shape, moved (no clipping here)
    assert info["dice"] < 1.0


def test_empty_is_empty():
    out, info = _hard("empty")
    assert not out.any() and info["dice"] == 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_noise_scatter_is_noise(seed):
    out, info = _hard("noise_scatter", seed)
    assert out.any()
    assert info["dice"] < 0.3
    assert out.sum() < 0.5 * GT.size


def test_probabilities_are_normalised_and_match_the_seed_table():
    probs = AugmentorConfig().probabilities()
    assert list(probs) == list(ERROR_TYPES)
    assert sum(probs.values()) == pytest.approx(1.0)
    assert probs["identity"] == pytest.approx(15 / 135)
    assert probs["noise_scatter"] == pytest.approx(3 / 135)
    for preset in AUGMENTOR_PRESETS.values():
        assert sum(preset.probabilities().values()) == pytest.approx(1.0)


def test_sampled_frequencies_follow_the_probabilities():
    aug = build_augmentor("default", secondary_prob=0.0, soft_mask_prob=0.0)
    rng = np.random.default_rng(123)
    small = _ellipse(32, 32)
    counts = {t: 0 for t in ERROR_TYPES}
    n = 1500
    for _ in range(n):
        counts[aug(small, rng)[1]["error_type"]] += 1
    probs = aug.config.probabilities()
    for t in ERROR_TYPES:
        assert abs(counts[t] / n - probs[t]) < 0.04, (t, counts[t] / n, probs[t])


def test_presets_differ():
    p = {name: cfg.probabilities() for name, cfg in AUGMENTOR_PRESETS.items()}
    assert set(p) == {"default", "mild", "severe", "boundary_focus", "structural"}
    assert p["mild"]["identity"] == pytest.approx(0.30, abs=0.03)
    assert p["mild"]["identity"] > p["default"]["identity"] > p["severe"]["identity"]
    severe = ("giant_over_segmentation", "empty", "noise_scatter")
    assert sum(p["severe"][t] for t in severe) > 2 * sum(p["default"][t] for t in severe)
    assert p["boundary_focus"]["over_segmentation"] + p["boundary_focus"]["under_segmentation"] == pytest.approx(0.5)
    structural = ("internal_holes", "missing_chunk", "fragmentation")
    assert sum(p["structural"][t] for t in structural) == pytest.approx(0.4)
    assert len({tuple(v.values()) for v in p.values()}) == 5


def test_soft_mask_is_a_probability_map_that_thresholds_back():
    for t in (2.0, 8.0):
        s = soft_mask(GT, t)
        assert s.dtype == np.float32 and 0.0 < s.min() and s.max() < 1.0
        assert np.array_equal(s > 0.5, GT)
    # Higher temperature = fuzzier: more pixels in the uncertain band.
    band = [int(((soft_mask(GT, t) > 0.1) & (soft_mask(GT, t) < 0.9)).sum()) for t in (2.0, 8.0)]
    assert band[1] > band[0]
    sdf = signed_distance(GT)
    assert (sdf[GT] >= 1).all() and (sdf[~GT] <= -1).all()
    assert np.all(soft_mask(np.zeros((8, 8), bool), 3.0) < 0.01)


def test_soft_and_secondary_paths_and_info():
    aug = build_augmentor("default", secondary_prob=1.0, soft_mask_prob=1.0, soft_mask_temperature=(3.0, 4.0))
    rng = np.random.default_rng(5)
    for _ in range(20):
        coarse, info = aug(GT, rng)
        assert coarse.dtype == np.float32 and coarse.min() >= 0.0 and coarse.max() <= 1.0
        assert set(info) == {"error_type", "secondary", "soft", "temperature", "dice"}
        assert info["soft"] is True and 3.0 <= info["temperature"] <= 4.0
        assert info["dice"] == pytest.approx(dice(coarse > 0.5, GT > 0))
        if info["error_type"] != "empty":
            assert 1 <= len(info["secondary"]) <= 2


def test_deterministic_given_the_generator():
    aug = build_augmentor("severe")
    a = [aug(GT, np.random.default_rng(9)) for _ in range(2)]
    assert np.array_equal(a[0][0], a[1][0]) and a[0][1] == a[1][1]


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="force_error_type"):
        build_augmentor()(GT, np.random.default_rng(0), force_error_type="nope")
    with pytest.raises(ValueError, match="unknown augmentor preset"):
        build_augmentor("nope")
    with pytest.raises(ValueError, match="weights"):
        AugmentorConfig(weights={"identity": -1.0})
    with pytest.raises(ValueError, match="over_scale"):
        AugmentorConfig(over_scale=(3.0, 1.2))
    assert AugmentorConfig.from_dict(AugmentorConfig().to_dict()) == AugmentorConfig()
