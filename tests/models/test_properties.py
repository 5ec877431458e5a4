"""Property tests of the pure tensor functions the service runs on every request, on arbitrary masks.

``models.prompts.extract_prompts`` (prompts from any probability map, including empty, full, one-pixel
and speckled ones), ``models.roi`` (ROI choice, crop, paste, coordinate maps) and ``models.gate`` (every
gate type and range): outputs are finite, boxes and points lie inside the image, ROIs are squares of the
documented size, pasted maps stay in the input's value range, and gates stay within
[gate_min, gate_max]. Hypothesis runs derandomized, so CI sees the same examples every time.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from models.gate import Gate, GateConfig, apply_gate
from models.prompts import MASK_LOGIT_SCALE, extract_prompts
from models.roi import crop_roi, from_roi_frame, full_image_roi, paste_roi, roi_from_box, to_roi_frame

PROPERTY_SETTINGS = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow])
EPS = 1e-4


def _unit_floats() -> st.SearchStrategy[float]:
    return st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0, allow_nan=False, width=32))


@st.composite
def masks(draw, max_batch: int = 3, max_side: int = 24) -> torch.Tensor:
    """(B, 1, H, W) float32 in [0, 1]: arbitrary values, or a structured extreme (empty, full, one pixel,
    binary speckle, a constant)."""
    b = draw(st.integers(1, max_batch))
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    kind = draw(st.sampled_from(["arbitrary", "empty", "full", "pixel", "binary", "constant"]))
    if kind == "arbitrary":
        values = draw(arrays(np.float32, (b, 1, h, w), elements=_unit_floats()))
    elif kind == "binary":
        values = draw(arrays(np.bool_, (b, 1, h, w))).astype(np.float32)
    elif kind == "pixel":
        values = np.zeros((b, 1, h, w), np.float32)
        values[:, 0, draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = 1.0
    else:
        level = {"empty": 0.0, "full": 1.0}.get(kind) if kind != "constant" else draw(_unit_floats())
        values = np.full((b, 1, h, w), level, np.float32)
    return torch.from_numpy(np.ascontiguousarray(values))


def _inside(xy: torch.Tensor, h: int, w: int) -> bool:
    """Pixel-frame coordinates (..., 2) within [0, W-1] x [0, H-1] (up to float rounding)."""
    x, y = xy[..., 0], xy[..., 1]
    return bool(((x >= -EPS) & (x <= w - 1 + EPS) & (y >= -EPS) & (y <= h - 1 + EPS)).all())


# ----------------------------------------------------------------------------------------------------------
# models.prompts
# ----------------------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(prob=masks(), negative=st.sampled_from(["corner", "centroid"]), style=st.sampled_from(["direct", "gaussian"]),
       std_scale=st.floats(0.5, 4.0), prior_mass=st.floats(1e-3, 2.0))
def test_extract_prompts_finite_and_inside_the_image(prob, negative, style, std_scale, prior_mass):
    b, _, h, w = prob.shape
    prob = prob.clone().requires_grad_(True)
    prompts = extract_prompts(prob, mask_size=(8, 8), mask_style=style, negative_style=negative,
                              std_scale=std_scale, prior_mass=prior_mass)
    assert prompts.points.shape == (b, 2, 2) and prompts.box.shape == (b, 4)
    assert prompts.mask_logits.shape == (b, 1, 8, 8)
    for tensor in (prompts.points, prompts.box, prompts.mask_logits):
        assert torch.isfinite(tensor).all()
    assert torch.equal(prompts.point_labels, torch.tensor([[1.0, 0.0]] * b))
    box = prompts.box
    assert bool((box[:, 0] <= box[:, 2] + EPS).all() and (box[:, 1] <= box[:, 3] + EPS).all())
    assert _inside(box.view(b, 2, 2), h, w)
    assert _inside(prompts.points, h, w)
    assert float(prompts.mask_logits.detach().abs().max()) <= MASK_LOGIT_SCALE + EPS
    # Differentiable everywhere, also on empty and saturated masks: the gradient is finite.
    (prompts.points.sum() + prompts.box.sum() + prompts.mask_logits.mean()).backward()
    assert torch.isfinite(prob.grad).all()


def test_empty_mask_prompts_fall_back_to_the_documented_values():
    prompts = extract_prompts(torch.zeros(1, 1, 9, 13))
    assert prompts.box[0].tolist() == pytest.approx([0.0, 0.0, 12.0, 8.0], abs=1e-4)
    assert prompts.points[0, 0].tolist() == pytest.approx([6.0, 4.0], abs=1e-4)  # image centre
    assert prompts.points[0, 1].tolist() == pytest.approx([0.0, 0.0], abs=1e-4)  # the box's top-left corner


# ----------------------------------------------------------------------------------------------------------
# models.roi
# ----------------------------------------------------------------------------------------------------------


@st.composite
def boxes_in_images(draw):
    """((H, W), box (1, 4) xyxy pixel frame inside the image, x0 <= x1, y0 <= y1)."""
    h, w = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    xs = sorted(draw(st.floats(0.0, w - 1.0)) for _ in range(2))
    ys = sorted(draw(st.floats(0.0, h - 1.0)) for _ in range(2))
    return (h, w), torch.tensor([[xs[0], ys[0], xs[1], ys[1]]], dtype=torch.float32)


@PROPERTY_SETTINGS
@given(case=boxes_in_images(), expand=st.floats(0.0, 1.0), min_fraction=st.floats(0.05, 1.0))
def test_roi_from_box_is_a_square_of_bounded_side_inside_the_image(case, expand, min_fraction):
    (h, w), box = case
    roi = roi_from_box(box, (h, w), expand, min_fraction)
    assert torch.isfinite(roi).all()
    x0, y0, x1, y1 = roi[0].tolist()
    side, longest = x1 - x0, float(max(h, w))
    assert side == pytest.approx(y1 - y0, abs=1e-3)  # square
    assert min_fraction * longest - 1e-3 <= side <= longest + 1e-3
    for lo, hi, extent in ((x0, x1, w), (y0, y1, h)):
        if side <= extent + 1e-3:  # fits on this axis: inside the image
            assert lo >= -1e-3 and hi <= extent + 1e-3
        else:  # longer than this axis: centred on the image, zero padded
            assert (lo + hi) / 2 == pytest.approx(extent / 2, abs=1e-3)


@PROPERTY_SETTINGS
@given(image=masks(max_batch=2, max_side=32), size=st.integers(4, 24), data=st.data())
def test_crop_then_paste_stays_finite_in_range_and_zero_outside_the_roi(image, size, data):
    b, _, h, w = image.shape
    box = torch.tensor([[data.draw(st.floats(0.0, w - 1.0)), data.draw(st.floats(0.0, h - 1.0))] * 2] * b)
    box[:, 2:] += torch.tensor([data.draw(st.floats(0.0, 8.0)), data.draw(st.floats(0.0, 8.0))])
    box[:, 2] = box[:, 2].clamp(max=w - 1.0)
    box[:, 3] = box[:, 3].clamp(max=h - 1.0)
    roi = roi_from_box(box, (h, w), 0.2, 0.25)
    crop = crop_roi(image, roi, size)
    pasted = paste_roi(crop, roi, (h, w))
    assert crop.shape == (b, 1, size, size) and pasted.shape == image.shape
    assert torch.isfinite(crop).all() and torch.isfinite(pasted).all()
    # Bilinear resampling with zero padding: convex combinations of the pixels and 0.
    low, high = min(0.0, float(image.min())), max(0.0, float(image.max()))
    assert float(crop.min()) >= low - EPS and float(crop.max()) <= high + EPS
    assert float(pasted.min()) >= low - EPS and float(pasted.max()) <= high + EPS
    xs = torch.arange(w, dtype=torch.float32) + 0.5  # pixel centres, continuous frame
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    for i in range(b):
        x0, y0, x1, y1 = roi[i].tolist()
        # Bilinear sampling reads half a crop pixel past the ROI edge: that band, in image pixels,
        # is (x1 - x0) / (2 * size); beyond it (plus one image pixel) the paste must be exactly zero.
        mx = 1 + (x1 - x0) / (2 * size)
        my = 1 + (y1 - y0) / (2 * size)
        outside = ((xs < x0 - mx) | (xs > x1 + mx))[None, :] | ((ys < y0 - my) | (ys > y1 + my))[:, None]
        spill = pasted[i, 0][outside]
        assert spill.numel() == 0 or float(spill.abs().max()) == 0.0


@PROPERTY_SETTINGS
@given(image=masks(max_batch=1, max_side=32), size=st.integers(8, 32))
def test_full_image_roi_round_trip_keeps_a_constant_image(image, size):
    _, _, h, w = image.shape
    level = float(image.max())
    constant = torch.full((1, 1, h, w), level)
    roi = full_image_roi(1, (h, w))
    pasted = paste_roi(crop_roi(constant, roi, size), roi, (h, w))
    # Away from the borders the constant survives crop + paste. Within one crop pixel (L / S image pixels)
    # of an edge, bilinear sampling mixes in the zero padding: at the bottom/right of the image's, at the
    # top/left of the crop's when the crop is smaller than the image.
    margin = int(np.ceil(max(h, w) / size)) + 1
    interior = pasted[0, 0, margin: h - margin, margin: w - margin]
    assert torch.allclose(interior, torch.full_like(interior, level), atol=1e-5)


@PROPERTY_SETTINGS
@given(case=boxes_in_images(), size=st.integers(4, 64),
       points=arrays(np.float32, (1, 3, 2), elements=st.floats(-50, 120, width=32)))
def test_roi_frame_maps_are_inverse(case, size, points):
    (h, w), box = case
    roi = roi_from_box(box, (h, w))
    pts = torch.from_numpy(points)
    assert torch.allclose(from_roi_frame(to_roi_frame(pts, roi, size), roi, size), pts, atol=1e-3)
    mapped_box = to_roi_frame(box, roi, size)
    assert mapped_box.shape == (1, 4)
    assert torch.allclose(from_roi_frame(mapped_box, roi, size), box, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# models.gate
# ----------------------------------------------------------------------------------------------------------


@st.composite
def gate_configs(draw) -> GateConfig:
    low = draw(_unit_floats())
    high = draw(st.floats(low, 1.0))
    return GateConfig(type=draw(st.sampled_from(["none", "uncertainty", "learned", "hybrid"])),
                      gate_gamma=draw(st.floats(0.05, 8.0)), gate_min=low, gate_max=high,
                      hidden_channels=draw(st.integers(1, 4)), use_image=draw(st.booleans()))


@PROPERTY_SETTINGS
@given(config=gate_configs(), maps=masks(max_batch=2, max_side=16), seed=st.integers(0, 2**16))
def test_gate_is_finite_and_within_its_range(config, maps, seed):
    torch.manual_seed(seed)
    gate = Gate(config).eval()
    if hasattr(gate, "net"):  # the output layer starts at zero: randomise it so the gate varies
        torch.nn.init.normal_(gate.net[-1].weight, std=3.0)
        torch.nn.init.normal_(gate.net[-1].bias, std=3.0)
    coarse = maps
    sam = torch.rand(maps.shape, generator=torch.Generator().manual_seed(seed))
    image = torch.rand(maps.shape, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        values = gate(coarse, sam, image)
        refined = apply_gate(coarse, sam, values)
    assert values.shape == coarse.shape and torch.isfinite(values).all()
    if config.type == "none":
        assert torch.equal(values, torch.ones_like(values))
    else:
        assert float(values.min()) >= config.gate_min - 1e-6
        assert float(values.max()) <= config.gate_max + 1e-6
    assert torch.isfinite(refined).all()
    assert float(refined.min()) >= -1e-6 and float(refined.max()) <= 1.0 + 1e-6
