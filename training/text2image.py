"""``python -m training text2image``: train the text + modality diffusion model on a MINIM CSV (data, loss and
what the run directory holds: docs/architecture.md, "training").
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from core.datasets import CaptionDataset, DatasetError, data_fingerprint
from core.text_encoders import DEFAULT_TEXT_ENCODER, CachedTextEncoder, load_text_encoder
from models.autoencoder import LatentAutoencoder, autoencoder_loss
from models.text2image import TEXT2IMAGE_PRESETS, Text2ImageModel, build_text2image, build_train_scheduler
from training.loop import LoopConfig, StepOutput, Trainer, TrainHooks
from weights.checkpoints import save_run

log = logging.getLogger(__name__)

# Side of the modality phantoms the commands write (the default generator makes 128 x 128 images).
PHANTOM_SIZE = 128

# Modality phrase -> synonyms (the phrase itself first). Lower case; matched against caption parts.
MODALITY_SYNONYMS: dict[str, tuple[str, ...]] = {
    "retinal oct": ("retinal oct", "optical coherence tomography of the retina", "oct b-scan"),
    "fundus photograph": ("fundus photograph", "color fundus image", "retinal fundus photo"),
    "chest x-ray": ("chest x-ray", "chest radiograph", "frontal cxr"),
    "chest ct": ("chest ct", "ct of the chest", "thoracic ct slice"),
    "brain mri": ("brain mri", "mri of the brain", "axial t1 brain mr"),
}
FINDING_SYNONYMS: dict[str, tuple[str, ...]] = {
    "normal retina": ("normal retina", "healthy retina"),
    "normal fundus": ("normal fundus", "healthy fundus"),
    "normal lungs": ("normal lungs", "clear lungs"),
    "normal brain": ("normal brain", "unremarkable brain"),
    "no acute findings": ("no acute findings", "normal study"),
    "cardiomegaly": ("cardiomegaly", "enlarged heart"),
}


def prompt_variants(caption: str) -> list[str]:
    """All augmented forms of a caption, the caption itself first (see the module docstring).

    Captions without a comma are treated as a modality phrase alone; unknown phrases keep their text.
    """
    parts = [p.strip() for p in caption.split(",", 1)]
    head = parts[0].lower()
    heads = MODALITY_SYNONYMS.get(head, (parts[0],))
    if len(parts) == 1 or not parts[1]:
        variants = list(heads)
    else:
        finding = parts[1]
        findings = FINDING_SYNONYMS.get(finding.lower(), (finding,))
        variants = []
        for h, f in itertools.product(heads, findings):
            variants += [f"{h}, {f}", f"{f}, {h}", f"{h} showing {f}"]
        variants += list(heads)  # the finding dropped
    out = [caption] + [v for v in dict.fromkeys(variants) if v != caption]
    return out


@dataclass(frozen=True)
class Text2ImageTrainConfig:
    """Training settings: AdamW ``lr``, condition dropout ``p_uncond``, prompt augmentation probability."""

    lr: float = 1e-3
    snr_gamma: float | None = 5.0
    p_uncond: float = 0.1
    p_augment: float = 0.5
    hflip: bool = False
    batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("p_uncond", "p_augment"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Text2ImageTrainConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not self.lr > 0 or self.batch_size < 1:
            raise ValueError(
                f"Text2ImageTrainConfig: lr = {self.lr!r} and batch_size = {self.batch_size!r} must be > 0"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AutoencoderTrainConfig:
    """The latent autoencoder's training: ``steps`` AdamW steps of ``batch_size`` images, one-cycle ``lr``."""

    steps: int = 500
    batch_size: int = 8
    lr: float = 2e-3

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"AutoencoderTrainConfig: steps = {self.steps!r}, batch_size = {self.batch_size!r} "
                             f"and lr = {self.lr!r} must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@torch.no_grad()
def reconstruction_quality(autoencoder: LatentAutoencoder, images: torch.Tensor, batch: int = 32) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of ``decode(encode(images))`` against ``images (N, 1, S, S)`` in [0, 1]."""
    from training.evaluate_generation import ssim

    psnr, similarity = [], []
    for i in range(0, len(images), batch):
        real = images[i:i + batch]
        recon = autoencoder.decode(autoencoder.encode(real))
        mse = ((recon - real) ** 2).flatten(1).mean(1).clamp_min(1e-10)
        psnr.append(10.0 * torch.log10(1.0 / mse))
        similarity.append(ssim(recon, real))
    return {"psnr": float(torch.cat(psnr).mean()), "ssim": float(torch.cat(similarity).mean()), "n": len(images)}


def train_autoencoder(autoencoder: LatentAutoencoder, train: torch.Tensor, val: torch.Tensor,
                      config: AutoencoderTrainConfig | None = None, seed: int = 0) -> dict[str, Any]:
    """Train on ``train (N, 1, S, S)`` in [0, 1], set the latent scale from them, freeze; returns the metrics
    (reconstruction PSNR / SSIM on ``val``, final losses, ``latent_scale``, seconds)."""
    config = config or AutoencoderTrainConfig()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps,
                                                   pct_start=0.1)
    start, parts = time.time(), {}
    autoencoder.train()
    for step in range(config.steps):
        index = torch.randint(0, len(train), (config.batch_size,), generator=generator)
        loss, parts = autoencoder_loss(autoencoder, train[index], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(autoencoder.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            log.info("autoencoder step %d/%d: %s", step + 1, config.steps,
                     ", ".join(f"{k} {v:.4g}" for k, v in parts.items()))
    autoencoder.eval().requires_grad_(False)
    scale = autoencoder.set_scale(train)
    quality = reconstruction_quality(autoencoder, val)
    return {"val_psnr": quality["psnr"], "val_ssim": quality["ssim"], "n_val": quality["n"],
            **{f"train_{k}": v for k, v in parts.items()}, "latent_scale": scale,
            "seconds": round(time.time() - start, 1), **config.to_dict()}


@dataclass
class CaptionTensors:
    """A CSV in memory: ``images (N, 1, S, S) float32 in [0, 1]``, caption index and modality id per image."""

    images: torch.Tensor
    caption_ids: torch.Tensor
    modality_ids: torch.Tensor
    captions: list[str]
    fingerprint: str
    source: str


def load_captions(csv_path: str | Path, model: Text2ImageModel) -> CaptionTensors:
    """Read a MINIM CSV at the model's size; unknown modalities raise ``DatasetError`` naming the CSV line."""
    dataset = CaptionDataset(csv_path, size=model.config.image_size)
    known = set(model.config.modalities)
    bad = [f"line {r.line} ({r.modal!r})" for r in dataset.records if r.modal not in known]
    if bad:
        raise DatasetError(
            str(csv_path), [f"modalities not in the model config {sorted(known)}: {', '.join(bad[:20])}"]
        )
    captions = sorted({r.text for r in dataset.records})
    index = {c: i for i, c in enumerate(captions)}
    images = torch.from_numpy(np.stack([s.image for s in dataset]).astype(np.float32))[:, None]
    return CaptionTensors(
        images=images,
        caption_ids=torch.tensor([index[r.text] for r in dataset.records]),
        modality_ids=model.modality_ids([r.modal for r in dataset.records]),
        captions=captions,
        fingerprint=data_fingerprint(dataset),
        source=str(csv_path),
    )


class DiffusionHooks(TrainHooks):
    """Diffusion training with prompt augmentation and condition dropout.

    Batches are ``(samples (B, *model.sample_shape) in model space, caption_ids (B,), modality_ids (B,))``:
    ``model.encode(images)``, computed once (:func:`encode_samples`; latents are cached, not re-encoded).
    """

    def __init__(self, model: Text2ImageModel, encoder: CachedTextEncoder, captions: list[str],
                 config: Text2ImageTrainConfig, seed: int = 0) -> None:
        self.config = config
        self.encoder = encoder
        self.scheduler = build_train_scheduler(model.config)
        too_long = [c for c in captions if encoder.count_tokens(c) > encoder.max_tokens]
        if too_long:
            raise ValueError(f"caption {too_long[0]!r} needs {encoder.count_tokens(too_long[0])} tokens; the model "
                             f"takes max_text_tokens = {encoder.max_tokens}")
        # Augmented variants that do not fit the token budget are left out (the caption itself always fits).
        self.variants = {c: [v for v in prompt_variants(c) if encoder.count_tokens(v) <= encoder.max_tokens]
                         for c in captions}
        self.captions = captions
        encoder.warm([""] + [v for vs in self.variants.values() for v in vs])
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.val_generator_seed = seed + 1

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        # A latent model's autoencoder is trained before and frozen.
        params = [p for name, p in model.named_parameters() if not name.startswith("autoencoder.")]
        return [{"name": "text2image", "params": params, "lr": self.config.lr}]

    def prompts_for(self, caption_ids: torch.Tensor, augment: bool) -> list[str]:
        prompts = []
        for i in caption_ids.tolist():
            caption = self.captions[i]
            if augment and self.rng.random() < self.config.p_augment:
                choices = self.variants[caption]
                caption = choices[int(self.rng.integers(len(choices)))]
            prompts.append(caption)
        return prompts

    def _loss(self, model: Text2ImageModel, images: torch.Tensor, prompts: list[str], modality_ids: torch.Tensor,
              generator: torch.Generator, drop: torch.Tensor | None) -> torch.Tensor:
        """The weighted diffusion loss of ``images (B, 1, S, S)`` in [0, 1] (encoded here; the autoencoder of a
        latent model gets no gradient): a scalar."""
        with torch.no_grad():
            x0 = model.encode(images)
        return self._loss_samples(model, x0, prompts, modality_ids, generator, drop)

    def _loss_samples(self, model: Text2ImageModel, x0: torch.Tensor, prompts: list[str], modality_ids: torch.Tensor,
                      generator: torch.Generator, drop: torch.Tensor | None) -> torch.Tensor:
        """:meth:`_loss` on samples already in model space, ``x0 (B, *model.sample_shape)``."""
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
        noisy = self.scheduler.add_noise(x0, noise, t)
        prediction_type = model.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, t)
        else:
            target = x0
        hidden, mask = self.encoder.encode(prompts)
        if drop is not None and bool(drop.any()):
            empty_hidden, empty_mask = self.encoder.encode([""])
            hidden = torch.where(drop[:, None, None], empty_hidden, hidden)
            mask = torch.where(drop[:, None], empty_mask, mask)
            modality_ids = torch.where(drop, torch.full_like(modality_ids, model.null_modality), modality_ids)
        per_sample = F.mse_loss(model(noisy, t, hidden, mask, modality_ids), target, reduction="none").mean((1, 2, 3))
        if self.config.snr_gamma is None:
            return per_sample.mean()
        alpha = self.scheduler.alphas_cumprod[t]
        snr = alpha / (1.0 - alpha)
        clipped = snr.clamp(max=self.config.snr_gamma)
        weight = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1.0), "sample": clipped}[prediction_type]
        return (weight * per_sample).mean()

    def training_step(self, model: torch.nn.Module, batch: Any) -> StepOutput:
        samples, caption_ids, modality_ids = batch
        if self.config.hflip:  # pixel space only (train_text2image refuses it for latents)
            flip = torch.rand(samples.shape[0], generator=self.generator) < 0.5
            samples = torch.where(flip[:, None, None, None], samples.flip(-1), samples)
        drop = torch.rand(samples.shape[0], generator=self.generator) < self.config.p_uncond
        loss = self._loss_samples(model, samples, self.prompts_for(caption_ids, True), modality_ids, self.generator,
                                  drop)
        return StepOutput(loss, scalars={"uncond_fraction": float(drop.float().mean())})

    def validate(self, model: torch.nn.Module, loader: Any) -> dict[str, float]:
        generator = torch.Generator().manual_seed(self.val_generator_seed)  # same noise and t every epoch
        total, count = 0.0, 0
        for samples, caption_ids, modality_ids in loader:
            loss = self._loss_samples(model, samples, self.prompts_for(caption_ids, False), modality_ids, generator,
                                      None)
            total += float(loss) * samples.shape[0]
            count += samples.shape[0]
        return {"val_loss": total / max(count, 1)}


@torch.no_grad()
def encode_samples(model: Text2ImageModel, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """``model.encode`` of ``images (N, 1, S, S)`` in [0, 1], in batches: ``(N, *model.sample_shape)``."""
    return torch.cat([model.encode(images[i:i + batch]) for i in range(0, len(images), batch)])


def _loader(data: CaptionTensors, samples: torch.Tensor, batch_size: int, steps: int | None,
            seed: int) -> DataLoader:
    dataset = TensorDataset(samples, data.caption_ids, data.modality_ids)
    if steps is None:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False)
    sampler = RandomSampler(dataset, replacement=False, num_samples=steps * batch_size,
                            generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True)


def train_text2image(
    csv_train: str | Path,
    csv_val: str | Path,
    out: str | Path,
    *,
    preset: str | dict[str, Any] = "default",
    text_encoder: str = DEFAULT_TEXT_ENCODER,
    config: Text2ImageTrainConfig | None = None,
    epochs: int = 10,
    steps_per_epoch: int = 100,
    seed: int = 0,
    progress: bool = False,
    encoder: CachedTextEncoder | None = None,
    autoencoder: AutoencoderTrainConfig | None = None,
) -> tuple[Text2ImageModel, dict[str, Any]]:
    """Train on ``csv_train`` (validation loss on ``csv_val``); writes a ``"text2image"`` run dir ``out``.

    A latent preset first trains its autoencoder (``autoencoder`` settings) on the training images, then
    caches their latents once and trains the UNet on them. ``encoder`` may pass an already loaded (cached)
    text encoder; otherwise ``text_encoder`` is loaded.
    """
    config = config or Text2ImageTrainConfig()
    torch.manual_seed(seed)
    model = build_text2image(preset)
    if model.autoencoder is not None and config.hflip:
        raise ValueError("Text2ImageTrainConfig.hflip: flipping cached latents is not flipping images; "
                         "leave hflip off for a latent preset")
    if encoder is None:
        encoder = load_text_encoder(text_encoder, max_tokens=model.config.max_text_tokens)  # type: ignore[assignment]
    if encoder.dim != model.config.text_dim:
        raise ValueError(f"text encoder {text_encoder!r} has width {encoder.dim}; the model's text_dim is "
                         f"{model.config.text_dim} (set it in the preset/config)")
    train, val = load_captions(csv_train, model), load_captions(csv_val, model)
    hooks = DiffusionHooks(model, encoder, sorted(set(train.captions) | set(val.captions)), config, seed)
    # Caption ids index each set's own caption list; remap to the hooks' joint list.
    for data in (train, val):
        joint = {c: i for i, c in enumerate(hooks.captions)}
        data.caption_ids = torch.tensor([joint[data.captions[i]] for i in data.caption_ids.tolist()])
    autoencoder_metrics: dict[str, Any] = {}
    if model.autoencoder is not None:
        autoencoder_metrics = train_autoencoder(model.autoencoder, train.images, val.images, autoencoder, seed)
        log.info("autoencoder: %s", json.dumps(autoencoder_metrics))
    train_samples, val_samples = encode_samples(model, train.images), encode_samples(model, val.images)
    loop = LoopConfig(epochs=epochs, monitor="val_loss", mode="min", seed=seed, progress=progress, grad_clip=1.0)
    result = Trainer(loop).fit(model, hooks, _loader(train, train_samples, config.batch_size, steps_per_epoch, seed),
                               _loader(val, val_samples, 64, None, seed), out, title="text2image")
    save_run(
        out, model,
        config={"text2image": model.config.to_dict(), "text_encoder": {"name": text_encoder},
                "train": {**config.to_dict(), "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                          "train_csv": train.source, "n_train": len(train.images), "val_csv": val.source,
                          "n_val": len(val.images)}},
        threshold=0.5, metrics={**result.best_metrics, "best_epoch": result.best_epoch, "steps": result.steps,
                                "seconds": round(result.seconds, 1),
                                **({"autoencoder": autoencoder_metrics} if autoencoder_metrics else {})},
        kind="text2image", phase="text2image", seed=seed, data_fingerprint=train.fingerprint,
    )
    return model.eval(), result.best_metrics


def modality_csvs(args: argparse.Namespace) -> tuple[Path, Path]:
    """``(train CSV, validation CSV)`` of a command: ``--csv`` / ``--val-csv`` when given, else 600 / 100
    five-modality phantoms written (once) next to ``--out``, seeded by ``--seed`` / ``--seed + 1000``."""
    data_root = Path(args.out).parent / f".{Path(args.out).name}-data"
    csv_train = Path(args.csv) if args.csv else write_modality_dataset(data_root / "train", 600, args.seed)
    csv_val = Path(args.val_csv) if args.val_csv else write_modality_dataset(data_root / "val", 100, args.seed + 1000)
    return csv_train, csv_val


def write_modality_dataset(out_dir: str | Path, n: int, seed: int, size: int = PHANTOM_SIZE) -> Path:
    """Write (once) ``n`` five-modality phantoms with ``captions.csv``; returns the CSV path."""
    from core.phantoms import write_dataset

    csv_path = Path(out_dir) / "captions.csv"
    if not csv_path.is_file():
        write_dataset("modality", n, out_dir, seed=seed, size=size)
    return csv_path


def add_arguments(parser: argparse.ArgumentParser, command_name: str = "text2image") -> None:
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument("--csv", help="training CSV path,text,modal (default: write 600 phantoms to OUT/../data)")
    parser.add_argument("--val-csv", help="validation CSV (default: 100 phantoms with another seed)")
    parser.add_argument("--preset", default="default", choices=sorted(TEXT2IMAGE_PRESETS))
    parser.add_argument("--text-encoder", default=DEFAULT_TEXT_ENCODER,
                        help="'minilm' (packaged all-MiniLM-L6-v2) or a local Hugging Face encoder folder")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps-per-epoch", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--p-uncond", type=float, default=0.1)
    parser.add_argument("--autoencoder-steps", type=int, default=AutoencoderTrainConfig.steps,
                        help="latent presets: steps of the autoencoder's training before the UNet's")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    csv_train, csv_val = modality_csvs(args)
    config = Text2ImageTrainConfig(lr=args.lr, p_uncond=args.p_uncond, batch_size=args.batch_size)
    _, metrics = train_text2image(csv_train, csv_val, args.out, preset=args.preset, text_encoder=args.text_encoder,
                                  config=config, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                                  seed=args.seed, progress=True,
                                  autoencoder=AutoencoderTrainConfig(steps=args.autoencoder_steps))
    print(json.dumps({"run_dir": str(args.out), **metrics}, indent=2))
    return 0
