"""GenSeg stage 2: the generator trained end to end to make the segmenter better, not just realistic
(the bilevel problem and its approximations: docs/architecture.md, "training").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
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

from core.config import ConfigMixin
from core.losses import build_loss
from core.machine import cpu_model
from core.metrics import dice as dice_metric
from core.metrics import iou as iou_metric
from models.pix2pix import PIX2PIX_PRESETS, Pix2PixGenerator, build_pix2pix
from models.transunet import TRANSUNET_PRESETS, TransUNet, build_transunet
from training.generators import (
    PairSet,
    eval_loader,
    pair_loader,
    phantom_pairs,
    random_hflip,
    train_pix2pix,
)
from training.genseg_synthesis import (
    MASK_AUGS,
    MaskSampler,
    lesion_fade,
    photometric_jitter,
    random_acquisition,
)
from training.loop import LoopConfig, StepOutput, Trainer, TrainHooks
from weights.checkpoints import RunInfo, load_run, save_run

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GenSegConfig(ConfigMixin):
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
        mask_aug: how perturbed masks are made (training.genseg_synthesis.MASK_AUGS).
        acquisition: strength of the random scanner (gain curve, contrast, speckle) each generated image is
            seen through (0: the generator's output as is; dropout is then its only noise).
        val_disjoint: draw the upper-level batch from labelled images that are not in the step's real batch
            (False: any labelled image, so it can repeat the batch the virtual step trains on).
        lesion_fade: strength of the random lesion fade on each generated image
            (training.genseg_synthesis.lesion_fade: the lesion pulled towards its surround by U(0, strength)),
            before the acquisition; 0: none.
        photometric: pass each generated image through the released GenSeg script's jitter
            (training.genseg_synthesis.photometric_jitter: stretch, equalise, posterise, soften, autocontrast)
            after the random acquisition.
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
    mask_aug: str = "errors"
    acquisition: float = 0.0
    val_disjoint: bool = False
    photometric: bool = False
    lesion_fade: float = 0.0

    @property
    def changes_appearance(self) -> bool:
        """Whether the lesion fade or the random acquisition is on (what the ``acq_aug`` arm applies to real
        pairs)."""
        return self.acquisition > 0 or self.lesion_fade > 0

    def __post_init__(self) -> None:
        if self.mask_aug not in MASK_AUGS:
            raise ValueError(f"GenSegConfig.mask_aug = {self.mask_aug!r}; expected one of {MASK_AUGS}")
        for name in ("lam", "seg_lr", "gen_lr", "unroll_lr", "anchor_l1", "acquisition", "lesion_fade"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"GenSegConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("hyper_every", "n_real_masks", "n_perturbed"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise ValueError(f"GenSegConfig.{name} must be an int >= 0, got {getattr(self, name)!r}")


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


def genseg_part(info: RunInfo, part: str) -> nn.Module:
    """The ``"generator"`` (a pix2pix) or ``"segmenter"`` (a TransUNet) of a loaded run, in eval mode: a
    ``"genseg"`` run holds both under those key prefixes; a pix2pix or baseline run holds only its own, unprefixed."""
    if part not in ("generator", "segmenter"):
        raise ValueError(f"part = {part!r}; expected 'generator' or 'segmenter'")
    module = build_pix2pix(info.config["pix2pix"]) if part == "generator" else build_transunet(info.config["transunet"])
    prefix = f"{part}."
    state = {k[len(prefix):]: v for k, v in info.state_dict.items() if k.startswith(prefix)}
    module.load_state_dict(state or info.state_dict)
    return module.eval()


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
    synthesize: Callable[[torch.Tensor], torch.Tensor] | None = None,
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
        synthesize: masks -> images through ``generator`` (default: ``generator`` itself), e.g. with a random
            acquisition after it.

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
                                           unroll_lr, synthesize or generator)
    finally:
        with torch.no_grad():
            for name, b in segmenter.named_buffers():
                b.copy_(saved[name])


def _unrolled_hypergradient(
    segmenter: nn.Module, generator: nn.Module, loss_fn: LossFn, real: tuple[torch.Tensor, torch.Tensor],
    synthetic_masks: torch.Tensor, val: tuple[torch.Tensor, torch.Tensor], lam: float, unroll_lr: float,
    synthesize: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[list[torch.Tensor], dict[str, float]]:
    names, params = zip(*[(n, p) for n, p in segmenter.named_parameters() if p.requires_grad], strict=True)
    # 1. Gradient of the real-pair loss: constant in phi, so no graph is kept.
    real_loss = loss_fn(segmenter(real[0]), real[1])
    g_real = torch.autograd.grad(real_loss, params, allow_unused=True)
    # 2. Gradient of the synthetic loss with its graph back to phi.
    fake = synthesize(synthetic_masks)
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
    """Supervised segmentation on real pairs (the baseline arm); base class of :class:`GenSegHooks`.

    ``real_acquisition``: see half of the real images through the lesion fade and the random scanner of
    ``config.lesion_fade`` / ``config.acquisition`` (the ``acq_aug`` ablation: the appearance changes the
    generated images get, without any generator).
    """

    def __init__(self, config: GenSegConfig, seed: int = 0, real_acquisition: bool = False) -> None:
        self.config = config
        self.loss_fn = build_loss(config.loss)
        self.rng = torch.Generator().manual_seed(seed)
        self.real_acquisition = real_acquisition

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"name": "segmenter", "params": list(_segmenter(model).parameters()), "lr": self.config.seg_lr}]

    def _real_batch(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = batch
        if self.config.hflip:
            image, mask = random_hflip(image, mask, generator=self.rng)
        if self.real_acquisition and self.config.changes_appearance:
            seen = lesion_fade(image, mask, self.rng, self.config.lesion_fade)
            seen = random_acquisition(seen, self.rng, self.config.acquisition)
            pick = torch.rand(image.shape[0], generator=self.rng) < 0.5
            image = torch.where(pick[:, None, None, None], seen, image)
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
        seed: seeds flips, mask choice, perturbations, the random acquisition and the generator's dropout noise.
    """

    def __init__(self, config: GenSegConfig, labelled: PairSet, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.images, self.masks = labelled.tensors()
        self.np_rng = np.random.default_rng(seed)
        self.sampler = MaskSampler(self.masks, config.mask_aug, self.np_rng)
        self.gen_optimizer: torch.optim.Optimizer | None = None
        self.steps = 0
        self.generator_updates = 0

    def on_fit_start(self, model: nn.Module, val_loader: Any) -> None:
        self.gen_optimizer = torch.optim.Adam(model.generator.parameters(), lr=self.config.gen_lr, betas=(0.5, 0.999))

    def _draw(self, n: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
        return self.sampler.draw_indices(n, exclude)

    def synthetic_masks(self) -> torch.Tensor:
        """``(n_real_masks + n_perturbed, 1, S, S)`` binary masks: labelled masks, then perturbed ones."""
        return self.sampler(self.config.n_real_masks, self.config.n_perturbed)

    def synthesize(self, generator: nn.Module, masks: torch.Tensor) -> torch.Tensor:
        """``masks (M, 1, S, S)`` -> images ``(M, 1, S, S) in [0, 1]``: the generator (dropout on in training),
        then the lesion fade and the random acquisition of their configured strengths and, if
        ``config.photometric``, the photometric jitter."""
        images = lesion_fade(generator(masks), masks, self.rng, self.config.lesion_fade)
        images = random_acquisition(images, self.rng, self.config.acquisition)
        return photometric_jitter(images, self.rng) if self.config.photometric else images

    def labelled_indices(self, masks: torch.Tensor) -> torch.Tensor:
        """Indices of the labelled pairs whose mask (or its mirror image) is in ``masks (B, 1, S, S)``."""
        hit = [i for i, m in enumerate(self.masks)
               if any(torch.equal(m, b) or torch.equal(m.flip(-1), b) for b in masks)]
        return torch.tensor(hit, dtype=torch.long)

    def generator_step(self, model: GenSegModel, real: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        """One Adam step of the generator on the hypergradient (+ the L1 anchor); returns logged scalars."""
        assert self.gen_optimizer is not None, "on_fit_start creates the generator optimiser"
        cfg = self.config
        exclude = self.labelled_indices(real[1]) if cfg.val_disjoint else None
        n_val = min(len(self.images), real[0].shape[0])
        if exclude is not None:
            n_val = min(n_val, max(1, len(self.images) - len(exclude)))
        val_index = self._draw(n_val, exclude)
        grads, info = unrolled_hypergradient(
            model.segmenter, model.generator, self.loss_fn, real, self.synthetic_masks(),
            (self.images[val_index], self.masks[val_index]), lam=cfg.lam, unroll_lr=cfg.unroll_lr,
            synthesize=lambda m: self.synthesize(model.generator, m),
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
            fake = self.synthesize(model.generator, masks)
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
    seed: int = 0, transunet: str | dict[str, Any] = "default", real_acquisition: bool = False,
) -> tuple[TransUNet, dict[str, Any]]:
    """The same segmenter, steps, batches and flips on the real pairs only (``real_acquisition``: half of them
    through the lesion fade and random acquisition of ``config``); writes a ``"transunet"`` run dir."""
    config = config or GenSegConfig()
    torch.manual_seed(seed)
    segmenter = build_transunet(transunet)
    result = _fit_segmenter(segmenter, SegmentationHooks(config, seed, real_acquisition), train, steps, batch_size,
                            Path(out), seed, "baseline")
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

ARMS = ("baseline", "acq_aug", "pix2pix_aug", "genseg")
# Phantom seeds of the evaluation sets: "test" for reported results, "val" for tuning (disjoint images). The
# shape shift has no "val" set: no tuning decision may look at it.
EVAL_SEEDS = {"test": {"in_domain": 50_000, "out_of_domain": 60_000, "out_of_domain_shape": 90_000},
              "val": {"in_domain": 70_000, "out_of_domain": 80_000}}
# JSON key prefix of each test set's headline gain (``<prefix>_gain`` and ``<prefix>_gain_ci``).
GAIN_KEYS = {"in_domain": "in_domain", "out_of_domain": "out_of_domain", "out_of_domain_shape": "out_of_domain_shape"}


def shape_shift_pairs(n: int, seed: int, size: int) -> PairSet:
    """``n`` in-domain-looking ultrasound phantoms whose lesions are all ``"angular"`` (3-5 straight sides), a
    shape family the labelled phantoms never have: the second out-of-domain shift (shape, not appearance)."""
    from core.phantoms import breast_ultrasound, sample_seed

    images, masks = [], []
    for i in range(n):
        image, mask = breast_ultrasound(sample_seed(seed, i), size, margin="angular")
        images.append(image.astype(np.float32) / 255.0)
        masks.append(mask.astype(np.float32))
    return PairSet(np.stack(images), np.stack(masks), [f"shape-{seed}-{i:04d}" for i in range(n)],
                   f"phantoms:ultrasound:angular-margin:seed={seed}")


def evaluation_sets(split: str, n: int, size: int) -> dict[str, PairSet]:
    """The evaluation sets of ``split`` ("test" or "val"), ``n`` pairs each at ``size`` px."""
    if split not in EVAL_SEEDS:
        raise ValueError(f"split = {split!r}; expected one of {sorted(EVAL_SEEDS)}")
    seeds = EVAL_SEEDS[split]
    sets = {"in_domain": phantom_pairs(n, seeds["in_domain"], size, "in"),
            "out_of_domain": phantom_pairs(n, seeds["out_of_domain"], size, "ood")}
    if "out_of_domain_shape" in seeds:
        sets["out_of_domain_shape"] = shape_shift_pairs(n, seeds["out_of_domain_shape"], size)
    return sets


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, list[float]]:
    """Mean and two-sided Student-t confidence interval ``[low, high]`` of the mean of ``values`` (n >= 2)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        raise ValueError(f"t_interval: need at least 2 values, got {x.size}")
    mean = float(x.mean())
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return mean, [mean - half, mean + half]


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary, paired differences against the baseline and the headline gain keys of per-seed rows."""
    arms = [a for a in ARMS if a in per_seed[0]]
    tests = list(per_seed[0][arms[0]])
    summary: dict[str, Any] = {}
    for arm in arms:
        summary[arm] = {}
        for test in tests:
            for metric in ("dice", "iou"):
                values = [r[arm][test][metric] for r in per_seed]
                summary[arm][f"{test}_{metric}"] = float(np.mean(values))
                summary[arm][f"{test}_{metric}_std_over_seeds"] = float(np.std(values))
    paired: dict[str, Any] = {}
    for arm in arms:
        if arm == "baseline" or "baseline" not in arms:
            continue
        paired[f"{arm}_minus_baseline"] = {}
        for test in tests:
            diffs = [r[arm][test]["dice"] - r["baseline"][test]["dice"] for r in per_seed]
            entry: dict[str, Any] = {"per_seed": diffs, "mean": float(np.mean(diffs)),
                                     "better_in": int(sum(d > 0 for d in diffs)), "n_seeds": len(diffs)}
            if len(diffs) >= 2:
                entry["ci95"] = t_interval(diffs)[1]
            paired[f"{arm}_minus_baseline"][test] = entry
    out: dict[str, Any] = {"summary": summary, "paired_dice_differences": paired}
    if "genseg" in arms and "baseline" in arms:
        for test in tests:
            entry = paired["genseg_minus_baseline"][test]
            out[f"{GAIN_KEYS[test]}_gain"] = entry["mean"]
            out[f"{GAIN_KEYS[test]}_gain_ci"] = entry.get("ci95")
    return out


def run_benchmark(
    out: str | Path, *, seeds: list[int], n_train: int = 9, size: int = 64, steps: int = 200,
    pix2pix_steps: int = 400, n_test: int = 100, config: GenSegConfig | None = None, split: str = "test",
    arms: tuple[str, ...] = ARMS,
) -> dict[str, Any]:
    """Per seed: 9 labelled phantoms -> pix2pix (stage 1) -> segmenters with the same steps and batches:
    ``baseline`` (real pairs only), ``acq_aug`` (real pairs, half seen through the lesion fade and random
    acquisition; only when either is on), ``pix2pix_aug`` (frozen stage-1 generator, lambda-weighted synthetic
    pairs) and ``genseg`` (end to end). Evaluation: :func:`evaluation_sets` of ``split`` (fixed seeds, disjoint
    from training). Returns the JSON-ready results (per seed, summary, paired differences with 95 % CIs)."""
    config = config or GenSegConfig()
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        raise ValueError(f"arms = {arms}; expected a non-empty subset of {ARMS}")
    arms = tuple(a for a in ARMS if a in arms and (a != "acq_aug" or config.changes_appearance))
    out = Path(out)
    tests = evaluation_sets(split, n_test, size)
    pix_config = dataclasses.replace(PIX2PIX_PRESETS["default"], image_size=size, num_downs=max(5, int(np.log2(size))))
    transunet = transunet_config(size)
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        t0 = time.time()
        train = phantom_pairs(n_train, seed, size, "in")
        needs_generator = any(a in arms for a in ("pix2pix_aug", "genseg"))
        generator = None
        if needs_generator:
            generator = stage1_generator(train, out / f"seed{seed}" / "pix2pix", pix_config, pix2pix_steps, seed)
        times = {"pix2pix_s": round(time.time() - t0, 1)}
        row: dict[str, Any] = {"seed": seed}
        for arm in arms:
            t0 = time.time()
            run_dir = out / f"seed{seed}" / arm
            if arm in ("baseline", "acq_aug"):
                segmenter, _ = train_baseline(train, run_dir, config=config, steps=steps, seed=seed,
                                              transunet=transunet, real_acquisition=arm == "acq_aug")
            else:
                assert generator is not None
                arm_config = config if arm == "genseg" else dataclasses.replace(config, hyper_every=0)
                gen = build_pix2pix(pix_config)
                gen.load_state_dict(generator.state_dict())
                model, _ = train_genseg(train, gen, run_dir, config=arm_config, steps=steps, seed=seed,
                                        transunet=transunet)
                segmenter = model.segmenter
            row[arm] = {name: evaluate_segmenter(segmenter, pairs) for name, pairs in tests.items()}
            times[f"{arm}_s"] = round(time.time() - t0, 1)
            log.info("seed %d %s: %s", seed, arm, json.dumps({k: round(v["dice"], 4) for k, v in row[arm].items()}))
        row["wall_times_s"] = times
        per_seed.append(row)
    return {
        "setup": {"n_labelled": n_train, "image_size": size, "segmenter": "TransUNet 'default' preset at "
                  f"img_size={size}", "generator": pix_config.to_dict(), "segmenter_steps": steps,
                  "pix2pix_steps": pix2pix_steps, "genseg": config.to_dict(), "seeds": seeds, "arms": list(arms),
                  "split": split,
                  "test_sets": {name: {"source": pairs.source, "n": len(pairs)} for name, pairs in tests.items()},
                  "model_selection": "best val_dice on the labelled training pairs (no extra labels), all arms"},
        **summarize(per_seed),
        "per_seed": per_seed,
    }


def stage1_generator(train: PairSet, run_dir: Path, pix_config: Any, pix2pix_steps: int, seed: int) -> nn.Module:
    """The stage-1 pix2pix generator of one seed: loaded from ``run_dir`` when a run there was trained on the
    same pairs with the same generator config, steps and seed (tuning runs share it), else trained."""
    epochs = max(1, pix2pix_steps // 50)
    if (run_dir / "run.json").is_file():
        info = load_run(run_dir)
        if (info.data_fingerprint == train.fingerprint() and info.seed == seed
                and info.config.get("pix2pix") == pix_config.to_dict()
                and info.config.get("train", {}).get("epochs") == epochs):
            generator = build_pix2pix(pix_config)
            generator.load_state_dict(info.state_dict)
            log.info("seed %d: stage 1 loaded from %s", seed, run_dir)
            return generator.eval()
    generator, _ = train_pix2pix(train, train, run_dir, preset=pix_config.to_dict(), epochs=epochs,
                                 steps_per_epoch=50, batch_size=4, seed=seed)
    return generator


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from benchmark JSONs run on disjoint seeds with the same setup (e.g. two processes)."""
    base = parts[0]
    for other in parts[1:]:
        a = {k: v for k, v in base["setup"].items() if k != "seeds"}
        b = {k: v for k, v in other["setup"].items() if k != "seeds"}
        if a != b:
            raise ValueError("merge: the results were run with different setups; only --seeds may differ")
    per_seed = sorted((row for part in parts for row in part["per_seed"]), key=lambda r: r["seed"])
    seeds = [r["seed"] for r in per_seed]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"merge: seeds overlap between the results: {seeds}")
    return {"setup": {**base["setup"], "seeds": seeds}, **summarize(per_seed), "per_seed": per_seed}


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
    parser.add_argument("--n-real-masks", type=int, default=defaults.n_real_masks,
                        help="synthetic pairs per step from labelled masks")
    parser.add_argument("--n-perturbed", type=int, default=defaults.n_perturbed,
                        help="synthetic pairs per step from augmented masks")
    parser.add_argument("--mask-aug", choices=MASK_AUGS, default=defaults.mask_aug)
    parser.add_argument("--acquisition", type=float, default=defaults.acquisition,
                        help="strength of the random acquisition on generated images (0: none)")
    parser.add_argument("--val-disjoint", action="store_true",
                        help="upper-level batch from labelled images not in the step's real batch")
    parser.add_argument("--lesion-fade", type=float, default=defaults.lesion_fade,
                        help="strength of the random lesion fade on generated images (0: none)")
    parser.add_argument("--photometric", action="store_true",
                        help="the released GenSeg script's jitter on generated images (equalise, posterise, ...)")
    parser.add_argument("--steps", type=int, default=200, help="segmenter optimiser steps")


def _config(args: argparse.Namespace) -> GenSegConfig:
    return GenSegConfig(lam=args.lam, gen_lr=args.gen_lr, seg_lr=args.seg_lr, unroll_lr=args.unroll_lr,
                        hyper_every=args.hyper_every, anchor_l1=args.anchor_l1, n_real_masks=args.n_real_masks,
                        n_perturbed=args.n_perturbed, mask_aug=args.mask_aug, acquisition=args.acquisition,
                        val_disjoint=args.val_disjoint, photometric=args.photometric,
                        lesion_fade=args.lesion_fade)


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
        parser.add_argument("--split", choices=sorted(EVAL_SEEDS), default="test",
                            help="evaluation sets: 'test' (reported) or 'val' (tuning; other phantom seeds)")
        parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
        parser.add_argument("--merge", nargs="+", metavar="JSON",
                            help="merge results of disjoint seeds into --json instead of running")
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
        if args.merge:
            parts = [json.loads(Path(p).read_text()) for p in args.merge]
            results = merge_results(parts)
            results["parts"] = [{"file": str(p), "seeds": part["setup"]["seeds"], "command": part.get("command"),
                                 "machine": part.get("machine"), "wall_time_s": part.get("wall_time_s")}
                                for p, part in zip(args.merge, parts, strict=True)]
        else:
            if args.threads:
                torch.set_num_threads(args.threads)
            t0 = time.time()
            load_before = os.getloadavg()
            results = run_benchmark(args.out, seeds=args.seeds, n_train=args.n_train, size=args.size,
                                    steps=args.steps, pix2pix_steps=args.pix2pix_steps, n_test=args.n_test,
                                    config=_config(args), split=args.split, arms=tuple(args.arms))
            results["wall_time_s"] = round(time.time() - t0, 1)
            results["command"] = "python -m training genseg-benchmark " + " ".join(
                (f"--{k.replace('_', '-')}" if v is True else
                 f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}")
                for k, v in sorted(vars(args).items())
                if k not in ("command", "module", "merge") and v is not None and v is not False)
            results["machine"] = {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__,
                                  "threads": torch.get_num_threads(), "load_average_1m_start": load_before[0],
                                  "load_average_1m_end": os.getloadavg()[0]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({k: v for k, v in results.items() if k.endswith(("_gain", "_gain_ci"))}, indent=2))
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
