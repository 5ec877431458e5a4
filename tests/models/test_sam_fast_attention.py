"""The "sdpa" image-encoder attention (fused kernel + materialised relative-position bias) against the
reference attention: same parameters, same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.sam import SamConfig, build_sam
from models.sam.image_encoder import ImageEncoderViT
from weights.sam_checkpoint import load_sam_checkpoint

FIXTURE = Path(__file__).parents[1] / "fixtures" / "sam" / "tiny_reference.safetensors"


@pytest.fixture(scope="module")
def models():
    ref = load_sam_checkpoint(FIXTURE, "tiny", prefix="model.")
    fast = load_sam_checkpoint(FIXTURE, "tiny", prefix="model.", attn_impl="sdpa")
    return ref, fast


def test_state_dict_identical_and_default_is_reference(models):
    ref, fast = models
    assert ref.image_encoder.attn_impl == "reference" and fast.image_encoder.attn_impl == "sdpa"
    assert build_sam("tiny").config.attn_impl == "reference"
    sd_ref, sd_fast = ref.state_dict(), fast.state_dict()
    assert list(sd_ref) == list(sd_fast)
    assert all(torch.equal(sd_ref[k], sd_fast[k]) for k in sd_ref)


def test_sdpa_matches_reference_on_fixture_weights(models):
    ref, fast = models
    data = load_file(str(FIXTURE))
    with torch.no_grad():
        emb_ref = ref.encode(data["out.preprocessed"])
        emb_fast = fast.encode(data["out.preprocessed"])
    torch.testing.assert_close(emb_fast, emb_ref, atol=1e-3, rtol=0)
    torch.testing.assert_close(emb_fast, data["out.image_embeddings"], atol=1e-3, rtol=0)


def test_sdpa_matches_reference_with_window_padding_and_gradients():
    # 5 x 5 token grid with window 3: windows are padded, global block uses the full grid
    torch.manual_seed(0)
    kwargs = dict(img_size=80, patch_size=16, embed_dim=32, depth=2, num_heads=2, out_chans=16, window_size=3,
                  global_attn_indexes=(1,), rel_pos_zero_init=False)
    ref = ImageEncoderViT(**kwargs)
    fast = ImageEncoderViT(**kwargs, attn_impl="sdpa")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 80, 80)
    out_ref, out_fast = ref(x), fast(x)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-4, rtol=0)
    out_ref.square().mean().backward()
    out_fast.square().mean().backward()
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_switching_implementation_and_validation(models):
    ref, _ = models
    enc = ref.image_encoder
    enc.set_attn_impl("sdpa")
    assert all(blk.attn.attn_impl == "sdpa" for blk in enc.blocks)
    enc.set_attn_impl("reference")
    with pytest.raises(ValueError, match="attn_impl"):
        enc.set_attn_impl("flash")
    with pytest.raises(ValueError, match="attn_impl"):
        SamConfig.from_dict({**ref.config.to_dict(), "attn_impl": "xformers"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-3), (torch.bfloat16, 1e-1)])
def test_sdpa_on_cuda_matches_reference(models, dtype, atol):
    ref, fast = (m.to("cuda") for m in models)
    try:
        x = torch.randn(2, 3, 256, 256, device="cuda")
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out_ref = ref.encode(x).float()
            out_fast = fast.encode(x).float()
        torch.testing.assert_close(out_fast, out_ref, atol=atol, rtol=0)
    finally:
        for m in models:
            m.to("cpu")
