"""UltraRefiner (coarse -> prompts and ROI -> SAM refiner -> gate) on seeded tiny parts against stored slices.

Regenerate after a deliberate change: ``.venv/bin/python -m tests.models.test_ultrarefiner_slices``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.build import build_ultrarefiner
from models.transunet import TransUNetConfig
from models.ultrarefiner import UltraRefiner
from tests.support.slices import assert_slice, print_slices, spread_weights_

pytestmark = pytest.mark.usefixtures("single_thread_torch")

REGENERATE = ".venv/bin/python -m tests.models.test_ultrarefiner_slices"
H, W = 48, 64
# the reference-fixture SAM ("tiny"), the hybrid gate (uncertainty times a learned CNN: both branches run)
CONFIG = {
    "transunet": TransUNetConfig(img_size=32, resnet_width=8, gn_groups=4, hidden_size=16, num_layers=1,
                                 num_heads=2, mlp_dim=32, head_channels=16, decoder_channels=(16, 8, 8, 4)),
    "refiner": "tiny",
    "gate": "hybrid",
}

# forward(), image 1 at rows 20:23, cols 26:29: coarse_mask, refined_mask; then refined_mask's mean and std
FORWARD = np.array([
    0.4264771, 0.4864652, 0.5592875, 0.4755514, 0.5323064, 0.5664091, 0.4529642, 0.4968110,
    0.5402446, 0.4278264, 0.4823025, 0.4558908, 0.4304768, 0.5325966, 0.5634986, 0.4522215,
    0.4575373, 0.4988292, 0.4279911, 0.0865193,
])
# from the disk's coarse probability, image 1: box xyxy, points [positive xy, negative xy], square ROI xyxy,
# predicted IoU
PROMPTS = np.array([
    11.9674330, 8.8932514, 36.3313866, 31.2462025, 24.1494102, 20.0697269, 11.9674330, 8.8932514,
    6.8946438, 2.8149605, 42.4041748, 38.3244934, -1.6002293,
])
# from the disk's coarse probability, image 1 at rows 20:23, cols 31:34 (across the disk's edge): sam_mask,
# gate, refined_mask
GATED = np.array([
    0.3319983, 0.3305795, 0.3307652, 0.0969214, 0.3280205, 0.2214294, 0.2097073, 0.2783094,
    0.2669259, 0.0248224, 0.0301277, 0.0100075, 0.1604531, 0.0285900, 0.0342527, 0.0550291,
    0.0700202, 0.0170032, 0.4724255, 0.2587264, 0.1164096, 0.4010112, 0.2474069, 0.1126906,
    0.3988888, 0.2177486, 0.0970471,
])


def _model() -> UltraRefiner:
    torch.manual_seed(0)
    return spread_weights_(build_ultrarefiner(CONFIG), seed=0).eval()


def _disk(r: float) -> torch.Tensor:
    """(1, 1, H, W) soft disk of radius ``r`` centred at (x 24, y 20), in [0, 1]."""
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    return torch.sigmoid(r - torch.sqrt((xs - 24.0) ** 2 + (ys - 20.0) ** 2))[None, None]


def _images() -> torch.Tensor:
    """(2, 1, H, W) a bright disk on a noisy background, in [0, 1]."""
    noise = torch.randn(2, 1, H, W, generator=torch.Generator().manual_seed(1))
    return (0.2 + 0.6 * _disk(8.0) + 0.05 * noise).clamp(0.0, 1.0)


def forward_slice() -> np.ndarray:
    with torch.no_grad():
        out = _model()(_images())
    refined = out["refined_mask"]
    picked = [out[k][1, 0, 20:23, 26:29].flatten() for k in ("coarse_mask", "refined_mask")]
    return torch.cat([*picked, refined.mean()[None], refined.std()[None]]).numpy()


def _staged() -> dict[str, torch.Tensor]:
    """Stages 2-4 of ``forward`` from a coarse probability of ~0.001 outside the disk and ~0.95 inside.

    A random-init TransUNet says ~0.5 everywhere, which leaves the prompts at their whole-image fallback; a
    given coarse disk puts the box, points and ROI where they depend on every prompt setting.
    """
    model, images = _model(), _images()
    coarse = 0.001 + 0.95 * _disk(7.0).expand_as(images)
    with torch.no_grad():
        inputs = model.prepare_refiner_inputs(images, coarse)
        low, iou = model.decode(model.refiner.encode(inputs.refiner_image), inputs.prompts)
        out = model.finish(coarse, low, inputs.roi, images)
    return {**out, "box": inputs.image_box, "points": inputs.image_points, "roi": inputs.roi, "iou": iou}


def prompts_slice() -> np.ndarray:
    out = _staged()
    return torch.cat([out["box"][1], out["points"][1].flatten(), out["roi"][1], out["iou"][1]]).numpy()


def gated_slice() -> np.ndarray:
    out = _staged()
    return torch.cat([out[k][1, 0, 20:23, 31:34].flatten() for k in ("sam_mask", "gate", "refined_mask")]).numpy()


def test_forward_masks_match_the_stored_slice():
    assert_slice(forward_slice(), FORWARD, REGENERATE)


def test_prompts_and_roi_match_the_stored_slice():
    assert_slice(prompts_slice(), PROMPTS, REGENERATE)


def test_gated_masks_match_the_stored_slice():
    assert_slice(gated_slice(), GATED, REGENERATE)


if __name__ == "__main__":
    print_slices({"FORWARD": forward_slice, "PROMPTS": prompts_slice, "GATED": gated_slice})
