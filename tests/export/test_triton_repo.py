"""`python -m export triton`: config.pbtxt parsed back with Triton's own ModelConfig schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from export.__main__ import main
from export.graphs import save_random_run
from export.onnx_export import export_artifacts
from export.triton import MANIFEST_COPY, read_config
from inference.manifest import load_manifest, sha256_file


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("triton")
    run_dir = save_random_run("tiny", root / "run")
    art = root / "art"
    export_artifacts(run_dir, art)
    out = root / "repo"
    assert main(["triton", str(art), "--out", str(out), "--max-batch-size", "8"]) == 0
    return art, out


def _full_dims(config, tensor) -> list[int]:
    """Triton's view of a tensor's full shape: batching models get an implicit leading -1."""
    return ([-1] if config.max_batch_size > 0 else []) + list(tensor.dims)


def _compatible(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b, strict=True))


def test_one_folder_per_graph_with_its_onnx(repo):
    art, out = repo
    manifest = load_manifest(art)
    assert {p.name for p in out.iterdir() if p.is_dir()} == {*manifest["graphs"], "refiner"}
    for name, graph in manifest["graphs"].items():
        assert sha256_file(out / name / "1" / "model.onnx") == graph["sha256"]
        config = read_config(out / name / "config.pbtxt")
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert config.parameters["medrefine_version"].string_value == manifest["version"]
    assert json.loads((out / MANIFEST_COPY).read_text())["version"] == manifest["version"]


def test_batchable_graphs_declare_dims_without_batch_and_dynamic_batching(repo):
    _, out = repo
    config = read_config(out / "transunet" / "config.pbtxt")
    assert config.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("image", mc.TYPE_FP32, [1, 128, 128])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("probability", [1, 128, 128])]
    assert config.HasField("dynamic_batching")
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    enc = read_config(out / "image_encoder" / "config.pbtxt")
    assert enc.max_batch_size == 8 and list(enc.input[0].dims) == [3, 256, 256]
    assert list(enc.output[0].dims) == [64, 16, 16] and enc.HasField("dynamic_batching")


def test_decoder_is_not_batched_by_triton_and_keeps_full_dims(repo):
    _, out = repo
    config = read_config(out / "mask_decoder" / "config.pbtxt")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    dims = {i.name: list(i.dims) for i in config.input}
    assert dims == {"image_embeddings": [-1, 64, 16, 16], "point_coords": [-1, -1, 2], "point_labels": [-1, -1],
                    "mask_input": [-1, 1, 64, 64], "has_mask_input": [-1], "orig_im_size": [2]}
    assert {o.name: list(o.dims) for o in config.output} == {
        "masks": [-1, 1, -1, -1], "iou_predictions": [-1, 1], "low_res_masks": [-1, 1, 64, 64]}
    assert all(t.data_type == mc.TYPE_FP32 for t in [*config.input, *config.output])


def test_ensemble_steps_are_wired_by_tensor_names(repo):
    _, out = repo
    ens = read_config(out / "refiner" / "config.pbtxt")
    assert ens.platform == "ensemble" and ens.max_batch_size == 0
    assert (out / "refiner" / "1").is_dir() and not any((out / "refiner" / "1").iterdir())
    steps = list(ens.ensemble_scheduling.step)
    assert [s.model_name for s in steps] == ["image_encoder", "mask_decoder"]
    assert dict(steps[0].output_map) == {"image_embeddings": "image_embeddings"}
    assert steps[1].input_map["image_embeddings"] == "image_embeddings"
    # every ensemble tensor is produced before use, and every model input/output is mapped with a
    # consistent dtype and shape (Triton's ValidateTensorConsistency rule, incl. the implicit batch dim)
    tensors = {t.name: (t.data_type, _full_dims(ens, t)) for t in ens.input}
    for step in steps:
        model = read_config(out / step.model_name / "config.pbtxt")
        inputs = {t.name: t for t in model.input}
        assert set(step.input_map) == set(inputs), step.model_name
        for model_name, ens_name in step.input_map.items():
            dtype, dims = tensors[ens_name]
            assert dtype == inputs[model_name].data_type
            assert _compatible(dims, _full_dims(model, inputs[model_name])), (step.model_name, model_name)
        outputs = {t.name: t for t in model.output}
        for model_name, ens_name in step.output_map.items():
            tensors[ens_name] = (outputs[model_name].data_type, _full_dims(model, outputs[model_name]))
    for t in ens.output:
        assert t.name in tensors and _compatible(tensors[t.name][1], _full_dims(ens, t))
    assert [t.name for t in ens.input] == ["image", "point_coords", "point_labels", "mask_input",
                                           "has_mask_input", "orig_im_size"]


def test_no_ensemble_flag_and_corrupted_artifacts(repo, tmp_path, capsys):
    art, _ = repo
    out = tmp_path / "repo"
    assert main(["triton", str(art), "--out", str(out), "--no-ensemble"]) == 0
    assert not (out / "refiner").exists() and (out / "transunet" / "config.pbtxt").is_file()
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in art.iterdir():
        (bad / f.name).write_bytes(f.read_bytes()[:-1] if f.name == "gate.onnx" else f.read_bytes())
    assert main(["triton", str(bad), "--out", str(tmp_path / "repo2")]) == 1
    assert f"{bad / 'gate.onnx'}: sha256 mismatch" in capsys.readouterr().err
    assert not (tmp_path / "repo2").exists()
