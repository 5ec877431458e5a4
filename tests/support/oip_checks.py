"""What the OIP transports' tests share: the pipeline's own answer for an image, the check that a transport's
``segment`` outputs carry exactly it, and a generate-shaped test model served beside ``segment``."""

from __future__ import annotations

import numpy as np

from inference.pipeline import SegmentationPipeline, SegmentOptions, SegmentResult
from service.oip_models import OipModel, TensorSpec

__all__ = ["CaptionModel", "assert_segment_outputs", "expected_segment"]


def expected_segment(pipeline: SegmentationPipeline, gray_uint8: np.ndarray,
                     threshold: float | None = None) -> SegmentResult:
    """The pipeline's answer for one ``(H, W) uint8`` image, as a transport should deliver it."""
    options = SegmentOptions(threshold=threshold) if threshold is not None else None
    (result,) = pipeline.segment([gray_uint8.astype(np.float32) / 255.0], options)
    return result


def assert_segment_outputs(outputs: dict[str, np.ndarray], expected: SegmentResult, shape: tuple[int, int]) -> None:
    """``segment``'s output tensors have their declared types and shapes and equal the pipeline's answer."""
    assert outputs["MASK"].dtype == np.uint8 and outputs["MASK"].shape == shape
    assert outputs["PROBABILITY"].dtype == np.float32 and outputs["PROBABILITY"].shape == shape
    assert outputs["BOX"].dtype == np.float32 and outputs["BOX"].shape == (4,)
    assert outputs["IOU"].dtype == np.float32 and outputs["IOU"].shape == (1,)
    assert set(np.unique(outputs["MASK"])) <= {0, 1}
    assert 0.0 <= outputs["PROBABILITY"].min() and outputs["PROBABILITY"].max() <= 1.0
    np.testing.assert_array_equal(outputs["MASK"], expected.mask)
    np.testing.assert_allclose(outputs["PROBABILITY"], expected.probability, atol=1e-6)
    np.testing.assert_allclose(outputs["BOX"], expected.box, atol=1e-5)
    np.testing.assert_allclose(outputs["IOU"][0], expected.iou, atol=1e-6)
    for name, value in (("NEEDS_REVIEW", expected.needs_review), ("LESION_FOUND", expected.lesion_found)):
        if name in outputs:  # the review flag and "no finding" travel as BOOL [1], as the pipeline decided them
            assert outputs[name].dtype == np.bool_ and outputs[name].shape == (1,)
            assert bool(outputs[name][0]) == value


class CaptionModel(OipModel):
    """A generate-shaped test model (BYTES in, image + BYTES out) served next to ``segment``."""

    name = "caption"
    platform = "test"
    inputs = (TensorSpec("PROMPT", "BYTES", ((1,),)), TensorSpec("MODALITY", "BYTES", ((1,),)))
    outputs = (TensorSpec("IMAGE", "UINT8", ((-1, -1),)), TensorSpec("CAPTION", "BYTES", ((1,),)))

    async def run(self, runtime, inputs, parameters, *, protocol):
        prompt, modality = bytes(inputs["PROMPT"][0]), bytes(inputs["MODALITY"][0])
        image = np.full((len(prompt), len(modality)), len(prompt), dtype=np.uint8)
        return {"IMAGE": image, "CAPTION": np.array([modality + b":" + prompt.upper()], dtype=object)}
