"""inference.engines and inference.artifacts: registry, ONNX Runtime vs torch, TensorRT error, verification."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from inference.artifacts import ArtifactError, load_artifacts
from inference.engines import (
    ENGINE_REGISTRY,
    TENSORRT_MISSING,
    OnnxRuntimeEngine,
    TensorRTEngine,
    TorchEngine,
    build_engine,
    physical_cores,
)
from tests.support.artifact_factory import session_tiny_artifacts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return session_tiny_artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def artifacts(tiny):
    return load_artifacts(tiny.art_dir)


@pytest.fixture(scope="module")
def ort_engine(artifacts):
    return OnnxRuntimeEngine(artifacts, intra_op_threads=1)


def _inputs(artifacts, rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    p = artifacts.pipeline
    grid = p.refiner_size // 16
    channels = next(s["shape"][1] for s in artifacts.graph("mask_decoder").inputs if s["name"] == "image_embeddings")
    return {
        "transunet": {
            "image": rng.random((2, p.transunet_in_channels, p.transunet_size, p.transunet_size), np.float32)
        },
        "image_encoder": {"image": rng.random((1, 3, p.refiner_size, p.refiner_size), np.float32) * 255.0},
        "mask_decoder": {
            "image_embeddings": rng.standard_normal((2, channels, grid, grid), np.float32),
            "point_coords": rng.random((2, 4, 2), np.float32) * p.refiner_size,
            "point_labels": np.array([[1, 0, 2, 3], [1, 0, 2, 3]], np.float32),
            "mask_input": rng.standard_normal((2, 1, 4 * grid, 4 * grid), np.float32),
            "has_mask_input": np.array([1.0, 0.0], np.float32),
            "orig_im_size": np.array([50.0, 70.0], np.float32),
        },
        "gate": {name: rng.random((2, 1, 30, 40), np.float32) for name in ("coarse", "sam", "image")},
    }


def test_registry_rejects_unknown_backend_naming_the_choices(tiny):
    with pytest.raises(ValueError, match=r"'tflite'.*\['onnxruntime', 'openvino', 'tensorrt', 'torch'\]"):
        build_engine("tflite", tiny.art_dir)
    assert set(ENGINE_REGISTRY) == {"onnxruntime", "openvino", "torch", "tensorrt"}


def test_onnxruntime_engine_runs_every_graph(ort_engine, artifacts):
    assert set(ort_engine.graph_names) == set(artifacts.graphs)
    assert ort_engine.describe() == {"backend": "onnxruntime", "providers": ["CPUExecutionProvider"],
                                     "intra_op_threads": 1, "allow_spinning": False,
                                     "precision": {name: "fp32" for name in artifacts.graphs}}
    for name in artifacts.graphs:
        assert ort_engine.input_names(name) == artifacts.graph(name).input_names
        assert ort_engine.output_names(name) == artifacts.graph(name).output_names
    inputs = _inputs(artifacts, np.random.default_rng(0))
    size = artifacts.pipeline.transunet_size
    probability = ort_engine.run("transunet", inputs["transunet"])["probability"]
    assert probability.shape == (2, 1, size, size) and probability.dtype == np.float32
    assert 0.0 <= probability.min() and probability.max() <= 1.0
    decoded = ort_engine.run("mask_decoder", inputs["mask_decoder"])
    assert decoded["masks"].shape == (2, 1, 50, 70) and decoded["iou_predictions"].shape == (2, 1)
    assert ort_engine.run("gate", inputs["gate"])["gate"].shape == (2, 1, 30, 40)


def test_engine_input_errors(ort_engine, artifacts):
    with pytest.raises(KeyError, match="no graph 'segmenter'"):
        ort_engine.run("segmenter", {})
    with pytest.raises(ValueError, match=r"missing \['point_labels'\]"):
        inputs = dict(_inputs(artifacts, np.random.default_rng(0))["mask_decoder"])
        del inputs["point_labels"]
        ort_engine.run("mask_decoder", inputs)
    with pytest.raises(ValueError, match="device 'npu'"):
        OnnxRuntimeEngine(artifacts, device="npu")


def test_gpu_providers_need_onnxruntime_gpu(artifacts):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        engine = OnnxRuntimeEngine(artifacts, device="cuda", graphs=["transunet"])
        assert engine.describe()["providers"][0] == "CUDAExecutionProvider"
    else:
        with pytest.raises(ValueError, match=r"onnxruntime-gpu.*NVIDIA"):
            OnnxRuntimeEngine(artifacts, device="cuda")


def test_torch_engine_gives_the_onnx_numbers(artifacts, ort_engine):
    engine = build_engine("torch", artifacts, device="cpu")
    assert isinstance(engine, TorchEngine) and engine.describe() == {"backend": "torch", "device": "cpu",
                                                             "precision": {n: "fp32" for n in engine.graph_names}}
    inputs = _inputs(artifacts, np.random.default_rng(1))
    for name in artifacts.graphs:
        assert engine.input_names(name) == ort_engine.input_names(name)
        expected = ort_engine.run(name, inputs[name])
        got = engine.run(name, inputs[name])
        assert set(got) == set(expected)
        bound = artifacts.graph(name).parity["bound"]
        for output, value in expected.items():
            np.testing.assert_allclose(got[output], value, atol=bound, err_msg=f"{name}.{output}")


def test_tensorrt_engine_without_tensorrt_says_how_to_install(artifacts, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(RuntimeError) as info:
        TensorRTEngine(artifacts)
    assert str(info.value) == TENSORRT_MISSING
    assert "pip install 'medrefine[gpu]'" in str(info.value)


def test_physical_cores_is_within_the_usable_cpus():
    import os

    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------- artifact verification
def _copy(tiny, tmp_path):
    target = tmp_path / "art"
    shutil.copytree(tiny.art_dir, target)
    return target


def test_modified_graph_is_refused_naming_the_file(tiny, tmp_path):
    art = _copy(tiny, tmp_path)
    with open(art / "transunet.onnx", "r+b") as handle:
        handle.seek(-8, 2)
        last = handle.read(1)
        handle.seek(-8, 2)
        handle.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match=r"transunet\.onnx: sha256 mismatch"):
        build_engine("onnxruntime", art)
    with pytest.raises(ArtifactError, match=r"transunet\.onnx: sha256 mismatch"):
        from inference.pipeline import SegmentationPipeline

        SegmentationPipeline.from_artifacts(art)


def test_missing_graph_file_and_manifest_problems(tiny, tmp_path):
    art = _copy(tiny, tmp_path)
    (art / "image_encoder.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"image_encoder\.onnx: missing"):
        load_artifacts(art)

    art = _copy(tiny, tmp_path / "b")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["pipeline"]["threshold"] = 0.7  # changes the version
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="manifest was edited after export"):
        load_artifacts(art)

    manifest["graphs"]["transunet"]["parity"]["passed"] = False
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="failed its export parity check"):
        load_artifacts(art)

    del manifest["graphs"]["mask_decoder"]
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"lacks required graph\(s\) \['mask_decoder'\]"):
        load_artifacts(art)

    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifacts(tmp_path / "nowhere")


def test_loaded_artifacts_expose_the_pipeline_settings(artifacts, tiny):
    manifest = json.loads((tiny.art_dir / "manifest.json").read_text())
    assert artifacts.version == manifest["version"]
    assert artifacts.threshold == pytest.approx(manifest["pipeline"]["threshold"])
    assert artifacts.pipeline.refiner_size == manifest["pipeline"]["refiner_size"]
    assert artifacts.pipeline.gate["type"] == "learned"
    assert artifacts.pipeline.ultrarefiner["use_roi"] is True
    with pytest.raises(ArtifactError, match="no graph 'vae'"):
        artifacts.graph("vae")
