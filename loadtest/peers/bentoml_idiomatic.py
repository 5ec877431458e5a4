"""BentoML the way its documentation shows: a batchable model Service behind a thin API Service (REST only).

    MEDREFINE_PEER_ARTIFACTS=artifacts/default \\
        bentoml serve loadtest.peers.bentoml_idiomatic:Segmenter --host 127.0.0.1 --port 3200

``Segmenter.segment`` takes the upload (multipart field ``file``, decoded by BentoML into a PIL image),
resizes it to the model's input (S x S, S = the refiner's side from the manifest: BentoML's adaptive
batching concatenates inputs along dimension 0, so every item must have one shape) and awaits
``SegmentModel.segment_batch`` through ``bentoml.depends``. That method is
``@bentoml.api(batchable=True)``: BentoML's dispatcher, in the model Service's own process, gathers
concurrent calls into one ``(B, S, S)`` batch of up to ``max_batch_size``. The mask comes back
``(S, S)``, is resized (nearest) to the upload's size and answered as a PNG in JSON, as the naive
server answers. BentoML 1.4 serves no gRPC for new-style services, so this peer is REST only.

Settings come from the environment at import (BentoML's decorators read them then):
``MEDREFINE_PEER_ARTIFACTS`` (required), ``MEDREFINE_PEER_THREADS`` (ONNX Runtime and torch threads,
default 1), ``MEDREFINE_PEER_MAX_BATCH_SIZE`` (default 16). ``max_latency_ms`` is BentoML's default.
"""

from __future__ import annotations

import base64
import io
import os

import bentoml
import numpy as np
from PIL import Image

ARTIFACTS_ENV = "MEDREFINE_PEER_ARTIFACTS"
THREADS = int(os.environ.get("MEDREFINE_PEER_THREADS", "1"))
MAX_BATCH_SIZE = int(os.environ.get("MEDREFINE_PEER_MAX_BATCH_SIZE", "16"))


def _artifacts() -> str:
    path = os.environ.get(ARTIFACTS_ENV)
    if not path:
        raise RuntimeError(f"{ARTIFACTS_ENV} must name the artifact directory to serve")
    return path


@bentoml.service(workers=1)
class SegmentModel:
    """The pipeline over the exported graphs, batched by BentoML."""

    def __init__(self) -> None:
        from loadtest.peers.common import load_pipeline

        self.pipeline = load_pipeline(_artifacts(), threads=THREADS)

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=MAX_BATCH_SIZE)
    def segment_batch(self, images: np.ndarray) -> np.ndarray:
        """``(B, S, S) float32 in [0, 1]`` -> ``(B, S, S) uint8 {0, 1}`` masks."""
        from loadtest.peers.common import segment_masks

        return np.stack(segment_masks(self.pipeline, list(images)))


@bentoml.service(workers=1)
class Segmenter:
    """``POST /segment``: an image upload in, its mask out."""

    model = bentoml.depends(SegmentModel)

    def __init__(self) -> None:
        from loadtest.peers.common import model_side

        self.side = model_side(_artifacts())

    @bentoml.api
    async def segment(self, file: Image.Image) -> dict:
        """``file`` (PNG/JPEG/TIFF upload) -> ``{"mask_png_base64", "height", "width", "foreground_fraction"}``."""
        from loadtest.peers.common import to_unit

        gray = file.convert("L")
        width, height = gray.size
        resized = gray if gray.size == (self.side, self.side) else gray.resize((self.side, self.side),
                                                                               Image.Resampling.BILINEAR)
        batch = to_unit(np.asarray(resized, dtype=np.uint8))[None]
        mask = (await self.model.to_async.segment_batch(batch))[0]
        out = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
        if out.size != (width, height):
            out = out.resize((width, height), Image.Resampling.NEAREST)
        buffer = io.BytesIO()
        out.save(buffer, format="PNG")
        return {"mask_png_base64": base64.b64encode(buffer.getvalue()).decode("ascii"), "height": height,
                "width": width, "foreground_fraction": float(np.asarray(out).mean() / 255.0)}
