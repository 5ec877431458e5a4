"""What GenSeg's generator draws: masks (elastic/geometric changes, the augmentor's shape errors) and a random
acquisition on each generated image. Masks ``(H, W)`` numpy in {0, 1}; images ``(B, 1, S, S) in [0, 1]``."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from training.augment import AugmentorConfig, MaskAugmentor

MASK_AUGS = ("none", "errors", "elastic", "elastic+errors")

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
