"""The fast SAM path (models.sam.fast) against the reference model: float32 within 1e-3, bfloat16 within stated
looser bounds with final-mask Dice >= 0.99; batch buckets; and loadtest.gpu_bench's refusal without CUDA.

On the CPU everything runs with compile=False (the same wrapper code); the CUDA tests compile (CUDA graphs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from core.metrics import dice_per_case
from core.phantoms import breast_ultrasound
from models.prompts import extract_prompts
from models.sam.fast import (
    FastSamOptions,
    batch_chunks,
    bucket_for,
    build_fast_sam,
    check_buckets,
    fast_sam_from,
    pad_batch,
)
from weights.sam_checkpoint import load_sam_checkpoint

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "sam" / "tiny_reference.safetensors"
FP32_ATOL = 1e-3
# bfloat16 (8-bit mantissa) through 4 encoder blocks: embeddings are O(1) after the neck's LayerNorm2d
BF16_EMB_ATOL = 0.1
BF16_LOGIT_ATOL = 0.25
BF16_IOU_ATOL = 0.05
MIN_DICE = 0.99
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(dice_per_case(a.reshape(1, -1), b.reshape(1, -1))[0])


@pytest.fixture(scope="module")
def ref():
    return load_sam_checkpoint(FIXTURE, "tiny", prefix="model.")


@pytest.fixture(scope="module")
def data():
    return load_file(str(FIXTURE))


@pytest.fixture(scope="module")
def batch(data):
    """3 preprocessed images (the fixture's and two flips) and the fixture's "all" prompts repeated."""
    x = data["out.preprocessed"]
    images = torch.cat([x, x.flip(-1), x.flip(-2)])
    prompts = {
        "point_coords": data["in.point_coords"].expand(3, -1, -1),
        "point_labels": data["in.point_labels"].expand(3, -1),
        "boxes": data["in.box_xyxy"].expand(3, -1),
        "mask_input": data["in.mask_input"].expand(3, -1, -1, -1),
    }
    return images, prompts


@pytest.fixture(scope="module")
def reference_out(ref, batch):
    images, prompts = batch
    with torch.no_grad():
        emb = ref.encode(images)
        low, iou = ref.decode(emb, **prompts)
    return emb, low, iou


# ---- buckets ----------------------------------------------------------------------------------------------
def test_bucket_for_and_chunks():
    buckets = (1, 8, 16, 32)
    assert [bucket_for(n, buckets) for n in (1, 2, 8, 9, 17, 32, 33)] == [1, 8, 8, 16, 32, 32, 32]
    assert batch_chunks(5, buckets) == [(0, 5, 8)]
    assert batch_chunks(70, buckets) == [(0, 32, 32), (32, 64, 32), (64, 70, 8)]
    assert batch_chunks(32, buckets) == [(0, 32, 32)]
    assert batch_chunks(3, (2,)) == [(0, 2, 2), (2, 3, 2)]
    with pytest.raises(ValueError, match=">= 1"):
        batch_chunks(0, buckets)
    for bad in ((), (8, 4), (0, 4), (1, 1), (2.0,)):
        with pytest.raises(ValueError, match="cuda_graph_buckets"):
            check_buckets(bad)


def test_pad_batch_repeats_the_first_row():
    x = torch.arange(6.0).view(3, 2)
    padded = pad_batch(x, 5)
    assert padded.shape == (5, 2)
    torch.testing.assert_close(padded[:3], x)
    torch.testing.assert_close(padded[3:], x[:1].expand(2, 2))
    assert pad_batch(x, 3) is x
    with pytest.raises(ValueError, match="cannot pad"):
        pad_batch(x, 2)


def test_options_validation():
    with pytest.raises(ValueError, match="dtype"):
        FastSamOptions(dtype=torch.int8)
    with pytest.raises(ValueError, match="attn_impl"):
        FastSamOptions(attn_impl="xformers")
    with pytest.raises(ValueError, match="compile_mode"):
        FastSamOptions(compile_mode="turbo")
    with pytest.raises(ValueError, match="cuda_graph_buckets"):
        FastSamOptions(decoder_buckets=(4, 2))
    d = FastSamOptions(device="cpu").to_dict()
    assert d["dtype"] == "bfloat16" and d["cuda_graph_buckets"] == [1, 8, 16, 32] and d["device"] == "cpu"


# ---- CPU, float32 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn_impl", ["flex", "sdpa"])
def test_fp32_fast_path_matches_reference(ref, data, batch, reference_out, attn_impl):
    images, prompts = batch
    emb_ref, low_ref, iou_ref = reference_out
    # encoder: 3 images padded to bucket 4; decoder: 3 prompt sets as chunks of 2 (the second padded)
    fast = fast_sam_from(ref, dtype=torch.float32, attn_impl=attn_impl, compile=False, device="cpu",
                         cuda_graph_buckets=(2, 4), decoder_buckets=(2,))
    emb = fast.encode(images)
    assert emb.shape == emb_ref.shape and emb.dtype == torch.float32
    torch.testing.assert_close(emb, emb_ref, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(emb[:1], data["out.image_embeddings"], atol=FP32_ATOL, rtol=0)
    low, iou = fast.decode(emb, **prompts)
    torch.testing.assert_close(low, low_ref, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(iou, iou_ref, atol=FP32_ATOL, rtol=0)
    # one embedding shared by three prompt sets, multimask
    low_m, iou_m = fast.decode(emb[:1], **{k: v[:1] for k, v in prompts.items()}, multimask_output=True)
    torch.testing.assert_close(low_m, data["out.all.multimask1.low_res_logits"], atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(iou_m, data["out.all.multimask1.iou"], atol=FP32_ATOL, rtol=0)
    # the reference model is untouched (fast_sam_from works on a copy)
    assert ref.image_encoder.attn_impl == "reference"
    assert all(p.dtype == torch.float32 for p in ref.parameters())


def test_build_fast_sam_loads_weights_and_embeds_raw_images(ref, data):
    state = {k.removeprefix("model."): v for k, v in data.items() if k.startswith("model.")}
    fast = build_fast_sam("tiny", torch.float32, "sdpa", False, (1,), state_dict=state, device="cpu")
    emb = fast.embed(data["in.image_raw"])  # (1, 3, 256, 256) in [0, 255]: reference preprocessing inside
    torch.testing.assert_close(emb, data["out.image_embeddings"], atol=FP32_ATOL, rtol=0)
    assert fast.describe()["options"]["attn_impl"] == "sdpa"
    with pytest.raises(RuntimeError):
        build_fast_sam("tiny", compile=False, state_dict={"nope": torch.zeros(1)}, device="cpu")


# ---- CPU, bfloat16 ----------------------------------------------------------------------------------------
def test_bf16_flex_path_close_to_reference_on_phantom(ref):
    image, mask = breast_ultrasound(5, 256)
    images = torch.from_numpy(image.astype(np.float32))[None, None].repeat(1, 3, 1, 1)
    p = extract_prompts(torch.from_numpy(mask.astype(np.float32))[None, None])
    prompts = {"point_coords": p.points, "point_labels": p.point_labels, "boxes": p.box,
               "mask_input": F.interpolate(p.mask_logits, size=(64, 64), mode="bilinear", align_corners=False)}
    with torch.no_grad():
        emb_ref = ref.encode(ref.preprocess(images))
        low_ref, iou_ref = ref.decode(emb_ref, **prompts)
        masks_ref = ref.postprocess_masks(low_ref, (256, 256), (256, 256)) > 0
    fast = fast_sam_from(ref, dtype=torch.bfloat16, attn_impl="flex", compile=False, device="cpu",
                         cuda_graph_buckets=(1,))
    emb = fast.encode(fast.preprocess(images))
    low, iou = fast.decode(emb, **prompts)
    masks = fast.postprocess_masks(low, (256, 256), (256, 256)) > 0
    assert 0.05 < masks_ref.float().mean() < 0.95  # a non-trivial mask, so the Dice below means something
    torch.testing.assert_close(emb, emb_ref, atol=BF16_EMB_ATOL, rtol=0)
    torch.testing.assert_close(low, low_ref, atol=BF16_LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(iou, iou_ref, atol=BF16_IOU_ATOL, rtol=0)
    assert dice(masks, masks_ref) >= MIN_DICE
    assert next(fast.sam.image_encoder.parameters()).dtype == torch.bfloat16
    assert next(fast.sam.prompt_encoder.parameters()).dtype == torch.float32


# ---- validation -------------------------------------------------------------------------------------------
def test_fast_sam_rejects_bad_inputs(ref, batch):
    images, prompts = batch
    fast = fast_sam_from(ref, dtype=torch.float32, attn_impl="sdpa", compile=False, device="cpu")
    with pytest.raises(ValueError, match=r"preprocessed \(B, 3, 256, 256\)"):
        fast.encode(images[:, :, :128])
    emb = torch.zeros(2, 64, 16, 16)
    with pytest.raises(ValueError, match="expected 1 or the number of prompt sets 3"):
        fast.decode(emb, **prompts)
    with pytest.raises(ValueError, match="together"):
        fast.decode(emb[:1], point_coords=prompts["point_coords"])
    with pytest.raises(ValueError, match="disagree"):
        fast.decode(emb[:1], boxes=prompts["boxes"], mask_input=prompts["mask_input"][:2])
    with pytest.raises(ValueError, match="mask_input"):
        fast.decode(emb[:1], mask_input=torch.zeros(1, 1, 32, 32))


# ---- CUDA (compiled, CUDA graphs) -------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("attn_impl", ["flex", "sdpa"])
def test_cuda_compiled_fp32_matches_reference(ref, batch, reference_out, attn_impl):
    images, prompts = batch
    emb_ref, low_ref, iou_ref = reference_out
    fast = fast_sam_from(ref, dtype=torch.float32, attn_impl=attn_impl, compile=True, device="cuda",
                         cuda_graph_buckets=(1, 4))
    emb = fast.encode(images)
    emb_again = fast.encode(images[:1])  # another bucket: the first result must not be overwritten
    torch.testing.assert_close(emb.cpu(), emb_ref, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(emb_again.cpu(), emb_ref[:1], atol=FP32_ATOL, rtol=0)
    low, iou = fast.decode(emb, **prompts)
    torch.testing.assert_close(low.cpu(), low_ref, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(iou.cpu(), iou_ref, atol=FP32_ATOL, rtol=0)


@needs_cuda
@pytest.mark.parametrize("attn_impl", ["flex", "sdpa"])
def test_cuda_compiled_bf16_close_to_reference(ref, batch, reference_out, attn_impl):
    images, prompts = batch
    emb_ref, low_ref, iou_ref = reference_out
    fast = fast_sam_from(ref, dtype=torch.bfloat16, attn_impl=attn_impl, compile=True, device="cuda",
                         cuda_graph_buckets=(1, 4))
    emb = fast.encode(images).cpu()
    low, iou = (t.cpu() for t in fast.decode(emb, **prompts))
    torch.testing.assert_close(emb, emb_ref, atol=BF16_EMB_ATOL, rtol=0)
    torch.testing.assert_close(iou, iou_ref, atol=BF16_IOU_ATOL, rtol=0)
    for m, r in zip(low > 0, low_ref > 0, strict=True):
        assert dice(m, r) >= MIN_DICE


# ---- the GPU benchmark ------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the benchmark would really run")
def test_gpu_bench_refuses_without_cuda(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "loadtest.gpu_bench", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert "needs an NVIDIA GPU with CUDA" in proc.stderr and "torch.cuda.is_available() is False" in proc.stderr
    assert str(out) in proc.stderr
    assert not out.exists()
