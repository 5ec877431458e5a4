"""TransUNet forward on a seeded tiny config against a stored output slice (the diffusers pattern).

Regenerate after a deliberate change: ``.venv/bin/python -m tests.models.test_transunet_slices``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.transunet import TransUNetConfig, build_transunet
from tests.support.slices import assert_slice, print_slices, spread_weights_

pytestmark = pytest.mark.usefixtures("single_thread_torch")

REGENERATE = ".venv/bin/python -m tests.models.test_transunet_slices"
# spelled out rather than a preset: the stored numbers pin exactly this architecture
TINY = TransUNetConfig(img_size=32, resnet_width=8, gn_groups=4, hidden_size=16, num_layers=1, num_heads=2,
                       mlp_dim=32, head_channels=16, decoder_channels=(16, 8, 8, 4))

# logits of image 1: the top-left 3x3, the 3x3 at the centre, then the mean and std over the batch
LOGITS = np.array([
    0.3194333, -0.3609473, -0.2068591, 0.8571922, 1.2254161, 0.4681196, 0.6614099, 0.4450985,
    0.0934014, 0.1441518, -0.4487784, -0.2670281, 0.1227549, -0.1641190, -0.0078824, 0.6464699,
    0.6009821, 0.2613520, 0.7342064, 0.5675375,
])


def logits_slice() -> np.ndarray:
    torch.manual_seed(0)
    model = spread_weights_(build_transunet(TINY), seed=0).eval()
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(images)  # (2, 1, 32, 32)
    picked = [logits[1, 0, :3, :3].flatten(), logits[1, 0, 15:18, 15:18].flatten(),
              logits.mean()[None], logits.std()[None]]
    return torch.cat(picked).numpy()


def test_transunet_logits_match_the_stored_slice():
    assert_slice(logits_slice(), LOGITS, REGENERATE)


if __name__ == "__main__":
    print_slices({"LOGITS": logits_slice})
