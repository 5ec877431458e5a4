"""What GenSeg's generator draws: masks (elastic/geometric changes, the augmentor's shape errors) and a random
acquisition on each generated image. Masks ``(H, W)`` numpy in {0, 1}; images ``(B, 1, S, S) in [0, 1]``."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from training.augment import AugmentorConfig, MaskAugmentor

MASK_AUGS = ("none", "errors", "elastic", "elastic+errors", "affine")

# Shape-changing error types only: new plausible lesions, not failure modes such as empty or scattered masks.
PERTURBATION = AugmentorConfig(
    weights={"over_segmentation": 1.0, "under_segmentation": 1.0, "shift": 1.0, "missing_chunk": 0.5},
    over_scale=(1.2, 2.0), under_scale=(0.5, 0.9), shift_fraction=(0.1, 0.5), secondary_prob=0.3,
    soft_mask_prob=0.0,
)


def elastic_geometric(mask: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A new lesion outline from ``mask (H, W)`` in {0, 1}: rotation (+-30 deg x strength), anisotropic scale
    (0.7-1.4), translation (up to 15 % of the side), left-right flip and a smooth elastic displacement field
    (amplitude 6 % of the side x strength). Returns ``(H, W) uint8 in {0, 1}``; the input if the result would be
    empty or cover over half the image (so a lesion always stays a lesion).
    """
    gt = np.asarray(mask) > 0.5
    h, w = gt.shape
    angle = rng.uniform(-math.pi / 6, math.pi / 6) * strength
    sy, sx = np.exp(rng.uniform(math.log(0.7), math.log(1.4), size=2) * min(1.0, strength))
    ty, tx = rng.uniform(-0.15, 0.15, size=2) * np.array([h, w]) * min(1.0, strength)
    ys, xs = np.nonzero(gt) if gt.any() else (np.array([h / 2]), np.array([w / 2]))
    cy, cx = float(ys.mean()), float(xs.mean())
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    # Inverse map: output pixel -> source pixel (rotate/scale about the lesion centre, then translate).
    dy, dx = yy - cy - ty, xx - cx - tx
    cos, sin = math.cos(angle), math.sin(angle)
    src_y = cy + (cos * dy - sin * dx) / sy
    src_x = cx + (sin * dy + cos * dx) / sx
    sigma = max(2.0, h / 10)
    amp = 0.06 * h * strength
    for grid in (src_y, src_x):
        field = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma)
        grid += amp * field / (np.abs(field).max() + 1e-12)
    out = ndimage.map_coordinates(gt.astype(np.float32), [src_y, src_x], order=1, mode="constant") > 0.5
    if rng.random() < 0.5:
        out = out[:, ::-1]
    out = ndimage.binary_fill_holes(out)
    if not out.any() or out.mean() > 0.5:
        return gt.astype(np.uint8)
    return np.ascontiguousarray(out, dtype=np.uint8)


def affine_geometric(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A moved and reshaped copy of ``mask (H, W)`` in {0, 1} with the ranges of GenSeg's released training
    script: left-right flip (p 0.5), scale 0.8-1.2 per axis, translation up to 10 % per axis, rotation
    +-15 deg and shear +-8 deg about the image centre. Returns ``(H, W) uint8 in {0, 1}``; the input if the
    result would be empty or cover over half the image.
    """
    gt = np.asarray(mask) > 0.5
    h, w = gt.shape
    angle, shear = np.deg2rad(rng.uniform(-15, 15)), np.deg2rad(rng.uniform(-8, 8))
    sy, sx = rng.uniform(0.8, 1.2, size=2)
    ty, tx = rng.uniform(-0.1, 0.1, size=2) * np.array([h, w])
    rotate = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    forward = rotate @ np.array([[1.0, 0.0], [math.tan(shear), 1.0]]) @ np.diag([sy, sx])
    inverse = np.linalg.inv(forward)
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    # ndimage maps output coordinates o to input inverse @ o + offset; this keeps the centre + (ty, tx) fixed.
    offset = centre - inverse @ (centre + np.array([ty, tx]))
    out = ndimage.affine_transform(gt.astype(np.float32), inverse, offset=offset, order=1, mode="constant") > 0.5
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if not out.any() or out.mean() > 0.5:
        return gt.astype(np.uint8)
    return np.ascontiguousarray(out, dtype=np.uint8)


class MaskSampler:
    """Draws the masks GenSeg synthesises images from: labelled masks and augmented ones.

    Args:
        masks: ``(N, 1, S, S)`` float32 labelled masks in {0, 1}.
        mask_aug: one of :data:`MASK_AUGS` — how the augmented masks are made ("errors": the UltraRefiner
            augmentor's shape errors; "elastic": :func:`elastic_geometric`; "elastic+errors": both in turn).
        rng: numpy generator (choice of masks and all perturbations).
    """

    def __init__(self, masks: torch.Tensor, mask_aug: str, rng: np.random.Generator) -> None:
        if mask_aug not in MASK_AUGS:
            raise ValueError(f"mask_aug = {mask_aug!r}; expected one of {MASK_AUGS}")
        self.masks = masks
        self.mask_aug = mask_aug
        self.rng = rng
        self.augmentor = MaskAugmentor(PERTURBATION)

    def draw_indices(self, n: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
        pool = np.arange(len(self.masks))
        if exclude is not None and len(exclude) < len(pool):
            pool = np.setdiff1d(pool, exclude.numpy())
        return torch.from_numpy(self.rng.choice(pool, size=n, replace=len(pool) < n))

    def augment(self, mask: np.ndarray) -> np.ndarray:
        """One augmented ``(S, S)`` float32 mask in {0, 1} (a left-right flip half the time)."""
        out = np.asarray(mask) > 0.5
        if self.mask_aug == "affine":
            return affine_geometric(out, self.rng).astype(np.float32)
        if self.mask_aug in ("elastic", "elastic+errors"):
            out = elastic_geometric(out, self.rng) > 0
        if self.mask_aug in ("errors", "elastic+errors"):
            out = self.augmentor(out, self.rng, force_soft=False)[0] > 0.5
        if self.mask_aug != "elastic" and self.rng.random() < 0.5:  # elastic_geometric flips already
            out = out[:, ::-1]
        return np.ascontiguousarray(out, dtype=np.float32)

    def __call__(self, n_real: int, n_augmented: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """``(n_real + n_augmented, 1, S, S)`` float32 masks: labelled masks, then augmented ones (none when
        ``mask_aug == "none"``: those are labelled masks too). ``exclude``: indices not to draw from."""
        parts = [self.masks[self.draw_indices(n_real, exclude)]]
        if n_augmented:
            base = self.masks[self.draw_indices(n_augmented, exclude)]
            if self.mask_aug != "none":
                base = torch.from_numpy(np.stack([self.augment(m) for m in base.numpy()[:, 0]])[:, None].copy())
            parts.append(base)
        return torch.cat(parts)


def random_acquisition(images: torch.Tensor, generator: torch.Generator, strength: float) -> torch.Tensor:
    """Each image seen through a random scanner: gain curve ``x**gamma`` (log-gamma ~ N(0, 0.35 s)), contrast
    about the image mean x exp(U(-0.5 s, 0.5 s)), offset U(-0.08 s, 0.08 s), multiplicative speckle of amplitude
    U(0, 0.4 s) and grain 2, 4 or 8 px, and a lateral blur half the time, ``s = strength``. Every factor is
    centred on the identity (no direction of shift is preferred). Differentiable in ``images (B, 1, S, S) in
    [0, 1]`` (the hypergradient flows through it); ``strength == 0`` returns the input.
    """
    if strength <= 0:
        return images
    b, _, h, w = images.shape
    dev, dt = images.device, images.dtype

    def u(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=generator)).to(dev, dt)

    gamma = torch.exp(0.35 * strength * torch.randn(b, 1, 1, 1, generator=generator)).to(dev, dt)
    out = images.clamp(1e-4, 1.0) ** gamma
    mean = out.mean(dim=(2, 3), keepdim=True)
    contrast = torch.exp(u(-0.5 * strength, 0.5 * strength))
    out = mean + contrast * (out - mean) + u(-0.08 * strength, 0.08 * strength)
    grain = int(2 ** torch.randint(1, 4, (1,), generator=generator))
    noise = torch.randn(b, 1, max(2, h // grain), max(2, w // grain), generator=generator).to(dev, dt)
    noise = F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False)
    out = out * (1.0 + u(0.0, 0.4 * strength) * noise)
    blur = torch.tensor([0.25, 0.5, 0.25], dtype=dt, device=dev)
    blurred = F.conv2d(F.pad(out, (1, 1, 0, 0), mode="replicate"), blur.view(1, 1, 1, 3))
    out = torch.where(u(0, 1) < 0.5, blurred, out)
    return out.clamp(0.0, 1.0)


def photometric_jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The released GenSeg script's jitter of generated images: each image stretched to [0, 1], then histogram
    equalisation (p 0.5), posterisation to 4 bits, a softening blend with a 3x3 smoothing (sharpness factor 0.3,
    p 0.5) and an autocontrast stretch (p 0.5). ``images (B, 1, S, S) in [0, 1]`` -> the same shape in [0, 1].

    Equalisation and posterisation have no useful gradient, so the result is passed straight through: forward
    values are the jittered images, the gradient is the identity's (the hypergradient still reaches the
    generator).
    """
    x = images.detach()
    b = x.shape[0]

    def stretch(t: torch.Tensor) -> torch.Tensor:
        lo = t.amin(dim=(1, 2, 3), keepdim=True)
        hi = t.amax(dim=(1, 2, 3), keepdim=True)
        return (t - lo) / (hi - lo).clamp_min(1e-6)

    def pick(p: float) -> torch.Tensor:
        return (torch.rand(b, generator=generator) < p).view(b, 1, 1, 1).to(x.device)

    out = stretch(x)
    flat = out.flatten(1)
    # Equalisation: each pixel's value becomes its rank among the image's pixels, scaled to (0, 1].
    ranks = torch.argsort(torch.argsort(flat, dim=1), dim=1).float().add(1) / flat.shape[1]
    out = torch.where(pick(0.5), ranks.view_as(out), out)
    out = torch.floor(out.clamp(0, 1) * 255 / 16) * 16 / 255
    smooth = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=x.dtype, device=x.device) / 13
    softened = 0.3 * out + 0.7 * F.conv2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), smooth.view(1, 1, 3, 3))
    out = torch.where(pick(0.5), softened, out)
    out = torch.where(pick(0.5), stretch(out), out).clamp(0, 1)
    return images + (out - images).detach()


def surround_mean(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image, the mean of the tissue ring 3-6 px outside the lesion: ``images, masks (B, 1, S, S)`` ->
    ``(B, 1, 1, 1)`` (0 where the ring is empty)."""
    near = F.max_pool2d(masks, 5, stride=1, padding=2)
    ring = F.max_pool2d(masks, 13, stride=1, padding=6) - near
    return (images * ring).sum(dim=(2, 3), keepdim=True) / ring.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)


def lesion_fade(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator, strength: float) -> torch.Tensor:
    """Lower each lesion's conspicuity: pixels under a softened mask are pulled towards the mean of a ring
    around the lesion by a random fraction ``t ~ U(0, strength)`` per image (0: unchanged, 1: the lesion's mean
    level equals its surround's). Generated lesions are more uniform and more conspicuous than real ones (docs/
    genseg.md), so a segmenter trained on them learns to miss faint lesions; this draws harder ones.

    ``images, masks (B, 1, S, S)``, images in [0, 1], masks in {0, 1}; differentiable in ``images``;
    ``strength == 0`` returns the input.
    """
    if strength <= 0:
        return images
    b = images.shape[0]
    surround = surround_mean(images, masks)
    soft = F.avg_pool2d(F.pad(masks, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    t = (strength * torch.rand(b, 1, 1, 1, generator=generator)).to(images.device, images.dtype)
    return (images + t * soft * (surround - images)).clamp(0.0, 1.0)
