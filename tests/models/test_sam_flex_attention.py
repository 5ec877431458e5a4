"""The "flex" image-encoder attention (FlexAttention, relative positions as a score_mod, no (N, N) bias) against
the reference attention: same parameters, outputs within 1e-3 in float32.

On the CPU (torch 2.13) flex_attention runs its unfused math implementation, forward only; the CUDA tests
run the compiled kernel and its backward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from models.sam import SamConfig, build_sam
from models.sam.flex_attention import flex_attention_rel_pos, rel_pos_score_mod
from models.sam.image_encoder import (
    Attention,
    ImageEncoderViT,
    add_decomposed_rel_pos,
    decomposed_rel_pos_terms,
)
from weights.sam_checkpoint import load_sam_checkpoint

FIXTURE = Path(__file__).parents[1] / "fixtures" / "sam" / "tiny_reference.safetensors"
ATOL = 1e-3  # float32, absolute, as for "sdpa"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def models():
    ref = load_sam_checkpoint(FIXTURE, "tiny", prefix="model.")
    flex = load_sam_checkpoint(FIXTURE, "tiny", prefix="model.", attn_impl="flex")
    return ref, flex


def _random_rel_pos(module: nn.Module, std: float, seed: int) -> None:
    """Non-zero relative-position tables everywhere, so the score_mod actually matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def test_state_dict_identical_and_flex_is_an_option(models):
    ref, flex = models
    assert flex.image_encoder.attn_impl == "flex" and ref.image_encoder.attn_impl == "reference"
    assert build_sam("tiny").config.attn_impl == "reference"
    assert SamConfig.from_dict({**ref.config.to_dict(), "attn_impl": "flex"}).attn_impl == "flex"
    sd_ref, sd_flex = ref.state_dict(), flex.state_dict()
    assert list(sd_ref) == list(sd_flex)
    assert all(torch.equal(sd_ref[k], sd_flex[k]) for k in sd_ref)


def test_flex_matches_reference_on_fixture_weights(models):
    ref, flex = models
    data = load_file(str(FIXTURE))
    x = data["out.preprocessed"]
    with torch.no_grad():
        emb_ref, emb_flex = ref.encode(x), flex.encode(x)
    torch.testing.assert_close(emb_flex, emb_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(emb_flex, data["out.image_embeddings"], atol=ATOL, rtol=0)


def test_flex_matches_reference_on_default_config_random_weights():
    torch.manual_seed(0)
    ref = build_sam("default").eval()
    _random_rel_pos(ref, std=0.5, seed=1)
    flex = build_sam("default", attn_impl="flex").eval()
    flex.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        emb_ref, emb_flex = ref.encode(x), flex.encode(x)
    assert emb_ref.abs().max() > 0.5  # a real signal, not a collapsed output
    torch.testing.assert_close(emb_flex, emb_ref, atol=ATOL, rtol=0)


def test_flex_matches_reference_with_window_padding():
    # 5 x 5 token grid, window 3: windows padded to 6 x 6; block 1 is global over the 5 x 5 grid
    kwargs = dict(img_size=80, patch_size=16, embed_dim=32, depth=2, num_heads=2, out_chans=16, window_size=3,
                  global_attn_indexes=(1,), rel_pos_zero_init=False)
    torch.manual_seed(3)
    ref = ImageEncoderViT(**kwargs).eval()
    _random_rel_pos(ref, std=0.5, seed=4)
    flex = ImageEncoderViT(**kwargs, attn_impl="flex").eval()
    flex.load_state_dict(ref.state_dict())
    x = torch.randn(3, 3, 80, 80, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(flex(x), ref(x), atol=ATOL, rtol=0)


def test_flex_matches_reference_on_a_non_square_grid():
    # 3 x 5 tokens: a key-row / key-column mix-up in the score_mod cannot hide on a non-square grid
    torch.manual_seed(6)
    ref = Attention(24, num_heads=3, use_rel_pos=True, rel_pos_zero_init=False, input_size=(3, 5)).eval()
    _random_rel_pos(ref, std=0.5, seed=7)
    flex = Attention(24, num_heads=3, use_rel_pos=True, input_size=(3, 5), attn_impl="flex").eval()
    flex.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 5, 24, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(flex(x), ref(x), atol=ATOL, rtol=0)


def test_function_equals_softmax_with_materialised_bias():
    gen = torch.Generator().manual_seed(9)
    b, heads, kh, kw, d = 2, 3, 4, 6, 8
    n = kh * kw
    q, k, v = (torch.randn(b, heads, n, d, generator=gen) for _ in range(3))
    table_h, table_w = torch.randn(2 * kh - 1, d, generator=gen), torch.randn(2 * kw - 1, d, generator=gen)
    rel_h, rel_w = decomposed_rel_pos_terms(q.reshape(b * heads, n, d), table_h, table_w, (kh, kw), (kh, kw))
    logits = add_decomposed_rel_pos((q * 0.3) @ k.transpose(-2, -1), q.reshape(b * heads, n, d), table_h, table_w,
                                    (kh, kw), (kh, kw)).view(b, heads, n, n)
    expected = logits.softmax(-1) @ v
    out = flex_attention_rel_pos(q, k, v, rel_h.reshape(b, heads, n, kh), rel_w.reshape(b, heads, n, kw), scale=0.3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # without relative positions it is plain scaled dot-product attention
    plain = flex_attention_rel_pos(q, k, v)
    torch.testing.assert_close(plain, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=0)


def test_score_mod_indexes_row_and_column_factors():
    rel = torch.randn(1, 2, 6, 2 + 3, generator=torch.Generator().manual_seed(10))  # k_h = 2, k_w = 3
    mod = rel_pos_score_mod(rel, 2, 3)
    # head 1, query 4, key 5 = row 1, column 2 of the 2 x 3 key grid
    got = mod(torch.tensor(0.25), torch.tensor(0), torch.tensor(1), torch.tensor(4), torch.tensor(5))
    torch.testing.assert_close(got, 0.25 + rel[0, 1, 4, 1] + rel[0, 1, 4, 2 + 2])


def test_flex_rejects_bad_shapes_and_cpu_gradients():
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="k_h x k_w"):
        flex_attention_rel_pos(q, q, q, torch.zeros(1, 2, 6, 2), torch.zeros(1, 2, 6, 2))
    with pytest.raises(ValueError, match="together"):
        flex_attention_rel_pos(q, q, q, torch.zeros(1, 2, 6, 2), None)
    with pytest.raises(ValueError, match=r"\(B, heads, N, d\)"):
        flex_attention_rel_pos(q, q[:, :1], q)
    with pytest.raises(RuntimeError, match="no backward on the CPU"):
        flex_attention_rel_pos(q.requires_grad_(), q, q)


@needs_cuda
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-3), (torch.bfloat16, 1e-1)])
def test_flex_on_cuda_matches_reference(models, dtype, atol):
    ref, flex = (m.to("cuda") for m in models)
    try:
        x = torch.randn(2, 3, 256, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out_ref = ref.encode(x).float()
            out_flex = flex.encode(x).float()
        torch.testing.assert_close(out_flex, out_ref, atol=atol, rtol=0)
    finally:
        for m in models:
            m.to("cpu")


@needs_cuda
def test_flex_on_cuda_gradients_match_reference():
    kwargs = dict(img_size=128, patch_size=16, embed_dim=64, depth=2, num_heads=2, out_chans=16, window_size=3,
                  global_attn_indexes=(1,), rel_pos_zero_init=False)
    torch.manual_seed(11)
    ref = ImageEncoderViT(**kwargs).cuda()
    flex = ImageEncoderViT(**kwargs, attn_impl="flex").cuda()
    flex.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 128, 128, device="cuda")
    out_ref, out_flex = ref(x), flex(x)
    torch.testing.assert_close(out_flex, out_ref, atol=1e-3, rtol=0)
    out_ref.square().mean().backward()
    out_flex.square().mean().backward()
    for (name, p_ref), p_flex in zip(ref.named_parameters(), flex.parameters(), strict=True):
        torch.testing.assert_close(p_flex.grad, p_ref.grad, atol=1e-3, rtol=1e-2, msg=name)
