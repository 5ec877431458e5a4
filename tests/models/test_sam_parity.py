"""models.sam against the official implementation's outputs (tests/fixtures/sam/tiny_reference.safetensors),
plus batching, frames, preprocessing styles and the training path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.sam import Sam, build_sam, get_preprocess_shape
from weights.sam_checkpoint import load_sam_checkpoint

FIXTURE = Path(__file__).parents[1] / "fixtures" / "sam" / "tiny_reference.safetensors"
ATOL = 1e-4


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE))


@pytest.fixture(scope="module")
def sam() -> Sam:
    return load_sam_checkpoint(FIXTURE, "tiny", prefix="model.")


@pytest.fixture(scope="module")
def embeddings(sam, ref) -> torch.Tensor:
    with torch.no_grad():
        return sam.encode(sam.preprocess(ref["in.image_raw"]))


def _prompts(ref: dict[str, torch.Tensor], case: str) -> dict[str, torch.Tensor]:
    points = {"point_coords": ref["in.point_coords"], "point_labels": ref["in.point_labels"]}
    if case == "box":
        return {"boxes": ref["in.box_xyxy"]}
    if case == "points":
        return points
    return {**points, "boxes": ref["in.box_xyxy"], "mask_input": ref["in.mask_input"]}


def test_preprocess_encoder_and_dense_pe(sam, ref, embeddings):
    with torch.no_grad():
        torch.testing.assert_close(sam.preprocess(ref["in.image_raw"]), ref["out.preprocessed"], atol=ATOL, rtol=0)
        torch.testing.assert_close(embeddings, ref["out.image_embeddings"], atol=ATOL, rtol=0)
        torch.testing.assert_close(sam.prompt_encoder.get_dense_pe(), ref["out.dense_pe"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["box", "points", "all"])
def test_prompt_embeddings(sam, ref, case):
    p = _prompts(ref, case)
    points = (p["point_coords"], p["point_labels"]) if "point_coords" in p else None
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points, p.get("boxes"), p.get("mask_input"))
    torch.testing.assert_close(sparse, ref[f"out.{case}.sparse"], atol=ATOL, rtol=0)
    torch.testing.assert_close(dense, ref[f"out.{case}.dense"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("multimask", [0, 1])
@pytest.mark.parametrize("case", ["box", "points", "all"])
def test_decode_matches_official(sam, ref, embeddings, case, multimask):
    with torch.no_grad():
        low, iou = sam.decode(embeddings, **_prompts(ref, case), multimask_output=bool(multimask))
    torch.testing.assert_close(low, ref[f"out.{case}.multimask{multimask}.low_res_logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(iou, ref[f"out.{case}.multimask{multimask}.iou"], atol=ATOL, rtol=0)


def test_postprocess_masks_matches_official(sam, ref):
    low = ref["out.all.multimask0.low_res_logits"]
    masks = sam.postprocess_masks(low, sam.input_size((256, 256)), (256, 256))
    torch.testing.assert_close(masks, ref["out.all.multimask0.masks_256"], atol=ATOL, rtol=0)


def test_batched_decode_is_one_prompt_set_per_image(sam, ref, embeddings):
    g = torch.Generator().manual_seed(1)
    emb = torch.cat([embeddings, embeddings + 0.1 * torch.randn(embeddings.shape, generator=g), embeddings.flip(-1)])
    coords = torch.rand(3, 2, 2, generator=g) * 256
    labels = torch.tensor([[1, 0], [1, 1], [0, 1]])
    boxes = torch.tensor([[40.0, 60.0, 190.0, 210.0], [0.0, 0.0, 100.0, 50.0], [30.0, 30.0, 250.0, 200.0]])
    masks = torch.randn(3, 1, 64, 64, generator=g)
    with torch.no_grad():
        low, iou = sam.decode(emb, coords, labels, boxes, masks, multimask_output=True)
        assert low.shape == (3, 3, 64, 64) and iou.shape == (3, 3)
        for i in range(3):
            li, ii = sam.decode(emb[i : i + 1], coords[i : i + 1], labels[i : i + 1], boxes[i : i + 1],
                                masks[i : i + 1], multimask_output=True)
            torch.testing.assert_close(low[i : i + 1], li, atol=1e-5, rtol=0)
            torch.testing.assert_close(iou[i : i + 1], ii, atol=1e-5, rtol=0)
        # one image, two prompt sets: broadcast like the official decoder
        low2, _ = sam.decode(embeddings, boxes=boxes[:2])
        assert low2.shape == (2, 1, 64, 64)
        torch.testing.assert_close(low2[:1], ref["out.box.multimask0.low_res_logits"], atol=ATOL, rtol=0)
        # no prompt at all still gives one mask per image
        low3, _ = sam.decode(emb)
        assert low3.shape == (3, 1, 64, 64)
    with pytest.raises(ValueError, match="batch"):
        sam.decode(emb[:2], boxes=boxes)
    with pytest.raises(ValueError, match="point_labels"):
        sam.decode(emb, point_coords=coords)


def test_forward_is_differentiable(sam, ref):
    sam.zero_grad()
    images = ref["in.image_raw"].clone()
    boxes = ref["in.box_xyxy"].clone().requires_grad_(True)
    mask = ref["in.mask_input"].clone().requires_grad_(True)
    low, iou = sam(images, boxes=boxes, mask_input=mask)
    with torch.no_grad():
        expected = sam.decode(sam.encode(sam.preprocess(images)), boxes=ref["in.box_xyxy"],
                              mask_input=ref["in.mask_input"])[0]
    torch.testing.assert_close(low, expected, atol=1e-5, rtol=0)
    (low.sigmoid().mean() + iou.sum()).backward()
    assert boxes.grad is not None and boxes.grad.abs().sum() > 0
    assert mask.grad is not None and mask.grad.abs().sum() > 0
    assert sam.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert sam.image_encoder.blocks[0].attn.rel_pos_h.grad.abs().sum() > 0
    sam.zero_grad()


def test_sam_style_frames_and_padding(sam):
    assert get_preprocess_shape(300, 400, 256) == (192, 256)
    assert sam.input_size((300, 400)) == (192, 256)
    coords = torch.tensor([[[400.0, 300.0], [100.0, 150.0]]])
    torch.testing.assert_close(sam.transform_coords(coords, (300, 400)),
                               torch.tensor([[[256.0, 192.0], [64.0, 96.0]]]))
    torch.testing.assert_close(sam.transform_boxes(torch.tensor([[0.0, 30.0, 200.0, 300.0]]), (300, 400)),
                               torch.tensor([[0.0, 19.2, 128.0, 192.0]]))
    images = torch.full((2, 3, 128, 64), 200.0)
    x = sam.preprocess(images)
    assert x.shape == (2, 3, 256, 256)
    valid = (200.0 - sam.pixel_mean) / sam.pixel_std
    torch.testing.assert_close(x[:, :, :256, :128], valid.expand(2, 3, 256, 128).contiguous())
    assert torch.count_nonzero(x[:, :, :, 128:]) == 0
    masks = sam.postprocess_masks(torch.randn(2, 3, 64, 64), sam.input_size((128, 64)), (128, 64))
    assert masks.shape == (2, 3, 128, 64)


def test_medsam_style_preprocess_and_frames():
    cfg = build_sam("tiny").config.replace(preprocess="medsam")
    model = build_sam(cfg)
    assert model.input_size((300, 400)) == (256, 256)
    torch.testing.assert_close(model.transform_coords(torch.tensor([[400.0, 150.0]]), (300, 400)),
                               torch.tensor([[256.0, 128.0]]))
    g = torch.Generator().manual_seed(2)
    images = torch.stack([torch.rand(3, 100, 80, generator=g) * 50 + 100, torch.rand(3, 100, 80, generator=g) * 255])
    x = model.preprocess(images)
    assert x.shape == (2, 3, 256, 256)
    flat = x.flatten(1)
    torch.testing.assert_close(flat.min(1).values, torch.zeros(2))
    torch.testing.assert_close(flat.max(1).values, torch.ones(2))
    # already S x S: no resize, only min-max
    square = torch.rand(1, 3, 256, 256, generator=g) * 255
    lo, hi = square.min(), square.max()
    torch.testing.assert_close(model.preprocess(square), (square - lo) / (hi - lo))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        model.preprocess(torch.rand(1, 1, 256, 256))
