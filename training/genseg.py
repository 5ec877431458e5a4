"""GenSeg stage 2: the generator is trained end to end to make the segmenter better, not just realistic.

Bilevel problem (GenSeg, Zhang et al.)::

    lower:  theta*(phi) = argmin_theta  L_seg(S_theta(x), y) + lambda * L_seg(S_theta(G_phi(m)), m)
    upper:  min_phi     L_seg(S_theta*(phi)(x_val), y_val)

with ``x, y`` the labelled pairs, ``m`` real masks and masks perturbed by ``training.augment.MaskAugmentor``
(shifted, grown, shrunk, chunked lesions: new shapes the labelled set lacks), ``G`` the stage-1 pix2pix
generator and ``S`` the project's TransUNet.

**How the upper gradient is computed.** The original code uses the Betty library. We use the one-step
unrolled hypergradient of DARTS (Liu et al., 2019), which is what such bilevel methods use in practice:
``theta' = theta - xi * grad_theta L_lower(theta, phi)`` with ``create_graph=True``, the validation loss is
evaluated at ``theta'`` through ``torch.func.functional_call`` and differentiated with respect to ``phi``
(an exact second-order term via double backward, not DARTS's finite-difference approximation). Only the
synthetic part of ``L_lower`` depends on ``phi``, so the real part's gradient is taken without a graph.
Reasons for not using Betty here: its PyPI package (``betty-ml`` 0.2.1, no release since 2023) is an extra
heavy dependency (its own engine, problem/config classes and distributed code) for what is one
``functional_call`` and two ``autograd.grad`` calls, and the offline machines this project targets cannot
fetch it at run time; the one-step unroll is the approximation DARTS-style bilevel methods rely on, and
it is checked against finite differences in tests/test_genseg.py.

Everything runs through the ONE trainer (training/loop.py): the trainer steps the segmenter; the generator
and its Adam optimiser live in :class:`GenSegHooks` and are stepped inside ``training_step`` every
``hyper_every`` steps. An optional L1 anchor (the pix2pix reconstruction term on real pairs) keeps the
generator's images close to the data while the hypergradient reshapes them. The upper-level ("validation")
batches are drawn from the labelled pairs themselves (9 labels leave no separate validation set), and so is
the trainer's model selection, identically for every arm of the benchmark.

Commands:
    ``python -m training genseg``: stage 2 from a stage-1 pix2pix run dir; writes a ``"genseg"`` run dir
    (weights ``segmenter.*`` (a TransUNet) and ``generator.*``).
    ``python -m training genseg-benchmark``: the miniature reproduction (9 labelled phantoms; baseline vs
    frozen-generator augmentation vs GenSeg, same steps; in-domain and out-of-domain Dice/IoU) -> JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from core.checkpoints import load_run, save_run
from core.losses import build_loss
from core.metrics import dice as dice_metric
from core.metrics import iou as iou_metric
from models.pix2pix import PIX2PIX_PRESETS, Pix2PixGenerator, build_pix2pix
from models.transunet import TRANSUNET_PRESETS, TransUNet, build_transunet
from training.augment import AugmentorConfig, MaskAugmentor
from training.generators import (
    PairSet,
    eval_loader,
    pair_loader,
    phantom_pairs,
    random_hflip,
    train_pix2pix,
)
from training.loop import LoopConfig, StepOutput, Trainer, TrainHooks

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Shape-changing perturbations only: new plausible lesions, not failure modes such as empty or scattered masks.
PERTURBATION = AugmentorConfig(
    weights={"over_segmentation": 1.0, "under_segmentation": 1.0, "shift": 1.0, "missing_chunk": 0.5},
    over_scale=(1.2, 2.0), under_scale=(0.5, 0.9), shift_fraction=(0.1, 0.5), secondary_prob=0.3,
    soft_mask_prob=0.0,
)


@dataclass(frozen=True)
class GenSegConfig:
    """Stage-2 settings.

    Attributes:
        lam: weight lambda of the synthetic-pair loss.
        seg_lr: segmenter learning rate (AdamW, the trainer's cosine schedule).
        gen_lr: generator learning rate (Adam, beta1 0.5) for the hypergradient updates.
        unroll_lr: xi, the SGD step of the virtual lower-level update.
        hyper_every: update the generator every this many steps (0: never — the frozen-generator ablation).
        anchor_l1: weight of the L1 anchor ``|G(m) - x|_1`` on real pairs in the generator's objective.
        n_real_masks / n_perturbed: synthetic images per step from real masks / from perturbed masks.
        loss: segmentation loss spec (core.losses).
        hflip: random left-right flips of the real pairs.
    """

    lam: float = 1.0
    seg_lr: float = 1e-3
    gen_lr: float = 2e-4
    unroll_lr: float = 0.01
    hyper_every: int = 2
    anchor_l1: float = 1.0
    n_real_masks: int = 2
    n_perturbed: int = 4
    loss: str = "dice+bce"
    hflip: bool = True

    def __post_init__(self) -> None:
        for name in ("lam", "seg_lr", "gen_lr", "unroll_lr", "anchor_l1"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"GenSegConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("hyper_every", "n_real_masks", "n_perturbed"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise ValueError(f"GenSegConfig.{name} must be an int >= 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenSegConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"GenSegConfig: unknown field(s) {unknown}")
        return cls(**data)


class GenSegModel(nn.Module):
    """The segmenter and the generator trained together; ``forward`` is the segmenter's.

    ``forward(image (B, 1, S, S) in [0, 1]) -> logits (B, 1, S, S)``.
    """

    def __init__(self, *, segmenter: TransUNet, generator: Pix2PixGenerator) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.generator = generator

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.segmenter(image)


def _segmenter(model: nn.Module) -> nn.Module:
    return model.segmenter if isinstance(model, GenSegModel) else model


def unrolled_hypergradient(
    segmenter: nn.Module,
    generator: nn.Module,
    loss_fn: LossFn,
    real: tuple[torch.Tensor, torch.Tensor],
    synthetic_masks: torch.Tensor,
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    lam: float,
    unroll_lr: float,
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """One-step unrolled hypergradient of the validation loss with respect to the generator's parameters.

    Args:
        segmenter: ``S_theta``; its parameters are not modified (the virtual step is functional).
        generator: ``G_phi`` mapping masks ``(B, 1, S, S) in [0, 1]`` to images.
        loss_fn: ``loss_fn(logits, target) -> scalar``.
        real: ``(images, masks)`` of the lower-level real batch, ``(B, 1, S, S)``.
        synthetic_masks: ``(M, 1, S, S)`` masks the generator turns into synthetic training images.
        val: ``(images, masks)`` of the upper-level (validation) batch.
        lam: weight of the synthetic loss; unroll_lr: the virtual SGD step xi.

    Returns:
        ``(grads, info)``: one gradient tensor per ``generator.parameters()`` (zeros where unused) and
        ``{"hyper_val_loss": L_val(theta'), "hyper_grad_norm": ...}``.

    Attention runs on the math SDPA kernel here: the fused CPU/flash kernels have no double backward. The
    segmenter's buffers (batch-norm running statistics) are restored afterwards: the virtual step's forward
    passes must not count as training batches.
    """
    saved = {name: b.detach().clone() for name, b in segmenter.named_buffers()}
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            return _unrolled_hypergradient(segmenter, generator, loss_fn, real, synthetic_masks, val, lam,
                                           unroll_lr)
    finally:
        with torch.no_grad():
            for name, b in segmenter.named_buffers():
                b.copy_(saved[name])


def _unrolled_hypergradient(
    segmenter: nn.Module, generator: nn.Module, loss_fn: LossFn, real: tuple[torch.Tensor, torch.Tensor],
    synthetic_masks: torch.Tensor, val: tuple[torch.Tensor, torch.Tensor], lam: float, unroll_lr: float,
) -> tuple[list[torch.Tensor], dict[str, float]]:
    names, params = zip(*[(n, p) for n, p in segmenter.named_parameters() if p.requires_grad], strict=True)
    # 1. Gradient of the real-pair loss: constant in phi, so no graph is kept.
    real_loss = loss_fn(segmenter(real[0]), real[1])
    g_real = torch.autograd.grad(real_loss, params, allow_unused=True)
    # 2. Gradient of the synthetic loss with its graph back to phi.
    fake = generator(synthetic_masks)
    synthetic_loss = lam * loss_fn(segmenter(fake), synthetic_masks)
    g_fake = torch.autograd.grad(synthetic_loss, params, create_graph=True, allow_unused=True)
    # 3. Virtual step theta' = theta - xi * grad, and the validation loss at theta'.
    virtual = {}
    for name, p, gr, gf in zip(names, params, g_real, g_fake, strict=True):
        step = torch.zeros_like(p) if gr is None else gr.detach()
        if gf is not None:
            step = step + gf
        virtual[name] = p.detach() - unroll_lr * step
    val_loss = loss_fn(functional_call(segmenter, virtual, (val[0],)), val[1])
    gen_params = list(generator.parameters())
    grads = torch.autograd.grad(val_loss, gen_params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(gen_params, grads, strict=True)]
    norm = float(torch.sqrt(sum((g.detach() ** 2).sum() for g in grads)))
    return grads, {"hyper_val_loss": float(val_loss.detach()), "hyper_grad_norm": norm}


def segmentation_scores(logits: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """Mean Dice and IoU (core.metrics conventions) of ``sigmoid(logits) > threshold`` against ``masks``."""
    pred = (torch.sigmoid(logits) > threshold).cpu().numpy()[:, 0]
    gt = (masks > 0.5).cpu().numpy()[:, 0]
    return {"dice": float(np.mean([dice_metric(p, g) for p, g in zip(pred, gt, strict=True)])),
            "iou": float(np.mean([iou_metric(p, g) for p, g in zip(pred, gt, strict=True)]))}


class SegmentationHooks(TrainHooks):
    """Supervised segmentation on real pairs (the baseline arm); base class of :class:`GenSegHooks`."""

    def __init__(self, config: GenSegConfig, seed: int = 0) -> None:
        self.config = config
        self.loss_fn = build_loss(config.loss)
        self.rng = torch.Generator().manual_seed(seed)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"name": "segmenter", "params": list(_segmenter(model).parameters()), "lr": self.config.seg_lr}]

    def _real_batch(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = batch
        if self.config.hflip:
            image, mask = random_hflip(image, mask, generator=self.rng)
        return image, mask

    def training_step(self, model: nn.Module, batch: Any) -> StepOutput:
        image, mask = self._real_batch(batch)
        loss = self.loss_fn(_segmenter(model)(image), mask)
        return StepOutput(loss, scalars={"loss_real": float(loss.detach())})

    def validate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        logits, masks = [], []
        for image, mask in loader:
            logits.append(_segmenter(model)(image))
            masks.append(mask)
        logits_t, masks_t = torch.cat(logits), torch.cat(masks)
        scores = segmentation_scores(logits_t, masks_t)
        return {"val_loss": float(self.loss_fn(logits_t, masks_t)), "val_dice": scores["dice"],
                "val_iou": scores["iou"]}


class GenSegHooks(SegmentationHooks):
    """Real pairs + generated pairs (weight lambda); the generator follows the unrolled hypergradient.

    Args:
        config: stage-2 settings.
        labelled: the labelled pairs; masks for synthesis and upper-level batches are drawn from them.
        seed: seeds flips, mask choice, perturbations and the generator's dropout noise.
    """

    def __init__(self, config: GenSegConfig, labelled: PairSet, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.images, self.masks = labelled.tensors()
        self.augmentor = MaskAugmentor(PERTURBATION)
        self.np_rng = np.random.default_rng(seed)
        self.gen_optimizer: torch.optim.Optimizer | None = None
        self.steps = 0
        self.generator_updates = 0

    def on_fit_start(self, model: nn.Module, val_loader: Any) -> None:
        self.gen_optimizer = torch.optim.Adam(model.generator.parameters(), lr=self.config.gen_lr, betas=(0.5, 0.999))

    def _draw(self, n: int) -> torch.Tensor:
        return torch.from_numpy(self.np_rng.choice(len(self.masks), size=n, replace=len(self.masks) < n))

    def synthetic_masks(self) -> torch.Tensor:
        """``(n_real_masks + n_perturbed, 1, S, S)`` binary masks: labelled masks, then perturbed ones."""
        cfg = self.config
        real = self.masks[self._draw(cfg.n_real_masks)]
        base = self.masks[self._draw(cfg.n_perturbed)].numpy()[:, 0]
        perturbed = [self.augmentor(m, self.np_rng, force_soft=False)[0] for m in base]
        flips = self.np_rng.random(len(perturbed)) < 0.5
        perturbed = [np.fliplr(p) if f else p for p, f in zip(perturbed, flips, strict=True)]
        parts = [real]
        if perturbed:
            parts.append(torch.from_numpy(np.stack(perturbed).astype(np.float32)[:, None].copy()))
        return torch.cat(parts)

    def generator_step(self, model: GenSegModel, real: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        """One Adam step of the generator on the hypergradient (+ the L1 anchor); returns logged scalars."""
        assert self.gen_optimizer is not None, "on_fit_start creates the generator optimiser"
        cfg = self.config
        val_index = self._draw(min(len(self.images), real[0].shape[0]))
        grads, info = unrolled_hypergradient(
            model.segmenter, model.generator, self.loss_fn, real, self.synthetic_masks(),
            (self.images[val_index], self.masks[val_index]), lam=cfg.lam, unroll_lr=cfg.unroll_lr,
        )
        if cfg.anchor_l1 > 0:
            anchor_index = self._draw(min(len(self.images), 4))
            anchor = (model.generator(self.masks[anchor_index]) - self.images[anchor_index]).abs().mean()
            anchor_grads = torch.autograd.grad(cfg.anchor_l1 * anchor, list(model.generator.parameters()),
                                               allow_unused=True)
            grads = [g if a is None else g + a for g, a in zip(grads, anchor_grads, strict=True)]
            info["anchor_l1"] = float(anchor.detach())
        self.gen_optimizer.zero_grad(set_to_none=True)
        for p, g in zip(model.generator.parameters(), grads, strict=True):
            p.grad = g.detach()
        self.gen_optimizer.step()
        self.gen_optimizer.zero_grad(set_to_none=True)
        self.generator_updates += 1
        return info

    def training_step(self, model: nn.Module, batch: Any) -> StepOutput:
        assert isinstance(model, GenSegModel)
        cfg = self.config
        image, mask = self._real_batch(batch)
        self.steps += 1
        scalars: dict[str, float] = {}
        if cfg.hyper_every > 0 and self.steps % cfg.hyper_every == 0:
            scalars.update(self.generator_step(model, (image, mask)))
        # Lower level: the segmenter's loss on real + generated pairs (generator output as fixed data here).
        masks = self.synthetic_masks()
        with torch.no_grad():
            fake = model.generator(masks)
        loss_real = self.loss_fn(model.segmenter(image), mask)
        loss_fake = self.loss_fn(model.segmenter(fake), masks)
        scalars.update({"loss_real": float(loss_real.detach()), "loss_fake": float(loss_fake.detach())})
        return StepOutput(loss_real + cfg.lam * loss_fake, scalars=scalars)


def _fit_segmenter(
    model: nn.Module, hooks: SegmentationHooks, train: PairSet, steps: int, batch_size: int, out: Path,
    seed: int, title: str,
) -> Any:
    epochs = max(1, steps // 50)
    loop = LoopConfig(epochs=epochs, max_steps=steps, monitor="val_dice", mode="max", seed=seed, progress=False)
    loader = pair_loader(train, batch_size, -(-steps // epochs), seed)
    return Trainer(loop).fit(model, hooks, loader, eval_loader(train), out, title=title)


def transunet_config(size: int) -> dict[str, Any]:
    """The ``"default"`` TransUNet preset at ``size`` px (only ``img_size`` changes)."""
    return dataclasses.replace(TRANSUNET_PRESETS["default"], img_size=size).to_dict()


def train_genseg(
    train: PairSet,
    generator: Pix2PixGenerator,
    out: str | Path,
    *,
    config: GenSegConfig | None = None,
    steps: int = 200,
    batch_size: int = 4,
    seed: int = 0,
    transunet: str | dict[str, Any] = "default",
    sources: dict[str, str] | None = None,
) -> tuple[GenSegModel, dict[str, Any]]:
    """Stage 2 on the labelled ``train`` pairs (model selection on them too); writes a ``"genseg"`` run dir."""
    config = config or GenSegConfig()
    torch.manual_seed(seed)
    segmenter = build_transunet(transunet)
    if segmenter.config.img_size != train.images.shape[-1]:
        raise ValueError(f"train_genseg: pairs are {train.images.shape[-1]} px; the TransUNet expects "
                         f"{segmenter.config.img_size} px")
    model = GenSegModel(segmenter=segmenter, generator=generator)
    hooks = GenSegHooks(config, train, seed=seed)
    result = _fit_segmenter(model, hooks, train, steps, batch_size, Path(out), seed, "genseg")
    metrics = {**result.best_metrics, "best_epoch": result.best_epoch, "steps": result.steps,
               "generator_updates": hooks.generator_updates, "seconds": round(result.seconds, 1)}
    save_run(out, model, config={"transunet": segmenter.config.to_dict(), "pix2pix": generator.config.to_dict(),
                                 "genseg": {**config.to_dict(), "steps": steps, "batch_size": batch_size,
                                            "train_source": train.source, "n_train": len(train)}},
             threshold=0.5, metrics=metrics, kind="genseg", phase="genseg", seed=seed,
             data_fingerprint=train.fingerprint(), sources=sources)
    return model.eval(), metrics


def train_baseline(
    train: PairSet, out: str | Path, *, config: GenSegConfig | None = None, steps: int = 200, batch_size: int = 4,
    seed: int = 0, transunet: str | dict[str, Any] = "default",
) -> tuple[TransUNet, dict[str, Any]]:
    """The same segmenter, steps, batches and flips on the real pairs only; writes a ``"transunet"`` run dir."""
    config = config or GenSegConfig()
    torch.manual_seed(seed)
    segmenter = build_transunet(transunet)
    result = _fit_segmenter(segmenter, SegmentationHooks(config, seed), train, steps, batch_size, Path(out), seed,
                            "baseline")
    metrics = {**result.best_metrics, "best_epoch": result.best_epoch, "steps": result.steps,
               "seconds": round(result.seconds, 1)}
    save_run(out, segmenter, config={"transunet": segmenter.config.to_dict()}, threshold=0.5, metrics=metrics,
             kind="transunet", phase="genseg-baseline", seed=seed, data_fingerprint=train.fingerprint())
    return segmenter.eval(), metrics


@torch.no_grad()
def evaluate_segmenter(segmenter: nn.Module, pairs: PairSet) -> dict[str, float]:
    """Dice / IoU (mean and std over cases) of a segmenter on a pair set."""
    segmenter.eval()
    dices, ious = [], []
    for image, mask in eval_loader(pairs, 32):
        pred = (torch.sigmoid(segmenter(image)) > 0.5).numpy()[:, 0]
        gt = mask.numpy()[:, 0] > 0.5
        dices += [dice_metric(p, g) for p, g in zip(pred, gt, strict=True)]
        ious += [iou_metric(p, g) for p, g in zip(pred, gt, strict=True)]
    return {"dice": float(np.mean(dices)), "dice_std": float(np.std(dices)), "iou": float(np.mean(ious)),
            "iou_std": float(np.std(ious)), "n": len(dices)}


# ----------------------------------------------------------------------------------------------------------
# The miniature reproduction
# ----------------------------------------------------------------------------------------------------------

ARMS = ("baseline", "pix2pix_aug", "genseg")


def run_benchmark(
    out: str | Path, *, seeds: list[int], n_train: int = 9, size: int = 64, steps: int = 200,
    pix2pix_steps: int = 400, n_test: int = 100, config: GenSegConfig | None = None,
) -> dict[str, Any]:
    """Per seed: 9 labelled phantoms -> pix2pix (stage 1) -> three segmenters with the same steps and batches:
    ``baseline`` (real pairs only), ``pix2pix_aug`` (frozen stage-1 generator, lambda-weighted synthetic pairs)
    and ``genseg`` (end to end). Test: ``n_test`` in-domain and ``n_test`` out-of-domain phantoms (fixed seeds,
    disjoint from training). Returns the JSON-ready results (per seed and mean/std over seeds)."""
    config = config or GenSegConfig()
    out = Path(out)
    tests = {"in_domain": phantom_pairs(n_test, 50_000, size, "in"),
             "out_of_domain": phantom_pairs(n_test, 60_000, size, "ood")}
    pix_config = dataclasses.replace(PIX2PIX_PRESETS["default"], image_size=size, num_downs=max(5, int(np.log2(size))))
    transunet = transunet_config(size)
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        t0 = time.time()
        train = phantom_pairs(n_train, seed, size, "in")
        generator, _ = train_pix2pix(train, train, out / f"seed{seed}" / "pix2pix", preset=pix_config.to_dict(),
                                     epochs=max(1, pix2pix_steps // 50), steps_per_epoch=50, batch_size=4, seed=seed)
        times = {"pix2pix_s": round(time.time() - t0, 1)}
        row: dict[str, Any] = {"seed": seed}
        for arm in ARMS:
            t0 = time.time()
            run_dir = out / f"seed{seed}" / arm
            if arm == "baseline":
                segmenter, _ = train_baseline(train, run_dir, config=config, steps=steps, seed=seed,
                                              transunet=transunet)
            else:
                arm_config = config if arm == "genseg" else dataclasses.replace(config, hyper_every=0)
                gen = build_pix2pix(pix_config)
                gen.load_state_dict(generator.state_dict())
                model, _ = train_genseg(train, gen, run_dir, config=arm_config, steps=steps, seed=seed,
                                        transunet=transunet)
                segmenter = model.segmenter
            row[arm] = {name: evaluate_segmenter(segmenter, pairs) for name, pairs in tests.items()}
            times[f"{arm}_s"] = round(time.time() - t0, 1)
            log.info("seed %d %s: %s", seed, arm, json.dumps(row[arm]))
        row["wall_times_s"] = times
        per_seed.append(row)
    summary: dict[str, Any] = {}
    for arm in ARMS:
        summary[arm] = {}
        for test in tests:
            for metric in ("dice", "iou"):
                values = [r[arm][test][metric] for r in per_seed]
                summary[arm][f"{test}_{metric}"] = float(np.mean(values))
                summary[arm][f"{test}_{metric}_std_over_seeds"] = float(np.std(values))
    return {
        "setup": {"n_labelled": n_train, "image_size": size, "segmenter": "TransUNet 'default' preset at "
                  f"img_size={size}", "generator": pix_config.to_dict(), "segmenter_steps": steps,
                  "pix2pix_steps": pix2pix_steps, "genseg": config.to_dict(), "seeds": seeds,
                  "test_sets": {name: {"source": pairs.source, "n": len(pairs)} for name, pairs in tests.items()},
                  "model_selection": "best val_dice on the labelled training pairs (no extra labels), all arms"},
        "summary": summary,
        "per_seed": per_seed,
    }


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = GenSegConfig()
    parser.add_argument("--lam", type=float, default=defaults.lam, help="weight of the synthetic-pair loss")
    parser.add_argument("--gen-lr", type=float, default=defaults.gen_lr)
    parser.add_argument("--seg-lr", type=float, default=defaults.seg_lr)
    parser.add_argument("--unroll-lr", type=float, default=defaults.unroll_lr)
    parser.add_argument("--hyper-every", type=int, default=defaults.hyper_every)
    parser.add_argument("--anchor-l1", type=float, default=defaults.anchor_l1)
    parser.add_argument("--steps", type=int, default=200, help="segmenter optimiser steps")


def _config(args: argparse.Namespace) -> GenSegConfig:
    return GenSegConfig(lam=args.lam, gen_lr=args.gen_lr, seg_lr=args.seg_lr, unroll_lr=args.unroll_lr,
                        hyper_every=args.hyper_every, anchor_l1=args.anchor_l1)


def add_arguments(parser: argparse.ArgumentParser, command_name: str = "genseg") -> None:
    _add_config_arguments(parser)
    if command_name == "genseg-benchmark":
        parser.add_argument("--out", default="runs/genseg-benchmark", help="folder for the per-seed run dirs")
        parser.add_argument("--json", default="docs/genseg_results.json")
        parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        parser.add_argument("--size", type=int, default=64, help="image side for generator and TransUNet")
        parser.add_argument("--n-train", type=int, default=9)
        parser.add_argument("--n-test", type=int, default=100)
        parser.add_argument("--pix2pix-steps", type=int, default=400)
        parser.add_argument("--threads", type=int, help="torch CPU threads (1 helps on a busy machine)")
        return
    parser.add_argument("--pix2pix", required=True, help="stage-1 run directory (kind 'pix2pix')")
    parser.add_argument("--out", required=True, help="run directory to write")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--data", help="labelled segmentation folder/ZIP (images/ + masks/)")
    src.add_argument("--phantoms", type=int, default=9, help="number of labelled ultrasound phantoms (default 9)")
    parser.add_argument("--phantom-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if getattr(args, "command", "genseg") == "genseg-benchmark":
        if args.threads:
            torch.set_num_threads(args.threads)
        t0 = time.time()
        results = run_benchmark(args.out, seeds=args.seeds, n_train=args.n_train, size=args.size, steps=args.steps,
                                pix2pix_steps=args.pix2pix_steps, n_test=args.n_test, config=_config(args))
        results["wall_time_s"] = round(time.time() - t0, 1)
        results["command"] = "python -m training genseg-benchmark " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in sorted(vars(args).items()) if k not in ("command", "module") and v is not None)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results["summary"], indent=2))
        return 0
    from training.generators import folder_pairs

    stage1 = load_run(args.pix2pix)
    if stage1.kind != "pix2pix":
        raise ValueError(f"{args.pix2pix}: kind = {stage1.kind!r}; expected a 'pix2pix' run directory")
    generator = build_pix2pix(stage1.config["pix2pix"])
    generator.load_state_dict(stage1.state_dict)
    size = generator.config.image_size
    train = folder_pairs(args.data, size) if args.data else phantom_pairs(args.phantoms, args.phantom_seed, size)
    _, metrics = train_genseg(train, generator, args.out, config=_config(args), steps=args.steps, seed=args.seed,
                              transunet=transunet_config(size), sources={"pix2pix": str(args.pix2pix)})
    print(json.dumps({"run_dir": str(args.out), **metrics}, indent=2))
    return 0
