"""User feedback: an accepted or corrected segmentation stored as a case of a named feedback dataset (image
de-identified, mask 0/255, the starting model version, seconds and prompts), and snapshots of those cases as
an ordinary dataset a train job can fine-tune on. Turned off by ``MEDREFINE_FEEDBACK=off``."""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select

from medplatform import db
from medplatform.datasets import check_name
from medplatform.errors import InvalidValue, NotFound
from medplatform.registry import parse_model_spec

if TYPE_CHECKING:
    from medplatform.context import Platform

BLOB_PREFIX = "feedback/"
DEFAULT_DATASET = "feedback"
MAX_SECONDS = 24 * 3600.0  # one correction; more is a client clock error, not a measurement
MAX_PROMPTS = 10_000
MAX_LIST = 1000
_OFF = ("0", "false", "no", "off")


def feedback_enabled(env: Mapping[str, str] | None = None) -> bool:
    """``MEDREFINE_FEEDBACK`` (default on): ``off``/``0``/``false``/``no`` turns the feedback routes off."""
    env = os.environ if env is None else env
    return (env.get("MEDREFINE_FEEDBACK") or "on").strip().lower() not in _OFF


@dataclass(frozen=True)
class SegmentationCorrection:
    """What ``POST /feedback/segmentation`` carries, before checks.

    ``image``: the encoded image as uploaded (PNG, JPEG, TIFF, DICOM, NIfTI); ``mask``: a PNG of the image's
    size with values 0 and 255 only; ``model``: the version that produced the starting mask (``name:N``,
    ``name@alias`` or ``name`` = its production; pinned to ``name:N`` when stored).
    """

    image: bytes
    mask: bytes
    model: str
    seconds: float
    prompts: int
    dataset: str = DEFAULT_DATASET


def save_segmentation(platform: Platform, correction: SegmentationCorrection, *,
                      max_pixels: int = 40_000_000) -> db.Feedback:
    """Check and store one correction; returns its row.

    The image is stored de-identified: a DICOM file through ``medplatform.deidentify`` (pixels, geometry and
    UIDs kept), any other format re-encoded as an 8-bit PNG of the decoded plane (no metadata chunks, no
    file name). Nothing about the case is logged.

    Raises:
        InvalidValue: naming ``image``, ``mask``, ``model_version``, ``seconds``, ``prompts`` or ``dataset``.
        NotFound: ``model_version`` names no registered version.
    """
    from core.imageio import ImageDecodeError, decode_image, encode_png

    dataset = _dataset_name(correction.dataset)
    seconds = _seconds(correction.seconds)
    prompts = _prompts(correction.prompts)
    name, version = resolve_model(platform, correction.model)
    try:
        decoded = decode_image(correction.image, name="image", max_pixels=max_pixels)
    except ImageDecodeError as exc:
        raise InvalidValue("image", f"{len(correction.image)} bytes", str(exc)) from None
    mask = decode_binary_png(correction.mask, decoded.shape, max_pixels=max_pixels)
    if decoded.format == "dicom":
        from medplatform.deidentify import deidentify_dicom

        stored, suffix = deidentify_dicom(correction.image), "dcm"
    else:
        stored, suffix = encode_png(np.round(decoded.pixels * 255.0).astype(np.uint8)), "png"
    mask_png = _mask_png(mask)
    row = db.Feedback(id=db.new_id(), kind="segmentation", dataset=dataset, model_name=name, model_version=version,
                      image_sha256=hashlib.sha256(stored).hexdigest(), seconds=seconds, prompts=prompts,
                      details={"format": decoded.format, "height": decoded.shape[0], "width": decoded.shape[1],
                               "mask_pixels": int(mask.sum())})
    row.image_key = f"{BLOB_PREFIX}{row.id}/image.{suffix}"
    row.mask_key = f"{BLOB_PREFIX}{row.id}/mask.png"
    platform.blobs.put_bytes(row.image_key, stored)
    platform.blobs.put_bytes(row.mask_key, mask_png)
    try:
        with platform.sessions.begin() as session:
            session.add(row)
    except BaseException:
        for key in (row.image_key, row.mask_key):
            platform.blobs.delete(key)
        raise
    return row


def resolve_model(platform: Platform, spec: Any) -> tuple[str, int]:
    """``(name, version)`` of a registered, live version; ``InvalidValue``/``NotFound`` on ``model_version``."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidValue("model_version", spec, "expected the version that produced the starting mask, "
                                                  "e.g. default:1 (model.version of /segment's answer)")
    spec = spec.strip()
    if re.fullmatch(r"[0-9a-f]{64}", spec):  # /segment without a registry answers the artifact version
        with platform.sessions() as session:
            row = session.scalars(select(db.ModelVersion).where(db.ModelVersion.artifact_version == spec,
                                                                db.ModelVersion.deleted_at.is_(None))
                                  .order_by(db.ModelVersion.id).limit(1)).first()
        if row is None:
            raise NotFound("model_version", spec, "no registered version has these artifacts")
        return row.name, row.version
    try:
        name, ref = parse_model_spec(spec)
        info = platform.registry.resolve(name, ref)
    except InvalidValue as exc:
        raise InvalidValue("model_version", spec, str(exc)) from None
    except NotFound as exc:
        raise NotFound("model_version", spec, str(exc)) from None
    return info.name, info.version


def decode_binary_png(data: bytes, shape: tuple[int, int], *, max_pixels: int = 40_000_000) -> np.ndarray:
    """A mask PNG of ``shape`` (H, W) with values 0 and 255 only, as ``(H, W) uint8 in {0, 1}``.

    Raises:
        InvalidValue: (field ``mask``) not a PNG, not one gray channel, another size, other values.
    """
    from PIL import Image, UnidentifiedImageError

    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise InvalidValue("mask", f"{len(data)} bytes", "expected a PNG (0 = background, 255 = lesion)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise InvalidValue("mask", f"{img.width}x{img.height}", f"over {max_pixels} pixels")
            if img.mode not in ("L", "1", "LA", "RGB", "RGBA"):
                raise InvalidValue("mask", img.mode, "expected an 8-bit gray PNG")
            values = np.asarray(img.convert("L") if img.mode == "1" else img)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InvalidValue("mask", f"{len(data)} bytes", f"unreadable PNG ({exc})") from None
    if values.ndim == 3:  # RGB(A) from a canvas export: the colour channels must agree (gray), alpha ignored
        colour = values[..., :3] if values.shape[2] >= 3 else values[..., :1]
        if (colour != colour[..., :1]).any():
            raise InvalidValue("mask", "colour", "expected a gray mask (R = G = B)")
        values = colour[..., 0]
    if values.shape != tuple(shape):
        raise InvalidValue("mask", f"{values.shape[1]}x{values.shape[0]}",
                           f"the mask must have the image's size {shape[1]}x{shape[0]} (width x height)")
    odd = np.setdiff1d(np.unique(values), (0, 255))
    if odd.size:
        raise InvalidValue("mask", [int(v) for v in odd[:5]], "not binary: expected values 0 and 255 only")
    return (values == 255).astype(np.uint8)


def _mask_png(mask: np.ndarray) -> bytes:
    from core.imageio import encode_mask_png

    return encode_mask_png(mask)


def _dataset_name(name: Any) -> str:
    try:
        return check_name(DEFAULT_DATASET if name is None or name == "" else name)
    except InvalidValue as exc:
        raise InvalidValue("dataset", name, str(exc)) from None


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= MAX_SECONDS:
        raise InvalidValue("seconds", value, f"expected the correction's duration in seconds, 0..{MAX_SECONDS:.0f}")
    return float(value)


def _prompts(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PROMPTS:
        raise InvalidValue("prompts", value, f"expected the number of prompts used, an integer 0..{MAX_PROMPTS}")
    return value


# -- reading ---------------------------------------------------------------------------------------------------


def list_cases(platform: Platform, *, kind: str = "segmentation", dataset: str | None = None,
               limit: int = 100) -> list[db.Feedback]:
    """Cases oldest first (the order snapshots take them in), optionally of one feedback dataset."""
    if not isinstance(limit, int) or not 1 <= limit <= MAX_LIST:
        raise InvalidValue("limit", limit, f"expected an integer in [1, {MAX_LIST}]")
    query = select(db.Feedback).where(db.Feedback.kind == kind)
    if dataset is not None:
        query = query.where(db.Feedback.dataset == _dataset_name(dataset))
    with platform.sessions() as session:
        return list(session.scalars(query.order_by(db.Feedback.created_at, db.Feedback.id).limit(limit)))


def get_case(platform: Platform, case_id: str) -> db.Feedback:
    """One case; ``NotFound`` (field ``feedback``)."""
    with platform.sessions() as session:
        row = session.get(db.Feedback, case_id) if isinstance(case_id, str) else None
    if row is None:
        raise NotFound("feedback", case_id, "no such feedback case")
    return row


def case_blob(platform: Platform, case_id: str, part: str) -> bytes:
    """The stored ``image`` (de-identified) or ``mask`` (PNG 0/255) of a segmentation case."""
    row = get_case(platform, case_id)
    key = {"image": row.image_key, "mask": row.mask_key}.get(part)
    if key is None:
        raise NotFound("part", part, "expected image or mask")
    return platform.blobs.get_bytes(key)


def describe(row: db.Feedback) -> dict[str, Any]:
    """A case as JSON-ready data (no blob contents)."""
    model = f"{row.model_name}:{row.model_version}" if row.model_name else None
    return {"id": row.id, "kind": row.kind, "dataset": row.dataset, "model_version": model, "seconds": row.seconds,
            "prompts": row.prompts, "image_sha256": row.image_sha256, "details": row.details,
            "created_at": row.created_at.isoformat()}


# -- snapshot: feedback cases -> an ordinary dataset ---------------------------------------------------------------


def snapshot(platform: Platform, dataset: str = DEFAULT_DATASET, *, limit: int | None = None,
             name: str | None = None) -> tuple[db.Dataset, int]:
    """The first ``limit`` segmentation cases of ``dataset`` (oldest first; all when None) as a ``datasets`` row
    (``images/<id>.png|dcm`` + ``masks/<id>.png``), ingested like an upload; returns ``(row, cases)``.

    Content-addressed as every dataset: the same cases snapshot to the same dataset. ``name`` defaults to
    ``"<dataset> (<n> cases)"``.

    Raises:
        InvalidValue: ``limit`` out of range. NotFound: ``dataset`` has no cases.
    """
    from medplatform.datasets import ingest_files

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidValue("limit", limit, "expected a positive integer (the oldest cases first)")
    dataset = _dataset_name(dataset)
    rows = list_cases(platform, dataset=dataset, limit=min(limit or MAX_LIST, MAX_LIST))
    if not rows:
        raise NotFound("dataset", dataset, "no segmentation feedback in this dataset")
    files: list[tuple[str, bytes]] = []
    for row in rows:
        suffix = (row.image_key or "").rsplit(".", 1)[-1]
        files.append((f"images/{row.id}.{suffix}", platform.blobs.get_bytes(row.image_key or "")))
        files.append((f"masks/{row.id}.png", platform.blobs.get_bytes(row.mask_key or "")))
    label = name if name else f"{dataset} ({len(rows)} cases)"
    return ingest_files(platform, label, files), len(rows)
