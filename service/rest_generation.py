"""The REST generation endpoints' work, free of BentoML: check the arguments, call the generation runtime,
encode the JSON answer (images as base64 PNGs).
(Details: docs/architecture.md, "service".)
"""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.imageio import decode_mask, encode_png
from service.errors import NotFound, ServiceError
from service.protocols import FrontEndRuntime
from service.rest import _ms, _read_upload

if TYPE_CHECKING:
    from service.generation import GenerationRuntime

__all__ = ["generate", "synthesize"]

# The generation runtime checks lists (one entry per prompt) and best-of "candidates"; a REST request sends
# one value of each, and its errors must name the request's own fields.
_REST_FIELDS = {"prompts": "prompt", "modalities": "modality", "negative_prompts": "negative_prompt",
                "candidates": "best_of"}


def _generation(runtime: FrontEndRuntime) -> GenerationRuntime:
    generation = runtime.generation
    if generation is None:
        raise NotFound("generation is not enabled on this server: start it with generator artifacts "
                       "(python -m export generators; MEDREFINE_GENERATORS)")
    return generation


def _model(generation: GenerationRuntime) -> dict[str, str]:
    return {"version": generation.version, "backend": "onnxruntime"}


def _synthesizer(generation: GenerationRuntime) -> dict[str, Any]:
    """The generator /synthesize served: its artifact ``version``, ``trained_by`` (``genseg`` or ``pix2pix``),
    ``registry`` (``name:version`` or None) and ``consistency_dice``."""
    from inference.synthesizer import served_synthesizer

    return {**served_synthesizer(generation.generators), "backend": "onnxruntime"}


def _png_b64(image: np.ndarray) -> str:
    return base64.b64encode(encode_png(image)).decode("ascii")


async def generate(
    runtime: FrontEndRuntime,
    *,
    prompt: str,
    modality: str,
    negative_prompt: str | None = None,
    guidance_scale: float = 1.5,
    steps: int = 25,
    seed: int | None = None,
    num_images: int = 1,
    best_of: int | None = None,
    rank_by: str | None = None,
) -> dict[str, Any]:
    """``POST /generate``: one prompt -> ``num_images`` images (or the best of ``best_of``, ranked by
    ``rank_by``: ``"selector"`` or ``"reward"``).

    Raises:
        ServiceError: 400 naming the argument at fault, 404 without generators, 503, 504.
    """
    started = time.perf_counter()
    generation = _generation(runtime)
    try:
        result = await generation.generate(
            [prompt], [modality], negative_prompts=None if negative_prompt is None else [negative_prompt],
            guidance_scale=guidance_scale, steps=steps, seed=seed, num_images=num_images, best_of=best_of,
            rank_by=rank_by,
        )
    except ServiceError as exc:
        raise exc.rename_field(_REST_FIELDS, drop="entry 0 ") from None
    encode_started = time.perf_counter()
    images = await asyncio.to_thread(lambda: [_png_b64(image) for image in result.images])
    height, width = (int(d) for d in result.images.shape[1:])
    return {
        "images_png_base64": images,
        "seed": result.seed,
        "width": width,
        "height": height,
        "prompt": prompt,
        "modality": modality,
        "scores": None if result.scores is None else [float(s) for s in result.scores],
        "ranked_by": result.ranked_by,
        "model": _model(generation),
        "timings_ms": {"generate": _ms(result.seconds), "encode": _ms(time.perf_counter() - encode_started),
                       "total": _ms(time.perf_counter() - started)},
    }


async def synthesize(runtime: FrontEndRuntime, file: Path) -> dict[str, Any]:
    """``POST /synthesize``: a mask upload -> a generated image of the same size.

    Raises:
        ServiceError: 400 (not a readable 2-D mask), 413, 415, 404 without generators, 503, 504.
    """
    started = time.perf_counter()
    generation = _generation(runtime)
    generation.check_capacity()
    data = await _read_upload(file, runtime, "file")
    # an undecodable mask raises ImageDecodeError naming "file": answered 400/413/415 by its type
    mask = await asyncio.to_thread(decode_mask, data, name="upload", max_pixels=runtime.settings.max_pixels)
    decode_s = time.perf_counter() - started
    result = await generation.synthesize(mask)
    encode_started = time.perf_counter()
    image = await asyncio.to_thread(_png_b64, result.image)
    return {
        "image_png_base64": image,
        "shape": [int(d) for d in result.image.shape],
        "model": _synthesizer(generation),
        "timings_ms": {"decode": _ms(decode_s), "synthesize": _ms(result.seconds),
                       "encode": _ms(time.perf_counter() - encode_started),
                       "total": _ms(time.perf_counter() - started)},
    }
