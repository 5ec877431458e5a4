import pytest
import torch

from models.prompts import (
    extract_prompts,
    gaussian_blur,
    mask_prompt,
    negative_point,
    point_and_box,
    positive_point,
    soft_box,
)

H, W = 64, 80


def _grid():
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    return xs, ys


def _disk(cx: float, cy: float, r: float) -> torch.Tensor:
    xs, ys = _grid()
    return (((xs - cx) ** 2 + (ys - cy) ** 2) <= r * r).float()[None, None]


def _gaussian(cx: float, cy: float, sx: float, sy: float) -> torch.Tensor:
    xs, ys = _grid()
    return torch.exp(-((xs - cx) ** 2) / (2 * sx**2) - ((ys - cy) ** 2) / (2 * sy**2))[None, None]


def test_positive_point_is_weighted_centroid():
    prob = torch.cat([_disk(40, 25, 10), _gaussian(20.25, 30.5, 4, 6)])
    pos = positive_point(prob)
    torch.testing.assert_close(pos, torch.tensor([[40.0, 25.0], [20.25, 30.5]]), atol=0.02, rtol=0)


def test_box_is_mean_plus_minus_2p5_std():
    prob = _gaussian(38, 30, 4, 6)
    box = soft_box(prob)
    torch.testing.assert_close(box, torch.tensor([[28.0, 15.0, 48.0, 45.0]]), atol=0.05, rtol=0)
    # a hard disk: std r/2 per axis, so the box is centre +- 1.25 r and covers the disk
    box = soft_box(_disk(40, 30, 8))[0]
    assert box[0] <= 40 - 8 and box[2] >= 40 + 8 and box[1] <= 30 - 8 and box[3] >= 30 + 8
    torch.testing.assert_close(box, torch.tensor([30.0, 20.0, 50.0, 40.0]), atol=0.3, rtol=0)


def test_box_is_clamped_into_image():
    box = soft_box(_gaussian(3, 60, 5, 5))[0]
    assert box[0] == 0 and box[3] == H - 1
    assert box[2] < W - 1 and box[1] > 0


def test_negative_points_land_in_background():
    disk = _disk(40, 30, 8)
    pos = positive_point(disk)
    box = soft_box(disk)
    neg = negative_point(disk, box, pos, style="corner")[0]
    assert disk[0, 0, int(round(neg[1].item())), int(round(neg[0].item()))] == 0
    corners = {(box[0, i].item(), box[0, j].item()) for i in (0, 2) for j in (1, 3)}
    # the farthest corner, pulled towards the top-left fallback by prior_mass / mass ~ 0.05 %
    assert min(abs(neg[0].item() - x) + abs(neg[1].item() - y) for x, y in corners) < 0.05

    # "centroid": the (1 - P)-weighted centroid inside the sigmoid-edged box, checked against a direct computation
    xs, ys = _grid()
    tri = ((xs >= 10) & (ys >= 10) & (xs + ys <= 60)).float()[None, None]
    pos = positive_point(tri)
    tbox = soft_box(tri)
    neg = negative_point(tri, tbox, pos, style="centroid", box_temperature=0.02)[0]
    x0, y0, x1, y1 = tbox[0].tolist()
    t = 0.02 * W
    edge = torch.sigmoid((xs - x0) / t) * torch.sigmoid((x1 - xs) / t) * torch.sigmoid((ys - y0) / t)
    weight = (1 - tri[0, 0]) * edge * torch.sigmoid((y1 - ys) / t)
    expected = torch.stack([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()
    torch.testing.assert_close(neg, expected, atol=0.02, rtol=0)
    # documented weakness of "centroid": for a symmetric mask it coincides with the positive point
    sym = negative_point(disk, soft_box(disk), positive_point(disk), style="centroid")[0]
    torch.testing.assert_close(sym, positive_point(disk)[0], atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="negative point style"):
        negative_point(tri, soft_box(tri), pos, style="nearest")


@pytest.mark.parametrize("negative_style", ["corner", "centroid"])
def test_empty_mask_fallbacks_are_defined_and_finite(negative_style):
    prob = torch.zeros(2, 1, H, W, requires_grad=True)
    p = extract_prompts(prob, mask_size=(16, 20), negative_style=negative_style)
    torch.testing.assert_close(p.points[:, 0], torch.tensor([[(W - 1) / 2, (H - 1) / 2]] * 2))
    torch.testing.assert_close(p.box, torch.tensor([[0.0, 0.0, W - 1.0, H - 1.0]] * 2))
    torch.testing.assert_close(p.points[:, 1], torch.zeros(2, 2))
    assert torch.equal(p.point_labels, torch.tensor([[1.0, 0.0]] * 2))
    assert torch.equal(p.mask_logits, torch.full((2, 1, 16, 20), -10.0))
    (p.points.sum() + p.box.sum() + p.mask_logits.sum()).backward()
    assert torch.isfinite(prob.grad).all()
    assert prob.grad.abs().sum() > 0


@pytest.mark.parametrize("negative_style", ["corner", "centroid"])
def test_full_mask_is_finite(negative_style):
    prob = torch.ones(1, 1, H, W, requires_grad=True)
    p = extract_prompts(prob, negative_style=negative_style)
    torch.testing.assert_close(p.box, torch.tensor([[0.0, 0.0, W - 1.0, H - 1.0]]))
    (p.points.sum() + p.box.sum()).backward()
    assert torch.isfinite(prob.grad).all()


def test_prompt_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(1, 1, 7, 9, generator=g, dtype=torch.float64) * 0.8 + 0.1
    prob.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: positive_point(p), (prob,))
    # a box well inside the image so no clamp is active
    blob = (_gaussian(40, 30, 5, 4).double() * 0.9 + 0.01)[..., 20:40, 28:52].contiguous().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: soft_box(p, std_scale=1.0), (blob,))
    assert torch.autograd.gradcheck(
        lambda p: negative_point(p, soft_box(p, std_scale=1.0), positive_point(p), style="centroid"), (blob,)
    )


def test_mask_prompt_styles_and_resize():
    prob = torch.zeros(1, 1, 32, 32)
    prob[..., :, 16:] = 1.0
    direct = mask_prompt(prob, style="direct")
    assert set(direct.unique().tolist()) == {-10.0, 10.0}
    blurred = mask_prompt(prob, style="gaussian", gaussian_sigma=2.0)
    assert blurred.shape == (1, 1, 32, 32)
    assert -10 < blurred[0, 0, 5, 15] < 0 < blurred[0, 0, 5, 16] < 10  # the step is smoothed
    assert blurred[0, 0, 5, 0] == pytest.approx(-10.0) and blurred[0, 0, 5, 31] == pytest.approx(10.0)
    small = mask_prompt(prob, size=(8, 8), style="direct")
    assert small.shape == (1, 1, 8, 8)
    assert small[0, 0, 0, 0] == -10 and small[0, 0, 0, 7] == 10
    with pytest.raises(ValueError, match="mask prompt style"):
        mask_prompt(prob, style="distance")


def test_gaussian_blur_keeps_constants_and_mass():
    x = torch.full((1, 2, 20, 24), 0.3)
    torch.testing.assert_close(gaussian_blur(x, 1.5), x)
    spike = torch.zeros(1, 1, 21, 21)
    spike[..., 10, 10] = 1.0
    out = gaussian_blur(spike, 1.0)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert out[0, 0, 10, 10] == out.max()
    assert out[0, 0, 10, 11] == pytest.approx(out[0, 0, 11, 10].item())


def test_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        positive_point(torch.zeros(1, 2, 8, 8))


def test_point_and_box_are_the_separate_calls_bit_for_bit():
    gen = torch.Generator().manual_seed(4)
    probs = torch.cat([torch.rand(3, 1, H, W, generator=gen), _gaussian(30.0, 20.0, 6.0, 9.0), _disk(50.0, 40.0, 12.0),
                       torch.zeros(1, 1, H, W), torch.ones(1, 1, H, W)])
    point, box, mass = point_and_box(probs, 2.5, 0.1)
    assert torch.equal(point, positive_point(probs, 0.1))
    assert torch.equal(box, soft_box(probs, 2.5, 0.1))
    assert torch.equal(mass, probs.sum(dim=(1, 2, 3)))
    for style in ("corner", "centroid"):
        shared = negative_point(probs, box, point, style, fg_mass=mass)
        assert torch.equal(shared, negative_point(probs, box, point, style))
