"""Synthetic phantoms, deterministic by seed: breast ultrasound, chest X-ray, and five captioned modalities
(what they model and claim: docs/architecture.md, "core").
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from core.imageio import encode_mask_png, encode_png

MODALITIES = ("oct", "fundus", "chest_xray", "chest_ct", "brain_mri")
MODALITY_LABELS = {
    "oct": "retinal oct",
    "fundus": "fundus photograph",
    "chest_xray": "chest x-ray",
    "chest_ct": "chest ct",
    "brain_mri": "brain mri",
}
FINDINGS: dict[str, tuple[str, ...]] = {
    "oct": ("normal retina", "drusen", "macular edema", "choroidal neovascularization"),
    "fundus": ("normal fundus", "glaucomatous optic disc cupping", "diabetic retinopathy"),
    "chest_xray": (
        "no acute findings",
        "right upper lobe nodule",
        "right lower lobe nodule",
        "left upper lobe nodule",
        "left lower lobe nodule",
        "cardiomegaly",
        "left pleural effusion",
    ),
    "chest_ct": (
        "normal lungs",
        "right lung nodule",
        "left lung nodule",
        "ground-glass opacity",
        "emphysema",
        "pleural effusion",
    ),
    "brain_mri": ("normal brain", "glioma", "meningioma", "hydrocephalus"),
}
LOBES = ("right upper lobe", "right lower lobe", "left upper lobe", "left lower lobe")

MARGINS = ("circumscribed", "lobulated", "spiculated", "indistinct", "angular")

# Distinct salts keep the random streams of different generators independent for the same seed.
_SALT = {
    "ultrasound": 11,
    "chest_xray": 12,
    "oct": 13,
    "fundus": 14,
    "chest_ct": 15,
    "brain_mri": 16,
    "pick": 17,
}


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------


def _rng(kind: str, seed: int) -> np.random.Generator:
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng([_SALT[kind], int(seed)])


def _check_size(size: int, minimum: int = 32) -> int:
    if int(size) != size or size < minimum:
        raise ValueError(f"size must be an integer >= {minimum}, got {size!r}")
    return int(size)


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(v, u)`` in [0, 1]: v down (rows), u right (columns)."""
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    return c[:, None] * np.ones((1, size)), np.ones((size, 1)) * c[None, :]


def _sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(np.asarray(z, np.float64) * 0.5))


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]
) -> np.ndarray:
    """Gaussian-filtered white noise with zero mean and unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (field - field.mean()) / (field.std() + 1e-12)


def _speckle(rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float]) -> np.ndarray:
    """Correlated fully developed speckle: the envelope of a filtered complex Gaussian field (Rayleigh
    distributed), scaled to unit RMS."""
    real = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    imag = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    envelope = np.hypot(real, imag)
    return envelope / math.sqrt(float(np.mean(envelope**2)) + 1e-12)


def _wave(rng: np.random.Generator, u: np.ndarray, terms: int = 3) -> np.ndarray:
    """Smooth random 1-D undulation in about [-1, 1] along ``u``."""
    out = np.zeros_like(u)
    for k in range(1, terms + 1):
        out += rng.uniform(0.3, 1.0) / k * np.sin(2 * math.pi * k * u + rng.uniform(0, 2 * math.pi))
    return out / sum(1.0 / k for k in range(1, terms + 1))


def _ellipse(
    v: np.ndarray, u: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0
) -> np.ndarray:
    """``((x'/rx)^2 + (y'/ry)^2)`` in a frame rotated by ``angle``: < 1 inside the ellipse."""
    dy, dx = v - cy, u - cx
    c, s = math.cos(angle), math.sin(angle)
    x_r, y_r = c * dx + s * dy, -s * dx + c * dy
    return (x_r / rx) ** 2 + (y_r / ry) ** 2


def _radial_shape(
    v: np.ndarray,
    u: np.ndarray,
    cy: float,
    cx: float,
    ry: float,
    rx: float,
    angle: float,
    radius: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """Signed, roughly normalised distance ``rho / r(theta) - 1`` of an ellipse whose radius is modulated by
    ``radius(theta)``: negative inside."""
    dy, dx = v - cy, u - cx
    c, s = math.cos(angle), math.sin(angle)
    x_r, y_r = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
    return np.hypot(x_r, y_r) / radius(np.arctan2(y_r, x_r)) - 1.0


def _harmonics(
    rng: np.random.Generator, orders: range, amplitude: float
) -> Callable[[np.ndarray], np.ndarray]:
    coefficients = [(k, rng.uniform(0.3, 1.0) * amplitude, rng.uniform(0, 2 * math.pi)) for k in orders]

    def radius(theta: np.ndarray) -> np.ndarray:
        out = np.ones_like(theta)
        for k, a, phase in coefficients:
            out += a * np.cos(k * theta + phase)
        return out

    return radius


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape == (size, size):
        return image
    resized = Image.fromarray(image.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, np.float64)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
    return labels == (1 + int(np.argmax(sizes)))


def _branches(
    rng: np.random.Generator,
    size: int,
    roots: list[tuple[float, float, float, float]],
    *,
    length: float,
    width: float,
    depth: int,
    curl: float = 0.15,
    spread: tuple[float, float] = (0.35, 0.8),
) -> np.ndarray:
    """Draw branching random-walk vessels with PIL; ``roots`` are ``(x, y, angle, bend)`` in [0, 1] units and
    radians (``bend`` is added to the heading at each step and halves at each branching).
    Returns ``(size, size)`` float in [0, 1]."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    stack = [(x * size, y * size, a, bend, length * size, width, depth) for x, y, a, bend in roots]
    while stack:
        x, y, a, bend, seg_len, w, d = stack.pop()
        points = [(x, y)]
        steps = 8
        branch_at = int(rng.integers(3, steps))
        fork = None
        for i in range(steps):
            a += bend + rng.normal(0.0, curl)
            x += seg_len / steps * math.cos(a)
            y += seg_len / steps * math.sin(a)
            points.append((x, y))
            if i == branch_at:
                fork = (x, y, a)
        draw.line(points, fill=255, width=max(1, int(round(w))), joint="curve")
        if d > 0 and fork is not None:
            side = 1.0 if rng.random() < 0.5 else -1.0
            fx, fy, fa = fork
            stack.append(
                (fx, fy, fa + side * rng.uniform(*spread), bend * 0.5, seg_len * 0.75, w * 0.7, d - 1)
            )
            stack.append((x, y, a, bend * 0.5, seg_len * 0.8, w * 0.85, d - 1))
    return np.asarray(canvas, np.float64) / 255.0


# ----------------------------------------------------------------------------------------------------------
# Breast ultrasound
# ----------------------------------------------------------------------------------------------------------


def breast_ultrasound(
    seed: int, size: int = 256, shadow: bool | None = None, lesion: bool = True, margin: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A B-mode breast ultrasound phantom with one hypoechoic lesion (or none: BUSI's "normal" class).

    Args:
        seed: non-negative integer; the same seed and arguments give the same arrays.
        size: output side in pixels (square), >= 32.
        shadow: ``True`` forces posterior acoustic shadowing, ``False`` forbids it (posterior enhancement
            may still occur), ``None`` chooses shadowing, enhancement or neither at random.
        lesion: ``False`` leaves the tissue (lobules, ligaments, speckle) without a lesion; the mask is empty.
        margin: ``None`` draws the margin type at random; one of ``MARGINS`` forces it. ``"angular"`` (a polygon
            with 3-5 straight sides, never drawn at random) is a shape family the random draw lacks: an
            out-of-domain test of lesion shape. Forcing a margin leaves every other draw unchanged.

    Returns:
        ``(image (size, size) uint8, mask (size, size) uint8 in {0, 1})``; with ``lesion`` the mask is never
        empty, without it the mask is all zero.
    """
    size = _check_size(size)
    rng = _rng("ultrasound", seed)
    v, u = _coords(size)
    px = 1.0 / size  # one pixel in normalised units
    scale = size / 256.0

    # 1. Tissue layers: skin, subcutaneous fat, fibroglandular tissue, pectoral muscle.
    skin = rng.uniform(0.025, 0.045)
    fat_end = rng.uniform(0.16, 0.3) + 0.03 * _wave(rng, u[0])[None, :]
    gland_end = rng.uniform(0.74, 0.88) + 0.04 * _wave(rng, u[0])[None, :]
    gland_level, fat_level, muscle_level = (
        rng.uniform(0.55, 0.75),
        rng.uniform(0.25, 0.38),
        rng.uniform(0.4, 0.55),
    )
    echo = np.where(
        v < skin, 1.0, np.where(v < fat_end, fat_level, np.where(v < gland_end, gland_level, muscle_level))
    )
    echo = ndimage.gaussian_filter(echo, 1.5 * scale)
    striation_angle = rng.uniform(-0.15, 0.15)
    striations = 1.0 + 0.35 * np.sin(2 * math.pi * (v + striation_angle * u) * rng.uniform(18, 30))
    echo = np.where(v > gland_end, echo * striations, echo)
    texture = (
        1.0
        + 0.22 * _smooth_noise(rng, (size, size), 6 * scale)
        + 0.1 * _smooth_noise(rng, (size, size), 2 * scale)
    )
    echo *= np.clip(texture, 0.3, None)
    # Cooper's ligaments: thin bright curves through the fat.
    for _ in range(int(rng.integers(2, 5))):
        y0, amplitude, freq = rng.uniform(0.06, 0.3), rng.uniform(0.02, 0.06), rng.uniform(1.0, 3.0)
        curve = y0 + amplitude * np.sin(2 * math.pi * freq * u + rng.uniform(0, 6.3))
        echo += 0.35 * np.exp(-(((v - curve) / (1.5 * px * max(scale, 0.5))) ** 2)) * (v < fat_end)
    # Hypoechoic fat lobules: distractors that are not lesions.
    for _ in range(int(rng.integers(1, 4))):
        ly, lx = rng.uniform(0.1, 0.8), rng.uniform(0.1, 0.9)
        lobule = _ellipse(
            v, u, ly, lx, rng.uniform(0.02, 0.05), rng.uniform(0.04, 0.1), rng.uniform(-0.3, 0.3)
        )
        echo *= 1.0 - rng.uniform(0.3, 0.55) * _sigmoid((1.0 - lobule) * 6.0)

    if not lesion:  # a normal scan: the same tissue, attenuation and speckle, nothing to segment
        return _finish_ultrasound(rng, echo, v, size, scale), np.zeros((size, size), dtype=np.uint8)

    # 2. The lesion: an ellipse whose radius is modulated by its margin type.
    drawn = str(rng.choice(["circumscribed", "lobulated", "spiculated", "indistinct"], p=[0.3, 0.3, 0.2, 0.2]))
    if margin is not None and margin not in MARGINS:
        raise ValueError(f"margin = {margin!r}; expected one of {MARGINS}")
    margin = drawn if margin is None else margin
    r0 = rng.uniform(0.07, 0.19)
    aspect = rng.uniform(0.55, 1.25)  # height / width: < 1 "wider than tall", > 1 "taller than wide"
    rx, ry = r0 / math.sqrt(aspect), r0 * math.sqrt(aspect)
    cx = rng.uniform(0.25 + rx * 0.5, 0.75 - rx * 0.5)
    cy = float(np.clip(rng.uniform(0.32, 0.62), skin + ry + 0.08, 0.9 - ry))
    angle = rng.uniform(-0.35, 0.35)
    if margin == "circumscribed":
        radius = _harmonics(rng, range(2, 4), 0.04)
    elif margin == "lobulated":
        radius = _harmonics(rng, range(2, 6), 0.1)
    elif margin == "spiculated":
        base = _harmonics(rng, range(2, 5), 0.06)
        spikes = [
            (rng.uniform(-math.pi, math.pi), rng.uniform(0.12, 0.4), rng.uniform(0.05, 0.12))
            for _ in range(int(rng.integers(5, 11)))
        ]

        def radius(theta: np.ndarray, base=base, spikes=spikes) -> np.ndarray:
            out = base(theta)
            for centre, height, width in spikes:
                d = np.angle(np.exp(1j * (theta - centre)))  # wrapped angular distance
                out = out + height * np.exp(-((d / width) ** 2))
            return out
    elif margin == "angular":
        sides, phase = int(rng.integers(3, 6)), rng.uniform(0, 2 * math.pi)

        def radius(theta: np.ndarray, sides=sides, phase=phase) -> np.ndarray:
            sector = 2 * math.pi / sides  # polar equation of a regular polygon, circumradius 1.15
            return 1.15 * math.cos(sector / 2) / np.cos(np.mod(theta - phase, sector) - sector / 2)
    else:  # indistinct: irregular, high-frequency outline
        radius = _harmonics(rng, range(2, 12), 0.06)
    distance = _radial_shape(v, u, cy, cx, ry, rx, angle, radius)
    mask = ndimage.binary_fill_holes(_largest_component(distance < 0.0))  # one lesion, no holes
    if not mask.any():  # cannot happen for size >= 32; keeps the "never empty" promise unconditional
        mask[min(int(cy * size), size - 1), min(int(cx * size), size - 1)] = True
    edge = {"circumscribed": 0.04, "lobulated": 0.05, "spiculated": 0.06, "indistinct": 0.16, "angular": 0.04}[
        str(margin)]
    inside = _sigmoid(-distance / edge)
    contrast = rng.uniform(0.06, 0.35)
    lesion_texture = np.clip(1.0 + 0.35 * _smooth_noise(rng, (size, size), 3 * scale), 0.2, None)
    echo = echo * (1.0 - inside) + contrast * gland_level * lesion_texture * inside
    if margin == "spiculated" or rng.random() < 0.2:  # echogenic halo around the lesion
        echo += rng.uniform(0.1, 0.3) * np.exp(-(((distance - 0.12) / 0.08) ** 2)) * (distance > 0)

    # 3. Posterior acoustic features below the lesion.
    # The same draws are made whatever ``shadow`` is, so it changes nothing but the posterior region.
    pick, shadow_strength, enhancement_strength = rng.random(), rng.uniform(0.4, 0.7), rng.uniform(0.3, 0.7)
    if shadow is True:
        posterior = "shadow"
    elif shadow is False:
        posterior = "enhancement" if pick < 0.4 else "none"
    else:
        posterior = "shadow" if pick < 0.3 else "enhancement" if pick < 0.6 else "none"
    below = np.maximum.accumulate(mask, axis=0) & ~mask
    below_soft = ndimage.gaussian_filter(below.astype(np.float64), (2 * scale, 5 * scale))
    if posterior == "shadow":
        echo *= 1.0 - shadow_strength * below_soft
    elif posterior == "enhancement":
        echo *= 1.0 + enhancement_strength * below_soft

    return _finish_ultrasound(rng, echo, v, size, scale), mask.astype(np.uint8)


def _finish_ultrasound(
    rng: np.random.Generator, echo: np.ndarray, v: np.ndarray, size: int, scale: float
) -> np.ndarray:
    """Step 4 of ``breast_ultrasound``: depth attenuation with partial gain compensation, speckle, log
    compression; echo (size, size) float -> image (size, size) uint8."""
    attenuation = np.exp(-rng.uniform(0.6, 1.5) * v) * (1.0 + 0.2 * rng.uniform(0, 1) * v)
    sigma = (max(0.7, 1.1 * scale), max(1.0, 2.6 * scale))  # axial, lateral speckle size
    intensity = np.clip(echo, 0.0, None) * attenuation * _speckle(rng, (size, size), sigma)
    compressed = ndimage.gaussian_filter(np.log1p(8.0 * intensity), 0.6 * scale)
    image = compressed / (np.percentile(compressed, 99.5) + 1e-12)
    image = image ** rng.uniform(0.9, 1.2) * rng.uniform(0.85, 1.0)
    return _to_uint8(image)


# ----------------------------------------------------------------------------------------------------------
# Chest X-ray
# ----------------------------------------------------------------------------------------------------------


def chest_xray(seed: int, size: int = 256, nodule: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A PA chest radiograph phantom; the mask is both lung fields (two connected components).

    Args:
        seed: non-negative integer.
        size: output side in pixels (square), >= 32.
        nodule: add one solitary pulmonary nodule in a random lobe (inside the lung mask).

    Returns:
        ``(image (size, size) uint8, lungs (size, size) uint8 in {0, 1})``.
    """
    size = _check_size(size)
    rng = _rng("chest_xray", seed)
    lobe = str(rng.choice(LOBES))  # drawn either way: the nodule changes nothing else
    image, lungs = _chest_xray(rng, size, nodule_lobe=lobe if nodule else None)
    return _to_uint8(image), lungs.astype(np.uint8)


def _chest_xray(
    rng: np.random.Generator,
    size: int,
    *,
    nodule_lobe: str | None = None,
    heart_scale: float = 1.0,
    effusion_side: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    findings_rng = np.random.default_rng(rng.integers(0, 2**63))  # findings draw apart from the anatomy
    v_pix, u_pix = _coords(size)
    shift_v, shift_u = rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)  # patient position
    v, u = v_pix - shift_v, u_pix - shift_u
    du = u - 0.5
    scale = size / 256.0

    # 1. Torso: narrow neck, shoulders, trunk; arms at the upper corners.
    trunk = rng.uniform(0.4, 0.47)
    half_width = 0.13 + (trunk - 0.13) * _sigmoid((v - rng.uniform(0.08, 0.12)) / 0.025)
    body = _sigmoid((half_width - np.abs(du)) / 0.012)
    density = 0.05 + 0.5 * body
    for side in (-1.0, 1.0):
        arm = _ellipse(v, u, 0.2, 0.5 + side * (trunk + 0.02), 0.16, 0.05)
        density += 0.35 * _sigmoid((1.0 - arm) * 5.0) * (1.0 - body)

    # 2. Lungs: an ellipse per side, cut by the diaphragm dome, the mediastinum and the heart.
    lung_w = rng.uniform(0.15, 0.185)
    top = rng.uniform(0.1, 0.15)
    heart_cy, heart_cx = rng.uniform(0.64, 0.68), 0.5 + rng.uniform(0.04, 0.06) * heart_scale
    heart_ry, heart_rx = rng.uniform(0.11, 0.13) * heart_scale, rng.uniform(0.15, 0.17) * heart_scale
    heart = _ellipse(v, u, heart_cy, heart_cx, heart_ry, heart_rx, rng.uniform(-0.45, -0.25)) < 1.0
    mediastinum = 0.035 + 0.02 * _sigmoid((v - 0.4) / 0.05)
    lungs = np.zeros((size, size), bool)
    halves = {}
    for side, name in ((-1.0, "right"), (1.0, "left")):  # image left is the patient's right
        cx = 0.5 + side * (0.045 + lung_w)
        bottom = 0.95
        cy, ry = (top + bottom) / 2, (bottom - top) / 2
        outline = _radial_shape(v, u, cy, cx, ry, lung_w, 0.0, _harmonics(rng, range(2, 5), 0.025))
        dome_top = rng.uniform(0.66, 0.7) + (0.025 if name == "left" else 0.0)
        dome = dome_top + rng.uniform(0.08, 0.12) * ((u - cx + side * 0.03) / lung_w) ** 2
        half = (outline < 0) & (v < dome) & (side * du > mediastinum) & ~heart
        halves[name] = _largest_component(half)
        lungs |= halves[name]
    lung_soft = ndimage.gaussian_filter(lungs.astype(np.float64), 1.2 * scale)
    # Lungs are lucent; the bases and apices overlap more soft tissue.
    overlap = 0.12 * np.clip((v - 0.45) / 0.3, 0, 1) + 0.08 * np.clip((0.22 - v) / 0.1, 0, 1)
    density -= (0.34 - overlap) * lung_soft
    heart_soft = ndimage.gaussian_filter(heart.astype(np.float64), 2.0 * scale)
    density += 0.05 * heart_soft * body

    # 3. Bones: spine with vertebrae, posterior and anterior ribs, clavicles.
    spine = _sigmoid((0.03 - np.abs(du)) / 0.006) * (v > 0.05)
    vertebrae = 0.75 + 0.25 * (np.sin(2 * math.pi * v / 0.055) > -0.6)
    density += 0.12 * spine * vertebrae * (1.0 - 0.5 * heart_soft)
    ribs = np.zeros((size, size))
    spacing, first = rng.uniform(0.058, 0.068), rng.uniform(0.12, 0.15)
    thickness = rng.uniform(0.018, 0.024)
    for side in (-1.0, 1.0):
        lateral = np.clip(side * du, 0.0, None)
        for k in range(9):
            v0 = first + k * spacing + rng.normal(0, 0.004)
            posterior = v0 - 0.12 * lateral + 0.85 * lateral**2
            ribs += _sigmoid((thickness / 2 - np.abs(v - posterior)) / 0.003) * (side * du > 0.03)
            anterior = v0 + 0.2 - 0.45 * lateral
            ribs += 0.35 * _sigmoid((thickness / 2 - np.abs(v - anterior)) / 0.004) * (side * du > 0.05)
        clavicle = 0.15 + 0.06 * (lateral - 0.05) - 0.25 * (lateral - 0.2) ** 2
        ribs += (
            1.2 * _sigmoid((0.014 - np.abs(v - clavicle)) / 0.003) * (side * du > 0.05) * (side * du < 0.38)
        )
    density += 0.1 * ribs * body

    # 4. Vascular markings fanning out from both hila.
    roots = []
    for side in (-1.0, 1.0):
        hx, hy = 0.5 + shift_u + side * 0.1, rng.uniform(0.42, 0.48) + shift_v
        base = 0.0 if side > 0 else math.pi
        for a in (-0.9, -0.3, 0.3, 0.9):
            roots.append((hx, hy, base + side * a + rng.normal(0, 0.1), 0.0))
    vessels = _branches(rng, size, roots, length=0.12, width=2.5 * scale, depth=3, curl=0.12)
    vessels = ndimage.gaussian_filter(vessels, 1.0 * scale)
    density += 0.045 * vessels * lung_soft

    # 5. Findings.
    if nodule_lobe is not None:
        side_name, level = nodule_lobe.split()[0], nodule_lobe.split()[1]
        half = halves[side_name]
        rows = np.nonzero(half.any(axis=1))[0]
        middle = (rows[0] + rows[-1]) / 2
        radius = findings_rng.uniform(0.015, 0.035)
        inner = ndimage.binary_erosion(half, iterations=max(1, int(radius * size) + 1))
        row = np.arange(size)[:, None]
        region = inner & ((row < middle) if level == "upper" else (row >= middle))
        candidates = np.argwhere(region if region.any() else half)
        ny, nx = candidates[int(findings_rng.integers(len(candidates)))]
        blob = np.hypot(v_pix - (ny + 0.5) / size, u_pix - (nx + 0.5) / size) / radius
        density += findings_rng.uniform(0.18, 0.28) * _sigmoid((1.0 - blob) * 6.0)
    if effusion_side is not None:
        half = halves[effusion_side]
        rows = np.nonzero(half.any(axis=1))[0]
        level = rows[-1] - findings_rng.uniform(0.2, 0.35) * (rows[-1] - rows[0])
        side = -1.0 if effusion_side == "right" else 1.0
        meniscus = level / size - 0.06 * np.clip(side * du - 0.1, 0, None) / 0.3  # rises laterally
        fluid = ndimage.gaussian_filter((half & (v_pix > meniscus)).astype(np.float64), 2.0 * scale)
        density += 0.3 * fluid

    # 6. Detector blur, quantum noise, display gamma.
    density = ndimage.gaussian_filter(density, 0.7 * scale)
    density += 0.012 * rng.standard_normal((size, size))
    image = np.clip(density, 0, 1) ** rng.uniform(0.85, 1.1) * rng.uniform(0.9, 1.05)
    return image, lungs


# ----------------------------------------------------------------------------------------------------------
# Five captioned modalities
# ----------------------------------------------------------------------------------------------------------


def modality_image(
    modality: str, seed: int, size: int = 64, finding: str | None = None
) -> tuple[np.ndarray, str]:
    """One image of a modality with a finding, and its caption ``"<modality label>, <finding>"``.

    Args:
        modality: one of :data:`MODALITIES`.
        seed: non-negative integer.
        size: output side in pixels (square), >= 32; rendered at >= 128 pixels and downsampled.
        finding: one of ``FINDINGS[modality]``; ``None`` picks one from the seed.

    Returns:
        ``(image (size, size) uint8, caption)``, e.g. ``"chest x-ray, left lower lobe nodule"``.
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    size = _check_size(size)
    rng = _rng(modality, seed)
    findings = FINDINGS[modality]
    if finding is None:
        finding = str(findings[int(rng.integers(len(findings)))])
    elif finding not in findings:
        raise ValueError(f"unknown finding {finding!r} for {modality}; expected one of {', '.join(findings)}")
    render = max(128, size)
    renderer = {
        "oct": _oct,
        "fundus": _fundus,
        "chest_xray": _cxr_finding,
        "chest_ct": _chest_ct,
        "brain_mri": _brain_mri,
    }[modality]
    image = _resize(renderer(rng, render, finding), size)
    return _to_uint8(image), f"{MODALITY_LABELS[modality]}, {finding}"


def _cxr_finding(rng: np.random.Generator, size: int, finding: str) -> np.ndarray:
    lobe = finding.removesuffix(" nodule") if finding.endswith("nodule") else None
    heart = rng.uniform(1.35, 1.5) if finding == "cardiomegaly" else 1.0
    effusion = finding.split()[0] if finding.endswith("pleural effusion") else None
    image, _ = _chest_xray(rng, size, nodule_lobe=lobe, heart_scale=heart, effusion_side=effusion)
    return image


def _oct(rng: np.random.Generator, size: int, finding: str) -> np.ndarray:
    """Retinal OCT B-scan: layered retina with a foveal pit, bright RPE, choroid; dark vitreous above."""
    v, u = _coords(size)
    x = u[0]
    fovea = 0.5 + rng.uniform(-0.08, 0.08)
    pit = np.exp(-(((x - fovea) / rng.uniform(0.07, 0.1)) ** 2))
    tilt, bow = rng.uniform(-0.08, 0.08), rng.uniform(0.1, 0.35)
    rpe_line = rng.uniform(0.58, 0.66) + tilt * (x - 0.5) + bow * (x - 0.5) ** 2
    thickness = rng.uniform(0.2, 0.26) * (1.0 - 0.35 * pit)
    if finding == "macular edema":
        thickness = thickness * (1.0 + 0.55 * np.exp(-(((x - fovea) / 0.16) ** 2)))
    bump = np.zeros_like(x)
    if finding == "drusen":
        for _ in range(int(rng.integers(2, 5))):
            bump += rng.uniform(0.015, 0.035) * np.exp(
                -(((x - fovea - rng.uniform(-0.25, 0.25)) / rng.uniform(0.02, 0.04)) ** 2)
            )
    cnv = np.zeros_like(x)
    if finding == "choroidal neovascularization":
        cnv = rng.uniform(0.04, 0.07) * np.exp(
            -(((x - fovea - rng.uniform(-0.05, 0.05)) / rng.uniform(0.06, 0.09)) ** 2)
        )
    rpe_top = rpe_line - bump - cnv
    surface = rpe_top - thickness
    # Layers from the surface down to the RPE: (relative thickness, reflectivity, thins at the fovea).
    layers = [
        (0.1, 0.85, True),
        (0.13, 0.45, True),
        (0.1, 0.6, True),
        (0.12, 0.3, True),
        (0.08, 0.55, True),
        (0.27, 0.2, False),
        (0.03, 0.55, False),
        (0.06, 0.35, False),
        (0.05, 0.9, False),
        (0.06, 0.4, False),
    ]
    weights = np.stack(
        [np.full_like(x, t) * ((1.0 - 0.9 * pit) if thins else (1.0 + 0.6 * pit)) for t, _, thins in layers]
    )
    weights *= (
        1.0 + 0.9 * np.clip(x - fovea, 0, None)[None, :] * np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 0])[:, None]
    )
    bounds = (
        surface[None, :]
        + np.cumsum(weights / weights.sum(0, keepdims=True), axis=0) * (rpe_top - surface)[None, :]
    )
    reflect = np.full((size, size), 0.03)  # vitreous
    previous = surface
    for (_, level, _), bound in zip(layers, bounds, strict=True):
        reflect = np.where((v >= previous[None, :]) & (v < bound[None, :]), level, reflect)
        previous = bound
    rpe_thick = rng.uniform(0.018, 0.026)
    reflect = np.where((v >= rpe_top[None, :]) & (v < (rpe_top + rpe_thick)[None, :]), 1.0, reflect)
    bruch = rpe_line + rpe_thick
    under = (v >= (rpe_top + rpe_thick)[None, :]) & (v < bruch[None, :])
    reflect = np.where(under, 0.5 if finding == "drusen" else 0.8, reflect)
    choroid = v >= np.maximum(rpe_top + rpe_thick, bruch)[None, :]
    depth = v - bruch[None, :]
    lumen = _smooth_noise(rng, (size, size), (2.0 * size / 256, 5.0 * size / 256)) > 0.6
    reflect = np.where(choroid, (0.55 - 0.35 * lumen) * np.exp(-np.clip(depth, 0, None) / 0.12), reflect)
    if finding == "macular edema":
        for _ in range(int(rng.integers(3, 8))):
            cx = fovea + rng.uniform(-0.12, 0.12)
            col = int(np.clip(cx * size, 0, size - 1))
            cy = surface[col] + rng.uniform(0.45, 0.75) * (rpe_top[col] - surface[col])
            cyst = _ellipse(v, u, cy, cx, rng.uniform(0.015, 0.035), rng.uniform(0.015, 0.04))
            reflect = np.where(cyst < 1.0, 0.02, reflect)
    if finding == "choroidal neovascularization":
        fluid = (
            (v < (rpe_top - 0.005)[None, :])
            & (v > (rpe_top - 0.6 * cnv - 0.004)[None, :])
            & (cnv[None, :] > 0.01)
        )
        reflect = np.where(fluid, 0.04, reflect)
        lesion = (v >= rpe_top[None, :]) & (v < (rpe_top + cnv * 0.8)[None, :])
        reflect = np.where(lesion, 0.85, reflect)
    reflect = ndimage.gaussian_filter(reflect, 0.6 * size / 256 + 0.3)
    speckled = reflect * (0.45 + 0.55 * _speckle(rng, (size, size), (0.6 * size / 128, 1.2 * size / 128)))
    image = np.log1p(12.0 * speckled) / math.log1p(12.0 * 1.3)
    return np.clip(image * rng.uniform(0.85, 1.05), 0, 1)


def _fundus(rng: np.random.Generator, size: int, finding: str) -> np.ndarray:
    """Fundus photograph in luminance: circular field, bright optic disc and cup, vessel arcades, macula."""
    v, u = _coords(size)
    field_r = rng.uniform(0.44, 0.48)
    radial = np.hypot(v - 0.5, u - 0.5)
    inside = _sigmoid((field_r - radial) / 0.004)
    side = 1.0 if rng.random() < 0.5 else -1.0  # macula to the right (+1) or left of the disc
    disc_x, disc_y = 0.5 - side * rng.uniform(0.17, 0.22), 0.5 + rng.uniform(-0.04, 0.04)
    mac_x, mac_y = disc_x + side * rng.uniform(0.24, 0.28), disc_y + rng.uniform(0.0, 0.04)
    background = rng.uniform(0.42, 0.52) * (1.0 - 0.55 * (radial / field_r) ** 2)
    background *= 1.0 + 0.06 * _smooth_noise(rng, (size, size), 6 * size / 256)
    macula = np.exp(-((np.hypot(v - mac_y, u - mac_x) / 0.07) ** 2))
    image = background * (1.0 - 0.35 * macula)
    disc_r = rng.uniform(0.055, 0.07)
    disc_d = np.hypot(v - disc_y, (u - disc_x) * 1.1) / disc_r
    cup_ratio = (
        rng.uniform(0.7, 0.85) if finding == "glaucomatous optic disc cupping" else rng.uniform(0.25, 0.4)
    )
    image += 0.35 * _sigmoid((1.0 - disc_d) * 8.0)
    image += 0.25 * _sigmoid((cup_ratio - disc_d) / 0.05)
    roots = []
    for vertical in (-1.0, 1.0):  # superior and inferior temporal arcades, artery and vein each
        for offset in (-0.12, 0.12):
            angle = math.atan2(vertical * 0.9, side * 0.5) + offset
            roots.append((disc_x, disc_y, angle, -vertical * side * 0.06))  # curve around the macula
    for _ in range(2):  # nasal branches
        roots.append((disc_x, disc_y, math.atan2(rng.uniform(-1, 1), -side), 0.0))
    vessels = _branches(
        rng, size, roots, length=0.3, width=6.0 * size / 256, depth=2, curl=0.04, spread=(0.4, 0.8)
    )
    vessels = ndimage.gaussian_filter(vessels, 0.7 * size / 256 + 0.3)
    image *= 1.0 - 0.45 * vessels
    if finding == "diabetic retinopathy":
        for _ in range(int(rng.integers(8, 20))):
            r, a = rng.uniform(0.04, 0.2), rng.uniform(0, 2 * math.pi)
            spot = np.hypot(v - mac_y - r * math.sin(a), u - mac_x - r * math.cos(a)) / rng.uniform(
                0.006, 0.014
            )
            image *= 1.0 - 0.6 * _sigmoid((1.0 - spot) * 4.0)  # dot-blot haemorrhages
        for _ in range(int(rng.integers(6, 14))):
            r, a = rng.uniform(0.05, 0.16), rng.uniform(0, 2 * math.pi)
            spot = np.hypot(v - mac_y - r * math.sin(a), u - mac_x - r * math.cos(a)) / rng.uniform(
                0.006, 0.012
            )
            image += 0.35 * _sigmoid((1.0 - spot) * 4.0)  # hard exudates
    image = image * inside + 0.01 * rng.standard_normal((size, size)) * inside
    return np.clip(image, 0, 1)


def _chest_ct(rng: np.random.Generator, size: int, finding: str) -> np.ndarray:
    """Axial chest CT slice, lung window (L -600, W 1500): body, lungs, vessels, mediastinum, spine."""
    v, u = _coords(size)
    hu = np.full((size, size), -1000.0)
    body_rx, body_ry, body_cy = rng.uniform(0.41, 0.46), rng.uniform(0.28, 0.33), rng.uniform(0.46, 0.5)
    body = _ellipse(v, u, body_cy, 0.5, body_ry, body_rx)
    hu = np.where(body < 1.0, -100.0, hu)  # subcutaneous fat
    hu = np.where(body < 0.85, 40.0, hu)  # muscle and soft tissue
    lung_rx, lung_ry = rng.uniform(0.15, 0.18), body_ry * rng.uniform(0.7, 0.8)
    heart = _ellipse(v, u, body_cy - 0.06, 0.53, rng.uniform(0.09, 0.11), rng.uniform(0.11, 0.13)) < 1.0
    spine_cy = body_cy + body_ry * 0.72
    vertebra = np.hypot(v - spine_cy, u - 0.5)
    lungs = np.zeros((size, size), bool)
    halves = {}
    for side, name in ((-1.0, "right"), (1.0, "left")):
        cx = 0.5 + side * rng.uniform(0.18, 0.2)
        shape = _radial_shape(
            v, u, body_cy + 0.01, cx, lung_ry, lung_rx, 0.0, _harmonics(rng, range(2, 4), 0.04)
        )
        half = (shape < 0) & (side * (u - 0.5) > 0.06) & ~heart & (vertebra > 0.08)
        halves[name] = half
        lungs |= half
    parenchyma = -870.0 if finding != "emphysema" else -930.0
    hu = np.where(lungs, parenchyma + 20.0 * _smooth_noise(rng, (size, size), 3 * size / 256), hu)
    # Vessels: bright dots and short branches, denser near the hila.
    roots = [
        (0.5 + s * 0.1, body_cy - 0.02, (0.0 if s > 0 else math.pi) + a, 0.0)
        for s in (-1.0, 1.0)
        for a in (-1.2, -0.5, 0.2, 0.9, 1.6)
    ]
    vessels = _branches(rng, size, roots, length=0.06, width=1.5 * size / 256, depth=2, curl=0.35)
    hu = np.where(lungs, hu + 700.0 * ndimage.gaussian_filter(vessels, 0.8 * size / 256), hu)
    # Mediastinum: heart, aorta, vertebra with canal, ribs.
    hu = np.where(heart, 45.0, hu)
    hu = np.where(np.hypot(v - (body_cy - 0.02), u - 0.46) < 0.035, 50.0, hu)
    hu = np.where(vertebra < 0.06, 350.0, hu)
    hu = np.where((vertebra > 0.05) & (vertebra < 0.06), 900.0, hu)
    hu = np.where(np.hypot(v - (spine_cy + 0.075), u - 0.5) < 0.022, 20.0, hu)
    offset = rng.uniform(0, 0.3)
    for angle in np.linspace(0.0, 2 * math.pi, 14, endpoint=False) + offset:  # rib cross-sections
        rib_y, rib_x = body_cy + 0.8 * body_ry * math.sin(angle), 0.5 + 0.86 * body_rx * math.cos(angle)
        hu = np.where(_ellipse(v, u, rib_y, rib_x, 0.012, 0.02, angle + math.pi / 2) < 1.0, 700.0, hu)
    table = np.abs(v - (body_cy + body_ry + 0.06) - 0.1 * (u - 0.5) ** 2) < 0.008
    hu = np.where(table & (np.abs(u - 0.5) < 0.45), 200.0, hu)
    # Findings.
    if finding.endswith("nodule"):
        half = halves[finding.split()[0]]
        spots = np.argwhere(ndimage.binary_erosion(half, iterations=max(1, size // 32)))
        ny, nx = spots[int(rng.integers(len(spots)))] if len(spots) else np.argwhere(half)[0]
        radius = rng.uniform(0.018, 0.03)
        hu = np.where(np.hypot(v - (ny + 0.5) / size, u - (nx + 0.5) / size) < radius, 30.0, hu)
    elif finding == "ground-glass opacity":
        patch = _smooth_noise(rng, (size, size), 8 * size / 256) > 0.4
        hu = np.where(lungs & patch, -450.0 + 40.0 * rng.standard_normal((size, size)), hu)
    elif finding == "emphysema":
        holes = _smooth_noise(rng, (size, size), 2.5 * size / 256) > 1.2
        hu = np.where(lungs & holes, -990.0, hu)
    elif finding == "pleural effusion":
        name = "right" if rng.random() < 0.5 else "left"
        half = halves[name]
        rows = np.nonzero(half.any(axis=1))[0]
        level = (rows[-1] - rng.uniform(0.25, 0.4) * (rows[-1] - rows[0])) / size
        hu = np.where(half & (v > level), 15.0, hu)
    hu = ndimage.gaussian_filter(hu, 0.6 * size / 256 + 0.2) + 25.0 * rng.standard_normal((size, size))
    level, width = -600.0, 1500.0
    return np.clip((hu - (level - width / 2)) / width, 0, 1)


def _brain_mri(rng: np.random.Generator, size: int, finding: str) -> np.ndarray:
    """Axial T1-weighted brain MRI: scalp, skull, cortex with gyri, white matter, ventricles, falx."""
    v, u = _coords(size)
    rx, ry = rng.uniform(0.36, 0.4), rng.uniform(0.43, 0.47)
    head = _ellipse(v, u, 0.5, 0.5, ry, rx, rng.uniform(-0.06, 0.06))
    image = np.zeros((size, size))
    image = np.where(head < 1.0, 0.85, image)  # scalp fat
    image = np.where(head < 0.9, 0.08, image)  # cortical bone
    image = np.where((head < 0.86) & (head > 0.8), 0.45, image)  # diploe
    image = np.where(head < 0.78, 0.1, image)  # CSF
    gyri = _harmonics(rng, range(14, 26), 0.035)
    brain = _radial_shape(v, u, 0.5, 0.5, ry * 0.86, rx * 0.86, 0.0, gyri)
    image = np.where(brain < 0, 0.42, image)  # grey matter
    white = _radial_shape(v, u, 0.5, 0.5, ry * 0.7, rx * 0.68, 0.0, _harmonics(rng, range(6, 18), 0.045))
    image = np.where(white < 0, 0.66, image)  # white matter
    falx = (np.abs(u - 0.5) < 0.006) & (brain < 0) & (np.abs(v - 0.5) > 0.14)
    image = np.where(falx, 0.1, image)
    vent_scale = rng.uniform(1.9, 2.3) if finding == "hydrocephalus" else rng.uniform(0.9, 1.1)
    for side in (-1.0, 1.0):
        ventricle = _ellipse(
            v, u, 0.47, 0.5 + side * 0.05 * vent_scale, 0.13 * vent_scale**0.7, 0.03 * vent_scale, side * 0.3
        )
        image = np.where(ventricle < 1.0, 0.1, image)
    angle = rng.uniform(0, 2 * math.pi)
    if finding == "glioma":
        cy, cx = 0.5 + 0.2 * math.sin(angle), 0.5 + 0.17 * math.cos(angle)
        r = rng.uniform(0.06, 0.09)
        d = np.hypot(v - cy, u - cx) / r
        image = np.where(d < 1.8, image * 0.75, image)  # vasogenic oedema
        image = np.where(d < 1.0, 0.9, image)  # enhancing rim
        image = np.where(d < 0.7, 0.2, image)  # necrotic core
    elif finding == "meningioma":
        cy, cx = 0.5 + 0.74 * ry * math.sin(angle), 0.5 + 0.74 * rx * math.cos(angle)
        d = np.hypot(v - cy, u - cx) / rng.uniform(0.06, 0.09)
        image = np.where((d < 1.0) & (head < 0.8), 0.8, image)
    image = ndimage.gaussian_filter(image, 0.8 * size / 256 + 0.3)
    noise = 0.025
    return np.hypot(
        image + noise * rng.standard_normal((size, size)), noise * rng.standard_normal((size, size))
    )


# ----------------------------------------------------------------------------------------------------------
# Registry and writers
# ----------------------------------------------------------------------------------------------------------


class PhantomSample(NamedTuple):
    """A generated sample: ``image (H, W) uint8``, ``mask (H, W) uint8 {0, 1}`` or None, caption, modality."""

    image: np.ndarray
    mask: np.ndarray | None
    caption: str | None
    modal: str | None


@dataclass(frozen=True)
class PhantomKind:
    """A kind of phantom data set: ``sample(index, seed, size)`` makes sample ``index`` of a data set."""

    name: str
    description: str
    default_size: int
    has_masks: bool
    sample: Callable[[int, int, int], PhantomSample]


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` in a data set generated with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def _ultrasound_sample(index: int, seed: int, size: int) -> PhantomSample:
    image, mask = breast_ultrasound(sample_seed(seed, index), size)
    return PhantomSample(image, mask, None, None)


# BUSI holds 133 normal scans among 780 (17 %); "ultrasound_mixed" draws lesion-free cases at that rate.
NORMAL_FRACTION = 133 / 780


def is_normal_case(index: int, seed: int) -> bool:
    """Whether sample ``index`` of an ``"ultrasound_mixed"`` set made with ``seed`` is lesion-free."""
    return bool(_rng("pick", sample_seed(seed, index)).random() < NORMAL_FRACTION)


def _ultrasound_mixed_sample(index: int, seed: int, size: int) -> PhantomSample:
    # Lesion cases are byte-identical to the "ultrasound" kind's sample of the same index and seed.
    image, mask = breast_ultrasound(sample_seed(seed, index), size, lesion=not is_normal_case(index, seed))
    return PhantomSample(image, mask, None, None)


def _ultrasound_normal_sample(index: int, seed: int, size: int) -> PhantomSample:
    image, mask = breast_ultrasound(sample_seed(seed, index), size, lesion=False)
    return PhantomSample(image, mask, None, None)


def _chest_sample(index: int, seed: int, size: int) -> PhantomSample:
    own = sample_seed(seed, index)
    image, mask = chest_xray(own, size, nodule=bool(_rng("pick", own).random() < 0.3))
    return PhantomSample(image, mask, None, None)


def _modality_sample(index: int, seed: int, size: int) -> PhantomSample:
    modality = MODALITIES[index % len(MODALITIES)]  # balanced: cycle through the five
    image, caption = modality_image(modality, sample_seed(seed, index), size)
    return PhantomSample(image, None, caption, modality)


KINDS: dict[str, PhantomKind] = {
    "ultrasound": PhantomKind(
        "ultrasound",
        "breast ultrasound with a hypoechoic lesion (mask = lesion)",
        256,
        True,
        _ultrasound_sample,
    ),
    "ultrasound_mixed": PhantomKind(
        "ultrasound_mixed",
        "breast ultrasound, 17 in 100 without a lesion like BUSI's normal class (empty mask)",
        256,
        True,
        _ultrasound_mixed_sample,
    ),
    "ultrasound_normal": PhantomKind(
        "ultrasound_normal", "breast ultrasound without a lesion (empty mask)", 256, True, _ultrasound_normal_sample
    ),
    "chest_xray": PhantomKind(
        "chest_xray", "PA chest X-ray, 3 in 10 with a nodule (mask = both lungs)", 256, True, _chest_sample
    ),
    "modality": PhantomKind(
        "modality", "five captioned modalities in MINIM layout (no masks)", 64, False, _modality_sample
    ),
}


def write_dataset(
    kind: str, n: int, out_dir: str | os.PathLike[str], seed: int = 0, size: int | None = None
) -> Path:
    """Write ``n`` samples of ``kind`` to ``out_dir``; the same arguments give byte-identical files.

    Layout: ``out_dir/images/NNNN.png`` and, for kinds with masks, ``out_dir/masks/NNNN.png`` (0/255);
    for ``"modality"``, ``out_dir/captions.csv`` with the MINIM header ``path,text,modal`` and paths relative
    to the CSV (``images/NNNN.png``). Names are zero-padded to at least 4 digits.

    Raises:
        ValueError: unknown kind, ``n < 1``, bad seed or size.
        FileExistsError: ``out_dir/images`` (or ``masks``) already holds files — stale files would mix in.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}; expected one of {', '.join(KINDS)}")
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    spec = KINDS[kind]
    size = _check_size(spec.default_size if size is None else size)
    _rng("pick", seed)  # validates the seed
    out = Path(out_dir)
    folders = [out / "images"] + ([out / "masks"] if spec.has_masks else [])
    for folder in folders:
        if folder.is_dir() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} already contains files; write to an empty directory")
        folder.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(n - 1)))
    rows = []
    for index in range(n):
        sample = spec.sample(index, seed, size)
        name = f"{index:0{width}d}.png"
        (out / "images" / name).write_bytes(encode_png(sample.image))
        if sample.mask is not None:
            (out / "masks" / name).write_bytes(encode_mask_png(sample.mask))
        if sample.caption is not None:
            rows.append((f"images/{name}", sample.caption, sample.modal))
    if rows:
        with open(out / "captions.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["path", "text", "modal"])
            writer.writerows(rows)
    return out


# ----------------------------------------------------------------------------------------------------------
# Sample grid for the README
# ----------------------------------------------------------------------------------------------------------


def overlay(
    image: np.ndarray, mask: np.ndarray | None, color: tuple[int, int, int] = (255, 60, 60)
) -> np.ndarray:
    """RGB ``(H, W, 3) uint8`` of a gray ``image`` with the mask tinted (25 %) and its outline drawn."""
    rgb = np.repeat(image[..., None], 3, axis=-1).astype(np.float64)
    if mask is not None and mask.any():
        fill = mask.astype(bool)
        outline = fill & ~ndimage.binary_erosion(fill)
        tint = np.asarray(color, np.float64)
        rgb[fill] = 0.75 * rgb[fill] + 0.25 * tint
        rgb[outline] = tint
    return np.round(rgb).astype(np.uint8)


def sample_grid(path: str | os.PathLike[str], tile: int = 128, seed: int = 0) -> Path:
    """Write a PNG grid (PIL only): a row of ultrasound samples, a row of chest X-rays (masks outlined) and a
    row with the five modalities, each tile captioned. Returns the path."""
    font = ImageFont.load_default()
    label_h, label_w, gap = 28, 110, 6
    rows: list[tuple[str, list[tuple[np.ndarray, str]]]] = []
    us = []
    for i in range(5):
        image, mask = breast_ultrasound(sample_seed(seed, i), tile, shadow=True if i == 1 else None)
        us.append((overlay(image, mask), f"sample {i}"))
    rows.append(("ultrasound\n(lesion)", us))
    cxr = []
    for i in range(5):
        image, mask = chest_xray(sample_seed(seed, 10 + i), tile, nodule=i % 2 == 1)
        cxr.append((overlay(image, mask, (60, 200, 90)), "nodule" if i % 2 else "no nodule"))
    rows.append(("chest x-ray\n(lungs)", cxr))
    mods = []
    for i, modality in enumerate(MODALITIES):
        image, caption = modality_image(modality, sample_seed(seed, 20 + i), tile)
        mods.append((np.repeat(image[..., None], 3, axis=-1), caption))
    rows.append(("modality\n(captions)", mods))
    columns = max(len(r[1]) for r in rows)
    width = label_w + columns * (tile + gap)
    height = len(rows) * (tile + label_h + gap)
    canvas = Image.new("RGB", (width, height), (20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    for r, (row_label, tiles) in enumerate(rows):
        top = r * (tile + label_h + gap)
        draw.multiline_text((6, top + tile // 2 - 12), row_label, fill=(230, 230, 230), font=font)
        for c, (pixels, caption) in enumerate(tiles):
            left = label_w + c * (tile + gap)
            canvas.paste(Image.fromarray(pixels), (left, top))
            text = caption if len(caption) <= 30 else caption.replace(", ", ",\n", 1)
            draw.multiline_text((left + 2, top + tile + 2), text, fill=(200, 200, 200), font=font, spacing=1)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return out
