"""GenSeg stage 1 (``python -m training pix2pix``) and the committed generators (``default-generators``);
docs/architecture.md, "training".
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from models.patchgan import PatchGANDiscriminator, build_patchgan
from models.pix2pix import PIX2PIX_PRESETS, Pix2PixGenerator, build_pix2pix
from training.loop import LoopConfig, StepOutput, Trainer, TrainHooks
from weights.checkpoints import save_run

log = logging.getLogger(__name__)

DOMAINS = ("in", "ood")


# ----------------------------------------------------------------------------------------------------------
# Pair sets
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PairSet:
    """Image/mask pairs in memory: ``images (N, S, S) float32 in [0, 1]``, ``masks (N, S, S) float32 in {0, 1}``."""

    images: np.ndarray
    masks: np.ndarray
    names: list[str]
    source: str

    def __post_init__(self) -> None:
        if self.images.shape != self.masks.shape or self.images.ndim != 3:
            raise ValueError(f"PairSet {self.source}: images {self.images.shape} and masks {self.masks.shape} "
                             "must both be (N, S, S)")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def fingerprint(self) -> str:
        """SHA-256 over the uint8-quantised images and the masks."""
        h = hashlib.sha256()
        h.update(np.round(self.images * 255).astype(np.uint8).tobytes())
        h.update(self.masks.astype(np.uint8).tobytes())
        return h.hexdigest()

    def subset(self, indices: list[int]) -> PairSet:
        return PairSet(self.images[indices], self.masks[indices], [self.names[i] for i in indices], self.source)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images (N, 1, S, S), masks (N, 1, S, S))`` float32 tensors."""
        return torch.from_numpy(self.images[:, None].copy()), torch.from_numpy(self.masks[:, None].copy())


def scanner_shift(image: np.ndarray, seed: int) -> np.ndarray:
    """The out-of-domain "other scanner" transform of a ``(S, S) float in [0, 1]`` ultrasound image.

    Coarser, stronger multiplicative speckle, a lower dynamic range (contrast x0.55-0.7 about the mean), a
    darker gamma (1.3-1.6), a gain offset and a slight lateral blur; deterministic in ``seed``.
    """
    rng = np.random.default_rng([97, int(seed)])
    size = image.shape[0]
    sigma = max(0.8, 2.5 * size / 256)
    real = ndimage.gaussian_filter(rng.standard_normal(image.shape), sigma)
    imag = ndimage.gaussian_filter(rng.standard_normal(image.shape), sigma)
    speckle = np.hypot(real, imag)
    speckle /= math.sqrt(float(np.mean(speckle**2)) + 1e-12)
    out = image * (1.0 - rng.uniform(0.35, 0.5) + rng.uniform(0.35, 0.5) * speckle)
    out = ndimage.gaussian_filter(out, (0.0, rng.uniform(0.5, 1.0) * size / 128))
    mean = float(out.mean())
    out = mean + rng.uniform(0.55, 0.7) * (out - mean) + rng.uniform(-0.05, 0.08)
    out = np.clip(out, 0.0, 1.0) ** rng.uniform(1.3, 1.6)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def phantom_pairs(n: int, seed: int, size: int, domain: str = "in") -> PairSet:
    """``n`` breast-ultrasound phantom pairs (core.phantoms) at ``size`` px.

    ``domain="in"``: the phantom generator as is. ``domain="ood"``: forced posterior shadowing plus
    :func:`scanner_shift` (different speckle, contrast, gamma and gain) — the out-of-domain test set.
    """
    from core.phantoms import breast_ultrasound, sample_seed

    if domain not in DOMAINS:
        raise ValueError(f"domain = {domain!r}; expected one of {DOMAINS}")
    images, masks = [], []
    for i in range(n):
        own = sample_seed(seed, i)
        image, mask = breast_ultrasound(own, size, shadow=True if domain == "ood" else None)
        image = image.astype(np.float32) / 255.0
        if domain == "ood":
            image = scanner_shift(image, own)
        images.append(image)
        masks.append(mask.astype(np.float32))
    names = [f"{domain}-{seed}-{i:04d}" for i in range(n)]
    return PairSet(np.stack(images), np.stack(masks), names, f"phantoms:ultrasound:{domain}:seed={seed}")


def folder_pairs(path: str | Path, size: int) -> PairSet:
    """All pairs of a segmentation folder/ZIP (``images/`` + ``masks/``, core.datasets) resized to ``size``."""
    from core.datasets import SegmentationDataset

    dataset = SegmentationDataset(path, size=size)
    images = np.stack([s.image for s in dataset]).astype(np.float32)
    masks = np.stack([s.mask for s in dataset]).astype(np.float32)
    return PairSet(images, masks, dataset.names, str(path))


def pair_loader(pairs: PairSet, batch_size: int, steps: int, seed: int) -> DataLoader:
    """A loader of ``steps`` batches ``(image (B, 1, S, S), mask (B, 1, S, S))`` drawn by repeated shuffles."""
    images, masks = pairs.tensors()
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(TensorDataset(images, masks), replacement=False, num_samples=steps * batch_size,
                            generator=generator)
    return DataLoader(TensorDataset(images, masks), batch_size=batch_size, sampler=sampler, drop_last=True)


def eval_loader(pairs: PairSet, batch_size: int = 16) -> DataLoader:
    images, masks = pairs.tensors()
    return DataLoader(TensorDataset(images, masks), batch_size=batch_size, shuffle=False)


def random_hflip(*tensors: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Flip the same samples of every ``(B, C, H, W)`` tensor left-right with probability 1/2."""
    flip = torch.rand(tensors[0].shape[0], generator=generator) < 0.5
    return tuple(torch.where(flip[:, None, None, None], t.flip(-1), t) for t in tensors)


# ----------------------------------------------------------------------------------------------------------
# Stage 1: pix2pix
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pix2PixTrainConfig:
    """pix2pix objective and optimiser settings (the paper's values by default)."""

    lr: float = 2e-4
    disc_lr: float = 2e-4
    beta1: float = 0.5
    lambda_l1: float = 100.0
    gan_mode: str = "vanilla"
    hflip: bool = True

    def __post_init__(self) -> None:
        if self.gan_mode not in ("vanilla", "lsgan"):
            raise ValueError(f"Pix2PixTrainConfig.gan_mode = {self.gan_mode!r}; expected 'vanilla' or 'lsgan'")
        for name in ("lr", "disc_lr", "lambda_l1"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Pix2PixTrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def gan_loss(logits: torch.Tensor, real: bool, mode: str = "vanilla") -> torch.Tensor:
    """pix2pix's GANLoss: BCE-with-logits (``"vanilla"``) or least squares (``"lsgan"``) against 1 or 0."""
    target = torch.full_like(logits, 1.0 if real else 0.0)
    if mode == "lsgan":
        return F.mse_loss(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


def image_quality(fake: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """Mean L1, PSNR (dB) and SSIM of ``(B, 1, S, S)`` images in [0, 1]."""
    from training.evaluate_generation import ssim

    l1 = float((fake - real).abs().mean())
    mse = float(((fake - real) ** 2).mean())
    return {"l1": l1, "psnr": 10.0 * math.log10(1.0 / max(mse, 1e-10)), "ssim": float(ssim(fake, real).mean())}


class Pix2PixHooks(TrainHooks):
    """Stage-1 hooks: the trainer steps the generator (``model``); the discriminator is stepped here.

    Args:
        discriminator: a conditional PatchGAN over ``(mask, image)``.
        config: objective and optimiser settings.
        seed: seeds the flip augmentation.
    """

    def __init__(self, discriminator: PatchGANDiscriminator, config: Pix2PixTrainConfig, seed: int = 0) -> None:
        self.discriminator = discriminator
        self.config = config
        self.disc_optimizer = torch.optim.Adam(discriminator.parameters(), lr=config.disc_lr,
                                               betas=(config.beta1, 0.999))
        self.generator = torch.Generator().manual_seed(seed)
        self.validations = 0

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        return [{"name": "generator", "params": list(model.parameters()), "lr": self.config.lr,
                 "betas": (self.config.beta1, 0.999), "weight_decay": 0.0}]

    def training_step(self, model: torch.nn.Module, batch: Any) -> StepOutput:
        image, mask = batch
        if self.config.hflip:
            image, mask = random_hflip(image, mask, generator=self.generator)
        fake = model(mask)
        mode = self.config.gan_mode
        # 1. Discriminator step on real and (detached) fake pairs.
        self.discriminator.train()
        self.disc_optimizer.zero_grad(set_to_none=True)
        loss_d = 0.5 * (gan_loss(self.discriminator(mask, image), True, mode)
                        + gan_loss(self.discriminator(mask, fake.detach()), False, mode))
        loss_d.backward()
        self.disc_optimizer.step()
        # 2. Generator loss; D's parameters are frozen while the graph is built, so no grads reach them.
        for p in self.discriminator.parameters():
            p.requires_grad_(False)
        loss_gan = gan_loss(self.discriminator(mask, fake), True, mode)
        for p in self.discriminator.parameters():
            p.requires_grad_(True)
        loss_l1 = (fake - image).abs().mean()
        loss = loss_gan + self.config.lambda_l1 * loss_l1
        return StepOutput(loss, scalars={"loss_d": float(loss_d.detach()), "loss_g_gan": float(loss_gan.detach()),
                                         "loss_g_l1": float(loss_l1.detach())})

    def validate(self, model: torch.nn.Module, loader: Any) -> dict[str, float]:
        fakes, reals = [], []
        for image, mask in loader:
            fakes.append(model(mask))
            reals.append(image)
        quality = image_quality(torch.cat(fakes), torch.cat(reals))
        self.validations += 1
        # ``val_epoch`` is what the trainer monitors: a GAN keeps its last generator (as pix2pix does); L1, PSNR
        # and SSIM to the paired image are logged only, since they favour the blurry early generators.
        return {**{f"val_{k}": v for k, v in quality.items()}, "val_epoch": float(self.validations)}


def train_pix2pix(
    train: PairSet,
    val: PairSet,
    out: str | Path,
    *,
    preset: str | dict[str, Any] = "default",
    disc: str | dict[str, Any] = "default",
    config: Pix2PixTrainConfig | None = None,
    epochs: int = 10,
    steps_per_epoch: int = 50,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Pix2PixGenerator, dict[str, Any]]:
    """Train a generator on ``train`` (validated on ``val``) and write the ``"pix2pix"`` run dir ``out``.

    Images and masks must already be at the generator's ``image_size``. Returns ``(generator in eval mode,
    best validation metrics)``.
    """
    config = config or Pix2PixTrainConfig()
    torch.manual_seed(seed)
    generator = build_pix2pix(preset)
    discriminator = build_patchgan(disc)
    size = generator.config.image_size
    if train.images.shape[-1] != size or val.images.shape[-1] != size:
        raise ValueError(f"train_pix2pix: pairs are {train.images.shape[-1]} px; the generator expects {size} px")
    hooks = Pix2PixHooks(discriminator, config, seed=seed)
    loop = LoopConfig(epochs=epochs, monitor="val_epoch", mode="max", grad_clip=None, seed=seed, progress=progress,
                      weight_decay=0.0)
    result = Trainer(loop).fit(generator, hooks, pair_loader(train, batch_size, steps_per_epoch, seed),
                               eval_loader(val), out, title="pix2pix")
    save_run(
        out, generator,
        config={"pix2pix": generator.config.to_dict(), "patchgan": discriminator.config.to_dict(),
                "train": {**config.to_dict(), "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                          "batch_size": batch_size, "train_source": train.source, "n_train": len(train),
                          "val_source": val.source, "n_val": len(val)}},
        threshold=0.5, metrics={**result.best_metrics, "best_epoch": result.best_epoch, "steps": result.steps,
                                "seconds": round(result.seconds, 1)},
        kind="pix2pix", phase="pix2pix", seed=seed, data_fingerprint=train.fingerprint(),
    )
    return generator.eval(), result.best_metrics


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def _add_pix2pix_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="run directory to write")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--data", help="segmentation folder or ZIP (images/ + masks/); 10%% held out for validation")
    src.add_argument("--phantoms", type=int, default=200, help="number of ultrasound phantom pairs (default 200)")
    parser.add_argument("--val-phantoms", type=int, default=24, help="validation phantoms (other seed)")
    parser.add_argument("--phantom-seed", type=int, default=0)
    parser.add_argument("--preset", default="default", choices=sorted(PIX2PIX_PRESETS))
    parser.add_argument("--disc", default="default", help="PatchGAN preset (default, tiny, pix2pix_70)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps-per-epoch", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--lambda-l1", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=0)


def _pix2pix_data(args: argparse.Namespace, size: int) -> tuple[PairSet, PairSet]:
    if args.data:
        from core.datasets import train_val_test_split

        pairs = folder_pairs(args.data, size)
        train_names, val_names, _ = train_val_test_split(pairs.names, val=0.1, test=0.0, seed=args.seed)
        index = {n: i for i, n in enumerate(pairs.names)}
        return pairs.subset([index[n] for n in train_names]), pairs.subset([index[n] for n in val_names])
    return (phantom_pairs(args.phantoms, args.phantom_seed, size),
            phantom_pairs(args.val_phantoms, args.phantom_seed + 1000, size))


def _run_pix2pix(args: argparse.Namespace) -> int:
    size = PIX2PIX_PRESETS[args.preset].image_size
    train, val = _pix2pix_data(args, size)
    config = Pix2PixTrainConfig(lr=args.lr, disc_lr=args.lr, lambda_l1=args.lambda_l1)
    _, metrics = train_pix2pix(train, val, args.out, preset=args.preset, disc=args.disc, config=config,
                               epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
                               seed=args.seed, progress=True)
    print(json.dumps({"run_dir": str(args.out), **metrics}, indent=2))
    return 0


def _add_default_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="checkpoints/generators", help="folder for pix2pix/, text2image/, selector/")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every training budget (steps) by this; 1.0 = the committed models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transunet", default="default",
                        help="run dir whose TransUNet scores pix2pix consistency ('default' = checkpoints/default; "
                             "a judge TransUNet is trained on phantoms when it is absent)")
    parser.add_argument("--skip-eval", action="store_true", help="train only; no evaluation in OUT/recipe.json")
    parser.add_argument("--work", help="folder for the phantom data and the judge TransUNet (default: a temporary "
                                       "folder, deleted at the end)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 helps on a busy machine)")


# The committed recipe: optimiser steps per model (x --scale) and data sizes.
DEFAULT_RECIPE: dict[str, Any] = {
    "pix2pix": {"n_train": 240, "n_val": 24, "epochs": 8, "steps_per_epoch": 150, "batch_size": 4},
    "selector": {"n_train": 600, "n_val": 100, "epochs": 5, "steps_per_epoch": 40, "batch_size": 32},
    "text2image": {"preset": "default", "epochs": 8, "steps_per_epoch": 100, "batch_size": 32,
                   "autoencoder_steps": 500, "autoencoder_batch_size": 8},
    "evaluation": {"n_test": 100, "per_modality": 20, "best_of": 4, "steps": 25, "guidance_scale": 1.5,
                   "judge_steps": 300},
}


def _steps(n: int, scale: float) -> int:
    return max(1, int(round(n * scale)))


def half_precision(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with floating tensors in float16 (half the committed size; loads into fp32 modules)."""
    return {k: v.detach().half() if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _store_half(run_dir: Path, model: torch.nn.Module) -> None:
    """Rewrite a run dir's weights in float16 and update run.json's hash and metadata."""
    from weights.checkpoints import RUN_JSON, WEIGHTS_FILE, file_sha256, save_safetensors

    # "format" first: the order the committed generators' headers have.
    save_safetensors(half_precision(model), run_dir / WEIGHTS_FILE, {"format": "pt", "dtype": "float16"})
    record = json.loads((run_dir / RUN_JSON).read_text())
    record["weights_sha256"] = file_sha256(run_dir / WEIGHTS_FILE)
    record["weights_dtype"] = "float16"
    (run_dir / RUN_JSON).write_text(json.dumps(record, indent=2) + "\n")


def _machine(load_start: tuple[float, float, float]) -> dict[str, Any]:
    """CPU model, cores, torch build and the 1-minute load average at the start and the end of the run."""
    import platform

    model = platform.processor() or "unknown"
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "load_average_1min_start": round(load_start[0], 2), "load_average_1min_end": round(os.getloadavg()[0], 2)}


def _run_default(args: argparse.Namespace) -> int:
    """Train pix2pix, the selector and the diffusion model, then evaluate; records wall and CPU times per part."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.work:
        return _train_default(args, Path(args.work))
    with tempfile.TemporaryDirectory(prefix="default-generators-") as work:
        return _train_default(args, Path(work))


def _train_default(args: argparse.Namespace, data_dir: Path) -> int:
    from training.evaluate_generation import evaluate_generation
    from training.selector import train_selector
    from training.text2image import (
        AutoencoderTrainConfig,
        Text2ImageTrainConfig,
        train_text2image,
        write_modality_dataset,
    )

    recipe, scale, seed = DEFAULT_RECIPE, args.scale, args.seed
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}
    load_start = os.getloadavg()
    start, cpu_start = time.time(), time.process_time()

    t0, c0 = time.time(), time.process_time()
    r = recipe["pix2pix"]
    size = PIX2PIX_PRESETS["default"].image_size
    generator, _ = train_pix2pix(
        phantom_pairs(r["n_train"], seed, size),
        phantom_pairs(r["n_val"], seed + 1000, size),
        out / "pix2pix",
        epochs=r["epochs"],
        steps_per_epoch=_steps(r["steps_per_epoch"], scale),
        batch_size=r["batch_size"],
        seed=seed,
    )
    _store_half(out / "pix2pix", generator)
    times["pix2pix_s"], cpu["pix2pix_s"] = time.time() - t0, time.process_time() - c0

    t0, c0 = time.time(), time.process_time()
    r = recipe["selector"]
    csv_train = write_modality_dataset(data_dir / "train", r["n_train"], seed)
    csv_val = write_modality_dataset(data_dir / "val", r["n_val"], seed + 1000)
    train_selector(csv_train, csv_val, out / "selector", epochs=r["epochs"],
                   steps_per_epoch=_steps(r["steps_per_epoch"], scale), batch_size=r["batch_size"], seed=seed)
    times["selector_s"], cpu["selector_s"] = time.time() - t0, time.process_time() - c0

    t0, c0 = time.time(), time.process_time()
    r = recipe["text2image"]
    model, _ = train_text2image(csv_train, csv_val, out / "text2image", preset=r["preset"], epochs=r["epochs"],
                                steps_per_epoch=_steps(r["steps_per_epoch"], scale),
                                config=Text2ImageTrainConfig(batch_size=r["batch_size"]), seed=seed,
                                autoencoder=AutoencoderTrainConfig(steps=_steps(r["autoencoder_steps"], scale),
                                                                   batch_size=r["autoencoder_batch_size"]))
    _store_half(out / "text2image", model)
    times["text2image_s"], cpu["text2image_s"] = time.time() - t0, time.process_time() - c0

    summary: dict[str, Any] = {"command": f"python -m training default-generators --out {args.out} --scale {scale} "
                                          f"--seed {seed}", "recipe": recipe, "threads": torch.get_num_threads()}
    if not args.skip_eval:
        t0, c0 = time.time(), time.process_time()
        r = recipe["evaluation"]
        csv_test = write_modality_dataset(data_dir / "test", r["n_test"], seed + 2000)
        report = evaluate_generation(out, csv_test, per_modality=r["per_modality"], best_of=r["best_of"],
                                     steps=r["steps"], guidance_scale=r["guidance_scale"], seed=seed,
                                     transunet=args.transunet, judge_steps=r["judge_steps"], work=data_dir / "judge")
        times["evaluate_s"], cpu["evaluate_s"] = time.time() - t0, time.process_time() - c0
        summary["evaluation"] = report
    times["total_s"], cpu["total_s"] = time.time() - start, time.process_time() - cpu_start
    summary["wall_times_s"] = {k: round(v, 1) for k, v in times.items()}
    summary["cpu_times_s"] = {k: round(v, 1) for k, v in cpu.items()}
    summary["machine"] = _machine(load_start)
    (out / "recipe.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("wall_times_s", "cpu_times_s")} | (
        {"modality_accuracy": summary["evaluation"]["modality_accuracy"],
         "pix2pix_consistency_dice": summary["evaluation"]["pix2pix_consistency_dice"]}
        if "evaluation" in summary else {}), indent=2))
    return 0


def add_arguments(parser: argparse.ArgumentParser, command_name: str = "pix2pix") -> None:
    if command_name == "default-generators":
        _add_default_arguments(parser)
    else:
        _add_pix2pix_arguments(parser)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if getattr(args, "command", "pix2pix") == "default-generators":
        return _run_default(args)
    return _run_pix2pix(args)
