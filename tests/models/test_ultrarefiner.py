import json

import pytest
import torch
import torch.nn.functional as F

from models.build import build_ultrarefiner, config_to_dict, resolve_config
from models.sam import SAM_PRESETS
from models.ultrarefiner import OUTPUT_KEYS, UltraRefinerConfig, roi_prompts

H, W = 96, 112


def _model(refiner="tiny", **overrides):
    torch.manual_seed(0)
    config = {"refiner": refiner, "ultrarefiner": {**UltraRefinerConfig().to_dict(), **overrides}}
    return build_ultrarefiner(config)


def _first_conv_grad(model):
    return model.transunet.transformer.embeddings.hybrid_model.root.conv.weight.grad


def _blob(cx: float, cy: float, r: float, h: int = H, w: int = W) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.sigmoid(r - torch.sqrt((xs - cx) ** 2 + (ys - cy) ** 2))[None, None]


def test_forward_keys_shapes_and_ranges():
    model = _model()
    image = torch.rand(2, 1, H, W)
    out = model(image)
    assert set(out) == set(OUTPUT_KEYS)
    for key in ("coarse_logits", "coarse_mask", "sam_mask", "refined_mask", "gate", "residual"):
        assert out[key].shape == (2, 1, H, W), key
    assert out["box"].shape == (2, 4) and out["roi"].shape == (2, 4)
    assert out["points"].shape == (2, 2, 2)
    assert out["iou"].shape == (2, 1)
    assert out["low_res_logits"].shape == (2, 1, 64, 64)
    for key in ("coarse_mask", "sam_mask", "refined_mask"):
        assert out[key].min() >= 0 and out[key].max() <= 1, key
    assert out["gate"].min() >= 0 and out["gate"].max() <= 0.8
    assert out["residual"].abs().max() <= 1
    torch.testing.assert_close(out["residual"], out["sam_mask"] - out["coarse_mask"])
    for value in out.values():
        assert torch.isfinite(value).all()
    roi = out["roi"]
    torch.testing.assert_close(roi[:, 2] - roi[:, 0], roi[:, 3] - roi[:, 1])


def test_refined_loss_reaches_transunet():
    model = _model("default")
    image = torch.rand(1, 1, H, W)
    target = _blob(50, 40, 15).round()
    out = model(image)
    F.binary_cross_entropy(out["refined_mask"].clamp(1e-6, 1 - 1e-6), target).backward()
    grad = _first_conv_grad(model)
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_refiner_branch_gradient_goes_through_prompts_and_roi():
    # a loss on sam_mask reaches the TransUNet only through prompts and ROI; prompt_grad_scale = 0 blocks exactly that
    image = torch.rand(1, 1, H, W)
    target = _blob(50, 40, 15).round()
    grads = {}
    for scale in (1.0, 0.0):
        model = _model(prompt_grad_scale=scale)
        F.binary_cross_entropy(model(image)["sam_mask"].clamp(1e-6, 1 - 1e-6), target).backward()
        grads[scale] = _first_conv_grad(model)
    assert torch.isfinite(grads[1.0]).all() and grads[1.0].abs().sum() > 0
    assert grads[0.0] is None or grads[0.0].abs().sum() == 0


def test_roi_crop_and_prompts_depend_differentiably_on_coarse_mask():
    model = _model(use_mask_prompt=False)
    image = torch.rand(1, 1, H, W)
    coarse = _blob(50, 40, 12).requires_grad_(True)
    inputs = model.prepare_refiner_inputs(image, coarse)
    side = inputs.roi[0, 2] - inputs.roi[0, 0]
    assert 0.25 * W <= side < W  # a real ROI, not clamped to the image
    # the crop's content moves with the ROI, which moves with the coarse mask
    weights = torch.linspace(-1, 1, inputs.refiner_image.numel()).view_as(inputs.refiner_image)
    (inputs.refiner_image * weights).sum().backward(retain_graph=True)
    assert torch.isfinite(coarse.grad).all() and coarse.grad.abs().sum() > 0
    coarse.grad = None
    (inputs.prompts.points.sum() + inputs.prompts.box.sum()).backward()
    assert coarse.grad.abs().sum() > 0


def test_stages_compose_to_forward():
    model = _model().eval()
    image = torch.rand(2, 1, H, W)
    with torch.no_grad():
        full = model(image)
        coarse = torch.sigmoid(model.coarse(image))
        inputs = model.prepare_refiner_inputs(image, coarse)
        low, iou = model.decode(model.refiner.encode(inputs.refiner_image), inputs.prompts)
        staged = model.finish(coarse, low, inputs.roi, image)
    for key in ("sam_mask", "refined_mask", "gate"):
        torch.testing.assert_close(staged[key], full[key])
    torch.testing.assert_close(iou, full["iou"])
    # prompts in the ROI frame lie inside the S x S refiner frame; the ROI frame box is the image box mapped
    s = model.refiner_size
    assert inputs.prompts.box.min() >= -0.5 and inputs.prompts.box.max() <= s - 0.5
    assert inputs.prompts.mask_logits.shape == (2, 1, 64, 64)
    assert inputs.refiner_image.shape == (2, 3, s, s)


@pytest.mark.parametrize("preprocess", ["sam", "medsam"])
def test_all_zero_image_and_empty_mask_are_finite(preprocess):
    config = SAM_PRESETS["tiny"].replace(preprocess=preprocess)
    model = _model(config.to_dict())
    image = torch.zeros(1, 1, 64, 64, requires_grad=True)
    out = model(image)
    for key, value in out.items():
        assert torch.isfinite(value).all(), key
    out["refined_mask"].sum().backward()
    assert torch.isfinite(_first_conv_grad(model)).all()
    # an empty coarse mask: whole-image box and ROI
    empty = torch.zeros(1, 1, 64, 64, requires_grad=True)
    inputs = model.prepare_refiner_inputs(image.detach(), empty)
    torch.testing.assert_close(inputs.roi, torch.tensor([[0.0, 0.0, 64.0, 64.0]]))
    torch.testing.assert_close(inputs.image_box, torch.tensor([[0.0, 0.0, 63.0, 63.0]]))
    assert torch.isfinite(inputs.refiner_image).all()
    low, _ = model.decode(model.refiner.encode(inputs.refiner_image), inputs.prompts)
    res = model.finish(empty, low, inputs.roi, image.detach())
    res["refined_mask"].sum().backward()
    assert torch.isfinite(empty.grad).all()


def test_no_roi_multimask_and_three_channel_transunet():
    torch.manual_seed(0)
    model = build_ultrarefiner(
        {
            "transunet": {"img_size": 64, "in_channels": 3},
            "refiner": "tiny",
            "gate": "hybrid",
            "ultrarefiner": {"use_roi": False, "multimask_output": True, "mask_prompt_style": "gaussian"},
        }
    )
    image = torch.rand(1, 1, 48, 80)
    out = model(image)
    torch.testing.assert_close(out["roi"], torch.tensor([[0.0, 0.0, 80.0, 80.0]]))
    assert out["low_res_logits"].shape == (1, 1, 64, 64) and out["iou"].shape == (1, 1)
    assert out["refined_mask"].shape == (1, 1, 48, 80)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_config_round_trip_and_errors():
    model = _model()
    data = json.loads(json.dumps(model.config_dict()))
    assert data == config_to_dict({"refiner": "tiny"})
    assert resolve_config(data) == resolve_config({"refiner": "tiny"})
    rebuilt = build_ultrarefiner(data)
    assert rebuilt.config_dict() == data
    missing, unexpected = rebuilt.load_state_dict(model.state_dict())
    assert not missing and not unexpected
    assert {k.split(".")[0] for k in model.state_dict()} <= {"transunet", "refiner", "gate"}

    with pytest.raises(ValueError, match="unknown part"):
        resolve_config({"sam": "tiny"})
    with pytest.raises(ValueError, match=r"config\['gate'\].*gate_max"):
        resolve_config({"gate": {"gate_max": 3}})
    with pytest.raises(ValueError, match=r"config\['ultrarefiner'\].*mask_prompt_style"):
        resolve_config({"ultrarefiner": {"mask_prompt_style": "blurry"}})
    with pytest.raises(ValueError, match=r"config\['transunet'\].*unknown preset"):
        resolve_config({"transunet": "r18"})
    with pytest.raises(ValueError, match=r"config\['refiner'\]"):
        resolve_config({"refiner": {"img_size": 250}})
    with pytest.raises(ValueError, match="use_roi"):
        UltraRefinerConfig(use_roi=1)
    with pytest.raises(ValueError, match="at least one"):
        UltraRefinerConfig(use_points=False, use_box=False, use_mask_prompt=False)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.rand(1, 3, 32, 32))


@pytest.mark.parametrize("negative", ["corner", "centroid"])
def test_roi_prompts_without_autograd_equal_the_training_path(negative):
    # inference shares one weighted mean between the prompts; training computes them separately: same values
    gen = torch.Generator().manual_seed(8)
    image = torch.rand(3, 1, 48, 40, generator=gen)
    coarse = torch.sigmoid(4.0 * torch.randn(3, 1, 48, 40, generator=gen))
    cfg = UltraRefinerConfig(negative_point=negative)
    trained = roi_prompts(image, coarse.clone().requires_grad_(True), cfg, refiner_size=32, mask_prompt_size=8)
    with torch.inference_mode():
        served = roi_prompts(image, coarse, cfg, refiner_size=32, mask_prompt_size=8)
    pairs = [(served.roi, trained.roi), (served.crop, trained.crop), (served.image_points, trained.image_points),
             (served.image_box, trained.image_box), (served.prompts.points, trained.prompts.points),
             (served.prompts.box, trained.prompts.box), (served.prompts.mask_logits, trained.prompts.mask_logits)]
    assert trained.image_box.requires_grad
    for got, want in pairs:
        assert torch.equal(got, want.detach())
