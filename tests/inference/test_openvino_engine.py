"""inference.engines.OpenVINOEngine: held-out Dice against ONNX Runtime fp32, fp32 graph parity, the precision
it reports against what OpenVINO compiled, threads, and its errors."""

from __future__ import annotations

import sys
import threading

import numpy as np
import openvino as ov
import pytest

from core.phantoms import breast_ultrasound, sample_seed
from export.parity import dice
from inference.artifacts import load_artifacts
from inference.engines import (
    ENGINE_REGISTRY,
    OPENVINO_MISSING,
    OnnxRuntimeEngine,
    OpenVINOEngine,
    build_engine,
)
from inference.pipeline import SegmentationPipeline, SegmentOptions
from inference.tensorrt_runtime import MissingDependencyError
from loadtest.optimize import HELDOUT_SEED
from tests.support.artifact_factory import session_tiny_artifacts

HELDOUT_IMAGES = 10
MAX_DICE_DELTA = 0.005  # issue #19: held-out Dice within 0.005 of fp32
MIN_MASK_AGREEMENT = 0.98  # mean Dice of each mask against the ONNX Runtime fp32 mask
FP32_BOUND = 1e-3  # OpenVINO fp32 against ONNX Runtime fp32, any output element (measured <= 2e-5)


@pytest.fixture(scope="module")
def default_art_dir(tmp_path_factory):
    pair = session_tiny_artifacts(tmp_path_factory, use_default_checkpoint=True)
    if not pair.from_default_checkpoint:
        pytest.fail("these checks need the committed default model (checkpoints/default)")
    return pair.art_dir


@pytest.fixture(scope="module")
def artifacts(default_art_dir):
    return load_artifacts(default_art_dir)


@pytest.fixture(scope="module")
def heldout():
    """(images (256, 256) float32 in [0, 1], truth masks bool) of lesion phantoms no training run has seen."""
    pairs = [breast_ultrasound(sample_seed(HELDOUT_SEED, i), 256) for i in range(HELDOUT_IMAGES)]
    return [p[0].astype(np.float32) / 255.0 for p in pairs], [p[1] > 0 for p in pairs]


def _masks(pipeline: SegmentationPipeline, images: list[np.ndarray]) -> list[np.ndarray]:
    return [r.mask > 0 for r in pipeline.segment(images, SegmentOptions(outputs=("mask",)))]


def _compiled_precision(artifacts, graph: str, hint: str) -> str:
    """What OpenVINO itself says a graph compiled with ``hint`` runs at on this CPU ("fp32" or "bf16")."""
    compiled = ov.Core().compile_model(str(artifacts.graph(graph).path), "CPU", {"INFERENCE_PRECISION_HINT": hint})
    return {"f32": "fp32", "bf16": "bf16"}[compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_heldout_dice_matches_onnxruntime_fp32(default_art_dir, heldout, precision):
    images, truth = heldout
    reference = SegmentationPipeline.from_artifacts(default_art_dir, "onnxruntime", intra_op_threads=1,
                                                    embedding_cache_bytes=0)
    pipeline = SegmentationPipeline.from_artifacts(default_art_dir, "openvino", intra_op_threads=1,
                                                   embedding_cache_bytes=0, precision=precision)
    want, got = _masks(reference, images), _masks(pipeline, images)
    fp32_dice = np.mean([dice(m, t) for m, t in zip(want, truth, strict=True)])
    ov_dice = np.mean([dice(m, t) for m, t in zip(got, truth, strict=True)])
    assert fp32_dice > 0.8  # the model finds the lesions: the comparison means something
    assert abs(ov_dice - fp32_dice) <= MAX_DICE_DELTA, (ov_dice, fp32_dice)
    assert np.mean([dice(g, w) for g, w in zip(got, want, strict=True)]) >= MIN_MASK_AGREEMENT


def test_describe_reports_the_precision_openvino_compiled(artifacts):
    engine = OpenVINOEngine(artifacts, intra_op_threads=1)  # default: bf16, the decoder on ONNX Runtime
    described = engine.describe()
    assert described["backend"] == "openvino" and described["intra_op_threads"] == 1
    assert described["precision"] == {
        "transunet": _compiled_precision(artifacts, "transunet", "bf16"),
        "image_encoder": _compiled_precision(artifacts, "image_encoder", "bf16"),
        "mask_decoder": "fp32",
    }
    assert described["runtime"]["mask_decoder"] == "onnxruntime"
    fp32 = OpenVINOEngine(artifacts, precision="fp32", intra_op_threads=1, onnxruntime_graphs=())
    assert fp32.describe()["precision"] == {name: "fp32" for name in artifacts.graphs}
    assert set(fp32.describe()["runtime"].values()) == {"openvino"}
    mixed = OpenVINOEngine(artifacts, precision={"image_encoder": "bf16"}, intra_op_threads=1)
    assert mixed.describe()["precision"]["transunet"] == "fp32"
    assert mixed.describe()["precision"]["image_encoder"] == _compiled_precision(artifacts, "image_encoder", "bf16")


def _graph_inputs(artifacts, batch: int, size: tuple[float, float]) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(batch)
    images = [breast_ultrasound(sample_seed(HELDOUT_SEED, i), 256)[0] for i in range(batch)]
    refiner = np.stack([np.repeat(im[None].astype(np.float32), 3, axis=0) for im in images])  # (B, 3, 256, 256)
    small = refiner[:, :1, ::2, ::2] / 255.0  # (B, 1, 128, 128) in [0, 1]
    return {
        "transunet": {"image": np.ascontiguousarray(small)},
        "image_encoder": {"image": refiner},
        "mask_decoder": {
            "image_embeddings": rng.standard_normal((batch, 64, 16, 16), np.float32),
            "point_coords": rng.random((batch, 3, 2), np.float32) * 256,
            "point_labels": np.tile(np.array([[1, 0, 2]], np.float32), (batch, 1)),
            "mask_input": rng.standard_normal((batch, 1, 64, 64), np.float32),
            "has_mask_input": np.ones((batch,), np.float32),
            "orig_im_size": np.array(size, np.float32),
        },
    }


def test_fp32_graphs_match_onnxruntime_at_any_batch_and_mask_size(artifacts):
    reference = OnnxRuntimeEngine(artifacts, intra_op_threads=1)
    # batches 1, 3 (padded to 4) on static-shape models, 6 beyond the largest bucket on the dynamic model
    engine = OpenVINOEngine(artifacts, precision="fp32", intra_op_threads=1, onnxruntime_graphs=(),
                            batch_buckets=(1, 4))
    assert engine.preferred_batch_sizes() == (1, 4) and reference.preferred_batch_sizes() == ()
    for batch, size in ((1, (256.0, 256.0)), (3, (50.0, 70.0)), (6, (97.0, 31.0))):
        for graph, feed in _graph_inputs(artifacts, batch, size).items():
            want, got = reference.run(graph, feed), engine.run(graph, feed)
            assert set(got) == set(want)
            for name in want:
                assert got[name].dtype == np.float32 and got[name].shape == want[name].shape, (graph, name)
                assert np.max(np.abs(got[name] - want[name])) <= FP32_BOUND, (graph, name, batch)
        assert got["masks"].shape == (batch, 1, int(size[0]), int(size[1]))  # sized by orig_im_size's values


def test_threads_share_an_engine(artifacts):
    engine = OpenVINOEngine(artifacts, intra_op_threads=1)
    feeds = [_graph_inputs(artifacts, batch, (64.0, 64.0))["transunet"] for batch in (1, 2, 1, 3, 2, 1)]
    alone = [engine.run("transunet", feed)["probability"] for feed in feeds]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for _ in range(3):
                results[index] = engine.run("transunet", feeds[index])["probability"]
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(feeds))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    for index, want in enumerate(alone):
        np.testing.assert_array_equal(results[index], want)


def test_unknown_precision_is_a_value_error_naming_it(artifacts):
    with pytest.raises(ValueError, match=r"\[4, 2\]"):
        OpenVINOEngine(artifacts, batch_buckets=(4, 2))
    with pytest.raises(ValueError, match="'int4'"):
        OpenVINOEngine(artifacts, precision="int4")
    with pytest.raises(ValueError, match="fp16"):
        OpenVINOEngine(artifacts, precision={"transunet": "fp16"})


def test_registered_and_missing_openvino_names_the_extra(artifacts, monkeypatch):
    assert ENGINE_REGISTRY["openvino"] is OpenVINOEngine
    assert isinstance(build_engine("openvino", artifacts, intra_op_threads=1), OpenVINOEngine)
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with pytest.raises(MissingDependencyError) as info:
        OpenVINOEngine(artifacts)
    assert str(info.value) == OPENVINO_MISSING and "medrefine[openvino]" in OPENVINO_MISSING
