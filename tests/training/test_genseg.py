"""GenSeg stage 2: the unrolled hypergradient and the end-to-end run (tiny TransUNet + tiny pix2pix)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.pix2pix import Pix2PixConfig, build_pix2pix
from models.transunet import TransUNetConfig, build_transunet
from training.generators import phantom_pairs
from training.genseg import GenSegConfig, GenSegHooks, GenSegModel, train_genseg, unrolled_hypergradient

TINY_TRANSUNET = TransUNetConfig(img_size=32, resnet_width=8, gn_groups=4, hidden_size=16, num_layers=1,
                                 num_heads=2, mlp_dim=32, head_channels=16, decoder_channels=(16, 8, 8, 4)).to_dict()
TINY_PIX2PIX = Pix2PixConfig(image_size=32, ngf=4, num_downs=5, use_dropout=False)


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    return build_transunet(TINY_TRANSUNET), build_pix2pix(TINY_PIX2PIX)


def test_hypergradient_is_finite_nonzero_and_matches_finite_differences():
    segmenter, generator = _parts()
    segmenter, generator = segmenter.double(), generator.double()
    pairs = phantom_pairs(4, 0, 32)
    images, masks = (t.double() for t in pairs.tensors())
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits  # float64 throughout (core.losses casts to fp32)
    kwargs = dict(lam=1.0, unroll_lr=0.5)
    args = (segmenter, generator, loss_fn, (images[:2], masks[:2]), masks[1:3], (images[2:], masks[2:]))
    grads, info = unrolled_hypergradient(*args, **kwargs)
    flat = torch.cat([g.flatten() for g in grads])
    assert torch.isfinite(flat).all() and float(flat.abs().max()) > 0
    assert info["hyper_grad_norm"] == pytest.approx(float(flat.norm()), rel=1e-6)
    assert all(p.grad is None for p in segmenter.parameters())  # the virtual step is functional

    # Central difference of L_val(theta'(phi)) along a random direction equals <hypergradient, direction>.
    # The function is very curved (batch norm over two images in the decoder), hence the tiny step.
    direction = [torch.randn_like(p) for p in generator.parameters()]
    norm = torch.sqrt(sum((d**2).sum() for d in direction))
    direction = [d / norm for d in direction]
    eps = 1e-7
    values = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for p, d in zip(generator.parameters(), direction, strict=True):
                p.add_(sign * eps * d)
        values.append(unrolled_hypergradient(*args, **kwargs)[1]["hyper_val_loss"])
        with torch.no_grad():
            for p, d in zip(generator.parameters(), direction, strict=True):
                p.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    analytic = float(sum((g * d).sum() for g, d in zip(grads, direction, strict=True)))
    assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-9)


def test_generator_step_changes_the_generator_and_not_the_segmenter():
    segmenter, generator = _parts()
    model = GenSegModel(segmenter=segmenter, generator=generator).train()
    pairs = phantom_pairs(5, 1, 32)
    hooks = GenSegHooks(GenSegConfig(gen_lr=1e-3, n_real_masks=2, n_perturbed=2), pairs, seed=0)
    hooks.on_fit_start(model, None)
    gen_before = [p.detach().clone() for p in generator.parameters()]
    seg_before = [t.detach().clone() for t in [*segmenter.parameters(), *segmenter.buffers()]]
    info = hooks.generator_step(model, tuple(t[:2] for t in pairs.tensors()))
    assert info["hyper_grad_norm"] > 0 and "anchor_l1" in info
    assert any(not torch.equal(a, b) for a, b in zip(gen_before, generator.parameters(), strict=True))
    seg_after = [*segmenter.parameters(), *segmenter.buffers()]  # batch-norm statistics untouched too
    assert all(torch.equal(a, b) for a, b in zip(seg_before, seg_after, strict=True))
    masks = hooks.synthetic_masks()
    assert masks.shape == (4, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}


def test_training_step_mixes_real_and_synthetic_losses():
    segmenter, generator = _parts()
    model = GenSegModel(segmenter=segmenter, generator=generator).train()
    pairs = phantom_pairs(4, 2, 32)
    hooks = GenSegHooks(GenSegConfig(hyper_every=1, lam=0.5), pairs, seed=0)
    hooks.on_fit_start(model, None)
    out = hooks.training_step(model, pairs.tensors())
    assert out.loss.item() == pytest.approx(out.scalars["loss_real"] + 0.5 * out.scalars["loss_fake"], rel=1e-5)
    assert "hyper_grad_norm" in out.scalars
    out.loss.backward()
    assert all(p.grad is None for p in generator.parameters())  # the trainer's loss never reaches G
    assert any(p.grad is not None for p in segmenter.parameters())


@pytest.mark.parametrize("hyper_every", [2, 0])
def test_train_genseg_writes_a_run_dir(tmp_path, hyper_every):
    from weights.checkpoints import load_run

    pairs = phantom_pairs(4, 3, 32)
    torch.manual_seed(0)
    generator = build_pix2pix(dataclasses.replace(TINY_PIX2PIX, use_dropout=True))
    before = [p.detach().clone() for p in generator.parameters()]
    config = GenSegConfig(hyper_every=hyper_every, n_real_masks=1, n_perturbed=1)
    model, metrics = train_genseg(pairs, generator, tmp_path / "gs", config=config, steps=2, batch_size=2,
                                  transunet=TINY_TRANSUNET)
    info = load_run(tmp_path / "gs")
    assert info.kind == "genseg"
    assert {"transunet", "pix2pix", "genseg"} <= set(info.config)
    assert any(k.startswith("segmenter.") for k in info.state_dict)
    assert any(k.startswith("generator.") for k in info.state_dict)
    for name in ("log.csv", "curves.png"):
        assert (tmp_path / "gs" / name).is_file()
    changed = any(not torch.equal(a, b) for a, b in zip(before, model.generator.parameters(), strict=True))
    assert metrics["generator_updates"] == (1 if hyper_every else 0)
    assert changed == bool(hyper_every)


# ----------------------------------------------------------------------------------------------------------
# Synthesis: mask augmentation, random acquisition, weighting, the upper-level split
# ----------------------------------------------------------------------------------------------------------


def test_elastic_geometric_makes_a_new_plausible_lesion():
    from core.metrics import dice
    from training.genseg_synthesis import elastic_geometric

    mask = phantom_pairs(1, 4, 64).masks[0]
    outs = [elastic_geometric(mask, np.random.default_rng(s)) for s in range(12)]
    dices = [dice(o > 0, mask > 0.5) for o in outs]
    areas = [o.sum() / mask.sum() for o in outs]
    assert all(set(np.unique(o).tolist()) <= {0, 1} and o.any() for o in outs)
    assert max(dices) < 0.98  # every draw changes the outline...
    assert np.median(dices) > 0.2  # ...but keeps a lesion of comparable size, not noise
    assert 0.3 < min(areas) and max(areas) < 3.0
    again = elastic_geometric(mask, np.random.default_rng(3))
    assert np.array_equal(again, outs[3])  # deterministic in the generator


def test_affine_geometric_moves_and_reshapes_the_lesion_within_the_released_ranges():
    from core.metrics import dice
    from training.genseg_synthesis import affine_geometric

    mask = phantom_pairs(1, 4, 64).masks[0] > 0.5
    outs = [affine_geometric(mask, np.random.default_rng(s)) for s in range(16)]
    areas = [o.sum() / mask.sum() for o in outs]
    assert all(set(np.unique(o).tolist()) <= {0, 1} and o.any() for o in outs)
    assert max(dice(o > 0, mask) for o in outs) < 0.98  # every draw moves or reshapes it
    # Scale 0.8-1.2 per axis and shear +-8 deg change the area by at most 0.64-1.44x (plus edge pixels).
    assert 0.55 < min(areas) and max(areas) < 1.6
    centre = np.array(np.nonzero(mask)).mean(axis=1)
    moved = [np.abs(np.array(np.nonzero(o)).mean(axis=1) - centre) for o in outs]
    # A 10 % translation plus rotation and scale about the image centre; a flip mirrors the column only.
    assert max(float(m[0]) for m in moved) < 0.1 * 64 + 0.35 * np.abs(centre[0] - 31.5) + 2
    assert np.array_equal(affine_geometric(mask, np.random.default_rng(3)), outs[3])


def test_photometric_jitter_stays_in_range_changes_the_histogram_and_passes_the_gradient():
    from training.genseg_synthesis import photometric_jitter

    images = torch.from_numpy(phantom_pairs(16, 6, 32).images[:, None].copy()).requires_grad_(True)
    out = photometric_jitter(images, torch.Generator().manual_seed(0))
    flat = out.detach().flatten(1)
    assert flat.min() >= 0 and flat.max() <= 1
    assert float((out - images).detach().abs().mean()) > 0.05  # a visible change of appearance
    assert sum(len(row.unique()) <= 16 for row in flat) >= 4  # posterised to 4 bits (unless softened after)...
    flat_equalised = [row for row in flat if abs(float(row.mean()) - 0.5) < 0.05]
    assert flat_equalised  # ...and some images equalised (mean about 0.5, uniform over ranks)
    out.sum().backward()
    assert torch.equal(images.grad, torch.ones_like(images))  # straight through to the generator


def test_lesion_fade_lowers_the_lesions_contrast_and_leaves_the_background():
    from training.genseg_synthesis import lesion_fade

    images, masks = phantom_pairs(16, 6, 64).tensors()
    images.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(lesion_fade(images, masks, gen, 0.0), images)
    out = lesion_fade(images, masks, gen, 1.0)

    def contrast(x: torch.Tensor) -> torch.Tensor:  # surround minus lesion mean, per image
        ring = torch.nn.functional.max_pool2d(masks, 9, stride=1, padding=4) - masks
        return (x * ring).sum((1, 2, 3)) / ring.sum((1, 2, 3)) - (x * masks).sum((1, 2, 3)) / masks.sum((1, 2, 3))

    before, after = contrast(images.detach()), contrast(out.detach())
    assert bool((after <= before + 1e-4).all()) and float((after / before).mean()) < 0.8  # fainter lesions...
    far = torch.nn.functional.max_pool2d(masks, 5, stride=1, padding=2) == 0
    assert torch.equal(out.detach()[far], images.detach()[far])  # ...on an untouched background
    out.sum().backward()
    assert float(images.grad.abs().sum()) > 0  # the hypergradient flows through it


@pytest.mark.parametrize("mask_aug", ["none", "errors", "elastic", "elastic+errors", "affine"])
def test_mask_sampler_draws_labelled_then_augmented_masks(mask_aug):
    from training.genseg_synthesis import MaskSampler

    masks = phantom_pairs(5, 5, 32).tensors()[1]
    sampler = MaskSampler(masks, mask_aug, np.random.default_rng(0))
    out = sampler(2, 3, exclude=torch.tensor([0, 1, 2]))
    assert out.shape == (5, 1, 32, 32) and set(out.unique().tolist()) <= {0.0, 1.0}
    allowed = [masks[3], masks[4]]
    for m in out[:2]:  # labelled masks come only from the indices not excluded
        assert any(torch.equal(m, a) for a in allowed)
    new = [not any(torch.equal(m, a) or torch.equal(m, a.flip(-1)) for a in masks) for m in out[2:]]
    assert any(new) == (mask_aug != "none")
    with pytest.raises(ValueError, match="mask_aug"):
        MaskSampler(masks, "warp", np.random.default_rng(0))


def test_random_acquisition_is_centred_bounded_and_differentiable():
    from training.genseg_synthesis import random_acquisition

    images = torch.from_numpy(phantom_pairs(16, 6, 32).images[:, None].copy()).requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(random_acquisition(images, gen, 0.0), images)
    out = random_acquisition(images, gen, 1.0)
    assert out.shape == images.shape and float(out.detach().min()) >= 0 and float(out.detach().max()) <= 1
    assert float((out - images).detach().abs().mean()) > 0.02  # a visible change of acquisition
    out.sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0  # the hypergradient flows through
    # No preferred direction: over many draws the mean brightness stays about that of the input.
    many = torch.cat([random_acquisition(images.detach(), gen, 1.0) for _ in range(8)])
    assert abs(float(many.mean()) - float(images.detach().mean())) < 0.08


@pytest.mark.parametrize("synthesis", [
    {"mask_aug": "elastic+errors", "acquisition": 0.8, "val_disjoint": True},
    {"mask_aug": "affine", "photometric": True, "lesion_fade": 0.5},
])
def test_training_step_weights_the_synthetic_pairs_it_is_configured_for(synthesis):
    segmenter, generator = _parts()
    model = GenSegModel(segmenter=segmenter, generator=generator).train()
    pairs = phantom_pairs(6, 7, 32)
    config = GenSegConfig(hyper_every=1, lam=0.25, n_real_masks=1, n_perturbed=3, **synthesis)
    hooks = GenSegHooks(config, pairs, seed=0)
    hooks.on_fit_start(model, None)
    assert hooks.synthetic_masks().shape[0] == 4
    out = hooks.training_step(model, tuple(t[:3] for t in pairs.tensors()))
    assert out.loss.item() == pytest.approx(out.scalars["loss_real"] + 0.25 * out.scalars["loss_fake"], rel=1e-5)
    assert out.scalars["hyper_grad_norm"] > 0


@pytest.mark.parametrize("val_disjoint", [False, True])
def test_upper_level_batch_avoids_the_real_batch_only_when_asked(val_disjoint):
    from training.genseg_diagnostics import upper_level_overlap

    pairs = phantom_pairs(9, 8, 32)
    stats = upper_level_overlap(pairs, GenSegConfig(val_disjoint=val_disjoint), steps=60, seed=0)
    if val_disjoint:
        assert stats["fraction_of_upper_level_images_in_the_real_batch"] == 0.0
    else:  # 4 of 9 drawn independently of the batch's 4: about 4/9 of them repeat it
        assert 0.25 < stats["fraction_of_upper_level_images_in_the_real_batch"] < 0.65
    assert stats["distinct_labelled_images_used"] == 9


def test_genseg_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="mask_aug"):
        GenSegConfig(mask_aug="warp")
    with pytest.raises(ValueError, match="acquisition"):
        GenSegConfig(acquisition=-0.1)
    with pytest.raises(ValueError, match="lesion_fade"):
        GenSegConfig(lesion_fade=-0.5)


# ----------------------------------------------------------------------------------------------------------
# The benchmark's statistics and JSON
# ----------------------------------------------------------------------------------------------------------


def test_t_interval_matches_the_textbook_value():
    from training.genseg import t_interval

    mean, (low, high) = t_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * np.std([1, 2, 3, 4], ddof=1) / 2  # t(0.975, df=3)
    assert mean == 2.5 and low == pytest.approx(2.5 - half) and high == pytest.approx(2.5 + half)
    with pytest.raises(ValueError, match="at least 2"):
        t_interval([1.0])


def _row(seed, gains):
    row = {"seed": seed}
    for arm, gain in (("baseline", 0.0), ("pix2pix_aug", -0.01), ("genseg", gains)):
        row[arm] = {test: {"dice": 0.7 + g, "iou": 0.5 + g} for test, g in
                    zip(("in_domain", "out_of_domain", "out_of_domain_shape"),
                        gain if isinstance(gain, tuple) else (gain,) * 3, strict=True)}
    return row


def test_summary_has_the_gain_keys_and_merge_checks_seeds_and_setup():
    from training.genseg import merge_results, summarize

    rows = [_row(0, (0.05, -0.02, 0.01)), _row(1, (0.03, 0.00, 0.03)), _row(2, (0.04, -0.04, 0.02))]
    out = summarize(rows)
    assert out["in_domain_gain"] == pytest.approx(0.04)
    assert out["out_of_domain_gain"] == pytest.approx(-0.02)
    assert out["out_of_domain_shape_gain"] == pytest.approx(0.02)
    low, high = out["in_domain_gain_ci"]
    assert 0 < low < 0.04 < high  # three positive differences: the interval is above zero
    low, high = out["out_of_domain_gain_ci"]
    assert low < -0.02 < high
    assert out["paired_dice_differences"]["pix2pix_aug_minus_baseline"]["in_domain"]["better_in"] == 0
    setup = {"seeds": [0, 1], "image_size": 32}
    merged = merge_results([{"setup": setup, "per_seed": rows[:2]}, {"setup": {**setup, "seeds": [2]},
                                                                       "per_seed": rows[2:]}])
    assert merged["setup"]["seeds"] == [0, 1, 2] and merged["in_domain_gain"] == pytest.approx(0.04)
    with pytest.raises(ValueError, match="overlap"):
        merge_results([{"setup": setup, "per_seed": rows[:2]}, {"setup": setup, "per_seed": rows[1:]}])
    with pytest.raises(ValueError, match="different setups"):
        merge_results([{"setup": setup, "per_seed": rows[:1]}, {"setup": {"seeds": [1], "image_size": 64},
                                                                  "per_seed": rows[1:2]}])


def test_shape_shift_set_has_angular_lesions_and_keeps_the_default_phantoms():
    from core.phantoms import breast_ultrasound
    from training.genseg import shape_shift_pairs

    pairs = shape_shift_pairs(6, 3, 64)
    assert pairs.images.shape == (6, 64, 64) and all(m.any() for m in pairs.masks)
    # Straight sides: the lesion fills its convex hull almost completely (the random margins do not).
    from scipy.spatial import ConvexHull

    def solidity(m):
        ys, xs = np.nonzero(m)
        return m.sum() / ConvexHull(np.c_[ys, xs]).volume

    assert np.median([solidity(m) for m in pairs.masks]) > 0.9
    image, mask = breast_ultrasound(11, 64)
    again = breast_ultrasound(11, 64, margin=None)
    assert np.array_equal(image, again[0]) and np.array_equal(mask, again[1])
    with pytest.raises(ValueError, match="margin"):
        breast_ultrasound(11, 64, margin="star")


def test_benchmark_json_on_a_tiny_run(tmp_path):
    from training.genseg import run_benchmark

    torch.set_num_threads(1)
    out = run_benchmark(tmp_path / "b", seeds=[0, 1], n_train=4, size=32, steps=2, pix2pix_steps=50, n_test=4,
                        config=GenSegConfig(n_real_masks=1, n_perturbed=1, mask_aug="elastic",
                                            acquisition=0.5), arms=("baseline", "genseg"))
    for key in ("in_domain", "out_of_domain", "out_of_domain_shape"):
        diffs = [r["genseg"][key]["dice"] - r["baseline"][key]["dice"] for r in out["per_seed"]]
        assert out[f"{key}_gain"] == pytest.approx(np.mean(diffs))
        low, high = out[f"{key}_gain_ci"]
        assert low <= out[f"{key}_gain"] <= high
    assert out["setup"]["test_sets"]["out_of_domain_shape"]["source"].startswith("phantoms:ultrasound:angular")
