"""inference.pipeline: the exported UltraRefiner chain on ONNX Runtime equals the torch model.

One tiny random run is exported once per session (tests/support/artifact_factory.py); every number the pipeline
returns is compared with ``models.UltraRefiner`` on the same checkpoint.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.metrics import dice
from inference.pipeline import InputError, PromptError, SegmentationPipeline, SegmentOptions
from models.gate import Gate, GateConfig
from models.roi import crop_roi, full_image_roi, paste_roi, to_roi_frame
from tests.support.artifact_factory import phantom_images, session_tiny_artifacts
from weights.checkpoints import build_model_from_run

SIZES = [(64, 64), (100, 80), (57, 131)]  # square at the TransUNet size, portrait, wide


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return session_tiny_artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def pipeline(tiny) -> SegmentationPipeline:
    return SegmentationPipeline.from_artifacts(tiny.art_dir, "onnxruntime", intra_op_threads=1)


@pytest.fixture(scope="module")
def model(tiny):
    return build_model_from_run(tiny.run_dir)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return phantom_images(SIZES, seed=7)


def _torch_forward(model, image: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(torch.from_numpy(image)[None, None])
    return {k: v[0].numpy() for k, v in out.items()}



def test_segment_batch_of_mixed_sizes_equals_torch_forward(pipeline, model, images):
    results = pipeline.segment(images)
    assert len(results) == len(images)
    threshold = pipeline.threshold
    for image, result in zip(images, results, strict=True):
        ref = _torch_forward(model, image)
        assert result.mask.shape == image.shape and result.mask.dtype == np.uint8
        assert result.probability.shape == image.shape and result.probability.dtype == np.float32
        ref_mask = ref["refined_mask"][0] > threshold
        assert ref_mask.mean() > 0.02, "the tiny model must produce a non-trivial mask for this test to mean much"
        assert dice(result.mask != 0, ref_mask) >= 0.99
        np.testing.assert_allclose(result.probability, ref["refined_mask"][0], atol=1e-4)
        np.testing.assert_allclose(result.coarse_probability, ref["coarse_mask"][0], atol=1e-4)
        np.testing.assert_array_equal(result.coarse_mask, (result.coarse_probability > threshold).astype(np.uint8))
        np.testing.assert_array_equal(result.mask, (result.probability > threshold).astype(np.uint8))
        np.testing.assert_allclose(result.gate, ref["gate"][0], atol=1e-4)
        np.testing.assert_allclose(result.box, ref["box"], atol=1e-3)
        np.testing.assert_allclose(result.points, ref["points"], atol=1e-3)
        np.testing.assert_allclose(result.roi, ref["roi"], atol=1e-3)
        np.testing.assert_array_equal(result.point_labels, [1.0, 0.0])
        assert result.iou == pytest.approx(float(ref["iou"][0]), abs=1e-3)
        assert result.uncertainty == pytest.approx(float(ref["gate"].mean()), abs=1e-4)
        assert result.area_pixels == int(result.mask.sum()) and result.area_mm2 is None
        assert result.model_version == pipeline.version and result.threshold == threshold
    # one batch: the same per-stage timings on every result, every graph stage present
    assert results[0].timings == results[2].timings
    for stage in ("transunet", "image_encoder", "mask_decoder", "gate", "total"):
        assert results[0].timings[stage] >= 0.0


def test_batched_equals_one_by_one(pipeline, images):
    batched = pipeline.segment(images)
    for image, together in zip(images, batched, strict=True):
        (alone,) = pipeline.segment([image])
        np.testing.assert_allclose(alone.probability, together.probability, atol=1e-5)
        assert alone.iou == pytest.approx(together.iou, abs=1e-5)


def test_interleaved_sizes_keep_request_order(pipeline, images):
    # images of one size share one glue group; results come back in request order all the same
    batch = [images[0], images[1], images[0][::-1].copy(), images[2], images[1][:, ::-1].copy()]
    together = pipeline.segment(batch)
    for image, result in zip(batch, together, strict=True):
        (alone,) = pipeline.segment([image])
        assert result.probability.shape == image.shape
        np.testing.assert_allclose(result.probability, alone.probability, atol=1e-5)
        np.testing.assert_allclose(result.roi, alone.roi, atol=1e-4)
        assert result.iou == pytest.approx(alone.iou, abs=1e-5)


def test_threshold_and_uncertainty_gate_overrides_match_torch(pipeline, model, images):
    image = images[1]
    options = SegmentOptions(threshold=0.3, gate="uncertainty", gate_gamma=2.0, gate_max=0.6)
    (result,) = pipeline.segment([image], options, spacings=[(0.5, 0.25)])
    learned = model.gate
    try:
        model.gate = Gate(GateConfig(type="uncertainty", gate_gamma=2.0, gate_min=0.0, gate_max=0.6))
        ref = _torch_forward(model, image)
    finally:
        model.gate = learned
    np.testing.assert_allclose(result.probability, ref["refined_mask"][0], atol=1e-4)
    np.testing.assert_allclose(result.gate, ref["gate"][0], atol=1e-4)
    assert result.gate.max() <= 0.6 + 1e-6
    np.testing.assert_array_equal(result.mask, (result.probability > 0.3).astype(np.uint8))
    assert result.area_mm2 == pytest.approx(result.area_pixels * 0.125)

    (plain,) = pipeline.segment([image], SegmentOptions(gate="none"))
    np.testing.assert_allclose(plain.probability, ref["sam_mask"][0], atol=1e-4)  # refined = refiner output
    assert plain.uncertainty == pytest.approx(1.0)


def test_outputs_option_returns_only_the_requested_arrays(pipeline, images):
    (result,) = pipeline.segment([images[0]], SegmentOptions(outputs=("mask", "gate")))
    assert result.mask is not None and result.gate is not None
    assert result.probability is None and result.coarse_probability is None and result.coarse_mask is None
    # options are hashable (the batcher groups requests by them); a list of outputs is normalised
    assert hash(SegmentOptions(outputs=["mask"])) == hash(SegmentOptions(outputs=("mask",)))


def test_concurrent_calls_give_the_sequential_results(pipeline, images):
    from concurrent.futures import ThreadPoolExecutor

    box = [10.0, 10.0, 50.0, 60.0]
    expected_seg = [r.probability for r in pipeline.segment(images)]
    expected_ref = pipeline.refine(images[1], box=box).probability
    with ThreadPoolExecutor(max_workers=4) as pool:
        segs = [pool.submit(pipeline.segment, images) for _ in range(3)]
        refs = [pool.submit(pipeline.refine, images[1], box) for _ in range(3)]
        for future in segs:
            for got, want in zip(future.result(), expected_seg, strict=True):
                np.testing.assert_allclose(got.probability, want, atol=1e-6)
        for future in refs:
            np.testing.assert_allclose(future.result().probability, expected_ref, atol=1e-6)


def test_option_and_image_errors_name_the_field(pipeline, images):
    cases = [
        (lambda: SegmentOptions(threshold=1.5), "threshold"),
        (lambda: SegmentOptions(gate="sometimes"), "gate"),
        (lambda: SegmentOptions(gate_min=-0.1), "gate_min"),
        (lambda: SegmentOptions(outputs=("mask", "logits")), "outputs"),
        (lambda: SegmentOptions.from_dict({"thresh": 0.5}), "thresh"),
        # the model's gate is "learned": another learned type or parameter overrides are refused
        (lambda: pipeline.segment([images[0]], SegmentOptions(gate="hybrid")), "gate"),
        (lambda: pipeline.segment([images[0]], SegmentOptions(gate_gamma=2.0)), "gate_gamma"),
        (lambda: pipeline.segment([images[0]], SegmentOptions(gate="uncertainty", gate_min=0.9, gate_max=0.5)), "gate"),
        (lambda: pipeline.segment([np.zeros((4, 4, 3), np.float32)]), "image"),
        (lambda: pipeline.segment([np.zeros((8, 8), np.uint8)]), "image"),
        (lambda: pipeline.segment([np.full((8, 8), 2.0, np.float32)]), "image"),
        (lambda: pipeline.segment([np.full((8, 8), np.nan, np.float32)]), "image"),
        (lambda: pipeline.segment([images[0]], spacings=[None, None]), "spacings"),
    ]
    for call, field in cases:
        with pytest.raises(InputError) as info:
            call()
        assert isinstance(info.value, ValueError)
        assert info.value.field == field, (info.value, field)
    assert pipeline.segment([]) == []


def _ellipse_logits(box, image_hw, roi, side):
    """The mask prompt a box gets: its inscribed ellipse cropped to ``roi``, as SAM logits (2p - 1) * 10."""
    x0, y0, x1, y1 = box
    ys, xs = np.mgrid[: image_hw[0], : image_hw[1]]
    inside = ((xs - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2 + ((ys - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2 <= 1
    return (2.0 * crop_roi(torch.from_numpy(inside.astype(np.float32))[None, None], roi, side) - 1.0) * 10.0


def _torch_refine(model, image, roi, box=None, points=None, labels=None):
    """The refine path written directly with the torch refiner in the window ``roi`` ((1, 4) xyxy): a box also
    brings its ellipse as the mask prompt; points + box = 3 tokens, SAM's single-mask output."""
    sam, s = model.refiner, model.refiner_size
    h, w = image.shape
    tensor = torch.from_numpy(image)[None, None]
    with torch.no_grad():
        emb = sam.encode(sam.preprocess(crop_roi(tensor, roi, s).expand(-1, 3, -1, -1) * 255.0))
        pts = to_roi_frame(torch.tensor(points, dtype=torch.float32)[None], roi, s) if points is not None else None
        lbl = torch.tensor(labels, dtype=torch.float32)[None] if labels is not None else None
        bx = to_roi_frame(torch.tensor(box, dtype=torch.float32)[None], roi, s) if box is not None else None
        mask_input = _ellipse_logits(box, (h, w), roi, s // 4) if box is not None else None
        low, iou = sam.decode(emb, pts, lbl, bx, mask_input, False)
        prob = paste_roi(torch.sigmoid(F.interpolate(low[:, :1], (s, s), mode="bilinear", align_corners=False)), roi,
                         (h, w))
    return prob[0, 0].numpy(), float(iou[0, 0])


def _torch_refine_tokens(model, image, roi, box=None, points=None, labels=None):
    """Fewer than 3 tokens through the training path (models.interactive): padded, single mask, a box's ellipse as
    the mask prompt."""
    from models.interactive import decode_tokens, pack_tokens

    sam, s = model.refiner, model.refiner_size
    h, w = image.shape
    with torch.no_grad():
        emb = sam.encode(sam.preprocess(crop_roi(torch.from_numpy(image)[None, None], roi, s).expand(-1, 3, -1, -1)
                                        * 255.0))
        pts = to_roi_frame(torch.tensor(points, dtype=torch.float32)[None], roi, s) if points is not None else None
        lbl = torch.tensor(labels, dtype=torch.float32)[None] if labels is not None else None
        bx = to_roi_frame(torch.tensor(box)[None], roi, s) if box is not None else None
        coords, codes = pack_tokens(pts, lbl, bx, batch=1)
        if box is None:
            low, iou = decode_tokens(sam, emb, coords, codes)
        else:
            low, iou = decode_tokens(sam, emb, coords, codes, _ellipse_logits(box, (h, w), roi, s // 4), torch.ones(1))
        prob = paste_roi(torch.sigmoid(F.interpolate(low, (s, s), mode="bilinear", align_corners=False)), roi, (h, w))
    return prob[0, 0].numpy(), float(iou[0, 0])


def test_refine_with_a_box_encodes_a_snapped_window_and_caches_it(tiny, model, images):
    pipeline = SegmentationPipeline.from_artifacts(tiny.art_dir, intra_op_threads=1)
    image = images[2]  # 57 x 131: the window is taller than the image and zero padded above and below
    box, points, labels = [20.0, 5.0, 90.0, 50.0], [[50.0, 30.0]], [1]
    # The ROI /segment cuts around such a box (tiny model: side 71 * (1 + 2 * 0.2) = 99.4), its side snapped up
    # to 104 (a multiple of 8), its centre x 55.5 to 56 (a multiple of 4); y is centred on the short image.
    window = torch.tensor([[4.0, -23.5, 108.0, 80.5]])

    first = pipeline.refine(image, box=box, points=points, point_labels=labels)
    assert first.cache_hit is False and "image_encoder" in first.timings
    ref_prob, ref_iou = _torch_refine(model, image, window, box, points, labels)
    assert first.probability.shape == image.shape and first.mask.dtype == np.uint8
    np.testing.assert_allclose(first.probability, ref_prob, atol=1e-4)
    assert first.iou == pytest.approx(ref_iou, abs=1e-3)
    np.testing.assert_array_equal(first.mask, (first.probability > pipeline.threshold).astype(np.uint8))
    outside = np.ones(image.shape, bool)
    outside[:, 4:108] = False
    assert first.probability[outside].max() == 0.0  # nothing is pasted outside the window

    # the same box with other clicks, and a box nudged by a pixel, snap to the same window: decoder only
    second = pipeline.refine(image, box=[21.0, 5.0, 90.0, 50.0], points=[[60.0, 20.0]], point_labels=[0])
    assert second.cache_hit is True and "image_encoder" not in second.timings and "mask_decoder" in second.timings
    stats = pipeline.cache_stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1) and stats.bytes > 0
    # a cached embedding gives the same numbers as a fresh encoder pass
    uncached = SegmentationPipeline(pipeline.engine, pipeline.artifacts, embedding_cache_bytes=0)
    again = uncached.refine(image, box=[21.0, 5.0, 90.0, 50.0], points=[[60.0, 20.0]], point_labels=[0])
    assert again.cache_hit is False
    np.testing.assert_allclose(second.probability, again.probability, atol=1e-6)

    # a box alone = 2 tokens, padded to 3 (models.interactive.pack_tokens): the single-mask output the refiner
    # is trained on (training.interactive), never SAM's untrained multimask outputs
    box_only = pipeline.refine(image, box=box)
    ref_prob, ref_iou = _torch_refine_tokens(model, image, window, box)
    np.testing.assert_allclose(box_only.probability, ref_prob, atol=1e-4)
    assert box_only.iou == pytest.approx(ref_iou, abs=1e-3)
    assert box_only.cache_hit is True

    # a box elsewhere is another window (a miss); clicks alone keep the whole-image framing, their own entry
    assert pipeline.refine(image, box=[80.0, 5.0, 130.0, 50.0]).cache_hit is False
    clicks = pipeline.refine(image, points=points, point_labels=labels)
    assert clicks.cache_hit is False
    ref_prob, _ = _torch_refine_tokens(model, image, full_image_roi(1, image.shape), None, points, labels)
    np.testing.assert_allclose(clicks.probability, ref_prob, atol=1e-4)
    assert pipeline.refine(image, points=[[10.0, 10.0]], point_labels=[0]).cache_hit is True

    # the caller's image key is the cache key; another image misses
    keyed = pipeline.refine(images[0], box=[5.0, 5.0, 40.0, 40.0], image_key="sha256:abc", spacing=(2.0, 2.0))
    assert keyed.cache_hit is False and keyed.image_key == "sha256:abc"
    assert keyed.area_mm2 == pytest.approx(4.0 * keyed.area_pixels)
    assert pipeline.refine(images[0], box=[6.0, 5.0, 40.0, 40.0], image_key="sha256:abc").cache_hit is True
    assert pipeline.refine(images[0], prior_mask=(images[0] > 0.5).astype(np.float32)).cache_hit is False


def test_refine_prompt_validation(pipeline, images):
    image = images[1]  # 100 x 80 (H x W)
    h, w = image.shape
    cases = [
        ({}, "box", "at least one prompt"),
        ({"box": [10, 10, 5, 40]}, "box", "x0 < x1"),
        ({"box": [10, 10, 40, 10]}, "box", "y0 < y1"),
        ({"box": [10, 10, w + 5, 40]}, "box", "outside the image"),
        ({"box": [1, 2, 3]}, "box", "4 finite numbers"),
        ({"points": [[5, 5]]}, "points", "together"),
        ({"points": [[5, 5]], "point_labels": [1, 0]}, "point_labels", "one label per point"),
        ({"points": [[5, 5]], "point_labels": [2]}, "point_labels", "foreground"),
        ({"points": [[-1, 5]], "point_labels": [1]}, "points", "outside the image"),
        ({"points": [[5, h + 1]], "point_labels": [1]}, "points", "outside the image"),
        ({"points": [[1, 1]] * 17, "point_labels": [1] * 17}, "points", "too many points"),
        ({"prior_mask": np.zeros((h, w), np.float32)}, "prior_mask", "all zero"),
        ({"prior_mask": np.ones((h, w), np.float32)}, "prior_mask", "all one"),
        ({"prior_mask": np.ones((10, 10), np.float32)}, "prior_mask", "does not match"),
    ]
    for kwargs, field, words in cases:
        with pytest.raises(PromptError, match=words) as info:
            pipeline.refine(image, **kwargs)
        assert isinstance(info.value, ValueError) and info.value.field == field
    # the image's full extent is a valid box
    assert pipeline.refine(image, box=[0, 0, w, h]).mask.shape == (h, w)
    with pytest.raises(InputError, match="threshold"):
        pipeline.refine(image, box=[0, 0, w, h], threshold=0.0)


def test_model_info_and_warmup(pipeline):
    info = pipeline.model_info()
    assert info["version"] == pipeline.artifacts.version and len(info["version"]) == 64
    assert info["backend"] == "onnxruntime" and info["engine"]["providers"] == ["CPUExecutionProvider"]
    assert info["threshold"] == pytest.approx(0.5)
    assert info["graphs"] == ["gate", "image_encoder", "mask_decoder", "transunet"]
    before = pipeline.cache_stats()
    timings = pipeline.warmup()
    assert timings["total"] > 0.0 and pipeline.cache_stats() == before
