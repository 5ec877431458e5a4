"""BentoML the way its documentation shows: a batchable model Service behind a thin API Service (REST only)."""

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
