"""`python -m export onnx`: graphs, manifest, parity, dynamic batch, fp16, and refusing broken exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from export import graphs as graphs_mod
from export.__main__ import main
from export.graphs import RANDOM_CONFIGS, build_graph_specs
from export.onnx_export import export_artifacts
from export.parity import BOUNDS, MIN_DICE, ParityError
from inference.manifest import FORMAT, compute_version, load_manifest, sha256_file
from models.build import build_ultrarefiner, config_to_dict
from weights.checkpoints import build_model_from_run, load_run, save_run

FIXTURE = Path(__file__).parents[1] / "fixtures" / "sam" / "tiny_reference.safetensors"
PIPELINE_KEYS = {"transunet_size", "transunet_in_channels", "refiner_size", "refiner_preprocess", "pixel_mean",
                 "pixel_std", "roi_expand_ratio", "mask_prompt_style", "gate", "threshold", "use_points", "use_box",
                 "use_mask_prompt"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Tiny UltraRefiner: default TransUNet, the SAM fixture's refiner weights, a learned gate (randomised)."""
    config = config_to_dict(RANDOM_CONFIGS["tiny"])
    torch.manual_seed(0)
    model = build_ultrarefiner(config)
    reference = load_file(str(FIXTURE))
    model.refiner.load_state_dict({k[len("model."):]: v for k, v in reference.items() if k.startswith("model.")})
    torch.nn.init.normal_(model.gate.net[-1].weight, std=0.5)  # zero-initialised: make the gate non-trivial
    return save_run(tmp_path_factory.mktemp("run") / "tiny", model, config, 0.4, {"val_dice": 0.8},
                    kind="ultrarefiner", data_fingerprint="sha256:test")


@pytest.fixture(scope="module")
def art_dir(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "tiny"
    assert main(["onnx", "--model", str(run_dir), "--out", str(out)]) == 0
    return out


def test_manifest_fields(art_dir, run_dir):
    manifest = load_manifest(art_dir)
    run = json.loads((run_dir / "run.json").read_text())
    assert manifest["format"] == FORMAT
    assert manifest["opset"] == 17 and manifest["precision"] == "fp32"
    assert set(manifest["graphs"]) == {"transunet", "image_encoder", "mask_decoder", "gate"}
    source = manifest["source"]
    assert source["run_dir"] == str(run_dir.resolve())
    assert source["weights_sha256"] == run["weights_sha256"] == sha256_file(run_dir / "weights.safetensors")
    assert source["config"] == run["config"] and source["threshold"] == 0.4
    assert source["metrics"] == {"val_dice": 0.8} and source["data_fingerprint"] == "sha256:test"
    pipeline = manifest["pipeline"]
    assert PIPELINE_KEYS <= set(pipeline)
    assert (pipeline["transunet_size"], pipeline["transunet_in_channels"], pipeline["refiner_size"]) == (128, 1, 256)
    assert pipeline["threshold"] == 0.4 and pipeline["gate"]["type"] == "learned"
    assert pipeline["pixel_mean"] == [123.675, 116.28, 103.53]
    hashes = {}
    for name, graph in manifest["graphs"].items():
        path = art_dir / graph["file"]
        assert graph["file"] == f"{name}.onnx" and graph["sha256"] == sha256_file(path)
        assert graph["bytes"] == path.stat().st_size
        hashes[name] = graph["sha256"]
    assert manifest["version"] == compute_version(hashes, pipeline)
    io = manifest["graphs"]["transunet"]
    assert io["inputs"] == [{"name": "image", "shape": ["batch", 1, 128, 128], "dtype": "float32"}]
    assert io["outputs"] == [{"name": "probability", "shape": ["batch", 1, 128, 128], "dtype": "float32"}]
    assert manifest["graphs"]["image_encoder"]["outputs"][0]["shape"] == ["batch", 64, 16, 16]
    dec = {t["name"]: t["shape"] for t in manifest["graphs"]["mask_decoder"]["inputs"]}
    assert dec["point_coords"] == ["batch", "num_points", 2] and dec["orig_im_size"] == [2]
    assert [t["name"] for t in manifest["graphs"]["gate"]["inputs"]] == ["coarse", "sam", "image"]
    assert manifest["graphs"]["gate"]["inputs"][0]["shape"] == ["batch", 1, "height", "width"]


def test_graphs_pass_checker_and_parity_is_recorded_within_bounds(art_dir):
    manifest = load_manifest(art_dir)
    for name, graph in manifest["graphs"].items():
        onnx.checker.check_model(str(art_dir / graph["file"]))
        parity = graph["parity"]
        assert parity["passed"] is True and parity["inputs"] == "phantom+random"
        assert parity["bound"] == BOUNDS[name]["fp32"]
        assert 0.0 <= parity["max_abs_err"] <= parity["bound"], name
        assert parity["max_abs_err"] == max(parity["per_output"].values())
        if name == "image_encoder":
            assert parity["mask_dice"] is None
        else:
            assert parity["mask_dice"] >= MIN_DICE, name


def _at_batch(inputs: dict[str, np.ndarray], axes: dict[str, dict[int, str]], batch: int) -> dict[str, np.ndarray]:
    out = {}
    for name, value in inputs.items():
        if axes.get(name, {}).get(0) == "batch":
            value = value[[i % value.shape[0] for i in range(batch)]]
        out[name] = value
    return out


def test_dynamic_batch_1_and_3(art_dir, run_dir):
    info = load_run(run_dir)
    specs = {s.name: s for s in build_graph_specs(build_model_from_run(info), info)}
    manifest = load_manifest(art_dir)
    for name, graph in manifest["graphs"].items():
        spec = specs[name]
        session = ort.InferenceSession(str(art_dir / graph["file"]), providers=["CPUExecutionProvider"])
        example = {k: v.numpy() for k, v in spec.example.items()}  # batch 2
        for batch in (1, 3):
            feeds = _at_batch(example, spec.dynamic_axes, batch)
            want = spec.reference(feeds)
            got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
            for key, value in want.items():
                assert got[key].shape == value.shape and got[key].shape[0] == batch, (name, key)
                np.testing.assert_allclose(got[key], value, atol=graph["parity"]["bound"], rtol=0)


def test_refiner_graphs_reproduce_the_sam_fixture(art_dir):
    ref = {k: v.numpy() for k, v in load_file(str(FIXTURE)).items()}
    encoder = ort.InferenceSession(str(art_dir / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    (embeddings,) = encoder.run(None, {"image": ref["in.image_raw"]})
    np.testing.assert_allclose(embeddings, ref["out.image_embeddings"], atol=1e-4, rtol=0)
    decoder = ort.InferenceSession(str(art_dir / "mask_decoder.onnx"), providers=["CPUExecutionProvider"])
    masks, iou, low_res = decoder.run(["masks", "iou_predictions", "low_res_masks"], {
        "image_embeddings": ref["out.image_embeddings"],
        "point_coords": ref["in.onnx.point_coords"],
        "point_labels": ref["in.onnx.point_labels"],
        "mask_input": ref["in.mask_input"],
        "has_mask_input": ref["in.onnx.has_mask_input"],
        "orig_im_size": ref["in.onnx.orig_im_size"],
    })
    assert masks.shape == (1, 1, 300, 400)
    np.testing.assert_allclose(masks, ref["out.onnx.masks"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(iou, ref["out.onnx.scores"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(low_res, ref["out.onnx.low_res_masks"], atol=1e-4, rtol=0)


def test_fp16_export(run_dir, tmp_path):
    out = tmp_path / "fp16"
    manifest = export_artifacts(run_dir, out, fp16=True, only=["transunet", "gate"])
    assert manifest["precision"] == "fp16" and set(manifest["graphs"]) == {"transunet", "gate"}
    for name, graph in manifest["graphs"].items():
        model = onnx.load(str(out / graph["file"]))
        assert {t.data_type for t in model.graph.initializer} & {onnx.TensorProto.FLOAT16}, name
        assert all(t["dtype"] == "float32" for t in graph["inputs"] + graph["outputs"]), name
        assert graph["parity"]["bound"] == BOUNDS[name]["fp16"] >= graph["parity"]["max_abs_err"]
        assert graph["parity_fp32"]["max_abs_err"] <= BOUNDS[name]["fp32"]
        assert graph["parity"]["mask_dice"] >= MIN_DICE
    assert not list(out.glob("*.fp32.onnx"))


def _no_staging_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".staging-" in p.name or ".old-" in p.name]


def test_noisy_export_fails_parity_and_writes_nothing(run_dir, tmp_path, monkeypatch):
    original = graphs_mod.TransUNetGraph.forward

    def noisy(self, image):
        out = original(self, image)
        return out + 0.01 * torch.randn_like(out)  # exported as RandomNormalLike: differs from torch

    monkeypatch.setattr(graphs_mod.TransUNetGraph, "forward", noisy)
    out = tmp_path / "broken"
    with pytest.raises(ParityError, match=r"graph 'transunet' \(fp32\).*exceeds the bound 1e-05"):
        export_artifacts(run_dir, out, only=["transunet"])
    assert not out.exists() and _no_staging_left(tmp_path)


def test_wrapper_bug_fails_parity_and_keeps_the_previous_export(art_dir, run_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "art"
    shutil.copytree(art_dir, out)
    before = {f.name: sha256_file(f) for f in out.iterdir()}
    # a wrapper that forgets the sigmoid: the reference (the model's own API) catches it
    monkeypatch.setattr(graphs_mod.TransUNetGraph, "forward", lambda self, image: self.transunet(image))
    code = main(["onnx", "--model", str(run_dir), "--out", str(out), "--graphs", "transunet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: graph 'transunet' (fp32)") and len(err.splitlines()) == 1
    assert {f.name: sha256_file(f) for f in out.iterdir()} == before
    assert _no_staging_left(tmp_path)


def test_unknown_graph_and_missing_run_are_clear_errors(run_dir, tmp_path, capsys):
    assert main(["onnx", "--model", str(run_dir), "--out", str(tmp_path / "a"), "--graphs", "nope"]) == 1
    assert "graphs ['nope'] are not produced" in capsys.readouterr().err
    assert main(["onnx", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "b")]) == 1
    assert "run directory not found" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_paper_config_builds_at_paper_sizes_on_the_meta_device():
    config = config_to_dict(RANDOM_CONFIGS["paper"])
    assert (config["transunet"]["img_size"], config["transunet"]["in_channels"]) == (224, 3)
    assert (config["refiner"]["img_size"], config["refiner"]["encoder_embed_dim"]) == (1024, 768)
    with torch.device("meta"):
        model = build_ultrarefiner(config)
    encoder = sum(p.numel() for p in model.refiner.image_encoder.parameters())
    transunet = sum(p.numel() for p in model.transunet.parameters())
    assert 85e6 < encoder < 95e6  # SAM ViT-B image encoder: 89.7 M parameters
    assert 100e6 < transunet < 110e6  # R50-ViT-B/16 TransUNet: 105.3 M with its decoder


def test_transunet_run_exports_the_transunet_graph_only(tmp_path):
    from models.transunet import build_transunet

    torch.manual_seed(1)
    model = build_transunet("default")
    run = save_run(tmp_path / "run", model, {"transunet": model.config.to_dict()}, 0.5, {}, kind="transunet")
    manifest = export_artifacts(run, tmp_path / "art")
    assert set(manifest["graphs"]) == {"transunet"} and manifest["source"]["kind"] == "transunet"
    assert manifest["pipeline"] == {"threshold": 0.5, "transunet_size": 128, "transunet_in_channels": 1}
    assert manifest["graphs"]["transunet"]["parity"]["passed"] is True
