"""``python -m training selector``: train the selector (modality classifier + realness score) on real images.
(Details: docs/architecture.md, "training".)
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from core.datasets import CaptionDataset, DatasetError, data_fingerprint
from models.selector import SELECTOR_PRESETS, Selector, build_selector
from training.loop import LoopConfig, StepOutput, Trainer, TrainHooks
from weights.checkpoints import save_run

log = logging.getLogger(__name__)

CORRUPTIONS = ("noise", "blur", "shuffle", "smooth_noise", "blend")


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma))
    coords = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(coords**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))


def corrupt(images: torch.Tensor, modality_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random corruption per image of ``(B, 1, S, S)`` in [0, 1] (see the module docstring)."""
    b, _, s, _ = images.shape
    kinds = torch.randint(0, len(CORRUPTIONS), (b,), generator=generator).tolist()
    out = []
    for i, kind in enumerate(kinds):
        x = images[i : i + 1]
        name = CORRUPTIONS[kind]
        if name == "noise":
            x = x + (0.2 + 0.3 * torch.rand(1, generator=generator)) * torch.randn(x.shape, generator=generator)
        elif name == "blur":
            x = _blur(x, float(1.5 + 2.0 * torch.rand(1, generator=generator)) * s / 32)
        elif name == "shuffle":
            t = s // 4
            tiles = x.unfold(2, t, t).unfold(3, t, t).reshape(1, 1, 16, t, t)
            tiles = tiles[:, :, torch.randperm(16, generator=generator)]
            x = tiles.view(1, 1, 4, 4, t, t).permute(0, 1, 2, 4, 3, 5).reshape(1, 1, s, s)
        elif name == "smooth_noise":
            x = _blur(torch.rand(x.shape, generator=generator), s / 16)
            x = (x - x.min()) / (x.max() - x.min() + 1e-6)
        else:  # blend with an image of another modality
            others = (modality_ids != modality_ids[i]).nonzero()[:, 0]
            j = int(others[torch.randint(0, len(others), (1,), generator=generator)]) if len(others) else i
            a = float(0.35 + 0.3 * torch.rand(1, generator=generator))
            x = (1 - a) * x + a * images[j : j + 1]
        out.append(x.clamp(0.0, 1.0))
    return torch.cat(out)


def load_modality_images(csv_path: str | Path, selector: Selector) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(images (N, 1, S, S) in [0, 1], modality_ids (N,), fingerprint)`` of a MINIM CSV at the selector's size."""
    dataset = CaptionDataset(csv_path, size=selector.config.image_size)
    index = {m: i for i, m in enumerate(selector.config.modalities)}
    bad = [f"line {r.line} ({r.modal!r})" for r in dataset.records if r.modal not in index]
    if bad:
        raise DatasetError(str(csv_path), [f"modalities not in the selector config {sorted(index)}: "
                                           f"{', '.join(bad[:20])}"])
    images = torch.from_numpy(np.stack([s.image for s in dataset]).astype(np.float32))[:, None]
    ids = torch.tensor([index[r.modal] for r in dataset.records])
    return images, ids, data_fingerprint(dataset)


class SelectorHooks(TrainHooks):
    """Cross-entropy on modalities of real images + BCE real-vs-corrupted."""

    def __init__(self, lr: float = 2e-3, seed: int = 0) -> None:
        self.lr = lr
        self.generator = torch.Generator().manual_seed(seed)

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        return [{"name": "selector", "params": list(model.parameters()), "lr": self.lr}]

    def _losses(self, model: torch.nn.Module, images: torch.Tensor, ids: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        fakes = corrupt(images, ids, generator)
        out = model(torch.cat([images, fakes]))
        n = images.shape[0]
        ce = F.cross_entropy(out.modality_logits[:n], ids)
        target = torch.cat([torch.ones(n), torch.zeros(n)])
        bce = F.binary_cross_entropy_with_logits(out.real_logit, target)
        stats = {"accuracy": float((out.modality_logits[:n].argmax(1) == ids).float().mean()),
                 "real_accuracy": float(((out.real_logit > 0).float() == target).float().mean())}
        return ce, bce, stats

    def training_step(self, model: torch.nn.Module, batch: Any) -> StepOutput:
        images, ids = batch
        ce, bce, stats = self._losses(model, images, ids, self.generator)
        return StepOutput(ce + bce, scalars={"loss_modality": float(ce.detach()), "loss_real": float(bce.detach()),
                                             **{f"train_{k}": v for k, v in stats.items()}})

    def validate(self, model: torch.nn.Module, loader: Any) -> dict[str, float]:
        generator = torch.Generator().manual_seed(1234)
        sums: dict[str, float] = {}
        count = 0
        for images, ids in loader:
            ce, bce, stats = self._losses(model, images, ids, generator)
            n = images.shape[0]
            for k, v in {"loss": float(ce + bce), **stats}.items():
                sums[k] = sums.get(k, 0.0) + v * n
            count += n
        return {f"val_{k}": v / max(count, 1) for k, v in sums.items()}


def train_selector(
    csv_train: str | Path, csv_val: str | Path, out: str | Path, *, preset: str | dict[str, Any] = "default",
    epochs: int = 6, steps_per_epoch: int = 40, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
    progress: bool = False,
) -> tuple[Selector, dict[str, Any]]:
    """Train on ``csv_train``, select by ``val_accuracy`` on ``csv_val``; writes a ``"selector"`` run dir."""
    torch.manual_seed(seed)
    selector = build_selector(preset)
    images, ids, fingerprint = load_modality_images(csv_train, selector)
    val_images, val_ids, _ = load_modality_images(csv_val, selector)
    sampler = RandomSampler(TensorDataset(images, ids), replacement=False, num_samples=steps_per_epoch * batch_size,
                            generator=torch.Generator().manual_seed(seed))
    train_loader = DataLoader(TensorDataset(images, ids), batch_size=batch_size, sampler=sampler, drop_last=True)
    val_loader = DataLoader(TensorDataset(val_images, val_ids), batch_size=64)
    loop = LoopConfig(epochs=epochs, monitor="val_accuracy", mode="max", seed=seed, progress=progress)
    result = Trainer(loop).fit(selector, SelectorHooks(lr, seed), train_loader, val_loader, out, title="selector")
    save_run(out, selector, config={"selector": selector.config.to_dict(),
                                    "train": {"epochs": epochs, "steps_per_epoch": steps_per_epoch,
                                              "batch_size": batch_size, "lr": lr, "train_csv": str(csv_train),
                                              "val_csv": str(csv_val), "corruptions": list(CORRUPTIONS)}},
             threshold=0.5, metrics={**result.best_metrics, "best_epoch": result.best_epoch, "steps": result.steps,
                                     "seconds": round(result.seconds, 1)},
             kind="selector", phase="selector", seed=seed, data_fingerprint=fingerprint)
    return selector.eval(), result.best_metrics


def add_arguments(parser: argparse.ArgumentParser, command_name: str = "selector") -> None:
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument("--csv", help="training CSV path,text,modal of REAL images (default: 600 phantoms)")
    parser.add_argument("--val-csv", help="validation CSV (default: 100 phantoms with another seed)")
    parser.add_argument("--preset", default="default", choices=sorted(SELECTOR_PRESETS))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps-per-epoch", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from training.text2image import modality_csvs

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    csv_train, csv_val = modality_csvs(args)
    _, metrics = train_selector(csv_train, csv_val, args.out, preset=args.preset, epochs=args.epochs,
                                steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, lr=args.lr,
                                seed=args.seed, progress=True)
    print(json.dumps({"run_dir": str(args.out), **metrics}, indent=2))
    return 0
