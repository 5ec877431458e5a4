"""weights.transunet_npz: the official R50+ViT-B_16.npz (JAX names and layouts) loads by name into our TransUNet.

The files are written here with the official key names and shapes and seeded random values; nothing is
downloaded. Shapes follow the JAX/Flax checkpoint: conv kernels HWIO, dense kernels (in, out), attention
kernels (D, heads, D/heads) and (heads, D/heads, D), a position table with a class token.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.transunet import TRANSUNET_PRESETS, TransUNetConfig, build_transunet
from weights.transunet_npz import load_transunet_npz

# A 3-channel miniature of R50+ViT-B/16 (two-unit stages, narrow), for the fast error and resize tests.
SMALL = {"img_size": 64, "in_channels": 3, "resnet_units": [2, 1, 2], "resnet_width": 8, "gn_groups": 4,
         "hidden_size": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 48, "head_channels": 16,
         "decoder_channels": [16, 8, 8, 8]}


def official_shapes(config: TransUNetConfig, grid: int | None = None, classes: int = 21843) -> dict[str, tuple]:
    """Key -> shape of the official ImageNet-21k R50+ViT checkpoint for ``config`` (positions on ``grid``)."""
    w, d, heads = config.resnet_width, config.hidden_size, config.num_heads
    grid = grid or config.img_size // 16
    shapes: dict[str, tuple] = {"conv_root/kernel": (7, 7, config.in_channels, w), "gn_root/scale": (w,),
                                "gn_root/bias": (w,)}
    cin = w
    stages = zip(config.resnet_units, (4 * w, 8 * w, 16 * w), (w, 2 * w, 4 * w), strict=True)
    for b, (units, cout, cmid) in enumerate(stages, 1):
        for u in range(1, units + 1):
            unit = f"block{b}/unit{u}/"
            unit_in = cin if u == 1 else cout
            shapes.update({unit + "conv1/kernel": (1, 1, unit_in, cmid), unit + "conv2/kernel": (3, 3, cmid, cmid),
                           unit + "conv3/kernel": (1, 1, cmid, cout)})
            for norm, channels in (("gn1", cmid), ("gn2", cmid), ("gn3", cout)):
                shapes.update({f"{unit}{norm}/scale": (channels,), f"{unit}{norm}/bias": (channels,)})
            if u == 1:  # every stage's first unit changes the width: projection shortcut
                shapes.update({unit + "conv_proj/kernel": (1, 1, unit_in, cout), unit + "gn_proj/scale": (cout,),
                               unit + "gn_proj/bias": (cout,)})
        cin = cout
    shapes.update({"embedding/kernel": (1, 1, 16 * w, d), "embedding/bias": (d,),
                   "Transformer/posembed_input/pos_embedding": (1, grid * grid + 1, d),
                   "Transformer/encoder_norm/scale": (d,), "Transformer/encoder_norm/bias": (d,)})
    for n in range(config.num_layers):
        block = f"Transformer/encoderblock_{n}/"
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            shapes.update({f"{block}{norm}/scale": (d,), f"{block}{norm}/bias": (d,)})
        for proj in ("query", "key", "value"):
            shapes[f"{block}MultiHeadDotProductAttention_1/{proj}/kernel"] = (d, heads, d // heads)
            shapes[f"{block}MultiHeadDotProductAttention_1/{proj}/bias"] = (heads, d // heads)
        shapes[f"{block}MultiHeadDotProductAttention_1/out/kernel"] = (heads, d // heads, d)
        shapes[f"{block}MultiHeadDotProductAttention_1/out/bias"] = (d,)
        shapes.update({f"{block}MlpBlock_3/Dense_0/kernel": (d, config.mlp_dim),
                       f"{block}MlpBlock_3/Dense_0/bias": (config.mlp_dim,),
                       f"{block}MlpBlock_3/Dense_1/kernel": (config.mlp_dim, d),
                       f"{block}MlpBlock_3/Dense_1/bias": (d,)})
    shapes.update({"cls": (1, 1, d), "head/kernel": (d, classes), "head/bias": (classes,),
                   "pre_logits/kernel": (d, d), "pre_logits/bias": (d,)})
    return shapes


def write_npz(path: Path, shapes: dict[str, tuple], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {key: rng.standard_normal(shape, dtype=np.float32) for key, shape in shapes.items()}
    np.savez(path, **arrays)
    return arrays


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The full-size R50+ViT-B_16.npz layout and an r50-vit-b16 TransUNet loaded from it."""
    path = tmp_path_factory.mktemp("vit") / "R50+ViT-B_16.npz"
    arrays = write_npz(path, official_shapes(TRANSUNET_PRESETS["r50-vit-b16"], grid=14), seed=0)
    torch.manual_seed(0)
    model = build_transunet("r50-vit-b16")
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("transformer.")}
    report = load_transunet_npz(model, path)
    return arrays, model, decoder_before, report


def test_r50_vit_b16_npz_loads_every_encoder_weight_by_name(official):
    arrays, model, _, report = official
    params = dict(model.named_parameters())
    assert set(report.loaded) == {name for name in params if name.startswith("transformer.")}
    assert report.ignored == ("cls", "head/bias", "head/kernel", "pre_logits/bias", "pre_logits/kernel")
    assert report.position_embedding == "class token dropped"

    def equal(name: str, expected: np.ndarray) -> None:
        np.testing.assert_array_equal(params[name].detach().numpy(), expected, err_msg=name)

    stem = "transformer.embeddings.hybrid_model."
    equal(stem + "root.conv.weight", arrays["conv_root/kernel"].transpose(3, 2, 0, 1))  # HWIO -> OIHW
    equal(stem + "root.gn.weight", arrays["gn_root/scale"])
    equal(stem + "body.block3.unit9.conv2.weight", arrays["block3/unit9/conv2/kernel"].transpose(3, 2, 0, 1))
    equal(stem + "body.block2.unit1.downsample.weight", arrays["block2/unit1/conv_proj/kernel"].transpose(3, 2, 0, 1))
    equal(stem + "body.block2.unit1.gn_proj.bias", arrays["block2/unit1/gn_proj/bias"])
    equal("transformer.embeddings.patch_embeddings.weight", arrays["embedding/kernel"].transpose(3, 2, 0, 1))
    equal("transformer.embeddings.position_embeddings",
          arrays["Transformer/posembed_input/pos_embedding"][:, 1:])  # class token dropped: 197 -> 196
    block = "Transformer/encoderblock_11/"
    equal("transformer.encoder.layer.11.attn.query.weight",
          arrays[block + "MultiHeadDotProductAttention_1/query/kernel"].reshape(768, 768).T)
    equal("transformer.encoder.layer.11.attn.value.bias",
          arrays[block + "MultiHeadDotProductAttention_1/value/bias"].reshape(-1))
    equal("transformer.encoder.layer.11.attn.out.weight",
          arrays[block + "MultiHeadDotProductAttention_1/out/kernel"].reshape(768, 768).T)
    equal("transformer.encoder.layer.11.ffn.fc1.weight", arrays[block + "MlpBlock_3/Dense_0/kernel"].T)
    equal("transformer.encoder.layer.11.ffn_norm.weight", arrays[block + "LayerNorm_2/scale"])
    equal("transformer.encoder.encoder_norm.bias", arrays["Transformer/encoder_norm/bias"])


def test_decoder_and_head_keep_their_initialisation(official):
    _, model, decoder_before, _ = official
    state = model.state_dict()
    assert decoder_before and all(torch.equal(state[k], v) for k, v in decoder_before.items())


def _small_file(tmp_path: Path, drop: str | None = None, reshape: tuple[str, tuple] | None = None,
                grid: int | None = None) -> Path:
    shapes = official_shapes(TransUNetConfig(**SMALL), grid=grid, classes=10)
    if drop:
        del shapes[drop]
    if reshape:
        shapes[reshape[0]] = reshape[1]
    path = tmp_path / "small.npz"
    write_npz(path, shapes, seed=1)
    return path


def test_missing_key_is_named_with_the_file_and_nothing_is_loaded(tmp_path):
    key = "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"
    path = _small_file(tmp_path, drop=key)
    model = build_transunet(SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="missing keys") as info:
        load_transunet_npz(model, path)
    assert key in str(info.value) and str(path) in str(info.value)
    assert "transformer.encoder.layer.1.ffn.fc1.weight" in str(info.value)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # all or nothing


def test_misshapen_key_is_named_with_both_shapes(tmp_path):
    key = "block1/unit1/conv2/kernel"
    path = _small_file(tmp_path, reshape=(key, (3, 3, 8, 4)))
    with pytest.raises(ValueError, match="shape mismatches") as info:
        load_transunet_npz(build_transunet(SMALL), path)
    message = str(info.value)
    assert f"{key}: file (3, 3, 8, 4) vs expected (3, 3, 8, 8)" in message and str(path) in message


def test_gray_config_and_deeper_checkpoint_are_refused(tmp_path):
    path = _small_file(tmp_path)
    with pytest.raises(ValueError, match=r"conv_root/kernel: file \(7, 7, 3, 8\) vs expected \(7, 7, 1, 8\)"):
        load_transunet_npz(build_transunet(dict(SMALL, in_channels=1)), path)
    with pytest.raises(ValueError, match=r"unexpected keys \(\d+\): block3/unit2/"):
        load_transunet_npz(build_transunet(dict(SMALL, resnet_units=[2, 1, 1])), path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_transunet_npz(build_transunet(SMALL), tmp_path / "absent.npz")


def test_position_table_of_another_grid_is_zoomed_as_upstream(tmp_path):
    path = _small_file(tmp_path, grid=7)  # a 7x7 table (+ class token) into a 4x4 model
    model = build_transunet(SMALL)
    report = load_transunet_npz(model, path)
    assert report.position_embedding == "resized 7x7 -> 4x4"
    table = np.load(path)["Transformer/posembed_input/pos_embedding"][0, 1:].reshape(7, 7, -1)
    loaded = model.transformer.embeddings.position_embeddings.detach().numpy().reshape(4, 4, -1)
    # Order-1 zoom maps corner to corner (scipy.ndimage.zoom, as the official load_from).
    for (i, j), (k, m) in (((0, 0), (0, 0)), ((3, 3), (6, 6)), ((0, 3), (0, 6))):
        np.testing.assert_allclose(loaded[i, j], table[k, m], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded[1, 0], table[2, 0], rtol=1e-5, atol=1e-6)  # 1 * 6/3 = row 2 exactly


def test_training_cli_starts_from_the_npz(tmp_path):
    from core.phantoms import write_dataset
    from training.__main__ import main
    from training.phases import RUN_PRESETS
    from weights.checkpoints import load_run

    write_dataset("ultrasound", 8, tmp_path / "train", 7, size=64)
    write_dataset("ultrasound", 4, tmp_path / "val", 8, size=64)
    preset = {"model": dict(RUN_PRESETS["tiny"].model, transunet=SMALL), "image_size": 64,
              "phases": {"transunet": {"epochs": 1, "batch_size": 4}}}
    (tmp_path / "preset.json").write_text(json.dumps(preset))
    path = _small_file(tmp_path)
    out = tmp_path / "p1"
    # LR 0: the run's weights are exactly the loaded ones.
    assert main(["transunet", "--out", str(out), "--vit-pretrained", str(path), "--lr", "0", "--max-steps", "1",
                 "--config", str(tmp_path / "preset.json"), "--data", str(tmp_path / "train"),
                 "--val-data", str(tmp_path / "val"), "--no-progress", "--device", "cpu"]) == 0
    info = load_run(out)
    assert info.sources["vit_pretrained"] == str(path)
    kernel = np.load(path)["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key/kernel"]
    np.testing.assert_array_equal(info.state_dict["transformer.encoder.layer.0.attn.key.weight"].numpy(),
                                  kernel.reshape(32, 32).T)
