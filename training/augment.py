"""Mask augmentor: a ground-truth mask -> a plausible *coarse* prediction, by error type and preset (the
error types and their parameters: docs/architecture.md, "training").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from core.config import ConfigMixin, resolve_preset
from core.metrics import dice

ERROR_TYPES: tuple[str, ...] = (
    "identity",
    "over_segmentation",
    "giant_over_segmentation",
    "under_segmentation",
    "missing_chunk",
    "internal_holes",
    "bridge",
    "false_positive_islands",
    "fragmentation",
    "shift",
    "empty",
    "noise_scatter",
)

SECONDARY_TYPES: tuple[str, ...] = ("boundary_jitter", "dilate", "erode", "speckle", "pinholes")

# Seed table (percent; the column sums to 135, so weights are normalised on use).
_DEFAULT_WEIGHTS: dict[str, float] = {
    "identity": 15.0,
    "over_segmentation": 17.0,
    "giant_over_segmentation": 10.0,
    "under_segmentation": 17.0,
    "missing_chunk": 12.0,
    "internal_holes": 10.0,
    "bridge": 10.0,
    "false_positive_islands": 17.0,
    "fragmentation": 10.0,
    "shift": 10.0,
    "empty": 4.0,
    "noise_scatter": 3.0,
}

Range = tuple[float, float]


@dataclass(frozen=True)
class AugmentorConfig(ConfigMixin):
    """Probabilities and parameter ranges of the mask augmentor (all ranges inclusive).

    Attributes:
        weights: error type -> non-negative weight (normalised to probabilities on use;
            types not named get weight 0).
        over_scale: area factor of over-segmentation (seed: 1.2x-3x).
        giant_scale: area factor of giant over-segmentation (seed: 3x-20x), capped at
            ``max_area_fraction`` of the image.
        under_scale: area factor of under-segmentation (seed: 0.4x-0.9x).
        chunk_fraction: fraction of the area cut out as a wedge or blob (seed: 5-30%).
        hole_count / hole_fraction: number of internal holes and the area fraction of each
            (seed: 1-3 holes, 2-20% each).
        bridge_blob_radius: radius of the adhered false-positive blob, in units of ``R``.
        bridge_gap: gap between the mask and the blob, in units of ``R``.
        bridge_half_width: half width of the connecting band in pixels.
        island_count / island_radius: false-positive islands (seed: 1-30 blobs), radius in
            units of ``R`` (at least 1 pixel).
        cut_count / cut_half_width: fragmentation cuts (seed: 1-5), half width in pixels.
        shift_fraction: translation as a fraction of the lesion's bounding-box size
            (seed: 5-30%).
        scatter_count / scatter_radius: noise-only scatter blobs, radius in pixels.
        irregularity: amplitude of the smooth noise that roughens grown/shrunk boundaries, in
            units of ``R``.
        secondary_prob: probability of adding 1-2 secondary perturbations.
        soft_mask_prob: probability of the soft conversion ``sigmoid(sdf / T)``.
        soft_mask_temperature: range of ``T`` in pixels (seed: 2-8).
        max_area_fraction: cap on the area of grown masks, as a fraction of the image.
    """

    weights: dict[str, float] = field(default_factory=lambda: dict(_DEFAULT_WEIGHTS))
    over_scale: Range = (1.2, 3.0)
    giant_scale: Range = (3.0, 20.0)
    under_scale: Range = (0.4, 0.9)
    chunk_fraction: Range = (0.05, 0.3)
    hole_count: tuple[int, int] = (1, 3)
    hole_fraction: Range = (0.02, 0.2)
    bridge_blob_radius: Range = (0.2, 0.6)
    bridge_gap: Range = (0.3, 1.0)
    bridge_half_width: Range = (0.7, 2.0)
    island_count: tuple[int, int] = (1, 30)
    island_radius: Range = (0.08, 0.35)
    cut_count: tuple[int, int] = (1, 5)
    cut_half_width: Range = (0.6, 2.0)
    shift_fraction: Range = (0.05, 0.3)
    scatter_count: tuple[int, int] = (5, 40)
    scatter_radius: Range = (1.0, 4.0)
    irregularity: Range = (0.0, 0.15)
    secondary_prob: float = 0.5
    soft_mask_prob: float = 0.8
    soft_mask_temperature: Range = (2.0, 8.0)
    max_area_fraction: float = 0.9

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(ERROR_TYPES))
        if unknown:
            raise ValueError(f"AugmentorConfig.weights: unknown error type(s) {unknown}; expected {ERROR_TYPES}")
        for name, w in self.weights.items():
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"AugmentorConfig.weights[{name!r}] = {w!r}; expected a finite number >= 0")
        if sum(self.weights.values()) <= 0:
            raise ValueError("AugmentorConfig.weights: all weights are 0; at least one must be positive")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                if len(value) != 2 or not value[0] <= value[1]:
                    raise ValueError(f"AugmentorConfig.{f.name} = {value!r}; expected a (low, high) pair, low <= high")
                if value[0] < 0:
                    raise ValueError(f"AugmentorConfig.{f.name} = {value!r}; expected non-negative bounds")
        for name in ("secondary_prob", "soft_mask_prob", "max_area_fraction"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"AugmentorConfig.{name} = {p!r}; expected a probability in [0, 1]")
        if self.soft_mask_temperature[0] <= 0:
            raise ValueError(f"AugmentorConfig.soft_mask_temperature = {self.soft_mask_temperature}; expected T > 0")

    def probabilities(self) -> dict[str, float]:
        """Normalised probability of every error type (in ``ERROR_TYPES`` order, summing to 1)."""
        total = float(sum(self.weights.values()))
        return {name: float(self.weights.get(name, 0.0)) / total for name in ERROR_TYPES}


def _weights(**overrides: float) -> dict[str, float]:
    return {name: float(overrides.get(name, 0.0)) for name in ERROR_TYPES}


AUGMENTOR_PRESETS: dict[str, AugmentorConfig] = {
    "default": AugmentorConfig(),
    # More identity (30%), fewer severe failures, a milder giant range.
    "mild": AugmentorConfig(
        weights=_weights(
            identity=30, over_segmentation=15, giant_over_segmentation=3, under_segmentation=15,
            missing_chunk=8, internal_holes=6, bridge=5, false_positive_islands=8, fragmentation=4,
            shift=4, empty=1, noise_scatter=1,
        ),
        giant_scale=(3.0, 6.0),
        island_count=(1, 10),
    ),
    # More extreme failures: giant over-segmentation, empty and scatter predictions.
    "severe": AugmentorConfig(
        weights=_weights(
            identity=5, over_segmentation=12, giant_over_segmentation=20, under_segmentation=12,
            missing_chunk=10, internal_holes=8, bridge=8, false_positive_islands=15, fragmentation=10,
            shift=12, empty=10, noise_scatter=10,
        ),
        secondary_prob=0.7,
    ),
    # 50% over/under-segmentation.
    "boundary_focus": AugmentorConfig(
        weights=_weights(
            identity=10, over_segmentation=25, giant_over_segmentation=5, under_segmentation=25,
            missing_chunk=8, internal_holes=4, bridge=5, false_positive_islands=8, fragmentation=4,
            shift=4, empty=1, noise_scatter=1,
        ),
    ),
    # 40% holes + missing chunks + fragmentation.
    "structural": AugmentorConfig(
        weights=_weights(
            identity=10, over_segmentation=10, giant_over_segmentation=4, under_segmentation=10,
            missing_chunk=14, internal_holes=14, bridge=8, false_positive_islands=10, fragmentation=12,
            shift=5, empty=2, noise_scatter=1,
        ),
    ),
}


# ---------------------------------------------------------------------------------------------
# Pure mask operations (bool (H, W) in, bool (H, W) out)
# ---------------------------------------------------------------------------------------------


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Signed Euclidean distance of a binary mask: (H, W) float32, > 0 inside, < 0 outside.

    Pixels next to the boundary get +1 (inside) / -1 (outside), so ``sdf > 0`` is the mask.
    An empty mask gives ``-(H + W)`` everywhere, a full mask ``+(H + W)``.
    """
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return np.full(m.shape, -float(sum(m.shape)), dtype=np.float32)
    if m.all():
        return np.full(m.shape, float(sum(m.shape)), dtype=np.float32)
    inside = ndimage.distance_transform_edt(m)
    outside = ndimage.distance_transform_edt(~m)
    return (inside - outside).astype(np.float32)


def soft_mask(mask: np.ndarray, temperature: float) -> np.ndarray:
    """Soft probability map ``sigmoid(signed_distance / T)``: (H, W) float32 in (0, 1).

    Thresholding at 0.5 gives back the binary mask exactly. ``T`` (pixels) sets the width of the
    transition: 2 is sharp, 8 fuzzy.
    """
    if temperature <= 0:
        raise ValueError(f"soft_mask: temperature = {temperature!r}; expected > 0")
    sdf = signed_distance(mask).astype(np.float64)
    return (1.0 / (1.0 + np.exp(-sdf / float(temperature)))).astype(np.float32)


def _smooth_noise(shape: tuple[int, int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (H, W) float64 with correlation length ~``sigma`` pixels.

    White noise on a grid ``sigma / 2`` pixels apart, lightly smoothed and linearly upsampled (much cheaper
    than filtering full-resolution noise with a wide Gaussian).
    """
    step = max(1, int(round(max(sigma, 1.0) / 2)))
    coarse_shape = (shape[0] // step + 3, shape[1] // step + 3)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape), sigma=1.0, mode="wrap")
    noise = ndimage.zoom(coarse, step, order=1)[: shape[0], : shape[1]]
    noise = noise - noise.mean()
    std = float(noise.std())
    return noise / std if std > 0 else noise


def _disk(shape: tuple[int, int], cy: float, cx: float, radius: float) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def _equiv_radius(area: int) -> float:
    return math.sqrt(max(area, 1) / math.pi)


def grow_to_area(mask: np.ndarray, target_area: int, rng: np.random.Generator, irregularity: float) -> np.ndarray:
    """Add the outside pixels nearest to the mask (plus smooth noise) until the area is reached."""
    m = mask.astype(bool)
    area = int(m.sum())
    k = int(min(target_area, m.size)) - area
    if k <= 0 or area == 0:
        return m.copy()
    field_ = ndimage.distance_transform_edt(~m)
    if irregularity > 0:
        field_ = field_ + irregularity * _smooth_noise(m.shape, rng, sigma=_equiv_radius(area) / 2)
    outside = np.flatnonzero(~m)
    order = np.argsort(field_.ravel()[outside], kind="stable")
    out = m.copy().ravel()
    out[outside[order[:k]]] = True
    return out.reshape(m.shape)


def shrink_to_area(mask: np.ndarray, target_area: int, rng: np.random.Generator, irregularity: float) -> np.ndarray:
    """Keep the ``target_area`` mask pixels deepest inside (plus smooth noise), at least one."""
    m = mask.astype(bool)
    area = int(m.sum())
    keep = int(max(1, min(target_area, area)))
    if keep >= area:
        return m.copy()
    field_ = ndimage.distance_transform_edt(m)
    if irregularity > 0:
        field_ = field_ + irregularity * _smooth_noise(m.shape, rng, sigma=_equiv_radius(area) / 2)
    inside = np.flatnonzero(m)
    order = np.argsort(-field_.ravel()[inside], kind="stable")
    out = np.zeros(m.size, dtype=bool)
    out[inside[order[:keep]]] = True
    return out.reshape(m.shape)


def _uniform(rng: np.random.Generator, r: Range) -> float:
    return float(rng.uniform(r[0], r[1]))


def _integers(rng: np.random.Generator, r: tuple[int, int]) -> int:
    return int(rng.integers(int(r[0]), int(r[1]) + 1))


# ---------------------------------------------------------------------------------------------
# The augmentor
# ---------------------------------------------------------------------------------------------


class MaskAugmentor:
    """Simulate a coarse segmenter's output from a ground-truth mask.

    Args:
        config: an ``AugmentorConfig`` (see ``AUGMENTOR_PRESETS``).

    Call with a mask ``(H, W)`` (bool, {0, 1} integers or floats thresholded at 0.5) and a
    ``np.random.Generator``; returns ``(coarse (H, W) float32 in [0, 1], info)`` with
    ``info = {"error_type", "secondary" (list), "soft" (bool), "temperature" (float or None),
    "dice" (Dice of coarse > 0.5 against the ground truth)}``.
    """

    def __init__(self, config: AugmentorConfig | None = None) -> None:
        self.config = config or AugmentorConfig()
        probs = self.config.probabilities()
        self._types = list(ERROR_TYPES)
        self._probs = np.array([probs[t] for t in self._types], dtype=np.float64)
        self._primary: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
            "identity": self._identity,
            "over_segmentation": self._over_segmentation,
            "giant_over_segmentation": self._giant_over_segmentation,
            "under_segmentation": self._under_segmentation,
            "missing_chunk": self._missing_chunk,
            "internal_holes": self._internal_holes,
            "bridge": self._bridge,
            "false_positive_islands": self._false_positive_islands,
            "fragmentation": self._fragmentation,
            "shift": self._shift,
            "empty": self._empty,
            "noise_scatter": self._noise_scatter,
        }

    def __call__(
        self,
        mask: np.ndarray,
        rng: np.random.Generator | None = None,
        force_error_type: str | None = None,
        force_soft: bool | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        rng = np.random.default_rng() if rng is None else rng
        gt = np.asarray(mask)
        if gt.ndim != 2:
            raise ValueError(f"MaskAugmentor: mask shape {gt.shape}; expected (H, W)")
        gt = gt > 0.5 if gt.dtype.kind == "f" else gt.astype(bool)

        # 1. Primary error type.
        if force_error_type is not None:
            if force_error_type not in self._primary:
                raise ValueError(f"force_error_type = {force_error_type!r}; expected one of {ERROR_TYPES}")
            error_type = force_error_type
        else:
            error_type = self._types[int(rng.choice(len(self._types), p=self._probs))]
        out = self._primary[error_type](gt, rng)

        # 2. Secondary perturbations (not on deliberately empty / identity-with-no-lesion outputs).
        secondary: list[str] = []
        if error_type != "empty" and out.any() and rng.random() < self.config.secondary_prob:
            n = int(rng.integers(1, 3))
            for idx in rng.choice(len(SECONDARY_TYPES), size=n, replace=False):
                name = SECONDARY_TYPES[int(idx)]
                out = self._secondary(name, out, rng)
                secondary.append(name)

        # 3. Soft conversion.
        soft = bool(rng.random() < self.config.soft_mask_prob) if force_soft is None else bool(force_soft)
        temperature: float | None = None
        if soft:
            temperature = _uniform(rng, self.config.soft_mask_temperature)
            coarse = soft_mask(out, temperature)
        else:
            coarse = out.astype(np.float32)
        info = {
            "error_type": error_type,
            "secondary": secondary,
            "soft": soft,
            "temperature": temperature,
            "dice": dice(coarse > 0.5, np.asarray(gt, dtype=bool)),
        }
        return coarse, info

    def augment_batch(
        self, masks: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Augment a stack ``(B, H, W)`` of masks; returns ``((B, H, W) float32 in [0, 1], infos)``."""
        outs, infos = [], []
        for m in np.asarray(masks):
            coarse, info = self(m, rng)
            outs.append(coarse)
            infos.append(info)
        return np.stack(outs).astype(np.float32), infos

    # -- primary error types ------------------------------------------------------------------

    def _identity(self, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return gt.copy()

    def _scaled(self, gt: np.ndarray, rng: np.random.Generator, scale: Range) -> np.ndarray:
        area = int(gt.sum())
        if area == 0:
            return gt.copy()
        factor = _uniform(rng, scale)
        irr = _uniform(rng, self.config.irregularity) * _equiv_radius(area)
        if factor >= 1.0:
            cap = int(self.config.max_area_fraction * gt.size)
            target = max(area + 1, min(int(round(area * factor)), cap))
            return grow_to_area(gt, target, rng, irr)
        return shrink_to_area(gt, int(round(area * factor)), rng, irr)

    def _over_segmentation(self, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self._scaled(gt, rng, self.config.over_scale)

    def _giant_over_segmentation(self, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self._scaled(gt, rng, self.config.giant_scale)

    def _under_segmentation(self, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self._scaled(gt, rng, self.config.under_scale)

    def _missing_chunk(self, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Cut out a wedge (angular sector from the centroid) or a blob at the boundary."""
        area = int(gt.sum())
        if area < 4:
            return gt.copy()
        k = max(1, int(round(area * _uniform(rng, self.config.chunk_fraction))))
        ys, xs = np.nonzero(gt)
        if rng.random() < 0.5:
            cy, cx = ys.mean(), xs.mean()
            angle = np.arctan2(ys - cy, xs - cx)
            start = rng.uniform(-math.pi, math.pi)
            key = np.mod(angle - start, 2 * math.pi)
        else:
            boundary = gt & ~ndimage.binary_erosion(gt)
            by, bx = np.nonzero(boundary)
            j = int(rng.integers(len(by)))
            key = (ys - by[j]) ** 2 + (xs - bx[j]) ** 2
        cut = np.argsort(key, kind="stable")[:k]
        out = gt.copy()
        out[ys[cut], xs[cut]] = False
        return out

    def _internal_holes(self, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Punch 1-3 disks strictly inside the mask (never touching its outer boundary)."""
        area = int(gt.sum())
        out = gt.copy()
        if area == 0:
            return out
        depth = ndimage.distance_transform_edt(gt)
        for _ in range(_integers(rng, self.config.hole_count)):
            radius = math.sqrt(_uniform(rng, self.config.hole_fraction) * area / math.pi)
            radius = min(radius, float(depth.max()) - 2.0)
            if radius < 1.0:
                break
            cy, cx = np.nonzero(depth > radius + 2.0)
            j = int(rng.integers(len(cy)))
            out &= ~_disk(gt.shape, cy[j], cx[j], radius)
        return out

    def _bridge(self, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A false-positive blob outside the lesion joined to it by a thin band (adhesion)."""
        area = int(gt.sum())
        if area == 0:
            return gt.copy()
        h, w = gt.shape
        r_eq = _equiv_radius(area)
        ys, xs = np.nonzero(gt)
        cy, cx = float(ys.mean()), float(xs.mean())
        theta = rng.uniform(-math.pi, math.pi)
        dy, dx = math.sin(theta), math.cos(theta)
        # Walk from the centroid along theta to the last mask pixel: the band starts there.
        t_exit = 0.0
        for t in np.arange(0.0, float(h + w), 0.5):
            y, x = int(round(cy + t * dy)), int(round(cx + t * dx))
            if not (0 <= y < h and 0 <= x < w):
                break
            if gt[y, x]:
                t_exit = t
        blob_r = max(1.5, _uniform(rng, self.config.bridge_blob_radius) * r_eq)
        t_blob = t_exit + _uniform(rng, self.config.bridge_gap) * r_eq + blob_r
        by = float(np.clip(cy + t_blob * dy, 0, h - 1))
        bx = float(np.clip(cx + t_blob * dx, 0, w - 1))
        blob = _disk(gt.shape, by, bx, blob_r)
        # Band: pixels within half_width of the segment from the exit point to the blob centre.
        ey, ex = cy + t_exit * dy, cx + t_exit * dx
        half = _uniform(rng, self.config.bridge_half_width)
        yy, xx = np.mgrid[:h, :w].astype(np.float64)
        sy, sx = by - ey, bx - ex
        seg_len2 = max(sy * sy + sx * sx, 1e-9)
        t = np.clip(((yy - ey) * sy + (xx - ex) * sx) / seg_len2, 0.0, 1.0)
        band = (yy - (ey + t * sy)) ** 2 + (xx - (ex + t * sx)) ** 2 <= max(half, 0.75) ** 2
        return gt | blob | band

    def _false_positive_islands(self, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """1-30 disks placed entirely outside the lesion (disjoint from it)."""
        area = int(gt.sum())
        r_eq = _equiv_radius(area) if area else 0.05 * min(gt.shape)
        out = gt.copy()
        gap = ndimage.distance_transform_edt(~gt) if area else np.full(gt.shape, np.inf)
        for _ in range(_integers(rng, self.config.island_count)):
            radius = max(1.0, _uniform(rng, self.config.island_radius) * r_eq)
            cy, cx = np.nonzero(gap > radius + 1.5)
            if len(cy) == 0:
                continue
            j = int(rng.integers(len(cy)))
            out |= _disk(gt.shape, cy[j], cx[j], radius)
        return out

    def _fragmentation(self, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """1-5 straight cuts through the lesion's interior (chords of width 1-4 px)."""
        area = int(gt.sum())
        if area < 9:
            return gt.copy()
        h, w = gt.shape
        depth = ndimage.distance_transform_edt(gt)
        cy, cx = np.nonzero(depth >= 0.3 * depth.max())
        yy, xx = np.mgrid[:h, :w].astype(np.float64)
        out = gt.copy()
        for _ in range(_integers(rng, self.config.cut_count)):
            j = int(rng.integers(len(cy)))
            theta = rng.uniform(0.0, math.pi)
            # Distance of every pixel to the line through (cy, cx) with direction theta.
            dist = np.abs((yy - cy[j]) * math.cos(theta) - (xx - cx[j]) * math.sin(theta))
            out &= dist > _uniform(rng, self.config.cut_half_width)
        return out

    def _shift(self, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Translate the mask by 5-30% of its bounding-box size (zero fill, no wrap)."""
        if not gt.any():
            return gt.copy()
        ys, xs = np.nonzero(gt)
        size = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
        dist = max(1.0, _uniform(rng, self.config.shift_fraction) * size)
        theta = rng.uniform(-math.pi, math.pi)
        dy, dx = int(round(dist * math.sin(theta))), int(round(dist * math.cos(theta)))
        if dy == 0 and dx == 0:
            dx = 1
        out = np.zeros_like(gt)
        h, w = gt.shape
        src = gt[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
        out[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
        return out

    def _empty(self, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.zeros_like(gt)

    def _noise_scatter(self, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Pure false-positive noise: small blobs anywhere, the lesion itself is missed."""
        h, w = gt.shape
        out = np.zeros_like(gt)
        for _ in range(_integers(rng, self.config.scatter_count)):
            radius = _uniform(rng, self.config.scatter_radius)
            out |= _disk(gt.shape, rng.uniform(0, h - 1), rng.uniform(0, w - 1), radius)
        return out

    # -- secondary perturbations ---------------------------------------------------------------

    def _secondary(self, name: str, m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if name == "boundary_jitter":
            amp = rng.uniform(0.5, 2.0)
            sdf = signed_distance(m) + amp * _smooth_noise(m.shape, rng, sigma=3.0)
            out = sdf > 0
            return out if out.any() else m
        if name == "dilate":
            return ndimage.distance_transform_edt(~m) <= rng.uniform(1.0, 2.0)
        if name == "erode":
            out = ndimage.distance_transform_edt(m) > rng.uniform(1.0, 2.0)
            return out if out.any() else m
        if name == "speckle":
            gap = ndimage.distance_transform_edt(~m)
            out = m.copy()
            for _ in range(int(rng.integers(1, 4))):
                cy, cx = np.nonzero(gap > 3.0)
                if len(cy) == 0:
                    break
                j = int(rng.integers(len(cy)))
                out |= _disk(m.shape, cy[j], cx[j], rng.uniform(0.8, 2.0))
            return out
        if name == "pinholes":
            depth = ndimage.distance_transform_edt(m)
            out = m.copy()
            for _ in range(int(rng.integers(1, 3))):
                cy, cx = np.nonzero(depth > 3.5)
                if len(cy) == 0:
                    break
                j = int(rng.integers(len(cy)))
                out &= ~_disk(m.shape, cy[j], cx[j], rng.uniform(0.8, 1.5))
            return out
        raise ValueError(f"unknown secondary perturbation {name!r}; expected one of {SECONDARY_TYPES}")


def build_augmentor(name_or_config: str | AugmentorConfig = "default", **overrides: Any) -> MaskAugmentor:
    """Build a ``MaskAugmentor`` from a preset name (``AUGMENTOR_PRESETS``) or a config.

    ``overrides`` replace config fields, e.g. ``build_augmentor("mild", soft_mask_prob=1.0)``.
    """
    config = resolve_preset(name_or_config, AUGMENTOR_PRESETS, AugmentorConfig, family="augmentor",
                            builder="build_augmentor")
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return MaskAugmentor(config)
