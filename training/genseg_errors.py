"""``python -m training genseg-errors``: where a GenSeg benchmark's Dice goes (recall, false positives, empty
masks per arm and set) and how conspicuous generated lesions are next to real ones; read in docs/genseg.md."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.machine import cpu_model
from core.metrics import dice_per_case
from training.generators import PairSet, phantom_pairs
from training.genseg import ARMS, evaluation_sets, genseg_part
from training.genseg_synthesis import surround_mean
from weights.checkpoints import load_run

log = logging.getLogger(__name__)

SET_NAMES = {"in_domain": "in domain", "out_of_domain": "scanner shift", "out_of_domain_shape": "angular lesions"}


def lesion_contrast(images: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Per image, the mean of a tissue ring 3-6 px outside the lesion minus the lesion's mean (how much darker
    the lesion is than its surround). ``images, masks (N, 1, S, S)``, images in [0, 1]. Returns ``(N,)``."""
    lesion = (images * masks).sum(dim=(1, 2, 3)) / masks.sum(dim=(1, 2, 3)).clamp_min(1.0)
    return (surround_mean(images, masks).flatten() - lesion).numpy()


def spread(values: np.ndarray) -> dict[str, float]:
    """Mean and the 10th, 50th and 90th percentiles of ``values``."""
    return {"mean": float(values.mean()), **{f"p{q}": float(np.percentile(values, q)) for q in (10, 50, 90)}}


@torch.no_grad()
def error_profile(segmenter: nn.Module, pairs: PairSet) -> dict[str, float]:
    """Mean over images of Dice (core.metrics'), recall, false-positive area / lesion area and predicted area /
    lesion area, and the fraction of images with an empty prediction (threshold 0.5)."""
    images, masks = pairs.tensors()
    pred = torch.sigmoid(segmenter.eval()(images)) > 0.5
    truth = masks > 0.5
    tp = (pred & truth).sum(dim=(1, 2, 3)).double()
    fp = (pred & ~truth).sum(dim=(1, 2, 3)).double()
    fn = (~pred & truth).sum(dim=(1, 2, 3)).double()
    area = (tp + fn).clamp_min(1.0)
    return {"dice": float(dice_per_case(pred, truth).mean()), "recall": float((tp / area).mean()),
            "false_positive_per_lesion_area": float((fp / area).mean()),
            "predicted_per_lesion_area": float(((tp + fp) / area).mean()),
            "empty_predictions": float((pred.sum(dim=(1, 2, 3)) == 0).double().mean())}


@torch.no_grad()
def analyse(runs: Path, seeds: list[int], *, split: str, n: int, size: int,
            n_masks: int = 48) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Error profiles of every arm found under ``runs/seed<S>/<arm>`` on the ``split`` sets, and lesion contrast
    of real images and of each seed's generators (stage 1 ``pix2pix`` and the end-to-end ``genseg`` one) drawn
    from ``n_masks`` held-out in-domain masks (phantom seed 71000, used by no benchmark set). Returns the
    JSON-ready result and the per-image contrasts pooled over seeds, by image set."""
    sets = evaluation_sets(split, n, size)
    held_out = phantom_pairs(n_masks, 71_000, size, "in")
    _, held_masks = held_out.tensors()
    pooled = {f"real, {SET_NAMES[name]}": lesion_contrast(*pairs.tensors()) for name, pairs in sets.items()}
    contrast: dict[str, Any] = {name: spread(values) for name, values in pooled.items()}
    profiles: dict[str, Any] = {}
    for seed in seeds:
        root = runs / f"seed{seed}"
        labelled = phantom_pairs(9, seed, size, "in")
        contrast[f"seed {seed}: its 9 labelled images"] = spread(lesion_contrast(*labelled.tensors()))
        for name in ("pix2pix", "genseg"):
            if (root / name / "run.json").is_file():
                generated = genseg_part(load_run(root / name), "generator")(held_masks)
                label = "stage-1 generator" if name == "pix2pix" else "end-to-end generator"
                values = lesion_contrast(generated, held_masks)
                contrast[f"seed {seed}: {label}"] = spread(values)
                pooled[label] = np.concatenate([pooled.get(label, np.empty(0)), values])
        profiles[str(seed)] = {}
        for arm in (a for a in ARMS if (root / a / "run.json").is_file()):
            segmenter = genseg_part(load_run(root / arm), "segmenter")
            profiles[str(seed)][arm] = {test: error_profile(segmenter, pairs) for test, pairs in sets.items()}
    arms = [a for a in ARMS if all(a in p for p in profiles.values())]
    mean = {arm: {test: {k: float(np.mean([profiles[s][arm][test][k] for s in profiles]))
                         for k in next(iter(profiles.values()))[arm][test]}
                  for test in sets} for arm in arms}
    return {"split": split, "n_per_set": n, "seeds": seeds, "lesion_contrast": contrast,
            "lesion_contrast_pooled": {name: spread(values) for name, values in pooled.items()},
            "error_profile_mean_over_seeds": mean, "error_profile_per_seed": profiles}, pooled


def contrast_figure(path: Path, pooled: dict[str, np.ndarray]) -> None:
    """Histograms of lesion contrast (surround minus lesion) per image set, one row each, shared axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(pooled), 1, figsize=(6.4, 1.1 * len(pooled) + 0.6), sharex=True)
    bins = np.linspace(-0.05, 0.45, 51)
    for ax, (name, values) in zip(np.atleast_1d(axes), pooled.items(), strict=True):
        ax.hist(values, bins=bins, color="tab:red" if "generator" in name else "tab:gray")
        ax.axvline(float(np.percentile(values, 10)), color="black", lw=0.8, ls="--")
        ax.set_ylabel(f"{name}\n(n={values.size})", rotation=0, ha="right", va="center", fontsize=8)
        ax.set_yticks([])
    np.atleast_1d(axes)[-1].set_xlabel("surround minus lesion mean (dashed: 10th percentile)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser, command_name: str = "genseg-errors") -> None:
    parser.add_argument("--runs", required=True, help="a genseg-benchmark --out folder (seed<S>/<arm> run dirs)")
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="evaluation sets (use the split the benchmark was run on)")
    parser.add_argument("--n", type=int, default=50, help="images per evaluation set")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--json", default="docs/genseg_errors.json")
    parser.add_argument("--figure", default="docs/genseg_contrast.png", help="lesion-contrast histograms")
    parser.add_argument("--threads", type=int)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    result, pooled = analyse(Path(args.runs), args.seeds, split=args.split, n=args.n, size=args.size)
    contrast_figure(Path(args.figure), pooled)
    result["command"] = (f"python -m training genseg-errors --runs {args.runs} --seeds "
                         f"{' '.join(map(str, args.seeds))} --split {args.split} --n {args.n} --size {args.size}")
    result["machine"] = {"cpu": cpu_model(), "torch": torch.__version__, "seconds": round(time.time() - t0, 1)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["error_profile_mean_over_seeds"], indent=2))
    return 0
