"""The REST endpoints' work, free of BentoML: decode an upload, call the runtime, encode the JSON answer.
(Details: docs/architecture.md, "service".)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import InputError
from core.imageio import DecodedImage, decode_image, decode_mask, encode_mask_png, encode_png, to_uint8
from service.decode_pool import shared_decode_pool
from service.errors import BadRequest, ServiceError, as_service_error, client_error
from service.model_versions import precision_report
from service.protocols import FrontEndRuntime

if TYPE_CHECKING:
    from service.model_versions import LoadedVersion

__all__ = [
    "DEFAULT_REFINE_OUTPUTS",
    "DEFAULT_SEGMENT_OUTPUTS",
    "REST_OUTPUTS",
    "error_response",
    "parse_outputs",
    "refine",
    "segment",
    "single_upload",
]

logger = logging.getLogger(__name__)

REST_OUTPUTS = ("image", "mask", "coarse_mask", "probability", "coarse_probability", "gate")
DEFAULT_SEGMENT_OUTPUTS = ("mask", "coarse_mask")
DEFAULT_REFINE_OUTPUTS = ("mask",)
_MASKS = ("mask", "coarse_mask")
_MAPS = ("probability", "coarse_probability", "gate")


def error_response(exc: BaseException) -> Any:
    """A Starlette JSON response for ``exc``: its ``ServiceError`` form by type, or a generic 500 (logged)."""
    from starlette.responses import JSONResponse

    error = client_error(exc)
    return JSONResponse(error.to_dict(), status_code=error.code, headers=error.headers())


def single_upload(paths: Sequence[Path] | Path | None, field: str) -> Path | None:
    """An optional single-file field that BentoML hands over as a list: its one file, or None.

    Raises:
        BadRequest: more than one file under ``field``.
    """
    if paths is None or isinstance(paths, Path):
        return paths
    if len(paths) > 1:
        raise BadRequest(f"{field} takes one file, got {len(paths)}", field)
    return paths[0] if paths else None


def parse_outputs(value: str | Sequence[str] | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """``"mask,gate"`` or ``["mask", "gate"]`` -> ``("mask", "gate")``; every name must be in ``REST_OUTPUTS``."""
    if value is None or value == "" or value == []:
        return default
    names = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in REST_OUTPUTS]
    if unknown:
        raise BadRequest(f"outputs {unknown} are unknown; choose from {list(REST_OUTPUTS)}", "outputs")
    return tuple(dict.fromkeys(names))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _encode_arrays(arrays: dict[str, np.ndarray | None], outputs: tuple[str, ...]) -> dict[str, str]:
    encoded = {}
    for name in outputs:
        array = arrays.get(name)
        if array is None:
            continue
        data = encode_mask_png(array) if name in _MASKS else encode_png(to_uint8(array))
        encoded[f"{name}_png_base64"] = _b64(data)
    return encoded


def _read_part(path: Path, limit: int, field: str) -> bytes:
    """The bytes of one uploaded part (blocking), at most ``limit`` of them."""
    data = path.read_bytes()
    if len(data) > limit:  # the middleware bounds the whole body; this bounds one part
        from service.errors import PayloadTooLarge

        raise PayloadTooLarge(f"{field} has {len(data)} bytes; the limit is {limit} bytes (max_upload_bytes)", field)
    return data


async def _read_upload(path: Path, runtime: FrontEndRuntime, field: str) -> bytes:
    return await asyncio.to_thread(_read_part, path, int(runtime.settings.max_upload_bytes), field)


def _decode_deadline(runtime: FrontEndRuntime) -> float:
    """``time.monotonic()`` after which a decode that has not started is not started (request_timeout_s)."""
    return time.monotonic() + float(runtime.settings.request_timeout_s)


async def _decode(path: Path, runtime: FrontEndRuntime) -> tuple[bytes, DecodedImage]:
    """Read and decode the ``file`` upload on the decode pool, within the decode budget of core.imageio.

    The inflate budget (``inflate_budget(max_pixels, max_upload_bytes)``, 325 MiB at the defaults) bounds
    what a compressed upload may cost; past it, or past ``max_pixels``, the answer is 413 naming ``file``.
    """
    runtime.check_capacity()  # 503 before spending memory and CPU on decoding when the queue is full
    settings = runtime.settings

    def read_and_decode() -> tuple[bytes, DecodedImage]:  # one decode-thread hop for both
        data = _read_part(path, int(settings.max_upload_bytes), "file")
        return data, decode_image(data, name="upload", max_pixels=settings.max_pixels,
                                  max_bytes=settings.max_upload_bytes)

    return await shared_decode_pool().run(read_and_decode, deadline=_decode_deadline(runtime))


async def _decode_prior_mask(path: Path, runtime: FrontEndRuntime) -> np.ndarray:
    """Read and decode the ``prior_mask`` upload on the decode pool: ``(H, W) uint8 in {0, 1}``."""
    settings = runtime.settings

    def read_and_decode() -> np.ndarray:
        data = _read_part(path, int(settings.max_upload_bytes), "prior_mask")
        try:
            return decode_mask(data, name="prior_mask", max_pixels=settings.max_pixels,
                               max_bytes=settings.max_upload_bytes)
        except InputError as exc:
            raise _field_error(exc, "prior_mask") from None

    return await shared_decode_pool().run(read_and_decode, deadline=_decode_deadline(runtime))


def _field_error(exc: InputError, field: str) -> ServiceError:
    """``exc`` answered as naming ``field`` where it names no field, or the default upload field ``file``."""
    error = as_service_error(exc)
    assert error is not None  # every InputError maps
    if error.field in (None, "file"):
        error.field = field
    return error


def _model(runtime: FrontEndRuntime, selected: LoadedVersion | None = None) -> dict[str, Any]:
    """``version``: the registry's ``name:version`` that answered (the artifact version without a registry);
    ``precision``: its graphs' (``service.model_versions.precision_report``)."""
    version = selected.label if selected is not None else runtime.model_version
    info = selected.pipeline.model_info() if selected is not None else runtime.model_info()
    return {"version": version, "backend": runtime.backend, "precision": precision_report(info)}


async def _select(runtime: FrontEndRuntime, model: str | None) -> LoadedVersion:
    """The version the ``model`` field names (404/400 naming ``model`` before the upload is decoded)."""
    return await runtime.select_model(model)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


async def segment(
    runtime: FrontEndRuntime,
    file: Path,
    *,
    threshold: float | None = None,
    gate: str | None = None,
    gamma: float | None = None,
    gate_min: float | None = None,
    gate_max: float | None = None,
    outputs: str | Sequence[str] | None = None,
    dicom_seg: bool = False,
    anonymize: bool | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """``POST /segment``: decode the upload, segment it through the shared queue, encode the answer.

    ``anonymize`` None takes the server's default (``MEDREFINE_ANONYMIZE_DICOM``, on unless turned off):
    a DICOM SEG then carries no patient identifiers. ``anonymize=false`` keeps them (e.g. to store the SEG
    back beside its source in a PACS); ``anonymize=true`` without ``dicom_seg`` is a 400.

    Raises:
        ServiceError: 400 (bad option or image), 413 (too large), 415 (unsupported format), 503, 504.
    """
    from inference.pipeline import SegmentOptions

    started = time.perf_counter()
    wanted = parse_outputs(outputs, DEFAULT_SEGMENT_OUTPUTS)
    try:
        options = SegmentOptions(threshold=threshold, gate=gate, gate_gamma=gamma, gate_min=gate_min,
                                 gate_max=gate_max, outputs=tuple(n for n in wanted if n != "image"))
    except InputError as exc:
        raise _field_error(exc, "options") from None
    if anonymize is True and not dicom_seg:
        raise BadRequest("anonymize applies to the DICOM SEG output; set dicom_seg=true as well", "anonymize")
    selected = await _select(runtime, model)
    _, decoded = await _decode(file, runtime)
    if dicom_seg and decoded.format != "dicom":
        raise BadRequest(f"dicom_seg needs a DICOM upload, got {decoded.format.upper()}", "dicom_seg")
    decode_s = time.perf_counter() - started
    result = await runtime.segment(decoded.pixels, options, protocol="rest", spacing=decoded.spacing_mm,
                                   **({"model": selected} if selected is not None else {}))
    encode_started = time.perf_counter()
    arrays = {
        "image": decoded.pixels, "mask": result.mask, "coarse_mask": result.coarse_mask,
        "probability": result.probability, "coarse_probability": result.coarse_probability, "gate": result.gate,
    }
    body: dict[str, Any] = await asyncio.to_thread(_encode_arrays, arrays, wanted)
    body.update({
        "shape": list(decoded.shape),
        "box": [float(v) for v in np.asarray(result.box).reshape(-1)],
        "points": np.asarray(result.points, dtype=float).reshape(-1, 2).tolist(),
        "point_labels": [int(v) for v in np.asarray(result.point_labels).reshape(-1)],
        "iou": float(result.iou),
        "needs_review": bool(result.needs_review),
        "lesion_found": bool(result.lesion_found),
        "uncertainty": float(result.uncertainty),
        "area_px": int(result.area_pixels),
        "area_mm2": None if result.area_mm2 is None else float(result.area_mm2),
        "threshold": float(result.threshold),
        "model": _model(runtime, selected),
    })
    if dicom_seg:
        from core.dicom_seg import build_dicom_seg

        if anonymize is None:
            anonymize = runtime.settings.anonymize_dicom

        mask = result.mask if result.mask is not None else (np.asarray(result.probability) > result.threshold)
        try:
            seg = await asyncio.to_thread(build_dicom_seg, decoded.source, np.asarray(mask, np.uint8),
                                          model_version=_model(runtime, selected)["version"], anonymize=anonymize)
        except InputError as exc:  # the upload lacks what a SEG must reference
            raise _field_error(exc, "dicom_seg") from None
        body["dicom_seg_base64"] = _b64(seg)
    timings = {"decode": _ms(decode_s), **{k: round(float(v), 3) for k, v in result.timings.items()},
               "encode": _ms(time.perf_counter() - encode_started), "total": _ms(time.perf_counter() - started)}
    body["timings_ms"] = timings
    return body


async def refine(
    runtime: FrontEndRuntime,
    file: Path,
    *,
    box: Sequence[float] | None = None,
    points: Sequence[Sequence[float]] | None = None,
    point_labels: Sequence[float] | None = None,
    prior_mask: Path | None = None,
    threshold: float | None = None,
    outputs: str | Sequence[str] | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """``POST /refine``: prompts (pixel frame of the upload) -> refined mask; the embedding is cached per image.

    Raises:
        ServiceError: as :func:`segment`; 400 names the prompt at fault.
    """
    started = time.perf_counter()
    wanted = parse_outputs(outputs, DEFAULT_REFINE_OUTPUTS)
    not_refine = [n for n in wanted if n not in ("image", "mask", "probability")]
    if not_refine:
        raise BadRequest(f"outputs {not_refine} are not produced by /refine; choose from image, mask, probability",
                         "outputs")
    selected = await _select(runtime, model)
    data, decoded = await _decode(file, runtime)
    prior = None
    if prior_mask is not None:
        prior = await _decode_prior_mask(prior_mask, runtime)
    decode_s = time.perf_counter() - started
    result = await runtime.refine(
        decoded.pixels, box=box, points=points, point_labels=point_labels, prior_mask=prior,
        image_key=hashlib.sha256(data).hexdigest(), threshold=threshold, spacing=decoded.spacing_mm,
        protocol="rest", **({"model": selected} if selected is not None else {}),
    )
    encode_started = time.perf_counter()
    arrays = {"image": decoded.pixels, "mask": result.mask, "probability": result.probability}
    body: dict[str, Any] = await asyncio.to_thread(_encode_arrays, arrays, wanted)
    body.update({
        "shape": list(decoded.shape),
        "box": None if box is None else [float(v) for v in box],
        "points": None if points is None else [[float(x), float(y)] for x, y in points],
        "point_labels": None if point_labels is None else [int(v) for v in point_labels],
        "iou": float(result.iou),
        "needs_review": bool(result.needs_review),
        "lesion_found": bool(result.lesion_found),
        "area_px": int(result.area_pixels),
        "area_mm2": None if result.area_mm2 is None else float(result.area_mm2),
        "threshold": float(result.threshold),
        "cache_hit": bool(result.cache_hit),
        "model": _model(runtime, selected),
    })
    body["timings_ms"] = {"decode": _ms(decode_s), **{k: round(float(v), 3) for k, v in result.timings.items()},
                          "encode": _ms(time.perf_counter() - encode_started),
                          "total": _ms(time.perf_counter() - started)}
    return body
