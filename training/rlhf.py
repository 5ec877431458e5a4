"""``python -m training rlhf``: ratings -> reward model -> reward-weighted fine-tuning of the text-to-image model,
and the simulated rater that stands in for experts (design and citations: docs/rlhf.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from inference.protocols import BEST_OF_RANKERS
from models.reward import REWARD_PRESETS, RewardModel, build_reward
from models.selector import Selector, fit_size
from models.text2image import Text2ImageModel, build_train_scheduler
from weights.checkpoints import file_sha256, save_run

if TYPE_CHECKING:
    from inference.protocols import ImageScorer

log = logging.getLogger(__name__)

MIN_PHANTOM_SIZE = 64  # phantoms are drawn at max(size, 64) and resized, as the generators' training sets are
SEEDS = {"reference": 210_000, "real": 220_000}  # phantom seeds: the rater's reference set, the replay set


# ----------------------------------------------------------------------------------------------------------
# Real phantoms
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RealPhantoms:
    """``images (N, 1, S, S) float32 in [0, 1]``, their captions and modality names (balanced, modality-major
    cycling as core.phantoms' ``"modality"`` data set)."""

    images: torch.Tensor
    captions: list[str]
    modalities: list[str]


def real_phantoms(n: int, size: int, seed: int, modalities: Sequence[str] | None = None) -> RealPhantoms:
    """``n`` captioned phantoms, drawn at ``max(size, 64)`` px and resized to ``size`` (as the selector resizes):
    the generators' training sets are drawn at 64 (32 px models) or at their size (128 px); ``modalities``
    restricts and orders the cycle (default: all of core.phantoms.MODALITIES)."""
    from core.phantoms import MODALITIES, modality_image, sample_seed

    names = list(modalities or MODALITIES)
    images, captions, mods = [], [], []
    for i in range(n):
        modality = names[i % len(names)]
        image, caption = modality_image(modality, sample_seed(seed, i), max(int(size), MIN_PHANTOM_SIZE))
        images.append(image)
        captions.append(caption)
        mods.append(modality)
    batch = torch.from_numpy(np.stack(images).astype(np.float32) / 255.0)[:, None]
    return RealPhantoms(fit_size(batch, size).clamp(0.0, 1.0), captions, mods)


# ----------------------------------------------------------------------------------------------------------
# The simulated rater
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RaterConfig:
    """The simulated rater's constants (docs/rlhf.md, "The simulated rater").

    ``defect = noise_weight * max(0, log2(noise_ratio)) + typicality_weight * max(0, typicality - 1)
    + confidence_weight * max(0, min_confidence - p_modality)``; the rating is 5 minus the number of
    ``thresholds`` the defect exceeds (so 1-5).
    """

    noise_weight: float = 1.0
    typicality_weight: float = 0.5
    confidence_weight: float = 10.0
    min_confidence: float = 0.9
    thresholds: tuple[float, ...] = (0.2, 0.45, 0.75, 1.1)

    def __post_init__(self) -> None:
        if len(self.thresholds) != 4 or list(self.thresholds) != sorted(self.thresholds):
            raise ValueError(f"RaterConfig.thresholds must be 4 increasing numbers, got {self.thresholds}")
        for name in ("noise_weight", "typicality_weight", "confidence_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"RaterConfig.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class RaterScores:
    """Per image ``(B,)``: ``rating`` int64 in 1..5, ``defect`` >= 0 (the rater's fine score, lower is better)
    and its measurements (``intensity``: see :class:`SimulatedRater`)."""

    rating: torch.Tensor
    defect: torch.Tensor
    p_modality: torch.Tensor
    noise_ratio: torch.Tensor
    typicality: torch.Tensor
    intensity: torch.Tensor


def high_frequency_energy(images: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` in [0, 1] -> ``(B,)``: mean squared 4-neighbour Laplacian (replicate padding)."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=images.dtype)[None, None]
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel).pow(2).mean(dim=(1, 2, 3))


class SimulatedRater:
    """Rates generated images 1-5 from measurable properties (docs/rlhf.md):

    - ``p_modality``: the selector's probability of the requested modality;
    - ``noise_ratio``: high-frequency energy over the mean of real phantoms of that modality (the base
      model's images carry residual sampling noise: ratios of 1.3-2 are common);
    - ``typicality``: distance of the selector's features to the real phantoms' feature mean of that
      modality, over the real phantoms' own mean distance (1 = as typical as a real phantom);
    - ``intensity``: mean absolute z-score of the image's mean and standard deviation of intensity against
      the real phantoms of that modality.

    Uncalibrated, the defect and stars follow :class:`RaterConfig`. :meth:`calibrate` fits the rater to a
    generator: the defect becomes a sum of the four measurements, each in units of its spread over a calibration
    pool of that generator's images, and the stars are set at the pool's per-modality quintiles.

    Args:
        selector: the modality classifier (eval mode); its ``config.modalities`` fixes the modality ids.
        reference: real phantoms, at least two per modality.
        roundtrip: optional ``(B, 1, S, S) -> (B, 1, S, S)`` in [0, 1] (a latent generator's frozen autoencoder,
            encode then decode); when given, ``noise_ratio`` is against the round-tripped phantoms, so that the
            autoencoder's own smoothing (which fine-tuning the denoiser cannot change) is not counted.
    """

    TERMS = ("noise", "typicality", "confidence", "intensity")

    def __init__(self, selector: Selector, reference: RealPhantoms, config: RaterConfig | None = None,
                 roundtrip: Any = None) -> None:
        self.selector = selector.eval()
        self.config = config or RaterConfig()
        self.modalities = tuple(selector.config.modalities)
        self.calibration: dict[str, Any] | None = None
        hf, centre, spread, stats = [], [], [], []
        with torch.no_grad():
            for modality in self.modalities:
                rows = [i for i, m in enumerate(reference.modalities) if m == modality]
                if len(rows) < 2:
                    raise ValueError(f"SimulatedRater: reference has {len(rows)} {modality!r} phantoms; need >= 2")
                images = reference.images[rows]
                feats = self.selector(images).features
                mean = feats.mean(0)
                hf.append(high_frequency_energy(roundtrip(images) if roundtrip is not None else images).mean())
                centre.append(mean)
                spread.append((feats - mean).norm(dim=1).mean())
                moments = _intensity_moments(images)  # (n, 2)
                stats.append(torch.stack([moments.mean(0), moments.std(0).clamp(min=1e-4)]))
        self.hf_real = torch.stack(hf)  # (M,)
        self.feature_mean = torch.stack(centre)  # (M, F)
        self.feature_spread = torch.stack(spread)  # (M,)
        self.intensity_stats = torch.stack(stats)  # (M, 2 [mean, std over phantoms], 2 [image mean, image std])

    @classmethod
    def from_phantoms(cls, selector: Selector, size: int, *, per_modality: int = 40,
                      seed: int = SEEDS["reference"], config: RaterConfig | None = None,
                      roundtrip: Any = None) -> SimulatedRater:
        """A rater whose reference is ``per_modality`` phantoms of each of the selector's modalities."""
        modalities = list(selector.config.modalities)
        return cls(selector, real_phantoms(per_modality * len(modalities), size, seed, modalities), config,
                   roundtrip)

    def modality_ids(self, modalities: Sequence[str]) -> torch.Tensor:
        index = {m: i for i, m in enumerate(self.modalities)}
        unknown = [m for m in modalities if m not in index]
        if unknown:
            raise ValueError(f"modalities: unknown modality {unknown[0]!r}; expected one of {list(self.modalities)}")
        return torch.tensor([index[m] for m in modalities], dtype=torch.long)

    @torch.no_grad()
    def measure(self, images: torch.Tensor, modality_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images (B, 1, H, W)`` in [0, 1] -> ``{"p_modality", "noise_ratio", "typicality", "intensity"}``,
        each ``(B,)``."""
        out = self.selector(images)
        p_mod = F.softmax(out.modality_logits, dim=1).gather(1, modality_ids[:, None])[:, 0]
        noise_ratio = high_frequency_energy(images) / self.hf_real[modality_ids]
        typicality = (out.features - self.feature_mean[modality_ids]).norm(dim=1) / self.feature_spread[modality_ids]
        stats = self.intensity_stats[modality_ids]  # (B, 2, 2)
        intensity = ((_intensity_moments(images) - stats[:, 0]) / stats[:, 1]).abs().mean(dim=1)
        return {"p_modality": p_mod, "noise_ratio": noise_ratio, "typicality": typicality, "intensity": intensity}

    @staticmethod
    def terms(measured: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, 4)``: the calibrated defect's raw terms (:attr:`TERMS`): ``|log2 noise_ratio|``, typicality,
        ``1 - p_modality``, intensity z-score; each is larger for a worse image."""
        return torch.stack([torch.log2(measured["noise_ratio"].clamp(min=1e-6)).abs(), measured["typicality"],
                            1.0 - measured["p_modality"], measured["intensity"]], dim=1)

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, modality_ids: torch.Tensor, *,
                  weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> dict[str, Any]:
        """Fit the 1-5 scale to a generator from a calibration pool of its images ``(N, 1, S, S)`` in [0, 1]
        (their own prompts and seeds, never rated nor evaluated): each term's scale is its standard deviation
        within a modality over the pool, and each modality's four star thresholds are the pool's quintiles of
        the defect, so that the pool's images spread evenly over 1-5.
        Frozen afterwards; returns the calibration (JSON-ready)."""
        terms = self.terms(self.measure(images, modality_ids))
        centred = terms.clone()
        for m in modality_ids.unique():
            centred[modality_ids == m] -= terms[modality_ids == m].mean(0)
        scales = centred.std(0).clamp(min=1e-6)  # the spread within a modality
        w = torch.tensor([float(v) for v in weights])
        if len(w) != len(self.TERMS) or bool((w < 0).any()):
            raise ValueError(f"calibrate: weights must be {len(self.TERMS)} numbers >= 0, got {list(weights)}")
        defect = (terms / scales * w).sum(1)
        thresholds = torch.zeros(len(self.modalities), 4)
        for m in range(len(self.modalities)):
            rows = modality_ids == m
            if int(rows.sum()) < 5:
                raise ValueError(f"calibrate: {int(rows.sum())} {self.modalities[m]!r} images; need >= 5")
            thresholds[m] = torch.quantile(defect[rows], torch.tensor([0.2, 0.4, 0.6, 0.8]))
        self.calibration = {"scales": scales, "weights": w, "thresholds": thresholds}
        return {"n_images": len(images), "terms": list(self.TERMS),
                "term_scales": [float(v) for v in scales], "term_weights": [float(v) for v in w],
                "thresholds": {name: [float(v) for v in thresholds[m]] for m, name in enumerate(self.modalities)},
                "per_modality": {name: int((modality_ids == m).sum()) for m, name in enumerate(self.modalities)}}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, modality_ids: torch.Tensor) -> RaterScores:
        """``images (B, 1, H, W)`` in [0, 1], ``modality_ids (B,)`` -> :class:`RaterScores`."""
        c = self.config
        m = self.measure(images, modality_ids)
        p_mod, noise_ratio, typicality = m["p_modality"], m["noise_ratio"], m["typicality"]
        if self.calibration is not None:
            cal = self.calibration
            defect = (self.terms(m) / cal["scales"] * cal["weights"]).sum(1)
            thresholds = cal["thresholds"][modality_ids]  # (B, 4)
        else:
            defect = (c.noise_weight * torch.log2(noise_ratio.clamp(min=1e-6)).clamp(min=0.0)
                      + c.typicality_weight * (typicality - 1.0).clamp(min=0.0)
                      + c.confidence_weight * (c.min_confidence - p_mod).clamp(min=0.0))
            thresholds = torch.tensor(c.thresholds)[None].expand(len(images), 4)
        stars = 5 - (defect[:, None] > thresholds).sum(dim=1)
        return RaterScores(stars.long(), defect, p_mod, noise_ratio, typicality, m["intensity"])


def _intensity_moments(images: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` -> ``(B, 2)``: each image's mean and standard deviation of intensity."""
    flat = images.flatten(1)
    return torch.stack([flat.mean(1), flat.std(1)], dim=1)


# ----------------------------------------------------------------------------------------------------------
# Rated images and their regeneration
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RatedImage:
    """One rating of one generated image, with what regenerates it (the image ``index`` of a request with
    ``seed`` starts from the noise of ``seed + index``; a ``best_of`` image is the best of the candidates from
    ``seed + k``, ranked again by the same scorer)."""

    prompt: str
    modality: str
    seed: int
    steps: int
    guidance_scale: float
    rating: int
    index: int = 0
    negative_prompt: str | None = None
    best_of: int | None = None  # a best-of image: the best of this many candidates (seeds seed + k), index 0
    rank_by: str | None = None  # what ranked them: "selector" (None) or "reward"

    @property
    def noise_seed(self) -> int:
        return int(self.seed) + int(self.index)


def read_ratings(path: str | Path) -> list[RatedImage]:
    """``{"ratings": [{prompt, modality, seed, steps, guidance_scale, rating, index?, negative_prompt?, best_of?,
    rank_by?}]}``.

    Raises:
        ValueError: naming the file, the entry and the missing or bad field.
    """
    data = json.loads(Path(path).read_text())
    entries = data.get("ratings") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected {{\"ratings\": [...]}} with at least one entry")
    names = [f.name for f in RatedImage.__dataclass_fields__.values()]
    out = []
    for i, entry in enumerate(entries):
        missing = [n for n in names[:6] if n not in entry]
        if missing:
            raise ValueError(f"{path}: ratings[{i}] lacks {missing[0]!r}")
        unknown = [k for k in entry if k not in names]
        if unknown:  # e.g. a field that changes which image it was: never drop it silently
            raise ValueError(f"{path}: ratings[{i}].{unknown[0]}: unknown field; expected {', '.join(names)}")
        rated = RatedImage(**{k: entry[k] for k in names if k in entry})
        if not (isinstance(rated.rating, int) and 1 <= rated.rating <= 5):
            raise ValueError(f"{path}: ratings[{i}].rating = {rated.rating!r}; expected an integer 1-5")
        if rated.best_of is not None and (isinstance(rated.best_of, bool) or not isinstance(rated.best_of, int)
                                          or rated.best_of < 1 or rated.index != 0):
            raise ValueError(f"{path}: ratings[{i}].best_of = {rated.best_of!r} (index {rated.index!r}); expected "
                             "an integer >= 1 with index 0")
        if rated.rank_by not in (None, *BEST_OF_RANKERS) or (rated.rank_by is not None and rated.best_of is None):
            raise ValueError(f"{path}: ratings[{i}].rank_by = {rated.rank_by!r}; expected one of "
                             f"{list(BEST_OF_RANKERS)}, with best_of")
        out.append(rated)
    return out


def write_ratings(path: str | Path, ratings: Sequence[RatedImage]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"ratings": [asdict(r) for r in ratings]}, indent=1))
    return path


def generate(pipe: Any, items: Sequence[tuple[str, str, int]], *, steps: int, guidance_scale: float,
             negative_prompts: Sequence[str | None] | None = None, chunk: int = 64) -> torch.Tensor:
    """``items = [(prompt, modality, noise seed)]`` -> ``(N, 1, S, S) float32 in [0, 1]``, one image each,
    bit-for-bit what ``pipe.sample([prompt], [modality], seed=seed)`` gives (``inference.generation``)."""
    from inference.generation import GenerationRequest

    negatives = list(negative_prompts) if negative_prompts is not None else [None] * len(items)
    requests = [GenerationRequest([p], [m], None if n is None else [n], float(guidance_scale), int(steps), int(s), 1)
                for (p, m, s), n in zip(items, negatives, strict=True)]
    out: list[torch.Tensor] = []
    for start in range(0, len(requests), chunk):
        out += [images for images in pipe.sample_many(requests[start:start + chunk]) if images is not None]
    return torch.cat(out)


def regenerate(pipe: Any, ratings: Sequence[RatedImage], chunk: int = 64,
               reward_scorer: ImageScorer | None = None) -> torch.Tensor:
    """The rated images again, ``(N, 1, S, S)`` in [0, 1] (ratings grouped by steps and guidance); a best-of
    image is picked again from its candidates (noise seeds ``seed + k``, batched with the other images) by the
    pipeline's selector, or by ``reward_scorer`` (the served generators' reward model) for ``rank_by="reward"``.

    Raises:
        ValueError: a ``rank_by="reward"`` rating without ``reward_scorer`` (names the rating).
    """
    for i, r in enumerate(ratings):
        if r.rank_by == "reward" and reward_scorer is None:
            raise ValueError(f"ratings[{i}]: rank_by 'reward' needs the reward model that ranked the image (the "
                             "served generators directory's reward/ run)")
    images: list[torch.Tensor | None] = [None] * len(ratings)
    groups: dict[tuple[int, float], list[int]] = {}
    for i, r in enumerate(ratings):
        groups.setdefault((int(r.steps), float(r.guidance_scale)), []).append(i)
    for (steps, guidance), rows in groups.items():
        seeds = {i: ([ratings[i].seed + k for k in range(ratings[i].best_of)] if ratings[i].best_of
                     else [ratings[i].noise_seed]) for i in rows}
        batch = generate(pipe, [(ratings[i].prompt, ratings[i].modality, s) for i in rows for s in seeds[i]],
                         steps=steps, guidance_scale=guidance,
                         negative_prompts=[ratings[i].negative_prompt for i in rows for _ in seeds[i]], chunk=chunk)
        start = 0
        for i in rows:
            r, candidates = ratings[i], batch[start:start + len(seeds[i])]
            start += len(seeds[i])
            if r.best_of is None:
                images[i] = candidates[0]
            else:
                scorer = reward_scorer if r.rank_by == "reward" else None
                images[i] = pipe.pick_best(candidates, [r.modality], r.best_of, scorer)[0][0]
    return torch.stack([im for im in images if im is not None])


# ----------------------------------------------------------------------------------------------------------
# The reward model
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardTrainConfig:
    """AdamW on the mean squared rating error; ``val_fraction`` of the ratings held out for the Spearman."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-3
    val_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"RewardTrainConfig: steps {self.steps}, batch_size {self.batch_size}, lr {self.lr} "
                             "must be > 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"RewardTrainConfig.val_fraction must be in [0, 1), got {self.val_fraction}")


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); nan when either side is constant."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def train_reward(images: torch.Tensor, modality_ids: torch.Tensor, ratings: torch.Tensor, selector: Selector, *,
                 preset: str | dict[str, Any] = "default", config: RewardTrainConfig | None = None,
                 seed: int = 0) -> tuple[RewardModel, dict[str, Any]]:
    """Fit a :class:`~models.reward.RewardModel` (on a frozen copy of ``selector``) to ``ratings (N,)`` of
    ``images (N, 1, S, S)`` in [0, 1].

    Horizontal flips augment the training split. Returns the model (eval mode) and ``{"spearman_val",
    "mae_val", "n_train", "n_val", ...}`` measured on the held-out split (nan when it is empty).
    """
    config = config or RewardTrainConfig()
    torch.manual_seed(seed)
    model = build_reward(preset, selector)
    n = len(images)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * config.val_fraction))
    val, train = order[:n_val], order[n_val:]
    target = ratings.float()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    generator = torch.Generator().manual_seed(seed + 1)
    model.train()
    for _ in range(config.steps):
        rows = train[torch.randint(0, len(train), (min(config.batch_size, len(train)),), generator=generator)]
        x = images[rows]
        flip = torch.rand(len(rows), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.mse_loss(model(x, modality_ids[rows]), target[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    metrics: dict[str, Any] = {"n_train": len(train), "n_val": n_val, "steps": config.steps,
                               "train_mse": float(loss.detach())}
    with torch.no_grad():
        if n_val:
            predicted = model(images[val], modality_ids[val])
            metrics["spearman_val"] = spearman(predicted.numpy(), target[val].numpy())
            metrics["mae_val"] = float((predicted - target[val]).abs().mean())
        else:
            metrics["spearman_val"] = metrics["mae_val"] = float("nan")
    return model, metrics


def save_reward_run(out: str | Path, model: RewardModel, metrics: dict[str, Any], *, n_ratings: int,
                    config: RewardTrainConfig, seed: int, ratings_source: str) -> Path:
    """A ``"reward"`` run dir (``weights.reward.load_reward`` reads it)."""
    return save_run(out, model, config={"reward": model.config.to_dict(),
                                        "train": {**asdict(config), "n_ratings": n_ratings,
                                                  "ratings": ratings_source}},
                    threshold=0.5, metrics=metrics, kind="reward", phase="reward", seed=seed)


# ----------------------------------------------------------------------------------------------------------
# Reward-weighted fine-tuning
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RLHFConfig:
    """Reward-weighted regression settings (docs/rlhf.md, "Objective").

    Attributes:
        samples: images generated from the base model and scored by the reward model (the RWR data).
        steps / batch_size / lr: AdamW fine-tuning of the whole denoiser.
        temperature: RWR weight ``exp((r - max r) / temperature)`` within each modality (in rating units).
        real_weight: weight of the original denoising loss on real phantoms (the regulariser to the base).
        p_uncond: condition dropout, as in pre-training (keeps the guidance branch trained).
        snr_gamma: min-SNR loss weighting, as in pre-training.
        sample_steps / guidance_scale: how the RWR samples are generated (the service's defaults).
    """

    samples: int = 400
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-4
    temperature: float = 0.05
    real_weight: float = 2.0
    p_uncond: float = 0.1
    snr_gamma: float | None = 5.0
    sample_steps: int = 25
    guidance_scale: float = 1.5

    def __post_init__(self) -> None:
        for name in ("samples", "steps", "batch_size", "sample_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"RLHFConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RLHFConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.real_weight < 0 or not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"RLHFConfig: real_weight {self.real_weight} must be >= 0 and p_uncond "
                             f"{self.p_uncond} in [0, 1]")


def rwr_weights(rewards: torch.Tensor, groups: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(N,)`` reward-weighted-regression weights ``exp(r / temperature)``, normalised to mean 1 within each
    group (a modality): each group keeps its share of the data, and its better samples get more of it."""
    weights = torch.zeros_like(rewards, dtype=torch.float64)
    for g in groups.unique():
        rows = groups == g
        z = rewards[rows].double() / temperature
        w = torch.exp(z - z.max())
        weights[rows] = w / w.mean()
    return weights.float()


def denoising_losses(model: Text2ImageModel, scheduler: Any, text_encoder: Any, images: torch.Tensor,
                     prompts: list[str], modality_ids: torch.Tensor, generator: torch.Generator, *,
                     p_uncond: float = 0.0, snr_gamma: float | None = 5.0) -> torch.Tensor:
    """Per-image ``(B,)`` denoising loss of ``images (B, 1, S, S)`` in [0, 1]: training.text2image's objective
    (random t, the model's prediction type, min-SNR weighting, condition dropout ``p_uncond``) unreduced, in the
    model's space (pixels, or the frozen autoencoder's latents of a latent model)."""
    with torch.no_grad():
        x0 = model.encode(images)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
    noisy = scheduler.add_noise(x0, noise, t)
    kind = model.config.prediction_type
    target = {"epsilon": noise, "sample": x0}.get(kind)
    if target is None:
        target = scheduler.get_velocity(x0, noise, t)
    hidden, mask = text_encoder.encode(prompts)
    drop = torch.rand(x0.shape[0], generator=generator) < p_uncond
    if bool(drop.any()):
        empty_hidden, empty_mask = text_encoder.encode([""])
        hidden = torch.where(drop[:, None, None], empty_hidden, hidden)
        mask = torch.where(drop[:, None], empty_mask, mask)
        modality_ids = torch.where(drop, torch.full_like(modality_ids, model.null_modality), modality_ids)
    per_image = F.mse_loss(model(noisy, t, hidden, mask, modality_ids), target, reduction="none").mean((1, 2, 3))
    if snr_gamma is None:
        return per_image
    alpha = scheduler.alphas_cumprod[t]
    snr = alpha / (1.0 - alpha)
    clipped = snr.clamp(max=snr_gamma)
    return {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1.0), "sample": clipped}[kind] * per_image


@dataclass
class FinetuneResult:
    model: Text2ImageModel
    metrics: dict[str, Any] = field(default_factory=dict)


def finetune_rwr(pipe: Any, reward: RewardModel, prompts: Sequence[tuple[str, str]], real: RealPhantoms, *,
                 config: RLHFConfig | None = None, seed: int = 0) -> FinetuneResult:
    """Reward-weighted regression (Lee et al. 2023) of ``pipe.model`` (left untouched; a copy is trained).

    1. ``config.samples`` images from the base model, cycling through ``prompts = [(prompt, modality)]`` with
       noise seeds ``seed * 1_000_003 + i``; 2. the reward model's predicted rating of each and its RWR weight
       (:func:`rwr_weights`, per modality); 3. :func:`weighted_finetune`.
    """
    config = config or RLHFConfig()
    if not prompts:
        raise ValueError("finetune_rwr: prompts is empty")
    started = time.perf_counter()
    # 1. Samples from the base model
    items = [(prompts[i % len(prompts)][0], prompts[i % len(prompts)][1], seed * 1_000_003 + i)
             for i in range(config.samples)]
    pool = generate(pipe, items, steps=config.sample_steps, guidance_scale=config.guidance_scale)
    modalities = [m for _, m, _ in items]
    # 2. Rewards and weights
    with torch.no_grad():
        rewards = reward(pool, reward.modality_ids(modalities))
    weights = rwr_weights(rewards, pipe.model.modality_ids(modalities), config.temperature)
    sampling_s = time.perf_counter() - started
    # 3. Fine-tuning
    result = weighted_finetune(pipe.model, pipe.text_encoder, pool, [p for p, _, _ in items], modalities, weights,
                               real, config=config, seed=seed)
    result.metrics.update(samples=config.samples, reward_mean=float(rewards.mean()),
                          reward_std=float(rewards.std()), sampling_seconds=round(sampling_s, 1),
                          seconds=round(time.perf_counter() - started, 1))
    return result


def weighted_finetune(base: Text2ImageModel, text_encoder: Any, pool: torch.Tensor, prompts: list[str],
                      modalities: list[str], weights: torch.Tensor, real: RealPhantoms | None, *,
                      config: RLHFConfig | None = None, seed: int = 0) -> FinetuneResult:
    """``config.steps`` AdamW steps on a copy of ``base`` minimising
    ``E_{x ~ weights}[denoising loss(x)] + real_weight * E_real[denoising loss]``.

    Args:
        pool: ``(N, 1, S, S)`` in [0, 1], with ``prompts`` and ``modalities`` (N each).
        weights: ``(N,)`` >= 0; each batch draws pool images with probability proportional to them (the
            weighted regression's expectation, with less variance than multiplying the loss).
        real: the regulariser's real images (None, or ``real_weight = 0``: no regulariser).
    """
    config = config or RLHFConfig()
    if not (len(pool) == len(prompts) == len(modalities) == len(weights)) or not bool((weights >= 0).all()):
        raise ValueError(f"weighted_finetune: pool {len(pool)}, prompts {len(prompts)}, modalities "
                         f"{len(modalities)} and weights {len(weights)} (>= 0) must match")
    started = time.perf_counter()
    model = copy.deepcopy(base).train()
    scheduler = build_train_scheduler(model.config)
    pool_ids = model.modality_ids(list(modalities))
    use_real = real is not None and config.real_weight > 0
    real_ids = model.modality_ids(real.modalities) if use_real else None
    frozen = {id(p) for p in model.autoencoder.parameters()} if model.autoencoder is not None else set()
    trainable = [p for p in model.parameters() if id(p) not in frozen]  # a latent model's autoencoder stays
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 17)
    totals = {"rwr_loss": 0.0, "real_loss": 0.0}
    for _ in range(config.steps):
        rows = torch.multinomial(weights.double(), config.batch_size, replacement=True, generator=generator)
        loss_rwr = denoising_losses(model, scheduler, text_encoder, pool[rows], [prompts[i] for i in rows],
                                    pool_ids[rows], generator, p_uncond=config.p_uncond,
                                    snr_gamma=config.snr_gamma).mean()
        loss = loss_rwr
        if use_real:
            real_rows = torch.randint(0, len(real.images), (config.batch_size,), generator=generator)
            loss_real = denoising_losses(model, scheduler, text_encoder, real.images[real_rows],
                                         [real.captions[i] for i in real_rows], real_ids[real_rows], generator,
                                         p_uncond=config.p_uncond, snr_gamma=config.snr_gamma).mean()
            loss = loss + config.real_weight * loss_real
            totals["real_loss"] += float(loss_real.detach())
        totals["rwr_loss"] += float(loss_rwr.detach())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
    model.eval()
    effective = float(weights.sum() ** 2 / (weights**2).sum())
    return FinetuneResult(model, {"steps": config.steps, "effective_samples": round(effective, 1),
                                  "rwr_loss_mean": totals["rwr_loss"] / config.steps,
                                  "real_loss_mean": totals["real_loss"] / config.steps,
                                  "finetune_seconds": round(time.perf_counter() - started, 1)})


def save_generators(out: str | Path, base_dir: str | Path, model: Text2ImageModel, *, config: RLHFConfig,
                    metrics: dict[str, Any], rlhf_info: dict[str, Any], seed: int) -> Path:
    """A generators directory ``out`` like checkpoints/generators: ``text2image/`` (the fine-tuned model; its
    run.json's ``config.rlhf`` records ``rlhf_info`` and the base weights' sha256), ``selector/`` and
    ``pix2pix/`` copied from ``base_dir`` (so ``python -m export generators --model OUT`` exports it)."""
    from weights.checkpoints import read_run_json
    from weights.generators import resolve_generators_dir

    base = resolve_generators_dir(base_dir)
    out = Path(out)
    base_run = read_run_json(base / "text2image")
    base_sha = file_sha256(base / "text2image" / str(base_run.get("weights", "weights.safetensors")))
    run_config = {k: v for k, v in base_run["config"].items() if k != "train"}
    run_config["rlhf"] = {**asdict(config), **rlhf_info, "base_weights_sha256": base_sha,
                          "base_run_dir": str((base / "text2image").resolve()),
                          "base_train": base_run["config"].get("train")}
    save_run(out / "text2image", model, config=run_config, threshold=0.5, metrics=metrics, kind="text2image",
             phase="rlhf", seed=seed, sources={"text2image": str((base / "text2image").resolve())})
    for name in ("selector", "pix2pix"):
        if (base / name / "run.json").is_file():
            if (out / name).exists():
                shutil.rmtree(out / name)
            shutil.copytree(base / name, out / name)
    return out


# ----------------------------------------------------------------------------------------------------------
# Evaluation: same-prompt, same-seed pairs
# ----------------------------------------------------------------------------------------------------------


def compare_generators(base_pipe: Any, tuned_pipe: Any, rater: SimulatedRater, items: Sequence[tuple[str, str, int]],
                       real: RealPhantoms, *, steps: int = 25, guidance_scale: float = 1.5) -> dict[str, Any]:
    """Base vs fine-tuned on ``items = [(prompt, modality, seed)]``: the rater's win rate of the fine-tuned image
    in each pair (by its fine defect score; ties, equal defects, count half), the same by 1-5 rating (ties
    half), modality accuracy (the rater's selector's argmax), and Frechet distances of the selector's
    features to ``real``."""
    from training.evaluate_generation import frechet_distance

    mods = [m for _, m, _ in items]
    ids = rater.modality_ids(mods)
    out: dict[str, Any] = {"n_pairs": len(items)}
    scores, feats = {}, {}
    for name, pipe in (("base", base_pipe), ("finetuned", tuned_pipe)):
        images = generate(pipe, items, steps=steps, guidance_scale=guidance_scale)
        scores[name] = rater(images, ids)
        with torch.no_grad():
            sel = rater.selector(images)
        feats[name] = sel.features.numpy()
        out[f"modality_accuracy_{name}"] = float((sel.modality_logits.argmax(1) == ids).float().mean())
        out[f"rating_mean_{name}"] = float(scores[name].rating.float().mean())
        out[f"rating_histogram_{name}"] = {str(k): int((scores[name].rating == k).sum()) for k in range(1, 6)}
        for key in ("noise_ratio", "typicality", "p_modality", "intensity"):
            out[f"{key}_median_{name}"] = float(getattr(scores[name], key).median())
    b, t = scores["base"], scores["finetuned"]
    out["win_rate_defect"] = float(((t.defect < b.defect).float() + 0.5 * (t.defect == b.defect).float()).mean())
    out["win_rate_rating"] = float(((t.rating > b.rating).float() + 0.5 * (t.rating == b.rating).float()).mean())
    out["strict_wins_rating"] = int((t.rating > b.rating).sum())
    out["strict_losses_rating"] = int((t.rating < b.rating).sum())
    with torch.no_grad():
        real_feats = rater.selector(real.images).features.numpy()
    for name in ("base", "finetuned"):
        out[f"fid_{name}"] = frechet_distance(feats[name], real_feats)
    return out


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def prompts_of(ratings: Sequence[RatedImage]) -> list[tuple[str, str]]:
    """The distinct ``(prompt, modality)`` pairs of the ratings, in first-seen order."""
    return list(dict.fromkeys((r.prompt, r.modality) for r in ratings))


def rlhf_from_ratings(ratings: Sequence[RatedImage], base_dir: str | Path, out: str | Path, *,
                      reward_run: str | Path | None = None, reward_config: RewardTrainConfig | None = None,
                      reward_preset: str = "default", config: RLHFConfig | None = None, n_real: int = 600,
                      seed: int = 0, ratings_source: str = "", pipe: Any = None) -> dict[str, Any]:
    """The whole fine-tuning job: regenerate the rated images, train the reward model (unless ``reward_run``
    names one), fine-tune with RWR, write the generators directory ``out`` (with ``out/reward``).
    Returns ``{"reward": metrics, "finetune": metrics, "out": str}``."""
    from inference.generation import load_text2image_pipeline
    from weights.generators import resolve_generators_dir
    from weights.reward import load_reward

    config = config or RLHFConfig()
    reward_config = reward_config or RewardTrainConfig()
    pipe = pipe or load_text2image_pipeline(base_dir)
    out = Path(out)
    report: dict[str, Any] = {"out": str(out), "n_ratings": len(ratings)}
    if reward_run is None:
        started = time.perf_counter()
        ranked_by_reward = any(r.rank_by == "reward" for r in ratings)
        serving_reward = resolve_generators_dir(base_dir) / "reward"
        if ranked_by_reward and not (serving_reward / "run.json").is_file():
            raise FileNotFoundError(f"{serving_reward}/run.json: missing; ratings of images kept by rank_by "
                                    "'reward' are regenerated with the reward model that ranked them")
        images = regenerate(pipe, ratings, reward_scorer=load_reward(serving_reward) if ranked_by_reward else None)
        regen_s = time.perf_counter() - started
        modalities = list(pipe.modalities)
        ids = torch.tensor([modalities.index(r.modality) for r in ratings])
        target = torch.tensor([float(r.rating) for r in ratings])
        if pipe.selector is None:
            raise FileNotFoundError(f"{base_dir}: the reward model needs the selector run (selector/run.json)")
        reward, reward_metrics = train_reward(images, ids, target, pipe.selector, preset=reward_preset,
                                              config=reward_config, seed=seed)
        reward_metrics.update(regenerate_seconds=round(regen_s, 1),
                              seconds=round(time.perf_counter() - started, 1))
        save_reward_run(out / "reward", reward, reward_metrics, n_ratings=len(ratings), config=reward_config,
                        seed=seed, ratings_source=ratings_source)
        reward_dir = out / "reward"
    else:
        reward, reward_dir = load_reward(reward_run), Path(reward_run)
        reward_metrics = {"loaded": str(reward_run)}
    report["reward"] = reward_metrics
    real = real_phantoms(n_real, pipe.image_size, SEEDS["real"] + seed, list(pipe.modalities))
    result = finetune_rwr(pipe, reward, prompts_of(ratings), real, config=config, seed=seed)
    report["finetune"] = result.metrics
    reward_sha = file_sha256(reward_dir / "weights.safetensors")
    save_generators(out, base_dir, result.model, config=config, metrics=result.metrics, seed=seed,
                    rlhf_info={"objective": "reward-weighted regression (Lee et al. 2023)",
                               "n_ratings": len(ratings), "ratings": ratings_source,
                               "reward_run_dir": str(reward_dir.resolve()), "reward_weights_sha256": reward_sha,
                               "reward_spearman_val": reward_metrics.get("spearman_val"), "n_real": n_real})
    return report


def add_arguments(parser: argparse.ArgumentParser, command_name: str = "rlhf") -> None:
    parser.add_argument("--ratings", required=True, help="ratings JSON ({\"ratings\": [...]}, see read_ratings)")
    parser.add_argument("--out", required=True, help="generators directory to write (text2image/, selector/, "
                                                     "pix2pix/, reward/)")
    parser.add_argument("--generators", default="default", help="the base generators directory")
    parser.add_argument("--reward", default=None, help="an existing reward run dir (default: train one here)")
    parser.add_argument("--steps", type=int, default=RLHFConfig.steps, help="fine-tuning steps")
    parser.add_argument("--samples", type=int, default=RLHFConfig.samples, help="base images scored for RWR")
    parser.add_argument("--lr", type=float, default=RLHFConfig.lr)
    parser.add_argument("--temperature", type=float, default=RLHFConfig.temperature)
    parser.add_argument("--real-weight", type=float, default=RLHFConfig.real_weight,
                        help="weight of the original denoising loss on real phantoms (0: none)")
    parser.add_argument("--reward-steps", type=int, default=RewardTrainConfig.steps)
    parser.add_argument("--reward-preset", default="default", choices=sorted(REWARD_PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    ratings = read_ratings(args.ratings)
    config = RLHFConfig(samples=args.samples, steps=args.steps, lr=args.lr, temperature=args.temperature,
                        real_weight=args.real_weight)
    report = rlhf_from_ratings(ratings, args.generators, args.out, reward_run=args.reward, config=config,
                               reward_config=RewardTrainConfig(steps=args.reward_steps),
                               reward_preset=args.reward_preset, seed=args.seed,
                               ratings_source=str(args.ratings))
    print(json.dumps(report, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
    return 0
