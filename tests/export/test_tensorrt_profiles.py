"""TensorRT profile logic, ONNX shape-input preparation and engine compatibility, without TensorRT.

The last test builds a real engine and runs only where tensorrt and an NVIDIA GPU exist.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from export import tensorrt as trt_export
from export.__main__ import EXIT_MISSING_DEPENDENCY, main
from export.onnx_export import export_graph
from export.tensorrt import ProfileRanges, prepare_for_tensorrt, profile_spec
from inference import tensorrt_runtime
from inference.tensorrt_runtime import (
    EngineCompatibilityError,
    GpuInfo,
    MissingDependencyError,
    check_engine_compatible,
    profile_max_batch,
)
from models.sam import build_sam
from weights.sam_onnx import DYNAMIC_AXES, INPUT_NAMES, OUTPUT_NAMES, SamOnnxDecoder


@pytest.fixture(scope="module")
def decoder_onnx(tmp_path_factory):
    torch.manual_seed(0)
    sam = build_sam("tiny").eval()
    low = tuple(sam.prompt_encoder.mask_input_size)
    example = {
        "image_embeddings": torch.randn(2, 64, 16, 16),
        "point_coords": torch.rand(2, 4, 2) * 256,
        "point_labels": torch.tensor([[1.0, 0.0, 2.0, 3.0]] * 2),
        "mask_input": torch.randn(2, 1, *low),
        "has_mask_input": torch.ones(2),
        "orig_im_size": torch.tensor([256.0, 256.0]),
    }
    path = tmp_path_factory.mktemp("trt") / "mask_decoder.onnx"
    export_graph(SamOnnxDecoder(sam).eval(), {n: example[n] for n in INPUT_NAMES}, path,
                 output_names=OUTPUT_NAMES, dynamic_axes=DYNAMIC_AXES)
    return path, example


def test_every_dynamic_input_gets_a_profile_and_orig_im_size_is_an_int32_shape_input(decoder_onnx):
    path, _ = decoder_onnx
    ranges = ProfileRanges(batch=(1, 4, 8), num_points=(1, 5, 9), image_size=(16, 256, 1024))
    profiles = {p.name: p for p in profile_spec(prepare_for_tensorrt(onnx.load(str(path))), ranges)}
    assert set(profiles) == set(INPUT_NAMES)
    # every input with a named dynamic axis is dynamic in the profile, with the configured range
    for name, axes in DYNAMIC_AXES.items():
        if name not in profiles:
            continue  # an output
        p = profiles[name]
        for axis, dim_name in axes.items():
            expected = ranges.batch if dim_name == "batch" else ranges.num_points
            assert (p.min[axis], p.opt[axis], p.max[axis]) == expected, (name, axis)
        assert p.dynamic
    assert profiles["image_embeddings"].min == (1, 64, 16, 16)
    assert profiles["image_embeddings"].max == (8, 64, 16, 16)
    assert profiles["point_coords"].max == (8, 9, 2)
    assert profiles["mask_input"].opt == (4, 1, 64, 64)
    shape_inputs = [p for p in profiles.values() if p.is_shape_input]
    assert [p.name for p in shape_inputs] == ["orig_im_size"]
    size = profiles["orig_im_size"]
    assert size.dtype == "int32"
    assert (size.min, size.max) == ((2,), (2,))
    assert (size.values_min, size.values_opt, size.values_max) == ((16, 16), (256, 256), (1024, 1024))
    assert all(p.dtype == "float32" for p in profiles.values() if not p.is_shape_input)
    assert profiles["orig_im_size"].to_dict()["values_max"] == [1024, 1024]
    # the engine record as export.tensorrt writes it gives the serving engine its batch limit
    record = {"engines": {"mask_decoder": {"profiles": [p.to_dict() for p in profiles.values()]}}}
    assert profile_max_batch(record, "mask_decoder") == 8


def test_profile_refuses_a_float_shape_input(decoder_onnx):
    path, _ = decoder_onnx
    with pytest.raises(ValueError, match="orig_im_size.*int32.*prepare_for_tensorrt"):
        profile_spec(onnx.load(str(path)))


def test_prepared_graph_takes_int32_sizes_and_computes_the_same(decoder_onnx):
    path, example = decoder_onnx
    original = onnx.load(str(path))
    prepared = prepare_for_tensorrt(original)
    size_input = next(i for i in prepared.graph.input if i.name == "orig_im_size")
    assert size_input.type.tensor_type.elem_type == onnx.TensorProto.INT32
    assert prepared.graph.node[0].op_type == "Cast"
    feeds = {k: v.numpy() for k, v in example.items()}
    feeds["orig_im_size"] = np.array([300.0, 400.0], dtype=np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    feeds["orig_im_size"] = np.array([300, 400], dtype=np.int32)
    got = ort.InferenceSession(prepared.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert got[0].shape == (2, 1, 300, 400)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    # idempotent: an int32 input is left alone
    assert len(prepare_for_tensorrt(prepared).graph.node) == len(prepared.graph.node)


class _Toy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x * 2.0)


def test_unknown_dynamic_dim_is_named_and_extra_ranges_cover_it(tmp_path):
    path = tmp_path / "toy.onnx"
    export_graph(_Toy(), {"image": torch.rand(2, 1, 8, 8)}, path, output_names=["p"],
                 dynamic_axes={"image": {0: "batch", 3: "columns"}, "p": {0: "batch"}})
    model = onnx.load(str(path))
    with pytest.raises(ValueError, match=r"'image' axis 3 is dynamic \('columns'\)"):
        profile_spec(model)
    (p,) = profile_spec(model, ProfileRanges(batch=(1, 2, 4), extra={"columns": (8, 16, 32)}))
    assert (p.min, p.opt, p.max) == ((1, 1, 8, 8), (2, 1, 8, 16), (4, 1, 8, 32))
    assert not p.is_shape_input


def test_gate_spatial_axes_use_the_spatial_range(tmp_path):
    path = tmp_path / "gate.onnx"
    spatial = {0: "batch", 2: "height", 3: "width"}
    export_graph(_Toy(), {"coarse": torch.rand(2, 1, 8, 8)}, path, output_names=["gate"],
                 dynamic_axes={"coarse": spatial, "gate": spatial})
    (p,) = profile_spec(onnx.load(str(path)), ProfileRanges(spatial=(32, 128, 512)))
    assert (p.min, p.opt, p.max) == ((1, 1, 32, 32), (8, 1, 128, 128), (16, 1, 512, 512))


def test_ranges_for_a_manifest_follow_its_pipeline():
    manifest = {"pipeline": {"transunet_size": 224, "refiner_size": 1024}}
    ranges = trt_export.ranges_for_manifest(manifest, batch=(1, 2, 4), num_points=(2, 4, 6), max_image_size=512)
    assert ranges.batch == (1, 2, 4) and ranges.num_points == (2, 4, 6)
    assert ranges.image_size == (1, 1024, 1024)  # never below the refiner frame
    assert ranges.spatial == (16, 224, 1024)
    assert trt_export.ranges_for_manifest({"pipeline": {"transunet_size": 128}}).image_size == (1, 128, 2048)


def test_profile_ranges_are_validated():
    with pytest.raises(ValueError, match="batch"):
        ProfileRanges(batch=(4, 2, 8))
    with pytest.raises(ValueError, match="num_points"):
        ProfileRanges(num_points=(0, 1, 2))


RECORD = {"gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}, "tensorrt_version": "10.3.0"}


def test_engine_compatibility():
    check_engine_compatible(RECORD, GpuInfo("NVIDIA H100 80GB HBM3", "9.0"), "10.3.0")
    check_engine_compatible(RECORD, {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}, "10.3.0")
    with pytest.raises(EngineCompatibilityError, match=r"TensorRT 10\.3\.0 at build, 10\.4\.1 here"):
        check_engine_compatible(RECORD, GpuInfo("NVIDIA H100 80GB HBM3", "9.0"), "10.4.1")
    with pytest.raises(EngineCompatibilityError, match=r"compute capability 9\.0 at build, 8\.6 here.*rebuild"):
        check_engine_compatible(RECORD, GpuInfo("NVIDIA A10", "8.6"), "10.3.0")
    with pytest.raises(EngineCompatibilityError, match="GPU 'NVIDIA H100 80GB HBM3' at build, 'NVIDIA H100 PCIe' here"):
        check_engine_compatible(RECORD, GpuInfo("NVIDIA H100 PCIe", "9.0"), "10.3.0")
    with pytest.raises(ValueError, match="tensorrt_version"):
        check_engine_compatible({"gpu": RECORD["gpu"]}, GpuInfo("x", "9.0"), "10.3.0")


def test_missing_tensorrt_is_one_clear_line_and_a_nonzero_exit(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(MissingDependencyError, match=r"TensorRT is not installed.*pip install 'medrefine\[gpu\]'"):
        tensorrt_runtime.import_tensorrt()
    code = main(["tensorrt", "--onnx", str(tmp_path), "--out", str(tmp_path / "trt")])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_MISSING_DEPENDENCY != 0
    assert len(err.splitlines()) == 1
    assert err.startswith("error: TensorRT is not installed") and "pip install 'medrefine[gpu]'" in err
    assert not (tmp_path / "trt").exists()


def test_missing_gpu_is_reported(monkeypatch):
    monkeypatch.setattr(tensorrt_runtime.shutil, "which", lambda _name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MissingDependencyError, match="no NVIDIA GPU found.*medrefine\\[gpu\\]"):
        tensorrt_runtime.query_gpu()


def test_build_engine_on_a_gpu(decoder_onnx, tmp_path):
    pytest.importorskip("tensorrt")
    try:
        gpu = tensorrt_runtime.query_gpu()
    except MissingDependencyError:
        pytest.skip("no NVIDIA GPU")
    import tensorrt

    path, _ = decoder_onnx
    cache = tmp_path / "timing.cache"
    profiles = trt_export.build_engine(path, tmp_path / "decoder.plan", ProfileRanges(), timing_cache=cache)
    assert (tmp_path / "decoder.plan").stat().st_size > 0 and cache.stat().st_size > 0
    assert any(p.is_shape_input for p in profiles)
    check_engine_compatible({"gpu": {"name": gpu.name, "compute_capability": gpu.compute_capability},
                             "tensorrt_version": tensorrt.__version__}, gpu, tensorrt.__version__)
