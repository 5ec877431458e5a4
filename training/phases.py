"""The three UltraRefiner training phases (``python -m training transunet | refiner | e2e``) as small hooks
over the one trainer; data, run presets, gate calibration and what each run directory holds:
docs/architecture.md ("training").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from core.config import ConfigMixin
from core.datasets import SegmentationDataset, data_fingerprint, kfold_split
from core.losses import build_loss
from core.metrics import DEFAULT_THRESHOLDS, dice_per_case, threshold_sweep
from models.build import build_transunet, build_ultrarefiner, config_to_dict
from models.gate import Gate, GateConfig, apply_gate
from models.transunet import TransUNet
from models.ultrarefiner import UltraRefiner, resize
from training.augment import AUGMENTOR_PRESETS, MaskAugmentor, build_augmentor
from training.calibration import calibrate_answers
from training.interactive import interactive_forward, iou_loss, sample_prompts
from training.loop import LoopConfig, StepOutput, Trainer, TrainHooks, seed_everything
from weights.checkpoints import RunDirError, build_model_from_run, load_run, resolve_run_dir, save_run

log = logging.getLogger("training.phases")

PHASES = ("transunet", "refiner", "e2e")
N_FOLDS = 5

# ---------------------------------------------------------------------------------------------------------
# Run presets and phase defaults
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PhaseSettings(ConfigMixin):
    """What every phase takes; each field is also a flag of the same name (``--batch-size``)."""

    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 8
    loss: str = "dice+bce"
    grad_clip: float | None = 1.0  # None or <= 0: no clipping


@dataclass(frozen=True)
class TransUNetPhase(PhaseSettings):
    """Phase 1 (the coarse TransUNet)."""


@dataclass(frozen=True)
class _InteractiveSettings(PhaseSettings):
    """Phases 2 and 3: they train the refiner on user-like prompts too, and calibrate the gate afterwards."""

    tune_gate: bool = True
    interactive_weight: float = 1.0  # weight of the /refine-style prompt loss (0: off)
    iou_loss_weight: float = 1.0
    interactive_per_batch: int = 8  # lesion cases per batch given user-like prompts


@dataclass(frozen=True)
class RefinerPhase(_InteractiveSettings):
    """Phase 2 (the refiner on augmented coarse masks)."""

    epochs: int = 15
    lr: float = 3e-4
    augmentor_preset: str = "default"
    real_ratio: float = 0.0  # share of real TransUNet predictions among the coarse masks, in [0, 1]
    sam_loss_weight: float = 0.5
    encoder_lr_scale: float = 1.0
    freeze_image_encoder: bool = False


@dataclass(frozen=True)
class E2EPhase(_InteractiveSettings):
    """Phase 3 (the whole UltraRefiner)."""

    epochs: int = 5
    lr: float = 5e-5
    interactive_weight: float = 0.5
    interactive_per_batch: int = 4
    transunet_lr: float = 1e-5
    refiner_lr: float | None = None  # None: lr
    transunet_grad_scale: float = 0.01
    transunet_weight_reg: float = 0.1
    freeze_transunet_epochs: int = 1
    coarse_loss_weight: float = 0.8
    refined_loss_weight: float = 0.2


PHASE_SETTINGS: dict[str, type[PhaseSettings]] = {"transunet": TransUNetPhase, "refiner": RefinerPhase,
                                                  "e2e": E2EPhase}


@dataclass(frozen=True)
class RunPreset:
    """What ``--config NAME`` selects.

    Attributes:
        model: run.json-style model config: part -> preset name or config dict (``models.build``).
        image_size: side (pixels) every image and mask is resized to for training.
        augmentor: overrides of the augmentor preset's fields for phase 2 (``training.augment``).
        phases: per-phase settings (field name -> value) over the defaults of ``PHASE_SETTINGS[phase]``.
        phantom_count: cases in the on-the-fly phantom set when ``--data`` is absent.
    """

    model: dict[str, Any]
    image_size: int = 128
    augmentor: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    phantom_count: int = 200

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str) -> RunPreset:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{origin}: unknown run-preset field(s) {unknown}; expected a subset of {sorted(names)}")
        if "model" not in data:
            raise ValueError(f"{origin}: run preset needs a 'model' field")
        return cls(**data)


_TINY_REFINER = {
    "img_size": 64, "patch_size": 16, "encoder_embed_dim": 32, "encoder_depth": 1, "encoder_num_heads": 2,
    "encoder_global_attn_indexes": [0], "window_size": 0, "mlp_ratio": 2.0, "out_chans": 32,
    "prompt_embed_dim": 32, "mask_in_chans": 8, "decoder_depth": 1, "decoder_mlp_dim": 64,
    "decoder_num_heads": 2, "iou_head_depth": 2, "iou_head_hidden_dim": 32, "num_multimask_outputs": 3,
}

RUN_PRESETS: dict[str, RunPreset] = {
    # Small CPU models; what `default-models` trains. Images are 256 px: the TransUNet works at its own 128 px
    # (UltraRefiner resizes), the refiner crops a square ROI (box + 50% context) from the full 256 px image and
    # resamples it to 256 px: the published 224 -> 1024 resolution path in small.
    "default": RunPreset(
        model={"transunet": "default", "refiner": "default", "gate": "default",
               "ultrarefiner": {"roi_expand_ratio": 0.5}},
        image_size=256,
        augmentor={"soft_mask_temperature": (0.5, 3.0)},
        phases={"refiner": {"lr": 1e-3, "sam_loss_weight": 1.0, "epochs": 25}},
    ),
    # The published sizes: TransUNet R50-ViT-B/16 at 224 and SAM ViT-B (load official weights with
    # --sam-checkpoint; the image encoder is then frozen as upstream does).
    "paper": RunPreset(
        model={"transunet": "r50-vit-b16", "refiner": "vit_b", "gate": "default", "ultrarefiner": "default"},
        image_size=224,
        phases={
            "transunet": {"lr": 1e-4, "epochs": 150, "batch_size": 8},
            "refiner": {"lr": 1e-4, "epochs": 50, "batch_size": 4},
            "e2e": {"epochs": 100, "transunet_lr": 1e-6, "refiner_lr": 1e-5, "batch_size": 4},
        },
    ),
    # Seconds-long runs for tests.
    "tiny": RunPreset(
        model={"transunet": "tiny", "refiner": _TINY_REFINER, "gate": "default", "ultrarefiner": "default"},
        image_size=64,
        augmentor={"soft_mask_temperature": (0.5, 2.0)},
        phases={name: {"epochs": 1, "batch_size": 4} for name in PHASES},
        phantom_count=16,
    ),
}


def resolve_preset(name_or_path: str) -> RunPreset:
    """A preset name from ``RUN_PRESETS`` or a JSON file holding the ``RunPreset`` fields."""
    if name_or_path in RUN_PRESETS:
        return RUN_PRESETS[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        return RunPreset.from_dict(json.loads(path.read_text()), str(path))
    raise ValueError(f"--config {name_or_path!r}: not a preset ({sorted(RUN_PRESETS)}) nor a JSON file")


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, command_name: str) -> None:
    """Flags of ``python -m training transunet|refiner|e2e``; unset flags take the preset's value."""
    if command_name not in PHASES:
        raise ValueError(f"training.phases has no command {command_name!r}; expected one of {PHASES}")
    g = parser.add_argument_group("data and run")
    g.add_argument("--data", help="folder or ZIP with images/ + masks/ (default: cached phantom ultrasound set)")
    g.add_argument("--val-data", help="separate validation folder/ZIP (default: fold --fold of --data)")
    g.add_argument("--out", required=True, help="run directory to write")
    g.add_argument("--config", default="default", help=f"run preset {sorted(RUN_PRESETS)} or a JSON file")
    g.add_argument("--epochs", type=int)
    g.add_argument("--seed", type=int, default=0, help="training seed (weights init, shuffling, augmentation)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the k-fold split and of phantom data")
    g.add_argument("--fold", type=int, default=0, help=f"validation fold, 0..{N_FOLDS - 1}")
    g.add_argument("--phantom-count", type=int, help="cases in the phantom set used when --data is absent")
    g.add_argument("--loss", help="loss spec for core.losses.build_loss, e.g. 'dice+bce'")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float, help="learning rate (phase 3: default for --refiner-lr)")
    g.add_argument("--grad-clip", type=float, help="max gradient norm (0 disables)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    g.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (tests)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.add_argument("--early-stop-patience", type=int,
                   help="stop after this many epochs without a val_dice gain above --min-delta (default: off)")
    g.add_argument("--min-delta", type=float, default=0.0, help="smallest val_dice gain that counts as improving")
    g.add_argument("--plateau-factor", type=float,
                   help="ReduceLROnPlateau: scale the LR by this after --plateau-patience flat epochs (default: off)")
    g.add_argument("--plateau-patience", type=int, default=2, help="flat epochs tolerated before the LR is reduced")
    if command_name == "transunet":
        parser.add_argument(
            "--vit-pretrained",
            metavar="NPZ",
            help="official TransUNet R50+ViT-B_16.npz (ImageNet-21k) for the encoder; config r50-vit-b16",
        )
    if command_name in ("refiner", "e2e"):
        parser.add_argument("--tune-gate", action=argparse.BooleanOptionalAction, default=None,
                            help="calibrate the uncertainty gate's gamma / gate_max on validation (default: on)")
        parser.add_argument("--interactive-weight", type=float,
                            help="weight of the loss on user-like prompts in /refine's whole-image framing (0 = off)")
        parser.add_argument("--interactive-per-batch", type=int, help="lesion cases per batch given user-like prompts")
        parser.add_argument("--iou-loss-weight", type=float, help="weight of the IoU head's MSE (SAM's IoU loss)")
    if command_name == "refiner":
        r = parser.add_argument_group("phase 2")
        r.add_argument("--sam-checkpoint", help="official SAM/MedSAM .pth or .safetensors for the refiner")
        r.add_argument("--transunet", help="phase-1 run dir ('default' allowed): real predictions and validation")
        r.add_argument("--gate", help="gate preset (models.gate.GATE_PRESETS) instead of the run preset's")
        r.add_argument("--augmentor-preset", choices=sorted(AUGMENTOR_PRESETS))
        r.add_argument("--real-ratio", type=float, help="fraction of real TransUNet predictions (needs --transunet)")
        r.add_argument("--sam-loss-weight", type=float, help="weight of the loss on the raw refiner mask")
        r.add_argument("--encoder-lr-scale", type=float, help="image-encoder LR / --lr")
        r.add_argument("--freeze-image-encoder", action=argparse.BooleanOptionalAction, default=None,
                       help="default: frozen with --sam-checkpoint, trained otherwise")
    if command_name == "e2e":
        e = parser.add_argument_group("phase 3")
        e.add_argument("--init", nargs="+", required=True,
                       help="an ultrarefiner run, or a transunet run and a refiner run ('default' allowed)")
        e.add_argument("--transunet-lr", type=float)
        e.add_argument("--refiner-lr", type=float)
        e.add_argument("--transunet-grad-scale", type=float, help="scale of gradients from the refiner into TransUNet")
        e.add_argument("--transunet-weight-reg", type=float, help="L2 anchor of TransUNet to its initial weights")
        e.add_argument("--freeze-transunet-epochs", type=int)
        e.add_argument("--coarse-loss-weight", type=float)
        e.add_argument("--refined-loss-weight", type=float)


def _settings(args: argparse.Namespace, phase: str, preset: RunPreset) -> PhaseSettings:
    """Phase settings: explicit flags > preset.phases[phase] > the defaults of ``PHASE_SETTINGS[phase]``."""
    cls = PHASE_SETTINGS[phase]
    settings = cls.from_dict(preset.phases.get(phase, {}))
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    return dataclasses.replace(settings, **flags)


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Arrays:
    """A split held in memory: images and masks (N, 1, S, S) float32 in [0, 1] ({0, 1} for masks)."""

    images: torch.Tensor
    masks: torch.Tensor
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class DataSplits:
    train: Arrays
    val: Arrays
    fingerprint: str
    source: str
    split: dict[str, Any]


def cache_dir() -> Path:
    return Path(os.environ.get("MEDREFINE_CACHE_DIR", Path.home() / ".cache" / "medrefine"))


def phantom_dataset(count: int, seed: int, size: int, root: Path | None = None) -> Path:
    """The folder of a phantom ultrasound set (``count`` cases of ``size`` px, ``seed``), written on first use."""
    from core.phantoms import write_dataset

    root = (root or cache_dir()) / "phantoms"
    out = root / f"ultrasound_n{count}_seed{seed}_{size}px"
    if not (out / "images").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=root))
        write_dataset("ultrasound", count, tmp, seed, size=size)
        try:
            tmp.rename(out)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("wrote %d phantom ultrasound cases to %s", count, out)
    return out


def load_arrays(dataset: SegmentationDataset) -> Arrays:
    images, masks, names = [], [], []
    for sample in dataset:
        images.append(np.asarray(sample.image, dtype=np.float32))
        masks.append(np.asarray(sample.mask, dtype=np.float32))
        names.append(sample.name)
    return Arrays(torch.from_numpy(np.stack(images))[:, None], torch.from_numpy(np.stack(masks))[:, None], names)


def load_data(args: argparse.Namespace, preset: RunPreset) -> DataSplits:
    count = args.phantom_count or preset.phantom_count
    source = args.data or str(phantom_dataset(count, args.split_seed, preset.image_size))
    dataset = SegmentationDataset(source, size=preset.image_size)
    fingerprint = data_fingerprint(dataset)
    if args.val_data:
        val_ds = SegmentationDataset(args.val_data, size=preset.image_size)
        train_ds = dataset
        fingerprint = f"{fingerprint}+{data_fingerprint(val_ds)}"
        split = {"mode": "val-data", "val_data": str(args.val_data)}
    else:
        train_names, val_names = kfold_split(dataset.names, k=N_FOLDS, fold=args.fold, seed=args.split_seed)
        train_ds, val_ds = dataset.subset(train_names), dataset.subset(val_names)
        split = {"mode": "kfold", "k": N_FOLDS, "fold": args.fold, "split_seed": args.split_seed}
    train, val = load_arrays(train_ds), load_arrays(val_ds)
    split.update(n_train=len(train), n_val=len(val), data=str(source))
    log.info("data %s: %d train / %d val at %d px", source, len(train), len(val), preset.image_size)
    return DataSplits(train, val, fingerprint, str(source), split)


def make_loader(arrays: Arrays, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    ds = TensorDataset(arrays.images, arrays.masks, torch.arange(len(arrays)))
    gen = torch.Generator().manual_seed(seed)
    drop_last = shuffle and len(arrays) > batch_size
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=gen)


def random_hflip(tensors: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """Flip each sample of every (B, C, H, W) tensor left-right with probability 1/2 (same flip for all)."""
    flip = torch.rand(tensors[0].shape[0], generator=generator) < 0.5
    if not flip.any():
        return tensors
    out = []
    for t in tensors:
        t = t.clone()
        t[flip] = t[flip].flip(-1)
        out.append(t)
    return out


# ---------------------------------------------------------------------------------------------------------
# Model helpers
# ---------------------------------------------------------------------------------------------------------


def transunet_logits(transunet: TransUNet, image: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) image in [0, 1] -> (B, 1, H, W) logits (resized to/from the TransUNet's input)."""
    s = transunet.config.img_size
    x = resize(image, (s, s))
    if transunet.config.in_channels != 1:
        x = x.expand(-1, transunet.config.in_channels, -1, -1)
    return resize(transunet(x), tuple(image.shape[-2:]))


def refine(model: UltraRefiner, image: torch.Tensor, coarse: torch.Tensor) -> dict[str, torch.Tensor]:
    """Refiner half of ``UltraRefiner.forward`` for a given coarse probability (B, 1, H, W) in [0, 1]."""
    inputs = model.prepare_refiner_inputs(image, coarse)
    low, iou = model.decode(model.refiner.encode(inputs.refiner_image), inputs.prompts)
    out = model.finish(coarse, low, inputs.roi, image)
    out["iou"] = iou
    return out


def _batch_dice(prob: torch.Tensor, gt: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-case hard Dice (B,) float32 of ``prob > threshold`` against {0, 1} ``gt`` (``core.metrics``)."""
    return torch.from_numpy(dice_per_case(prob > threshold, gt > 0.5)).float()


@torch.no_grad()
def predict_transunet(transunet: TransUNet, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Coarse probabilities (N, 1, H, W) in [0, 1] for images (N, 1, H, W), on the model's device, CPU out."""
    device = next(transunet.parameters()).device
    was_training = transunet.training
    transunet.eval()
    out = [torch.sigmoid(transunet_logits(transunet, images[i : i + batch_size].to(device))).cpu()
           for i in range(0, len(images), batch_size)]
    transunet.train(was_training)
    return torch.cat(out)


def augment_masks(
    augmentor: MaskAugmentor, masks: torch.Tensor, rng: np.random.Generator, work_size: int
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Simulated coarse probabilities for ground-truth masks (B, 1, H, W) {0, 1}, same shape, in [0, 1].

    The coarse model sees ``work_size`` x ``work_size`` inputs and its logits are upsampled to (H, W), so the
    masks are reduced to ``work_size`` (antialiased bilinear, > 0.5), augmented there, and upsampled
    bilinearly: the same smoothing a real coarse mask gets (and 4x cheaper at twice the resolution).
    """
    size = tuple(masks.shape[-2:])
    small = (resize(masks.float(), (work_size, work_size)) > 0.5).float() if size != (work_size,) * 2 else masks
    outs, infos = augmentor.augment_batch(small[:, 0].numpy() > 0.5, rng)
    return resize(torch.from_numpy(outs)[:, None], size).clamp(0.0, 1.0), infos


# ---------------------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------------------


VAL_PROMPT_SEED = 4242  # the same validation prompts every epoch


@torch.no_grad()
def validate_interactive(model: UltraRefiner, loader: Iterable[Any], device: torch.device) -> dict[str, float]:
    """Dice of /refine's framing on the validation lesion cases with a jittered box and with one click
    (seeded prompts), and the mean |predicted - actual| IoU of the box answers."""
    from training.interactive import PromptBatch, jittered_box, mask_iou

    rng = np.random.default_rng(VAL_PROMPT_SEED)
    box_d, point_d, iou_err = [], [], []
    for image, mask, _ in loader:
        lesion = mask.flatten(1).amax(1) > 0.5
        if not lesion.any():
            continue
        image, mask = image[lesion].to(device), mask[lesion].to(device)
        gt = mask[:, 0].cpu().numpy() > 0.5
        b, h, w = gt.shape
        prior = torch.zeros(b, 1, h, w, device=device)
        no = torch.zeros(b, device=device)
        boxes = torch.from_numpy(np.stack([jittered_box(m, rng) for m in gt])).to(device)
        clicks = []
        for m in gt:
            ys, xs = np.nonzero(m)
            i = int(rng.integers(len(ys)))
            clicks.append([[xs[i], ys[i]]])
        clicks_t = torch.tensor(clicks, dtype=torch.float32, device=device)
        box_prompts = PromptBatch(torch.zeros(b, 1, 2, device=device), -torch.ones(b, 1, device=device), boxes,
                                  torch.ones(b, dtype=torch.bool, device=device), prior, no, ["box"] * b)
        point_prompts = PromptBatch(clicks_t, torch.ones(b, 1, device=device), torch.zeros(b, 4, device=device),
                                    torch.zeros(b, dtype=torch.bool, device=device), prior, no, ["point"] * b)
        prob, pred = interactive_forward(model, image, box_prompts)
        box_d.append(_batch_dice(prob, mask))
        iou_err.append((pred[:, 0] - mask_iou(prob, mask)).abs())
        point_d.append(_batch_dice(interactive_forward(model, image, point_prompts)[0], mask))
    if not box_d:
        return {"val_box_dice": 0.0, "val_point_dice": 0.0, "val_box_iou_abs_error": 1.0}
    return {"val_box_dice": float(torch.cat(box_d).mean()), "val_point_dice": float(torch.cat(point_d).mean()),
            "val_box_iou_abs_error": float(torch.cat(iou_err).mean())}


class _PhaseHooks(TrainHooks):
    """Shared pieces: losses, device, flip augmentation, the validation loader's arrays."""

    def __init__(self, settings: PhaseSettings, device: str, seed: int) -> None:
        self.settings = settings
        self.device = torch.device(device)
        self.loss_logits = build_loss(settings.loss, from_logits=True)
        self.loss_prob = build_loss(settings.loss, from_logits=False)
        self.generator = torch.Generator().manual_seed(seed + 1)

    def _to(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return [t.to(self.device) for t in tensors]

    def interactive_loss(
        self, model: UltraRefiner, image: torch.Tensor, mask: torch.Tensor, prior: torch.Tensor,
        rng: np.random.Generator,
    ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Loss on user-like prompts in /refine's whole-image framing (``training.interactive``) for up to
        ``interactive_per_batch`` lesion cases of the batch: ``L(prob) + iou_loss_weight * MSE(iou)``.

        Args:
            image, mask, prior: (B, 1, H, W) on the device; ``prior`` in [0, 1] (the coarse prediction).

        Returns:
            (weighted loss or None when off / no lesion case, scalars for log.csv).
        """
        weight, limit = float(self.settings.interactive_weight), int(self.settings.interactive_per_batch)
        lesion = torch.nonzero(mask.flatten(1).amax(1) > 0.5).flatten()[:limit]
        if weight <= 0 or limit <= 0 or len(lesion) == 0:
            return None, {}
        gt = mask[lesion]
        prompts = sample_prompts(gt[:, 0].cpu().numpy() > 0.5, prior[lesion][:, 0].detach().cpu().numpy(), rng)
        for name in ("points", "labels", "box", "has_box", "prior", "has_prior"):
            setattr(prompts, name, getattr(prompts, name).to(self.device))
        prob, pred_iou = interactive_forward(model, image[lesion], prompts)
        seg = self.loss_prob(prob, gt)
        iou = iou_loss(pred_iou, prob, gt)
        loss = weight * (seg + float(self.settings.iou_loss_weight) * iou)
        return loss, {"interactive_loss": seg.item(), "interactive_iou_mse": iou.item()}


class TransUNetHooks(_PhaseHooks):
    """Phase 1: the TransUNet alone, ``loss(logits, mask)``, monitor coarse Dice."""

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        return [{"name": "transunet", "params": list(model.parameters()), "lr": self.settings.lr}]

    def training_step(self, model: torch.nn.Module, batch: Any) -> StepOutput:
        image, mask, _ = batch
        image, mask = self._to(*random_hflip([image, mask], self.generator))
        logits = transunet_logits(model, image)
        return StepOutput(self.loss_logits(logits, mask))

    def validate(self, model: torch.nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        losses, dices = [], []
        for image, mask, _ in loader:
            image, mask = self._to(image, mask)
            logits = transunet_logits(model, image)
            losses.append(self.loss_logits(logits, mask).item() * len(image))
            dices.append(_batch_dice(torch.sigmoid(logits), mask))
        n = sum(len(d) for d in dices)
        dice = float(torch.cat(dices).mean())
        return {"val_loss": sum(losses) / n, "val_dice": dice, "val_coarse_dice": dice}


class RefinerHooks(_PhaseHooks):
    """Phase 2: train the refiner (and a learned gate) on coarse masks from the augmentor, mixed with real
    TransUNet predictions at ``real_ratio``; loss ``L(refined) + sam_loss_weight * L(sam_mask)``.

    Augmented masks follow phase 3's resolution path: the ground truth is reduced to the TransUNet's input
    size ``work_size``, augmented there, and upsampled bilinearly to the image size (see ``augment_masks``).
    Validation uses the real TransUNet predictions when a TransUNet run is given (the phase-3 input),
    else a fixed augmented coarse mask per validation case.
    """

    def __init__(
        self,
        settings: RefinerPhase,
        device: str,
        seed: int,
        augmentor_overrides: dict[str, Any],
        real_train: torch.Tensor | None,
        val_coarse: torch.Tensor,
        freeze_image_encoder: bool,
        work_size: int,
    ) -> None:
        super().__init__(settings, device, seed)
        self.augmentor = build_augmentor(settings.augmentor_preset, **augmentor_overrides)
        self.rng = np.random.default_rng(seed + 2)
        self.real_train = real_train
        self.val_coarse = val_coarse
        self.freeze_image_encoder = freeze_image_encoder
        self.work_size = work_size
        self.error_counts: dict[str, int] = {}

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        lr = self.settings.lr
        model.transunet.requires_grad_(False)
        encoder = list(model.refiner.image_encoder.parameters())
        model.refiner.image_encoder.requires_grad_(not self.freeze_image_encoder)
        enc_ids = {id(p) for p in encoder}
        rest = [p for p in model.refiner.parameters() if id(p) not in enc_ids]
        groups = [{"name": "refiner", "params": rest, "lr": lr}]
        if not self.freeze_image_encoder:
            groups.append({"name": "image_encoder", "params": encoder, "lr": lr * self.settings.encoder_lr_scale})
        gate = list(model.gate.parameters())
        if gate:
            groups.append({"name": "gate", "params": gate, "lr": lr})
        return groups

    def on_epoch_start(self, epoch: int, model: torch.nn.Module) -> None:
        model.transunet.eval()
        if self.freeze_image_encoder:
            model.refiner.image_encoder.eval()

    def coarse_for(self, mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Coarse probabilities (B, 1, H, W) for a training batch: real predictions or augmented masks."""
        ratio = float(self.settings.real_ratio) if self.real_train is not None else 0.0
        real = torch.tensor([ratio > 0 and self.rng.random() < ratio for _ in range(len(mask))])
        # A normal case: the augmentor needs a lesion; its coarse mask is the real prediction, else empty.
        empty = mask.flatten(1).amax(1) <= 0.5
        real = real | empty if self.real_train is not None else real
        coarse = torch.zeros_like(mask)
        if real.any():
            coarse[real] = self.real_train[index[real]]
            self.error_counts["real"] = self.error_counts.get("real", 0) + int(real.sum())
        synthetic = ~real & ~empty
        if synthetic.any():
            aug, infos = augment_masks(self.augmentor, mask[synthetic], self.rng, self.work_size)
            coarse[synthetic] = aug
            for info in infos:
                self.error_counts[info["error_type"]] = self.error_counts.get(info["error_type"], 0) + 1
        return coarse

    def training_step(self, model: torch.nn.Module, batch: Any) -> StepOutput:
        image, mask, index = batch
        coarse = self.coarse_for(mask, index)
        image, mask, coarse = self._to(*random_hflip([image, mask, coarse], self.generator))
        out = refine(model, image, coarse)
        refined_loss = self.loss_prob(out["refined_mask"], mask)
        sam_loss = self.loss_prob(out["sam_mask"], mask)
        iou_mse = iou_loss(out["iou"], out["sam_mask"], mask)
        loss = refined_loss + self.settings.sam_loss_weight * sam_loss + self.settings.iou_loss_weight * iou_mse
        scalars = {"refined_loss": refined_loss.item(), "sam_loss": sam_loss.item(), "iou_mse": iou_mse.item()}
        extra, more = self.interactive_loss(model, image, mask, coarse, self.rng)
        if extra is not None:
            loss = loss + extra
            scalars.update(more)
        return StepOutput(loss, scalars)

    def validate(self, model: torch.nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        refined, coarse_d, sam = [], [], []
        for image, mask, index in loader:
            coarse = self.val_coarse[index]
            image, mask, coarse = self._to(image, mask, coarse)
            out = refine(model, image, coarse)
            refined.append(_batch_dice(out["refined_mask"], mask))
            sam.append(_batch_dice(out["sam_mask"], mask))
            coarse_d.append(_batch_dice(coarse, mask))
        metrics = {
            "val_dice": float(torch.cat(refined).mean()),
            "val_coarse_dice": float(torch.cat(coarse_d).mean()),
            "val_sam_dice": float(torch.cat(sam).mean()),
        }
        metrics.update(validate_interactive(model, loader, self.device))
        # The checkpoint must serve both /segment (automatic prompts) and /refine (a user's box).
        metrics["val_score"] = (metrics["val_dice"] + metrics["val_box_dice"]) / 2
        return metrics


class E2EHooks(_PhaseHooks):
    """Phase 3: the whole UltraRefiner.

    Loss ``coarse_w * L(coarse_logits) + refined_w * L(refined) + reg * sum((theta - theta_0)^2)`` over the
    TransUNet's parameters (L2 anchor to the phase-1 weights). Gradients from the refiner branch into the
    TransUNet are scaled by ``transunet_grad_scale`` (``UltraRefinerConfig.prompt_grad_scale``). For the first
    ``freeze_transunet_epochs`` epochs the TransUNet is frozen (no grad, eval mode). The TransUNet's
    validation Dice is measured before training; an epoch that falls below it is logged as a warning and
    marked ``coarse_degraded = 1`` in log.csv.
    """

    degrade_tolerance = 0.005

    def __init__(self, settings: E2EPhase, device: str, seed: int, model: UltraRefiner) -> None:
        super().__init__(settings, device, seed)
        self.anchor = {n: p.detach().clone() for n, p in model.transunet.named_parameters()}
        self.rng = np.random.default_rng(seed + 3)
        self.baseline_coarse_dice: float | None = None
        self.frozen = False

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        s = self.settings
        refiner_lr = s.refiner_lr if s.refiner_lr is not None else s.lr
        groups = [
            {"name": "transunet", "params": list(model.transunet.parameters()), "lr": s.transunet_lr},
            {"name": "refiner", "params": list(model.refiner.parameters()), "lr": refiner_lr},
        ]
        gate = list(model.gate.parameters())
        if gate:
            groups.append({"name": "gate", "params": gate, "lr": refiner_lr})
        return groups

    def on_fit_start(self, model: torch.nn.Module, val_loader: Iterable[Any]) -> None:
        dices = []
        for image, mask, _ in val_loader:
            image, mask = self._to(image, mask)
            dices.append(_batch_dice(torch.sigmoid(model.coarse(image)), mask))
        self.baseline_coarse_dice = float(torch.cat(dices).mean())
        log.info("e2e: TransUNet baseline val Dice %.4f", self.baseline_coarse_dice)

    def on_epoch_start(self, epoch: int, model: torch.nn.Module) -> None:
        self.frozen = epoch < int(self.settings.freeze_transunet_epochs)
        model.transunet.requires_grad_(not self.frozen)
        if self.frozen:
            model.transunet.eval()
            log.info("e2e: epoch %d: TransUNet frozen", epoch + 1)

    def anchor_penalty(self, model: UltraRefiner) -> torch.Tensor:
        terms = [((p - self.anchor[n].to(p.device)) ** 2).sum() for n, p in model.transunet.named_parameters()]
        return torch.stack(terms).sum()

    def training_step(self, model: torch.nn.Module, batch: Any) -> StepOutput:
        s = self.settings
        image, mask, _ = batch
        image, mask = self._to(*random_hflip([image, mask], self.generator))
        out = model(image)
        coarse_loss = self.loss_logits(out["coarse_logits"], mask)
        refined_loss = self.loss_prob(out["refined_mask"], mask)
        iou_mse = iou_loss(out["iou"], out["sam_mask"], mask)
        loss = (s.coarse_loss_weight * coarse_loss + s.refined_loss_weight * refined_loss
                + s.iou_loss_weight * iou_mse)
        scalars = {"coarse_loss": coarse_loss.item(), "refined_loss": refined_loss.item(), "iou_mse": iou_mse.item()}
        extra, more = self.interactive_loss(model, image, mask, out["coarse_mask"].detach(), self.rng)
        if extra is not None:
            loss = loss + extra
            scalars.update(more)
        if s.transunet_weight_reg > 0 and not self.frozen:
            reg = self.anchor_penalty(model)
            loss = loss + s.transunet_weight_reg * reg
            scalars["anchor_l2"] = reg.item()
        return StepOutput(loss, scalars)

    def validate(self, model: torch.nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        refined, coarse, sam = [], [], []
        for image, mask, _ in loader:
            image, mask = self._to(image, mask)
            out = model(image)
            refined.append(_batch_dice(out["refined_mask"], mask))
            coarse.append(_batch_dice(out["coarse_mask"], mask))
            sam.append(_batch_dice(out["sam_mask"], mask))
        metrics = {
            "val_dice": float(torch.cat(refined).mean()),
            "val_coarse_dice": float(torch.cat(coarse).mean()),
            "val_sam_dice": float(torch.cat(sam).mean()),
        }
        metrics.update(validate_interactive(model, loader, self.device))
        metrics["val_score"] = (metrics["val_dice"] + metrics["val_box_dice"]) / 2
        return metrics

    def on_epoch_end(self, epoch: int, model: torch.nn.Module, row: dict[str, Any]) -> None:
        base = self.baseline_coarse_dice
        row["baseline_coarse_dice"] = base
        degraded = base is not None and row["val_coarse_dice"] < base - self.degrade_tolerance
        row["coarse_degraded"] = int(degraded)
        if degraded:
            log.warning("e2e: epoch %d: TransUNet val Dice %.4f fell below its phase-1 baseline %.4f",
                        epoch + 1, row["val_coarse_dice"], base)


# ---------------------------------------------------------------------------------------------------------
# Threshold tuning and run writing
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_ultrarefiner(
    model: UltraRefiner, images: torch.Tensor, coarse: torch.Tensor | None = None, batch_size: int = 16
) -> dict[str, torch.Tensor]:
    """Coarse, refiner and refined probabilities (N, 1, H, W) and the predicted IoU (N, 1) for images
    (N, 1, H, W); ``coarse`` given = phase 2."""
    device = next(model.parameters()).device
    model.eval()
    out: dict[str, list[torch.Tensor]] = {"coarse": [], "sam": [], "refined": [], "iou": []}
    for i in range(0, len(images), batch_size):
        image = images[i : i + batch_size].to(device)
        if coarse is None:
            o = model(image)
            c = o["coarse_mask"]
        else:
            c = coarse[i : i + batch_size].to(device)
            o = refine(model, image, c)
        out["coarse"].append(c.cpu())
        out["sam"].append(o["sam_mask"].cpu())
        out["refined"].append(o["refined_mask"].cpu())
        out["iou"].append(o["iou"].cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def tune_threshold(probs: torch.Tensor, masks: torch.Tensor) -> tuple[float, dict[str, float]]:
    """Validation threshold sweep (core.metrics.threshold_sweep) -> (best threshold, {"0.5": dice, ...})."""
    best, scores = threshold_sweep(probs[:, 0].numpy(), masks[:, 0].numpy() > 0.5)
    return float(best), {f"{t:g}": round(s, 6) for t, s in scores.items()}


# (gamma, gate_min, gate_max) candidates of the uncertainty gate's validation calibration.
GATE_GRID: tuple[tuple[float, float, float], ...] = tuple(
    (g, lo, hi) for g in (1.0, 2.0, 4.0, 8.0) for lo in (0.0, 0.25, 0.5) for hi in (0.5, 0.8, 1.0) if lo <= hi
)
GATE_MIN_GAIN = 0.001  # validation Dice a grid point must gain over the current gate to replace it


def _best_threshold_dice(probs: torch.Tensor, masks: torch.Tensor) -> float:
    """Best mean per-case Dice (``_batch_dice``) over ``core.metrics.DEFAULT_THRESHOLDS``."""
    return max((float(_batch_dice(probs, masks, float(t)).mean()) for t in DEFAULT_THRESHOLDS), default=0.0)


def tune_gate(model: UltraRefiner, probs: dict[str, torch.Tensor], masks: torch.Tensor) -> dict[str, Any] | None:
    """Calibrate the parameter-free uncertainty gate on validation, like the threshold.

    For every ``(gamma, gate_min, gate_max)`` in ``GATE_GRID`` the refined mask ``coarse + gate * (sam - coarse)`` is
    recomputed from the stored coarse and refiner probabilities and scored by its best-threshold Dice. The
    best replaces ``model.gate`` when it beats the current gate by more than ``GATE_MIN_GAIN``; ``probs
    ["refined"]`` is updated to match. Learned gates are left alone (returns None).
    """
    current = model.gate.config
    if current.type != "uncertainty":
        return None
    coarse, sam = probs["coarse"], probs["sam"]

    def score(cfg: GateConfig) -> tuple[float, torch.Tensor]:
        refined = apply_gate(coarse, sam, Gate(cfg)(coarse, sam))
        return round(_best_threshold_dice(refined, masks), 6), refined

    def key(cfg: GateConfig) -> str:
        return f"gamma={cfg.gate_gamma:g},gate_min={cfg.gate_min:g},gate_max={cfg.gate_max:g}"

    base_score, base_refined = score(current)
    results = {key(current): base_score}
    best = (base_score, current, base_refined)
    for gamma, gate_min, gate_max in GATE_GRID:
        cfg = dataclasses.replace(current, gate_gamma=gamma, gate_min=gate_min, gate_max=gate_max)
        value, refined = score(cfg)
        results[key(cfg)] = value
        if value > best[0] + (GATE_MIN_GAIN if best[1] is current else 0.0):
            best = (value, cfg, refined)
    chosen = best[1]
    model.gate = Gate(chosen).to(next(model.parameters()).device)
    probs["refined"] = best[2]
    log.info("gate calibration: %s (val Dice %.4f; before %.4f)", key(chosen), best[0], base_score)
    return {"chosen": chosen.to_dict(), "before": current.to_dict(), "val_dice": results}


def _calibrate(
    model: UltraRefiner, probs: dict[str, torch.Tensor], masks: torch.Tensor, settings: _InteractiveSettings
) -> tuple[dict[str, tuple[float, dict[str, float]]], dict[str, Any] | None]:
    """Gate calibration (when enabled) then the refined and coarse threshold sweeps on validation."""
    gate = tune_gate(model, probs, masks) if settings.tune_gate else None
    sweeps = {"refined": tune_threshold(probs["refined"], masks), "coarse": tune_threshold(probs["coarse"], masks)}
    return sweeps, gate


def _finish_metrics(best: dict[str, float], sweeps: dict[str, tuple[float, dict[str, float]]]) -> dict[str, Any]:
    metrics: dict[str, Any] = dict(best)
    for name, (thr, scores) in sweeps.items():
        metrics[f"val_{name}_dice_at_threshold"] = scores[f"{thr:g}"]
        metrics[f"threshold_sweep_{name}"] = scores
    return metrics


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _loop_config(settings: PhaseSettings, args: argparse.Namespace, monitor: str = "val_dice") -> LoopConfig:
    clip = settings.grad_clip
    return LoopConfig(
        epochs=int(settings.epochs), max_steps=args.max_steps, grad_clip=clip if clip and clip > 0 else None,
        monitor=monitor, device=args.device, seed=args.seed, progress=not args.no_progress,
        early_stop_patience=args.early_stop_patience, min_delta=args.min_delta,
        plateau_factor=args.plateau_factor, plateau_patience=args.plateau_patience,
    )


def _training_record(settings: PhaseSettings, preset_name: str, fit: Any, args: argparse.Namespace) -> dict:
    return {
        "settings": settings.to_dict(), "preset": preset_name, "best_epoch": fit.best_epoch, "steps": fit.steps,
        "seconds": round(fit.seconds, 1), "device": args.device, "max_steps": args.max_steps,
        **({"early_stopped": fit.early_stopped} if args.early_stop_patience is not None else {}),
    }


def run_transunet(args: argparse.Namespace) -> Path:
    preset = resolve_preset(args.config)
    settings = _settings(args, "transunet", preset)
    seed_everything(args.seed)
    data = load_data(args, preset)
    model_config = config_to_dict(preset.model)
    model = build_transunet(model_config["transunet"]).to(args.device)
    sources: dict[str, str] = {}
    if args.vit_pretrained:
        from weights.transunet_npz import load_transunet_npz

        report = load_transunet_npz(model, args.vit_pretrained)
        log.info("transunet: %d encoder tensors from %s (positions %s; unused: %s)", len(report.loaded),
                 args.vit_pretrained, report.position_embedding, ", ".join(report.ignored) or "none")
        sources["vit_pretrained"] = str(args.vit_pretrained)
    hooks = TransUNetHooks(settings, args.device, args.seed)
    train_loader = make_loader(data.train, settings.batch_size, True, args.seed)
    val_loader = make_loader(data.val, settings.batch_size, False, args.seed)
    fit = Trainer(_loop_config(settings, args)).fit(model, hooks, train_loader, val_loader, args.out, "transunet")
    probs = predict_transunet(model, data.val.images)
    sweep = tune_threshold(probs, data.val.masks)
    return save_run(
        args.out, model, {"transunet": model_config["transunet"]}, sweep[0],
        _finish_metrics(fit.best_metrics, {"coarse": sweep}),
        kind="transunet", phase="transunet", seed=args.seed, data_fingerprint=data.fingerprint, sources=sources,
        extra={"thresholds": {"coarse": sweep[0]}, "training": _training_record(settings, args.config, fit, args),
               "split": data.split},
    )


def _load_transunet_run(path: str) -> tuple[Path, TransUNet, dict[str, Any], float]:
    info = load_run(resolve_run_dir(path))
    if info.kind == "transunet":
        model = build_model_from_run(info)
        return info.run_dir, model, info.config["transunet"], info.threshold
    if info.kind == "ultrarefiner":
        full = build_model_from_run(info)
        thr = float(info.raw.get("thresholds", {}).get("coarse", info.threshold))
        return info.run_dir, full.transunet, info.config["transunet"], thr
    raise RunDirError(f"{info.run_dir}/run.json: kind {info.kind!r} holds no TransUNet; expected 'transunet'")


def run_refiner(args: argparse.Namespace) -> Path:
    preset = resolve_preset(args.config)
    settings = _settings(args, "refiner", preset)
    if not 0.0 <= settings.real_ratio <= 1.0:
        raise ValueError(f"--real-ratio = {settings.real_ratio}; expected a value in [0, 1]")
    if settings.real_ratio > 0 and not args.transunet:
        raise ValueError("--real-ratio > 0 needs --transunet RUN_DIR (the real predictions come from it)")
    seed_everything(args.seed)
    data = load_data(args, preset)
    model_config = config_to_dict(dict(preset.model, **({"gate": args.gate} if args.gate else {})))
    sources: dict[str, str] = {}
    transunet = None
    if args.transunet:
        tu_dir, transunet, tu_config, _ = _load_transunet_run(args.transunet)
        model_config["transunet"] = tu_config
        sources["transunet"] = str(tu_dir)
    model = build_ultrarefiner(model_config)
    if transunet is not None:
        model.transunet.load_state_dict(transunet.state_dict())
    if args.sam_checkpoint:
        from weights.sam_checkpoint import load_sam_checkpoint

        sam = load_sam_checkpoint(args.sam_checkpoint, model_config["refiner"])
        model.refiner.load_state_dict(sam.state_dict())
        sources["sam_checkpoint"] = str(args.sam_checkpoint)
    freeze = args.freeze_image_encoder if args.freeze_image_encoder is not None else bool(args.sam_checkpoint)
    settings = dataclasses.replace(settings, freeze_image_encoder=freeze)
    model.to(args.device)

    work_size = model.transunet.config.img_size
    real_train = predict_transunet(model.transunet, data.train.images) if transunet is not None else None
    if transunet is not None:
        val_coarse = predict_transunet(model.transunet, data.val.images)
    else:
        aug = build_augmentor(settings.augmentor_preset, **preset.augmentor)
        rng = np.random.default_rng(10_000 + args.split_seed)
        val_coarse = augment_masks(aug, data.val.masks, rng, work_size)[0]
    hooks = RefinerHooks(settings, args.device, args.seed, preset.augmentor, real_train, val_coarse, freeze,
                         work_size)
    train_loader = make_loader(data.train, settings.batch_size, True, args.seed)
    val_loader = make_loader(data.val, settings.batch_size, False, args.seed)
    fit = Trainer(_loop_config(settings, args, "val_score")).fit(model, hooks, train_loader, val_loader, args.out,
                                                                 "refiner")
    probs = predict_ultrarefiner(model, data.val.images, coarse=val_coarse)
    sweeps, gate_tuning = _calibrate(model, probs, data.val.masks, settings)
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("refiner.", "gate."))}
    training = _training_record(settings, args.config, fit, args)
    training["coarse_source"] = "transunet" if transunet is not None else "augmentor"
    training["error_type_counts"] = hooks.error_counts
    training["augmentor"] = dict(preset.augmentor)
    training["gate_tuning"] = gate_tuning
    answers = calibrate_answers(probs, data.val.masks, sweeps["refined"][0])
    return save_run(
        args.out, state, model.config_dict(), sweeps["refined"][0], _finish_metrics(fit.best_metrics, sweeps),
        kind="refiner", phase="refiner", seed=args.seed, data_fingerprint=data.fingerprint, sources=sources,
        extra={"thresholds": {k: v[0] for k, v in sweeps.items()}, "training": training, "split": data.split,
               **answers},
    )


def _init_e2e_model(paths: list[str]) -> tuple[UltraRefiner, dict[str, str]]:
    """An UltraRefiner from one ultrarefiner run, or from a transunet run plus a refiner run."""
    infos = [load_run(resolve_run_dir(p)) for p in paths]
    kinds = sorted(i.kind for i in infos)
    if kinds == ["ultrarefiner"]:
        return build_model_from_run(infos[0]), {"ultrarefiner": str(infos[0].run_dir)}
    if kinds == ["refiner", "transunet"]:
        tu = next(i for i in infos if i.kind == "transunet")
        rf = next(i for i in infos if i.kind == "refiner")
        model = build_model_from_run(rf, transunet_run=tu.run_dir)
        return model, {"transunet": str(tu.run_dir), "refiner": str(rf.run_dir)}
    raise ValueError(
        f"--init {paths}: got run kinds {kinds}; expected one 'ultrarefiner' run or a 'transunet' and a 'refiner' run"
    )


def run_e2e(args: argparse.Namespace) -> Path:
    preset = resolve_preset(args.config)
    settings = _settings(args, "e2e", preset)
    seed_everything(args.seed)
    data = load_data(args, preset)
    model, sources = _init_e2e_model(args.init)
    scale = float(settings.transunet_grad_scale)
    if not 0.0 <= scale <= 1.0:
        raise ValueError(f"--transunet-grad-scale = {scale}; expected a value in [0, 1]")
    model.config = dataclasses.replace(model.config, prompt_grad_scale=scale)
    model.to(args.device)
    hooks = E2EHooks(settings, args.device, args.seed, model)
    train_loader = make_loader(data.train, settings.batch_size, True, args.seed)
    val_loader = make_loader(data.val, settings.batch_size, False, args.seed)
    fit = Trainer(_loop_config(settings, args, "val_score")).fit(model, hooks, train_loader, val_loader, args.out,
                                                                 "e2e")
    probs = predict_ultrarefiner(model, data.val.images)
    sweeps, gate_tuning = _calibrate(model, probs, data.val.masks, settings)
    metrics = _finish_metrics(fit.best_metrics, sweeps)
    metrics["baseline_coarse_dice"] = hooks.baseline_coarse_dice
    training = _training_record(settings, args.config, fit, args)
    training["gate_tuning"] = gate_tuning
    answers = calibrate_answers(probs, data.val.masks, sweeps["refined"][0])
    return save_run(
        args.out, model, model.config_dict(), sweeps["refined"][0], metrics,
        kind="ultrarefiner", phase="e2e", seed=args.seed, data_fingerprint=data.fingerprint, sources=sources,
        extra={"thresholds": {k: v[0] for k, v in sweeps.items()}, "training": training, "split": data.split,
               **answers},
    )


_RUNNERS = {"transunet": run_transunet, "refiner": run_refiner, "e2e": run_e2e}


def run(args: argparse.Namespace) -> int:
    """Dispatch ``args.command`` (transunet | refiner | e2e); returns 0 after writing the run directory."""
    _setup_logging()
    if args.command not in _RUNNERS:
        raise ValueError(f"training.phases: unknown command {args.command!r}; expected one of {PHASES}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    run_dir = _RUNNERS[args.command](args)
    log.info("%s: wrote %s", args.command, run_dir)
    return 0


__all__ = [
    "PHASE_SETTINGS",
    "E2EPhase",
    "PhaseSettings",
    "RefinerPhase",
    "TransUNetPhase",
    "RUN_PRESETS",
    "E2EHooks",
    "RefinerHooks",
    "RunPreset",
    "TransUNetHooks",
    "add_arguments",
    "load_data",
    "phantom_dataset",
    "predict_transunet",
    "predict_ultrarefiner",
    "refine",
    "resolve_preset",
    "run",
    "transunet_logits",
    "tune_threshold",
]
