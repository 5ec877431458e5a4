"""Request images for load tests: breast-ultrasound phantoms, each request's pixels distinct."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

__all__ = ["Workload"]


@dataclass
class Workload:
    """A pool of ``pool_size`` distinct ``(size, size)`` uint8 images and their PNG encodings.

    Request ``i`` uses pool entry ``i % pool_size``.

    Args:
        size: image side in pixels (>= 32).
        pool_size: distinct images (>= 1).
        bases: distinct phantoms the pool is stamped from.
        seed: phantom seed.
    """

    size: int = 256
    pool_size: int = 64
    bases: int = 8
    seed: int = 0
    _images: list[np.ndarray] = field(init=False, repr=False)
    _pngs: list[bytes] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.size < 32:
            raise ValueError(f"Workload.size: expected >= 32 pixels, got {self.size}")
        if self.pool_size < 1 or self.bases < 1:
            raise ValueError(f"Workload.pool_size and bases must be >= 1, got {self.pool_size}, {self.bases}")
        from core.phantoms import breast_ultrasound

        base = [breast_ultrasound(self.seed + k, size=self.size)[0].astype(np.uint8)
                for k in range(min(self.bases, self.pool_size))]
        self._images = []
        for index in range(self.pool_size):
            image = base[index % len(base)].copy()
            image.reshape(-1)[:8] = np.frombuffer(index.to_bytes(8, "little"), dtype=np.uint8)
            self._images.append(image)
        self._pngs = [_png(image) for image in self._images]

    def image(self, index: int) -> np.ndarray:
        """Request ``index``'s image: ``(size, size)`` uint8 (shared, do not modify)."""
        return self._images[index % self.pool_size]

    def float_image(self, index: int) -> np.ndarray:
        """Request ``index``'s image as ``(size, size)`` float32 in [0, 1] (what the server decodes)."""
        return self._images[index % self.pool_size].astype(np.float32) / 255.0

    def png(self, index: int) -> bytes:
        """Request ``index``'s image encoded as an 8-bit gray PNG."""
        return self._pngs[index % self.pool_size]


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
