"""The one shared trainer: ``Trainer(LoopConfig(...)).fit(model, hooks, train_loader, val_loader, run_dir)``.

Phases plug in through ``TrainHooks``; nothing here knows about models (hook order: docs/architecture.md).
"""

from __future__ import annotations

import abc
import contextvars
import copy
import csv
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

LOG_CSV = "log.csv"
CURVES_PNG = "curves.png"

EpochObserver = Callable[[str, int, dict[str, Any]], None]  # (title, total epochs, the epoch's log row)
_EPOCH_OBSERVERS: contextvars.ContextVar[tuple[EpochObserver, ...]] = contextvars.ContextVar(
    "training_epoch_observers", default=())


@contextmanager
def observe_epochs(observer: EpochObserver) -> Iterator[None]:
    """Call ``observer(title, epochs, row)`` after every epoch of every ``Trainer.fit`` run inside the block.

    For callers that run a phase without owning its hooks (a platform job reporting progress); an exception
    the observer raises ends the fit (how a cancelled job stops at its next epoch).
    """
    token = _EPOCH_OBSERVERS.set((*_EPOCH_OBSERVERS.get(), observer))
    try:
        yield
    finally:
        _EPOCH_OBSERVERS.reset(token)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass(frozen=True)
class LoopConfig:
    """Trainer settings.

    Attributes:
        epochs: number of passes over the training loader.
        max_steps: stop after this many optimiser steps in total (validation still runs); None = no cap.
        grad_clip: max global gradient norm (None or <= 0: no clipping).
        monitor: validation metric that selects the best epoch; ``mode`` "max" or "min".
        scheduler: "cosine" (per-step cosine decay to ``min_lr_ratio`` x LR) or "constant".
        weight_decay: AdamW weight decay (groups may override).
        device: torch device string.
        progress: show a tqdm bar (auto-disabled when stderr is not a terminal).
        early_stop_patience: stop after this many consecutive epochs without an improvement of the
            monitored metric (as Keras ``EarlyStopping``); None = train every epoch.
        min_delta: how much the monitored metric must beat its best to count as an improvement, in the
            metric's units (for early stopping and the plateau rule).
        plateau_factor: multiply every group's LR by this in (0, 1) once the metric has not improved for
            more than ``plateau_patience`` epochs, as ``torch.optim.lr_scheduler.ReduceLROnPlateau``
            (``threshold=min_delta``, ``threshold_mode="abs"``, no cooldown); None = off.
        plateau_patience: epochs without improvement the plateau rule tolerates before reducing.
        plateau_min_scale: the plateau rule never takes the LR below this fraction of the schedule's.
    """

    epochs: int = 1
    max_steps: int | None = None
    grad_clip: float | None = 1.0
    monitor: str = "val_dice"
    mode: str = "max"
    scheduler: str = "cosine"
    min_lr_ratio: float = 0.05
    weight_decay: float = 1e-4
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    early_stop_patience: int | None = None
    min_delta: float = 0.0
    plateau_factor: float | None = None
    plateau_patience: int = 2
    plateau_min_scale: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"LoopConfig.epochs = {self.epochs}; expected >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"LoopConfig.max_steps = {self.max_steps}; expected >= 1 or None")
        if self.mode not in ("max", "min"):
            raise ValueError(f"LoopConfig.mode = {self.mode!r}; expected 'max' or 'min'")
        if self.scheduler not in ("cosine", "constant"):
            raise ValueError(f"LoopConfig.scheduler = {self.scheduler!r}; expected 'cosine' or 'constant'")
        if self.early_stop_patience is not None and self.early_stop_patience < 1:
            raise ValueError(f"LoopConfig.early_stop_patience = {self.early_stop_patience}; expected >= 1 or None")
        if not (math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise ValueError(f"LoopConfig.min_delta = {self.min_delta}; expected a finite value >= 0")
        if self.plateau_factor is not None and not 0.0 < self.plateau_factor < 1.0:
            raise ValueError(f"LoopConfig.plateau_factor = {self.plateau_factor}; expected a value in (0, 1) or None")
        if self.plateau_patience < 0:
            raise ValueError(f"LoopConfig.plateau_patience = {self.plateau_patience}; expected >= 0")
        if not 0.0 <= self.plateau_min_scale < 1.0:
            raise ValueError(f"LoopConfig.plateau_min_scale = {self.plateau_min_scale}; expected a value in [0, 1)")


@dataclass
class StepOutput:
    """What a training step returns: the loss to minimise, scalars to log, optional loss parts."""

    loss: torch.Tensor
    scalars: dict[str, float] = field(default_factory=dict)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class FitResult:
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, Any]]
    steps: int
    seconds: float
    early_stopped: bool = False  # True when early stopping ended training before ``epochs``


class Patience:
    """Counts consecutive epochs in which a score (higher is better) did not beat its best by ``min_delta``.

    A non-finite score never improves. ``bad_epochs`` is 0 right after an improvement.
    """

    def __init__(self, min_delta: float) -> None:
        self.min_delta = min_delta
        self.best = -math.inf
        self.bad_epochs = 0

    def update(self, score: float) -> bool:
        """Record one epoch's score; returns whether it improved."""
        if math.isfinite(score) and score > self.best + self.min_delta:
            self.best, self.bad_epochs = score, 0
            return True
        self.bad_epochs += 1
        return False


class TrainHooks(abc.ABC):
    """What a phase supplies to the trainer. Only the three abstract methods are required."""

    @abc.abstractmethod
    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """Optimiser parameter groups: ``[{"name": str, "params": [...], "lr": float}, ...]``."""

    @abc.abstractmethod
    def training_step(self, model: torch.nn.Module, batch: Any) -> StepOutput:
        """Forward one batch and return the loss (model is in train mode)."""

    @abc.abstractmethod
    def validate(self, model: torch.nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        """Validation metrics, keys prefixed ``val_`` (model in eval mode, no grad)."""

    def on_fit_start(self, model: torch.nn.Module, val_loader: Iterable[Any]) -> None:
        """Before the first epoch (e.g. evaluate a baseline)."""
        return None

    def on_epoch_start(self, epoch: int, model: torch.nn.Module) -> None:
        """After ``model.train()`` at the start of each epoch (e.g. freeze a submodule)."""
        return None

    def backward(self, out: StepOutput, model: torch.nn.Module) -> None:
        """Compute gradients; override to scale gradients of parts of the loss."""
        out.loss.backward()

    def after_step(self, model: torch.nn.Module) -> None:
        """After each optimiser step."""
        return None

    def on_epoch_end(self, epoch: int, model: torch.nn.Module, row: dict[str, Any]) -> None:
        """After validation; ``row`` is the epoch's log row (may be extended in place)."""
        return None


def _lr_factor(step: int, total: int, config: LoopConfig) -> float:
    if config.scheduler == "constant" or total <= 1:
        return 1.0
    progress = min(step / float(total - 1), 1.0)
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def write_log_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """Write all epoch rows; the header is the union of keys in first-seen order."""
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k, "") for k in keys})


def write_curves_png(path: Path, history: list[dict[str, Any]], title: str = "") -> None:
    """Plot losses (left) and validation metrics (right) per epoch into a PNG (matplotlib Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    numeric = [
        k for k in history[0]
        if k not in ("epoch", "step", "seconds") and not k.startswith("lr_")
        and all(isinstance(r.get(k), (int, float)) and math.isfinite(r.get(k)) for r in history)
    ]
    losses = [k for k in numeric if "loss" in k]
    metrics = [k for k in numeric if k.startswith("val_") and "loss" not in k]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    for ax, keys, label in ((fig.add_subplot(1, 2, 1), losses, "loss"), (fig.add_subplot(1, 2, 2), metrics, "metric")):
        for k in keys:
            ax.plot(epochs, [row[k] for row in history], marker="o", label=k)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if keys:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(str(path), dpi=80)


class Trainer:
    """Runs ``TrainHooks`` over data loaders; see the module docstring for the order of calls."""

    def __init__(self, config: LoopConfig) -> None:
        self.config = config

    def build_optimizer(self, model: torch.nn.Module, hooks: TrainHooks) -> torch.optim.Optimizer:
        groups = []
        for i, group in enumerate(hooks.param_groups(model)):
            params = [p for p in group["params"] if p.requires_grad]
            if not params:
                continue
            g = dict(group, params=params)
            g.setdefault("name", f"group{i}")
            g.setdefault("weight_decay", self.config.weight_decay)
            g["base_lr"] = float(g["lr"])
            groups.append(g)
        if not groups:
            raise ValueError("Trainer: the hooks' param_groups hold no trainable parameters")
        return torch.optim.AdamW(groups)

    def fit(
        self,
        model: torch.nn.Module,
        hooks: TrainHooks,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any],
        run_dir: str | Path,
        title: str = "",
    ) -> FitResult:
        cfg = self.config
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        model.to(cfg.device)
        optimizer = self.build_optimizer(model, hooks)
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
        total = cfg.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        sign = 1.0 if cfg.mode == "max" else -1.0
        best_score, best_epoch, best_state, best_metrics = -math.inf, -1, None, {}
        history: list[dict[str, Any]] = []
        step, start = 0, time.time()
        stopping, plateau = Patience(cfg.min_delta), Patience(cfg.min_delta)
        plateau_scale, early_stopped = 1.0, False

        model.eval()
        with torch.no_grad():
            hooks.on_fit_start(model, val_loader)
        for epoch in range(cfg.epochs):
            t0 = time.time()
            model.train()
            hooks.on_epoch_start(epoch, model)
            sums: dict[str, float] = {}
            count = 0
            bar = tqdm(train_loader, desc=f"{title or 'train'} epoch {epoch + 1}/{cfg.epochs}",
                       leave=False, disable=None if cfg.progress else True)
            for batch in bar:
                factor = _lr_factor(step, total, cfg)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * factor * plateau_scale
                optimizer.zero_grad(set_to_none=True)
                out = hooks.training_step(model, batch)
                if not torch.isfinite(out.loss):
                    raise FloatingPointError(f"non-finite training loss {out.loss.item()} at step {step}")
                hooks.backward(out, model)
                if cfg.grad_clip is not None and cfg.grad_clip > 0:
                    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
                    out.scalars.setdefault("grad_norm", grad_norm)
                optimizer.step()
                hooks.after_step(model)
                step += 1
                count += 1
                sums["train_loss"] = sums.get("train_loss", 0.0) + out.loss.item()
                for k, v in out.scalars.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                bar.set_postfix(loss=f"{sums['train_loss'] / count:.4f}")
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
            bar.close()

            model.eval()
            with torch.no_grad():
                val = hooks.validate(model, val_loader)
            row: dict[str, Any] = {"epoch": epoch + 1, "step": step}
            row.update({k: v / max(count, 1) for k, v in sums.items()})
            row.update({f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups})
            row.update(val)
            hooks.on_epoch_end(epoch, model, row)
            row["seconds"] = round(time.time() - t0, 2)
            history.append(row)
            if cfg.monitor not in val:
                raise KeyError(f"Trainer: monitor {cfg.monitor!r} not in validation metrics {sorted(val)}")
            score = sign * float(val[cfg.monitor])
            if math.isfinite(score) and score > best_score:
                best_score, best_epoch, best_metrics = score, epoch + 1, dict(val)
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            log.info("%s epoch %d/%d: %s", title or "train", epoch + 1, cfg.epochs,
                     ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
            write_log_csv(run_dir / LOG_CSV, history)
            write_curves_png(run_dir / CURVES_PNG, history, title=title)
            for observer in _EPOCH_OBSERVERS.get():
                observer(title or "train", cfg.epochs, row)
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
            stopping.update(score)
            last_epoch = epoch + 1 == cfg.epochs
            if (
                cfg.early_stop_patience is not None
                and stopping.bad_epochs >= cfg.early_stop_patience
                and not last_epoch
            ):
                log.info("%s: early stop after epoch %d: %s has not improved by more than %g for %d epochs",
                         title or "train", epoch + 1, cfg.monitor, cfg.min_delta, stopping.bad_epochs)
                early_stopped = True
                break
            plateau.update(score)
            if cfg.plateau_factor is not None and plateau.bad_epochs > cfg.plateau_patience:
                plateau_scale = max(plateau_scale * cfg.plateau_factor, cfg.plateau_min_scale)
                plateau.bad_epochs = 0
                log.info("%s: %s on a plateau after epoch %d: LR scaled to %g x the schedule",
                         title or "train", cfg.monitor, epoch + 1, plateau_scale)

        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        return FitResult(best_epoch=best_epoch, best_metrics=best_metrics, history=history, steps=step,
                         seconds=time.time() - start, early_stopped=early_stopped)
