"""GenSeg stage 2: the unrolled hypergradient and the end-to-end run (tiny TransUNet + tiny pix2pix)."""

from __future__ import annotations

import dataclasses

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
    from core.checkpoints import load_run

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
