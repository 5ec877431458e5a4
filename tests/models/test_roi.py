import math

import pytest
import torch

from models.prompts import positive_point
from models.roi import crop_roi, from_roi_frame, full_image_roi, paste_roi, roi_from_box, to_roi_frame


def _smooth_image(h: int, w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    img = 0.5 + 0.25 * torch.sin(xs / 9.0) * torch.cos(ys / 7.0) + 0.002 * xs
    return img[None, None]


def test_roi_from_box_square_expanded_and_inside():
    box = torch.tensor([[30.0, 20.0, 49.0, 29.0], [0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 79.0, 63.0], [40, 30, 41, 31]])
    roi = roi_from_box(box, (64, 80), expand_ratio=0.2, min_fraction=0.25)
    side_x, side_y = roi[:, 2] - roi[:, 0], roi[:, 3] - roi[:, 1]
    torch.testing.assert_close(side_x, side_y)
    # centred box: longest side 20 px (inclusive extent) * 1.4, centred on (40, 25) in the continuous frame
    torch.testing.assert_close(roi[0], torch.tensor([26.0, 11.0, 54.0, 39.0]))
    # corner box: shifted inside the image, min size max(10 * 1.4, 0.25 * 80) = 20
    torch.testing.assert_close(roi[1], torch.tensor([0.0, 0.0, 20.0, 20.0]))
    # whole-image box: side capped at L = 80, fits x, centred (zero-padded) on the short y axis
    torch.testing.assert_close(roi[2], torch.tensor([0.0, -8.0, 80.0, 72.0]))
    # tiny box gets the minimum side
    assert side_x[3].item() == pytest.approx(20.0)


def test_full_image_roi():
    torch.testing.assert_close(full_image_roi(2, (48, 64)), torch.tensor([[0.0, 0.0, 64.0, 64.0]] * 2))


def test_whole_image_crop_and_paste_are_identity():
    img = torch.rand(2, 3, 32, 32)
    roi = full_image_roi(2, (32, 32))
    torch.testing.assert_close(crop_roi(img, roi, 32), img, atol=1e-6, rtol=0)
    torch.testing.assert_close(paste_roi(img, roi, (32, 32)), img, atol=1e-6, rtol=0)


def test_round_trip_inside_and_zero_outside():
    h, w = 64, 80
    img = _smooth_image(h, w).repeat(2, 1, 1, 1)
    roi = torch.tensor([[10.3, 12.7, 50.3, 52.7], [-6.0, 30.0, 34.0, 70.0]])
    back = paste_roi(crop_roi(img, roi, 96), roi, (h, w))
    cx = torch.arange(w, dtype=torch.float32) + 0.5
    cy = torch.arange(h, dtype=torch.float32) + 0.5
    for i in range(2):
        x0, y0, x1, y1 = roi[i].tolist()
        # pixels at least one pixel inside both the ROI and the image (the crop reads zeros outside the image)
        in_x = (cx > max(x0, 0) + 1) & (cx < min(x1, w) - 1)
        in_y = (cy > max(y0, 0) + 1) & (cy < min(y1, h) - 1)
        inside = in_y[:, None] & in_x[None, :]
        err = (back[i, 0] - img[i, 0]).abs()[inside]
        assert err.max() < 2e-3, err.max()
        out_x = (cx < x0 - 1) | (cx > x1 + 1)
        out_y = (cy < y0 - 1) | (cy > y1 + 1)
        outside = out_y[:, None] | out_x[None, :]
        assert outside.any()
        assert back[i, 0][outside].abs().max() == 0


def test_coordinate_maps_agree_with_crop():
    h = w = 64
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    bump = torch.exp(-((xs - 30.0) ** 2 + (ys - 20.0) ** 2) / (2 * 3.0**2))[None, None]
    roi = torch.tensor([[10.0, 5.0, 50.0, 45.0]])
    crop = crop_roi(bump, roi, 80)
    found = positive_point(crop, prior_mass=1e-6)
    mapped = to_roi_frame(torch.tensor([[[30.0, 20.0]]]), roi, 80)[:, 0]
    torch.testing.assert_close(mapped, torch.tensor([[40.5, 30.5]]))
    torch.testing.assert_close(found, mapped, atol=0.05, rtol=0)


def test_to_and_from_roi_frame_round_trip_boxes_and_points():
    roi = torch.tensor([[3.0, -2.0, 43.0, 38.0], [0.0, 0.0, 64.0, 64.0]])
    pts = torch.tensor([[[1.0, 2.0], [30.0, 7.5]], [[0.0, 0.0], [63.0, 63.0]]])
    box = torch.tensor([[5.0, 6.0, 20.0, 30.0], [0.0, 0.0, 63.0, 63.0]])
    for coords in (pts, box):
        out = to_roi_frame(coords, roi, 256)
        assert out.shape == coords.shape
        torch.testing.assert_close(from_roi_frame(out, roi, 256), coords)
    # pixel-centre convention: with a whole-image ROI of a 64 image at 256, index 0 maps to 1.5, index 63 to 253.5
    torch.testing.assert_close(to_roi_frame(box, roi, 256)[1], torch.tensor([1.5, 1.5, 253.5, 253.5]))
    with pytest.raises(ValueError, match=r"\(B, N, 2\)"):
        to_roi_frame(torch.zeros(2, 3), roi, 256)


def test_gradients_reach_the_roi():
    img = _smooth_image(48, 48)
    roi = torch.tensor([[8.3, 6.1, 40.3, 38.1]], requires_grad=True)
    weights = torch.linspace(0, 1, 24 * 24).view(1, 1, 24, 24)
    (crop_roi(img, roi, 24) * weights).sum().backward()
    assert torch.isfinite(roi.grad).all() and roi.grad.abs().min() > 0

    roi.grad = None
    mask = torch.rand(1, 1, 16, 16, requires_grad=True)
    pasted = paste_roi(mask, roi, (48, 48))
    (pasted * torch.linspace(0, 1, 48 * 48).view(1, 1, 48, 48)).sum().backward()
    assert torch.isfinite(roi.grad).all() and roi.grad.abs().sum() > 0
    assert mask.grad.abs().sum() > 0
    assert math.isfinite(pasted.sum().item())


def test_rejects_bad_roi_shape():
    with pytest.raises(ValueError, match="roi must be"):
        crop_roi(torch.zeros(2, 1, 8, 8), torch.zeros(1, 4), 8)
