"""``segment``'s mirrored TransUNet pass rides in the originals' engine call when the engine's batch allows it,
with the answers of two calls; a TensorRT profile's maximum batch caps it.
"""

from __future__ import annotations

import numpy as np
import pytest

from core.metrics import dice
from core.phantoms import breast_ultrasound, sample_seed
from inference.engines import Engine, WrappedEngine, build_engine
from inference.pipeline import MIRROR_MERGE_MAX_BATCH, SegmentationPipeline, SegmentOptions
from inference.tensorrt_runtime import profile_max_batch
from tests.support.artifact_factory import phantom_images, session_tiny_artifacts

SEED = 9300  # held-out lesion phantoms (tests/inference/test_segment_rules.py: neither trained nor calibrated on)
N_CASES = 40
MIN_SERVED_DICE = 0.895  # the served rules' bound on these cases (measured 0.902)


class _RecordingEngine(WrappedEngine):
    """An engine under another backend name (and batch limit) that records the batch of every TransUNet call."""

    def __init__(self, inner: Engine, backend: str, max_batch: int | None = None) -> None:
        super().__init__(inner, backend)
        self.transunet_batches: list[int] = []
        self._max_batch = max_batch

    def max_batch(self, graph_name: str) -> int | None:
        return self._max_batch

    def _run(self, graph_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if graph_name == "transunet":
            self.transunet_batches.append(len(inputs["image"]))
        return self.inner.run(graph_name, inputs)


@pytest.fixture(scope="module")
def default_artifacts(tmp_path_factory):
    pair = session_tiny_artifacts(tmp_path_factory, use_default_checkpoint=True)
    if not pair.from_default_checkpoint:
        pytest.fail("these checks need the committed default model (checkpoints/default)")
    return SegmentationPipeline.from_artifacts(pair.art_dir, "onnxruntime", intra_op_threads=1).artifacts


def _segment(pipeline: SegmentationPipeline, images: list[np.ndarray], batch: int) -> list:
    options = SegmentOptions(outputs=("mask", "probability"))
    return [r for k in range(0, len(images), batch) for r in pipeline.segment(images[k : k + batch], options)]


def test_mirrored_pass_in_one_call_answers_as_two_calls_on_held_out_phantoms(default_artifacts):
    cases = [breast_ultrasound(sample_seed(SEED, i), 256) for i in range(N_CASES)]
    images = [image.astype(np.float32) / 255.0 for image, _ in cases]
    engine = _RecordingEngine(build_engine("onnxruntime", default_artifacts, intra_op_threads=1), "onnxruntime")
    merged = SegmentationPipeline(engine, default_artifacts)
    separate = SegmentationPipeline(engine, default_artifacts)
    separate.mirror_merge_batch = 0  # every pass its own call: the computation before the merge
    assert merged.segment_rules["coarse_flip"] and merged.mirror_merge_batch == MIRROR_MERGE_MAX_BATCH
    for batch, calls in ((1, [2] * N_CASES), (8, [16] * (N_CASES // 8)), (20, [20, 20, 20, 20])):
        engine.transunet_batches.clear()
        reference = _segment(separate, images, batch)  # the refiner sees the same batches in both
        assert engine.transunet_batches == [min(batch, N_CASES)] * (2 * N_CASES // batch)
        engine.transunet_batches.clear()
        served = _segment(merged, images, batch)
        assert engine.transunet_batches == calls, batch  # 2B <= 16 in one call; beyond, a call per pass
        for i, (alone, together) in enumerate(zip(reference, served, strict=True)):
            # identical on the 2-core Xeon where this was written; ONNX Runtime may pick batch-dependent
            # kernels elsewhere, hence float noise on the probability and a Dice bound on the mask
            np.testing.assert_allclose(together.probability, alone.probability, atol=1e-5, err_msg=f"case {i}")
            assert dice(together.mask > 0, alone.mask > 0) >= 0.999, f"case {i}"
        served_dice = np.mean([dice(r.mask > 0, truth) for r, (_, truth) in zip(served, cases, strict=True)])
        assert served_dice >= MIN_SERVED_DICE, f"batch {batch}: held-out Dice {served_dice:.4f}"


def test_a_tensorrt_profile_maximum_caps_the_merged_batch(tmp_path_factory):
    tiny = session_tiny_artifacts(tmp_path_factory)
    base = SegmentationPipeline.from_artifacts(tiny.art_dir, "onnxruntime", intra_op_threads=1)

    def record(most: int) -> dict:  # ART_DIR/trt/manifest.json as export.tensorrt writes it
        return {"engines": {"transunet": {"profiles": [
            {"name": "image", "min": [1, 1, 64, 64], "opt": [4, 1, 64, 64], "max": [most, 1, 64, 64],
             "is_shape_input": False},
            {"name": "orig_im_size", "min": [2], "opt": [2], "max": [2], "is_shape_input": True},
        ]}}}

    engines = {most: _RecordingEngine(base.engine, "tensorrt", profile_max_batch(record(most), "transunet"))
               for most in (6, 2)}
    capped = SegmentationPipeline(engines[6], base.artifacts)
    small = SegmentationPipeline(engines[2], base.artifacts)
    assert capped.mirror_merge_batch == 6 and small.mirror_merge_batch == 2
    images = phantom_images([(64, 64)] * 4, seed=3)
    expected = base.segment(images[:3])
    for pipeline, batch, calls in ((capped, 3, [6]), (capped, 4, [4, 4]), (small, 3, [3, 3])):
        pipeline.segment_rules = {**pipeline.segment_rules, "coarse_flip": True}
        engine = pipeline.engine
        engine.transunet_batches.clear()
        results = pipeline.segment(images[:batch])
        assert engine.transunet_batches == calls
        if batch == 3 and base.segment_rules["coarse_flip"]:
            for got, want in zip(results, expected, strict=True):
                np.testing.assert_allclose(got.probability, want.probability, atol=1e-5)
