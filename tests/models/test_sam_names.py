"""models.sam: official parameter names / shapes, presets and config validation, strict checkpoint loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.sam import SAM_PRESETS, SamConfig, build_sam, get_sam_config, sam_model_registry
from weights.sam_checkpoint import load_sam_checkpoint

FIXTURES = Path(__file__).parents[1] / "fixtures" / "sam"


def _meta_state_shapes(name: str) -> dict[str, list[int]]:
    with torch.device("meta"):
        model = build_sam(name)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def test_vit_b_matches_official_state_dict_exactly():
    expected = json.loads((FIXTURES / "vit_b_state_dict.json").read_text())
    got = _meta_state_shapes("vit_b")
    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    assert {k: v for k, v in got.items() if v != expected[k]} == {}
    assert "pixel_mean" not in got and "pixel_std" not in got


def test_medsam_vit_b_has_the_same_state_dict_as_vit_b():
    assert _meta_state_shapes("medsam_vit_b") == _meta_state_shapes("vit_b")
    assert get_sam_config("medsam_vit_b").preprocess == "medsam"


@pytest.mark.parametrize(
    ("name", "width", "depth", "heads", "global_idx"),
    [
        ("vit_b", 768, 12, 12, [2, 5, 8, 11]),
        ("vit_l", 1024, 24, 16, [5, 11, 17, 23]),
        ("vit_h", 1280, 32, 16, [7, 15, 23, 31]),
    ],
)
def test_official_encoder_sizes(name, width, depth, heads, global_idx):
    with torch.device("meta"):
        model = build_sam(name)
    enc = model.image_encoder
    assert enc.img_size == 1024 and enc.pos_embed.shape == (1, 64, 64, width)
    assert len(enc.blocks) == depth
    assert [i for i, blk in enumerate(enc.blocks) if blk.window_size == 0] == global_idx
    head_dim = width // heads
    for i, blk in enumerate(enc.blocks):
        assert blk.attn.num_heads == heads
        assert blk.attn.qkv.weight.shape == (3 * width, width)
        assert blk.mlp.lin1.weight.shape == (4 * width, width)
        rows = 127 if i in global_idx else 27  # 2 * 64 - 1 global, 2 * 14 - 1 windowed
        assert blk.attn.rel_pos_h.shape == (rows, head_dim) and blk.attn.rel_pos_w.shape == (rows, head_dim)
    assert enc.neck[0].weight.shape == (256, width, 1, 1)
    # the prompt encoder and decoder do not depend on the encoder size
    assert model.mask_decoder.mask_tokens.weight.shape == (4, 256)
    assert model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.shape == (2, 128)


def test_fixture_config_is_the_tiny_preset_and_presets_round_trip():
    fixture_cfg = json.loads((FIXTURES / "tiny_config.json").read_text())
    assert SamConfig.from_dict(fixture_cfg) == SAM_PRESETS["tiny"]
    for name, cfg in SAM_PRESETS.items():
        data = json.loads(json.dumps(cfg.to_dict()))
        assert SamConfig.from_dict(data) == cfg, name
        assert data["preprocess"] in ("sam", "medsam") and data["attn_impl"] == "reference"
    assert set(sam_model_registry) == set(SAM_PRESETS) >= {"tiny", "default", "vit_b", "vit_l", "vit_h", "medsam_vit_b"}


def test_default_preset_is_small_and_runs():
    cfg = get_sam_config("default")
    assert cfg.img_size == 256 and cfg.out_chans == cfg.prompt_embed_dim == 64
    model = sam_model_registry["default"]()
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    with torch.no_grad():
        emb = model.encode(model.preprocess(torch.rand(2, 3, 256, 256) * 255))
        low, iou = model.decode(emb, boxes=torch.tensor([[10.0, 20.0, 100.0, 120.0]] * 2), multimask_output=True)
    assert emb.shape == (2, 64, 16, 16) and low.shape == (2, 3, 64, 64) and iou.shape == (2, 3)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"preprocess": "clahe"}, "preprocess"),
        ({"attn_impl": "flash"}, "attn_impl"),
        ({"img_size": 250}, "img_size"),
        ({"out_chans": 32}, "out_chans"),
        ({"encoder_global_attn_indexes": [1, 7]}, "encoder_global_attn_indexes"),
        ({"encoder_num_heads": 5}, "encoder_embed_dim"),
        ({"window_size": -1}, "window_size"),
        ({"pixel_std": [1.0, 0.0, 1.0]}, "pixel_std"),
        ({"decoder_depth": "2"}, "decoder_depth"),
        ({"colour": 1}, "colour"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    data = {**SAM_PRESETS["tiny"].to_dict(), **changes}
    with pytest.raises(ValueError, match=field):
        SamConfig.from_dict(data)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="vit_b"):
        build_sam("vit_x")


# ---- checkpoint loading ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in build_sam("tiny").state_dict().items()}


def test_pth_and_wrapped_pth_load_strictly(tmp_path, tiny_state):
    plain = tmp_path / "sam_tiny.pth"
    torch.save(tiny_state, plain)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": tiny_state, "epoch": 3}, wrapped)
    for path in (plain, wrapped):
        model = load_sam_checkpoint(path, "tiny")
        assert not model.training
        for k, v in model.state_dict().items():
            assert torch.equal(v, tiny_state[k]), k


def test_safetensors_with_prefix_loads_the_reference_fixture():
    from safetensors.torch import load_file

    ref = load_file(str(FIXTURES / "tiny_reference.safetensors"))
    model = load_sam_checkpoint(FIXTURES / "tiny_reference.safetensors", "tiny", prefix="model.")
    assert torch.equal(model.mask_decoder.iou_token.weight, ref["model.mask_decoder.iou_token.weight"])


def test_mismatched_checkpoint_error_lists_every_problem(tmp_path, tiny_state):
    bad = dict(tiny_state)
    del bad["mask_decoder.iou_token.weight"]
    bad["extra.weight"] = torch.zeros(1)
    bad["image_encoder.pos_embed"] = torch.zeros(1, 8, 8, 96)
    path = tmp_path / "broken_ckpt.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError) as info:
        load_sam_checkpoint(path, "tiny")
    msg = str(info.value)
    assert "broken_ckpt.pth" in msg
    assert "missing keys (1): mask_decoder.iou_token.weight" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "image_encoder.pos_embed: file (1, 8, 8, 96) vs model (1, 16, 16, 96)" in msg


def test_vit_b_weights_do_not_fit_the_tiny_config(tmp_path):
    path = tmp_path / "wrong_size.pth"
    with torch.device("meta"):
        meta = build_sam("vit_b").state_dict()
    torch.save({k: torch.zeros(v.shape) for k, v in meta.items() if k.startswith("mask_decoder.iou")}, path)
    with pytest.raises(ValueError, match=r"wrong_size\.pth.*missing keys"):
        load_sam_checkpoint(path, "tiny")


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_sam_checkpoint(tmp_path / "nope.pth", "tiny")
    other = tmp_path / "weights.npz"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"weights\.npz.*suffix"):
        load_sam_checkpoint(other, "tiny")
