"""``python -m training genseg-diagnostics``: why GenSeg's synthetic pairs help or hurt, measured on one seed
(generated vs real images, diversity, consistency Dice, pairs and weight, the hypergradient, the upper-level
split) -> JSON and a figure; read in docs/genseg.md."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from core.machine import cpu_model
from core.metrics import dice as dice_metric
from models.pix2pix import PIX2PIX_PRESETS, build_pix2pix
from models.transunet import build_transunet
from training.generators import PairSet, phantom_pairs
from training.genseg import (
    GenSegConfig,
    GenSegHooks,
    shape_shift_pairs,
    stage1_generator,
    train_baseline,
    train_genseg,
    transunet_config,
    unrolled_hypergradient,
)
from training.genseg_synthesis import MaskSampler, random_acquisition

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Image statistics and diversity
# ----------------------------------------------------------------------------------------------------------


def image_stats(images: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Means over ``images (N, S, S) in [0, 1]`` with ``masks (N, S, S)``: intensity mean and std, lesion
    contrast ``mean(lesion) / mean(ring of tissue around it)``, and texture energy ``mean |laplacian|``."""
    contrast, lap = [], []
    for x, m in zip(images, masks > 0.5, strict=True):
        ring = ndimage.binary_dilation(m, iterations=max(2, x.shape[0] // 10)) & ~m
        if m.any() and ring.any():
            contrast.append(float(x[m].mean() / max(x[ring].mean(), 1e-6)))
        lap.append(float(np.abs(ndimage.laplace(x.astype(np.float64))).mean()))
    return {"mean": float(images.mean()), "std": float(images.std(axis=(1, 2)).mean()),
            "lesion_to_surround": float(np.mean(contrast)), "laplacian_energy": float(np.mean(lap))}


def mean_pairwise_l1(a: np.ndarray) -> float:
    """Mean L1 between every two of ``a (N, S, S)``."""
    n = len(a)
    return float(np.mean([np.abs(a[i] - a[j]).mean() for i in range(n) for j in range(i + 1, n)]))


def nearest_l1(a: np.ndarray, ref: np.ndarray) -> float:
    """Mean over ``a`` of the L1 distance to the nearest image of ``ref``."""
    return float(np.mean([min(np.abs(x - r).mean() for r in ref) for x in a]))


@torch.no_grad()
def generate(generator: nn.Module, masks: torch.Tensor, *, dropout: bool, acquisition: float = 0.0,
             seed: int = 0) -> np.ndarray:
    """``masks (N, 1, S, S)`` -> ``(N, S, S)`` images; ``dropout``: the generator's training-mode noise on."""
    generator.train(dropout)
    rng = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    out = random_acquisition(generator(masks), rng, acquisition)
    generator.eval()
    return out.numpy()[:, 0]


@torch.no_grad()
def judge_dice(judge: nn.Module, images: np.ndarray, masks: np.ndarray) -> float:
    judge.eval()
    pred = (torch.sigmoid(judge(torch.from_numpy(images[:, None].astype(np.float32)))) > 0.5).numpy()[:, 0]
    return float(np.mean([dice_metric(p, g > 0.5) for p, g in zip(pred, masks, strict=True)]))


# ----------------------------------------------------------------------------------------------------------
# The hypergradient against a K-step unroll
# ----------------------------------------------------------------------------------------------------------


def k_step_val_loss(segmenter: nn.Module, generator: nn.Module, loss_fn: Any, batches: list[tuple], val: tuple,
                    *, lam: float, unroll_lr: float, create_graph: bool) -> torch.Tensor:
    """``L_val(theta_K)`` after K SGD steps ``theta_{k+1} = theta_k - xi grad L_lower(theta_k, phi)`` on
    ``batches = [(real_images, real_masks, synthetic_masks), ...]``; differentiable in the generator's
    parameters when ``create_graph``. The segmenter's parameters and buffers are left unchanged."""
    buffers = {n: b.detach() for n, b in segmenter.named_buffers()}
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in segmenter.named_parameters()}

    def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        # Fresh copies of the batch-norm statistics per call: their in-place update must not touch a tensor
        # that an earlier step's graph saved.
        return functional_call(segmenter, {**params, **{n: b.clone() for n, b in buffers.items()}}, (x,))

    with sdpa_kernel([SDPBackend.MATH]):
        for images, masks, synth in batches:
            fake = generator(synth)
            loss = loss_fn(forward(theta, images), masks) + lam * loss_fn(forward(theta, fake), synth)
            grads = torch.autograd.grad(loss, list(theta.values()), create_graph=create_graph, allow_unused=True)
            theta = {n: (t if g is None else t - unroll_lr * g) for (n, t), g in zip(theta.items(), grads,
                                                                                      strict=True)}
            if not create_graph:
                theta = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
        return loss_fn(forward(theta, val[0]), val[1])


def hypergradient_probe(segmenter: nn.Module, generator: nn.Module, hooks: GenSegHooks, *, horizons: tuple[int, ...],
                        eps: tuple[float, ...] = (1e-7, 1e-5, 1e-3, 1e-1), seed: int = 0) -> dict[str, Any]:
    """At the given segmenter/generator state (float64 copies, generator without dropout or random acquisition,
    BCE loss: deterministic, so that finite differences are exact to O(eps^2)): the one-step
    hypergradient ``h1`` (as training uses it), its norm, and for each horizon K the K-step hypergradient ``hK``
    (autograd through K unrolled steps), ``cos(h1, hK)``, and the central finite difference of
    ``L_val(theta_K)`` along ``h1/|h1|`` against ``<hK, h1/|h1|>`` at each step size of ``eps`` (the smallest
    checks the gradient; the larger ones ask whether it still predicts the loss at the scale of an actual
    generator update: an Adam step of lr 2e-4 moves the 648k parameters at 64 px by up to ~0.16 in norm)."""
    seg = copy.deepcopy(segmenter).double().train()
    gen = copy.deepcopy(generator).double().eval()
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits  # float64 end to end
    cfg = hooks.config
    rng = np.random.default_rng(seed)
    images, masks = hooks.images.double(), hooks.masks.double()
    k_max = max(horizons)
    batches = []
    for _ in range(k_max):
        idx = torch.from_numpy(rng.choice(len(images), size=4, replace=False))
        batches.append((images[idx], masks[idx], hooks.synthetic_masks().double()))
    val_idx = torch.from_numpy(rng.choice(len(images), size=4, replace=False))
    val = (images[val_idx], masks[val_idx])
    # The segmenter's dropout is on (training mode): every evaluation below reseeds torch so that all of them
    # draw the same dropout masks in the same order, the function finite differences need to be deterministic.
    torch.manual_seed(seed)
    h1, info = unrolled_hypergradient(seg, gen, loss_fn, batches[0][:2], batches[0][2], val, lam=cfg.lam,
                                      unroll_lr=cfg.unroll_lr)
    h1_flat = torch.cat([g.flatten() for g in h1])
    unit = [g / h1_flat.norm() for g in h1]
    out: dict[str, Any] = {"h1_norm": float(h1_flat.norm()), "val_loss": info["hyper_val_loss"], "horizons": {}}
    params = list(gen.parameters())
    for k in horizons:
        torch.manual_seed(seed)
        loss = k_step_val_loss(seg, gen, loss_fn, batches[:k], val, lam=cfg.lam, unroll_lr=cfg.unroll_lr,
                               create_graph=True)
        hk = torch.autograd.grad(loss, params, allow_unused=True)
        hk_flat = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, hk,
                                                                                                   strict=True)])
        fd = {}
        for step in eps:
            values = []
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for p, d in zip(params, unit, strict=True):
                        p.add_(sign * step * d)
                torch.manual_seed(seed)
                values.append(float(k_step_val_loss(seg, gen, loss_fn, batches[:k], val, lam=cfg.lam,
                                                    unroll_lr=cfg.unroll_lr, create_graph=False).detach()))
                with torch.no_grad():
                    for p, d in zip(params, unit, strict=True):
                        p.sub_(sign * step * d)
            fd[f"{step:g}"] = (values[0] - values[1]) / (2 * step)
        out["horizons"][str(k)] = {
            "hK_norm": float(hk_flat.norm()),
            "cos_h1_hK": float(F.cosine_similarity(h1_flat, hk_flat, dim=0)),
            "fd_directional_derivative_along_h1_by_step": fd,
            "autograd_directional_derivative_along_h1": float((hk_flat * h1_flat).sum() / h1_flat.norm()),
            "val_loss_at_theta_K": float(loss.detach()),
        }
    return out


def anchor_vs_hypergradient(segmenter: nn.Module, generator: nn.Module, hooks: GenSegHooks, seed: int = 0
                            ) -> dict[str, float]:
    """What moves the generator: norms of the one-step hypergradient (x lam's batch, as training draws it) and of
    the L1 anchor's gradient (all labelled pairs, x ``anchor_l1``) at this state, and their cosine."""
    torch.manual_seed(seed)
    gen = copy.deepcopy(generator).train()
    seg = copy.deepcopy(segmenter).train()
    images, masks = hooks.images, hooks.masks
    rng = np.random.default_rng(seed)
    idx = torch.from_numpy(rng.choice(len(images), size=4, replace=False))
    val = torch.from_numpy(rng.choice(len(images), size=4, replace=False))
    h, _ = unrolled_hypergradient(seg, gen, hooks.loss_fn, (images[idx], masks[idx]), hooks.synthetic_masks(),
                                  (images[val], masks[val]), lam=hooks.config.lam, unroll_lr=hooks.config.unroll_lr)
    anchor = hooks.config.anchor_l1 * (gen(masks) - images).abs().mean()
    a = torch.autograd.grad(anchor, list(gen.parameters()), allow_unused=True)
    hf = torch.cat([g.flatten() for g in h])
    af = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(gen.parameters(), a,
                                                                                         strict=True)])
    return {"hypergradient_norm": float(hf.norm()), "anchor_gradient_norm": float(af.norm()),
            "cosine": float(F.cosine_similarity(hf, af, dim=0)), "anchor_l1": float(anchor.detach())}


# ----------------------------------------------------------------------------------------------------------
# The validation split, and pairs per real pair
# ----------------------------------------------------------------------------------------------------------


def upper_level_overlap(train: PairSet, config: GenSegConfig, steps: int = 200, seed: int = 0) -> dict[str, float]:
    """How the upper-level batch relates to the step's real batch: mean fraction of its images that the same
    step's virtual update trains on, and how many distinct labelled images it uses over ``steps``."""
    from training.generators import pair_loader

    hooks = GenSegHooks(config, train, seed=seed)
    overlap, seen = [], set()
    for _image, mask in pair_loader(train, 4, steps, seed):
        exclude = hooks.labelled_indices(mask) if config.val_disjoint else None
        n_val = min(len(train), 4)
        if exclude is not None:
            n_val = min(n_val, max(1, len(train) - len(exclude)))
        val_idx = hooks._draw(n_val, exclude)
        in_batch = set(hooks.labelled_indices(mask).tolist())
        overlap.append(np.mean([int(i) in in_batch for i in val_idx]))
        seen.update(int(i) for i in val_idx)
    return {"fraction_of_upper_level_images_in_the_real_batch": float(np.mean(overlap)),
            "distinct_labelled_images_used": len(seen), "upper_level_batch": 4, "labelled": len(train)}


def pairs_per_real(config: GenSegConfig, steps: int, batch_size: int = 4) -> dict[str, float]:
    n_synth = config.n_real_masks + config.n_perturbed
    return {"real_pairs_per_step": batch_size, "synthetic_pairs_per_step": n_synth,
            "synthetic_per_real_pair": n_synth / batch_size, "lam": config.lam,
            # Losses are means over their batch: the synthetic batch's share of the step's loss weight.
            "synthetic_share_of_loss_weight": config.lam / (1 + config.lam),
            "weight_of_one_synthetic_pair_relative_to_one_real": config.lam * batch_size / max(n_synth, 1),
            "of_which_from_augmented_masks": config.n_perturbed / max(n_synth, 1),
            "synthetic_images_over_the_run": steps * n_synth, "real_images_over_the_run": steps * batch_size}


# ----------------------------------------------------------------------------------------------------------
# The whole report
# ----------------------------------------------------------------------------------------------------------


def _figure(path: Path, rows: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.35 * cols + 1.6, 1.35 * len(rows)))
    for r, (label, images, masks) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c], cmap="gray", vmin=0, vmax=1)
                ax.contour(masks[c], levels=[0.5], colors="red", linewidths=0.5)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_diagnostics(out_json: Path, figure: Path, work: Path, *, seed: int, size: int, steps: int, pix2pix_steps: int,
                    configs: dict[str, GenSegConfig], judge_steps: int, horizons: tuple[int, ...],
                    n_eval: int = 48) -> dict[str, Any]:
    t_start = time.time()
    transunet = transunet_config(size)
    train = phantom_pairs(9, seed, size, "in")
    pix_config = __import__("dataclasses").replace(PIX2PIX_PRESETS["default"], image_size=size,
                                                   num_downs=max(5, int(np.log2(size))))
    stage1 = stage1_generator(train, work / f"seed{seed}" / "pix2pix", pix_config, pix2pix_steps, seed)
    judge_pairs = phantom_pairs(200, 7_000, size, "in")
    judge, judge_metrics = train_baseline(judge_pairs, work / "judge", steps=judge_steps, batch_size=8, seed=seed,
                                          transunet=transunet)
    held = phantom_pairs(n_eval, 71_000, size, "in")  # in-domain masks/images none of the runs train on
    ood1 = phantom_pairs(n_eval, 81_000, size, "ood")
    ood2 = shape_shift_pairs(n_eval, 91_000, size)
    report: dict[str, Any] = {"seed": seed, "size": size, "segmenter_steps": steps, "n_eval": n_eval,
                              "judge": {"source": f"TransUNet 'default' at {size} px, {judge_steps} steps on 200 "
                                                  "in-domain phantoms (seed 7000)", "train_val_dice":
                                        judge_metrics.get("val_dice")}}
    real_groups = {"real_in_domain": (held.images, held.masks), "real_out_of_domain": (ood1.images, ood1.masks),
                   "real_out_of_domain_shape": (ood2.images, ood2.masks)}
    report["judge_dice_on_real"] = {k: judge_dice(judge, *v) for k, v in real_groups.items()}
    report["image_stats"] = {k: image_stats(*v) for k, v in real_groups.items()}
    real_nn = nearest_l1(held.images, train.images)
    report["diversity"] = {"real_in_domain": {"pairwise_l1": mean_pairwise_l1(held.images),
                                              "nearest_labelled_l1": real_nn}}
    report["consistency_dice"] = {}
    masks_t = torch.from_numpy(held.masks[:, None].copy())
    lab_masks = torch.from_numpy(train.masks[:, None].copy())
    generators: dict[str, tuple[nn.Module, GenSegConfig | None]] = {"stage1": (stage1, None)}
    report["runs"] = {}
    hooks_by_name: dict[str, GenSegHooks] = {}
    for name, config in configs.items():
        gen = build_pix2pix(pix_config)
        gen.load_state_dict(stage1.state_dict())
        t0 = time.time()
        model, metrics = train_genseg(train, gen, work / f"seed{seed}" / f"genseg-{name}", config=config,
                                      steps=steps, seed=seed, transunet=transunet)
        report["runs"][name] = {"config": config.to_dict(), "seconds": round(time.time() - t0, 1),
                                "pairs": pairs_per_real(config, steps),
                                "upper_level": upper_level_overlap(train, config, steps, seed),
                                "train_log_hyper": _hyper_log(work / f"seed{seed}" / f"genseg-{name}" / "log.csv")}
        generators[f"genseg_{name}"] = (model.generator, config)
        hooks_by_name[name] = GenSegHooks(config, train, seed=seed)
        # The hypergradient at the start (stage-1 generator, untrained segmenter) and at the end of this run.
        torch.manual_seed(seed)
        fresh = build_transunet(transunet)
        report["runs"][name]["hypergradient"] = {
            "start": hypergradient_probe(fresh, stage1, hooks_by_name[name], horizons=horizons, seed=seed),
            "end": hypergradient_probe(model.segmenter, model.generator, hooks_by_name[name], horizons=horizons,
                                       seed=seed)}
        report["runs"][name]["what_moves_the_generator"] = {
            "start": anchor_vs_hypergradient(fresh, stage1, hooks_by_name[name], seed),
            "end": anchor_vs_hypergradient(model.segmenter, model.generator, hooks_by_name[name], seed)}
        log.info("%s: %s", name, json.dumps(report["runs"][name]["hypergradient"]))
    figure_rows = [("labelled (real)", train.images[:6], train.masks[:6])]
    for gname, (gen, config) in generators.items():
        acq = config.acquisition if config else 0.0
        sampler = MaskSampler(lab_masks, config.mask_aug if config else "errors", np.random.default_rng(seed))
        aug_masks = sampler(0, n_eval)
        fake_lab = generate(gen, lab_masks, dropout=False)
        fake_held = generate(gen, masks_t, dropout=True, acquisition=acq, seed=seed)
        fake_aug = generate(gen, aug_masks, dropout=True, acquisition=acq, seed=seed + 1)
        samples = np.stack([generate(gen, lab_masks[:1], dropout=True, acquisition=acq, seed=seed + 10 + i)[0]
                            for i in range(8)])
        report["image_stats"][gname] = image_stats(fake_held, held.masks)
        report["diversity"][gname] = {
            "pairwise_l1": mean_pairwise_l1(fake_held),
            "nearest_labelled_l1": nearest_l1(fake_held, train.images),
            "l1_to_own_labelled_image": float(np.abs(fake_lab - train.images).mean()),
            "same_mask_8_draws_pairwise_l1": mean_pairwise_l1(samples),
            "same_mask_8_draws_pixel_std": float(samples.std(axis=0).mean()),
        }
        report["consistency_dice"][gname] = {
            "held_out_masks": judge_dice(judge, fake_held, held.masks),
            "augmented_labelled_masks": judge_dice(judge, fake_aug, aug_masks.numpy()[:, 0]),
            "labelled_masks_no_dropout": judge_dice(judge, fake_lab, train.masks)}
        figure_rows.append((f"{gname.replace('_', ' ')}\n(labelled masks)", fake_lab[:6], train.masks[:6]))
        if config is not None and (config.acquisition > 0 or config.mask_aug != "errors"):
            figure_rows.append((f"{gname.replace('_', ' ')}\n(augmented masks)", fake_aug[:6],
                                aug_masks.numpy()[:6, 0]))
    figure_rows += [("in domain (test-like)", held.images[:6], held.masks[:6]),
                    ("out of domain:\nscanner", ood1.images[:6], ood1.masks[:6]),
                    ("out of domain:\nangular lesions", ood2.images[:6], ood2.masks[:6])]
    _figure(figure, figure_rows)
    report["figure"] = str(figure)
    report["machine"] = {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__,
                         "threads": torch.get_num_threads(), "load_average_1m_end": os.getloadavg()[0]}
    report["wall_time_s"] = round(time.time() - t_start, 1)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _hyper_log(path: Path) -> dict[str, Any]:
    """Mean hypergradient norm, anchor L1 and upper-level loss in the first and last quarter of a run's log."""
    import csv

    if not path.is_file():
        return {}
    rows = [r for r in csv.DictReader(path.open()) if r.get("hyper_grad_norm")]
    if not rows:
        return {}
    q = max(1, len(rows) // 4)
    out: dict[str, Any] = {"rows": len(rows)}
    for key in ("hyper_grad_norm", "anchor_l1", "hyper_val_loss"):
        vals = [float(r[key]) for r in rows if r.get(key)]
        if vals:
            out[key] = {"first_quarter": float(np.mean(vals[:q])), "last_quarter": float(np.mean(vals[-q:]))}
    return out


def add_arguments(parser: argparse.ArgumentParser, command_name: str = "genseg-diagnostics") -> None:
    parser.add_argument("--seed", type=int, default=1000, help="labelled-set seed (a tuning seed, not a reported one)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--pix2pix-steps", type=int, default=400)
    parser.add_argument("--judge-steps", type=int, default=300)
    parser.add_argument("--horizons", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--config", action="append", default=[], metavar="NAME=JSON",
                        help="a GenSeg config to diagnose, e.g. 'tuned={\"acquisition\": 0.5}' (repeatable; "
                             "'old' = the previous defaults is always included)")
    parser.add_argument("--work", default="runs/genseg-diagnostics")
    parser.add_argument("--json", default="docs/genseg_diagnostics.json")
    parser.add_argument("--figure", default="docs/genseg_samples.png")
    parser.add_argument("--threads", type=int)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = {"old": GenSegConfig()}
    for item in args.config:
        name, _, text = item.partition("=")
        if not name or not text:
            raise ValueError(f"--config {item!r}: expected NAME=JSON")
        configs[name] = GenSegConfig.from_dict(json.loads(text))
    report = run_diagnostics(Path(args.json), Path(args.figure), Path(args.work), seed=args.seed, size=args.size,
                             steps=args.steps, pix2pix_steps=args.pix2pix_steps, configs=configs,
                             judge_steps=args.judge_steps, horizons=tuple(args.horizons))
    print(json.dumps({k: report[k] for k in ("judge_dice_on_real", "consistency_dice", "diversity")}, indent=2))
    return 0

