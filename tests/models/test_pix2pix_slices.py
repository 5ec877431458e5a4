"""pix2pix generator forward on the seeded ``tiny`` preset against a stored output slice (the diffusers pattern).

Regenerate after a deliberate change (of the model or of the preset): ``.venv/bin/python -m
tests.models.test_pix2pix_slices``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.pix2pix import build_pix2pix
from tests.support.slices import assert_slice, print_slices, spread_weights_

pytestmark = pytest.mark.usefixtures("single_thread_torch")

REGENERATE = ".venv/bin/python -m tests.models.test_pix2pix_slices"

# image 1 (a disk mask): the top-left 3x3, the 3x3 across the disk's edge at rows 15:18, cols 20:23, then the
# mean and std over the batch
IMAGES = np.array([
    0.7557625, 0.3254974, 0.5096549, 0.5197439, 0.5757832, 0.4768424, 0.5314685, 0.2651287,
    0.7748996, 0.8307862, 0.8829058, 0.8585768, 0.5728545, 0.9562210, 0.8438744, 0.9146121,
    0.3607204, 0.8553165, 0.4151937, 0.3094289,
])


def images_slice() -> np.ndarray:
    torch.manual_seed(0)
    generator = spread_weights_(build_pix2pix("tiny"), seed=0).eval()  # 32 x 32, InstanceNorm, dropout off in eval
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disk = (((xs - 16.0) ** 2 + (ys - 16.0) ** 2) <= 36.0).float()[None, None]  # radius 6
    masks = torch.cat([(torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(1)) > 0.5).float(), disk])
    with torch.no_grad():
        images = generator(masks)  # (2, 1, 32, 32) in [0, 1]
    picked = [images[1, 0, :3, :3].flatten(), images[1, 0, 15:18, 20:23].flatten(), images.mean()[None],
              images.std()[None]]
    return torch.cat(picked).numpy()


def test_generator_images_match_the_stored_slice():
    assert_slice(images_slice(), IMAGES, REGENERATE)


if __name__ == "__main__":
    print_slices({"IMAGES": images_slice})
