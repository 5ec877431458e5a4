"""User feedback: corrected segmentations (image de-identified, mask 0/255, starting model version, seconds,
prompts) and ratings of generated images (a 1-5 score or a preference, each image stored as what regenerates it),
in named feedback datasets; snapshots for train jobs. Turned off by ``MEDREFINE_FEEDBACK=off``."""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select

from inference.protocols import BEST_OF_RANKERS
from medplatform import db
from medplatform.datasets import check_name
from medplatform.errors import InvalidValue, NotFound
from medplatform.registry import parse_model_spec

if TYPE_CHECKING:
    from inference.generation import GenerationLimits
    from medplatform.context import Platform

BLOB_PREFIX = "feedback/"
DEFAULT_DATASET = "feedback"
GENERATION_DATASET = "generation-ratings"
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


def _dataset_name(name: Any, default: str = DEFAULT_DATASET) -> str:
    try:
        return check_name(default if name is None or name == "" else name)
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
               limit: int = 100, offset: int = 0) -> list[db.Feedback]:
    """Cases oldest first (the order snapshots take them in), optionally of one feedback dataset; ``offset``
    skips that many (the next page starts at ``offset + limit``)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST:
        raise InvalidValue("limit", limit, f"expected an integer in [1, {MAX_LIST}]")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidValue("offset", offset, "expected a non-negative integer")
    query = select(db.Feedback).where(db.Feedback.kind == kind)
    if dataset is not None:
        query = query.where(db.Feedback.dataset == _dataset_name(dataset))
    with platform.sessions() as session:
        return list(session.scalars(query.order_by(db.Feedback.created_at, db.Feedback.id)
                                    .offset(offset).limit(limit)))


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


# -- ratings of generated images ---------------------------------------------------------------------------------

MAX_VERSION_CHARS = 128
PREFERENCES = ("image", "other")


@dataclass(frozen=True)
class GeneratedImage:
    """Enough to regenerate one image of ``POST /generate``: the same request (``prompt``, ``modality``,
    ``negative_prompt``, ``seed`` = the answer's ``seed``, ``steps``, ``guidance_scale``, ``num_images`` or
    ``best_of`` and ``rank_by``) to the same ``generator_version`` (the answer's ``model.version``), then
    ``images[index]``."""

    prompt: str
    modality: str
    seed: int
    steps: int
    guidance_scale: float
    generator_version: str
    index: int = 0
    negative_prompt: str | None = None
    num_images: int = 1  # the request's images per prompt: image k starts from the noise of seed + k
    best_of: int | None = None  # the request's best_of (the best of that many candidates; index 0)
    rank_by: str | None = None  # the request's rank_by for best_of (None: the selector)

    def generate_body(self) -> dict[str, Any]:
        """The ``POST /generate`` JSON body that regenerates this image (as ``images_png_base64[index]``)."""
        body: dict[str, Any] = {"prompt": self.prompt, "modality": self.modality, "seed": self.seed,
                                "steps": self.steps, "guidance_scale": self.guidance_scale}
        if self.negative_prompt is not None:
            body["negative_prompt"] = self.negative_prompt
        if self.best_of is not None:
            body["best_of"] = self.best_of
            if self.rank_by is not None:
                body["rank_by"] = self.rank_by
        else:
            body["num_images"] = self.num_images
        return body


@dataclass(frozen=True)
class GenerationRating:
    """A 1-5 ``rating`` of ``image``, or a preference between ``image`` and ``other`` (the same prompt and
    modality; e.g. the base and a fine-tuned generator at one seed): ``preferred`` is ``"image"`` or ``"other"``."""

    image: GeneratedImage
    rating: int | None = None
    other: GeneratedImage | None = None
    preferred: str | None = None
    dataset: str = GENERATION_DATASET


def save_generation_rating(platform: Platform, rating: GenerationRating, *,
                           modalities: Collection[str] | None = None,
                           limits: GenerationLimits | None = None) -> db.Feedback:
    """Check and store one rating as a ``kind="generation"`` row (the rating in ``details``, no blobs); returns
    the row. Nothing is logged.

    Args:
        modalities: the generator's modalities; None accepts any modality name (a server without generators).
        limits: the accepted steps, guidance, prompt length and image counts (the serving generator's; default
            ``inference.generation.GenerationLimits()``).

    Raises:
        InvalidValue: naming the field: ``image.seed``, ``other.steps``, ``rating``, ``preferred``, ``other``,
            ``dataset``, ...
    """
    if limits is None:
        from inference.generation import GenerationLimits

        limits = GenerationLimits()
    checked = _check_rating(rating, modalities, limits)
    row = db.Feedback(id=db.new_id(), kind="generation", dataset=checked.dataset, details=_rating_details(checked))
    with platform.sessions.begin() as session:
        session.add(row)
    return row


def list_generation_ratings(platform: Platform, dataset: str = GENERATION_DATASET) -> list[GenerationRating]:
    """Every rating of ``dataset``, oldest first."""
    name = _dataset_name(dataset, GENERATION_DATASET)
    query = (select(db.Feedback).where(db.Feedback.kind == "generation", db.Feedback.dataset == name)
             .order_by(db.Feedback.created_at, db.Feedback.id))
    with platform.sessions() as session:
        return [rating_from_row(row) for row in session.scalars(query)]


def rating_from_row(row: db.Feedback) -> GenerationRating:
    """The stored rating of a ``kind="generation"`` row."""
    details = row.details
    other = details.get("other")
    return GenerationRating(image=GeneratedImage(**details["image"]), rating=details.get("rating"),
                            other=None if other is None else GeneratedImage(**other),
                            preferred=details.get("preferred"), dataset=row.dataset)


def describe_rating(row: db.Feedback) -> dict[str, Any]:
    """A rating as JSON-ready data: ``id``, ``dataset``, ``created_at`` and the fields of the POST body."""
    rating = rating_from_row(row)
    return {"id": row.id, "kind": row.kind, "dataset": row.dataset, "image": asdict(rating.image),
            "rating": rating.rating, "other": None if rating.other is None else asdict(rating.other),
            "preferred": rating.preferred, "created_at": row.created_at.isoformat()}


def rating_from_json(body: Mapping[str, Any]) -> GenerationRating:
    """The ``POST /feedback/generation`` JSON body (``{"image": {...}, "rating": 4}`` or ``{"image": {...},
    "other": {...}, "preferred": "other"}``, optional ``"dataset"``) as a rating, before the value checks.

    Raises:
        InvalidValue: an unknown key (naming it, e.g. ``image.colour``), a missing one, or not an object.
    """
    allowed = ("image", "rating", "other", "preferred", "dataset")
    for key in body:
        if key not in allowed:
            raise InvalidValue(str(key), body[key], f"unknown field; expected {', '.join(allowed)}")
    if "image" not in body:
        raise InvalidValue("image", None, "required: the rated image (prompt, modality, seed, steps, "
                                          "guidance_scale, generator_version, ...)")
    other = body.get("other")
    dataset = body.get("dataset")
    return GenerationRating(image=_image_from_json(body["image"], "image"), rating=body.get("rating"),
                            other=None if other is None else _image_from_json(other, "other"),
                            preferred=body.get("preferred"),
                            dataset=GENERATION_DATASET if dataset is None or dataset == "" else dataset)


def _image_from_json(data: Any, field: str) -> GeneratedImage:
    if not isinstance(data, Mapping):
        raise InvalidValue(field, type(data).__name__, "expected an object: prompt, modality, seed, steps, "
                                                       "guidance_scale, generator_version, index, ...")
    names = [f.name for f in fields(GeneratedImage)]
    for key in data:
        if key not in names:
            raise InvalidValue(f"{field}.{key}", data[key], f"unknown field; expected {', '.join(names)}")
    for name in names[:6]:
        if name not in data:
            raise InvalidValue(f"{field}.{name}", None, "required (as /generate answered or was asked)")
    return GeneratedImage(**{key: data[key] for key in names if key in data})


def _check_rating(rating: Any, modalities: Collection[str] | None, limits: GenerationLimits) -> GenerationRating:
    if not isinstance(rating, GenerationRating):
        raise InvalidValue("rating", type(rating).__name__, "expected a GenerationRating")
    dataset = _dataset_name(rating.dataset, GENERATION_DATASET)
    image = _check_image(rating.image, "image", modalities, limits)
    preference = rating.other is not None or rating.preferred is not None
    if rating.rating is not None and preference:
        raise InvalidValue("rating", rating.rating, "give either a rating or a preference (other + preferred), "
                                                    "not both")
    if rating.rating is None and not preference:
        raise InvalidValue("rating", None, "expected a rating 1..5, or a preference: other (the second image) "
                                           "and preferred")
    if rating.rating is not None:
        value = rating.rating
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
            raise InvalidValue("rating", value, "expected an integer 1..5 (5 = best)")
        return GenerationRating(image=image, rating=value, dataset=dataset)
    if rating.other is None:
        raise InvalidValue("other", None, "a preference needs the second image of the same prompt")
    if rating.preferred not in PREFERENCES:
        raise InvalidValue("preferred", rating.preferred, "expected 'image' or 'other'")
    other = _check_image(rating.other, "other", modalities, limits)
    if (other.prompt, other.modality) != (image.prompt, image.modality):
        raise InvalidValue("other", f"{other.modality}: {other.prompt[:60]}",
                           "a preference compares two images of the same prompt and modality")
    if other == image:
        raise InvalidValue("other", "the same image", "a preference compares two different images")
    return GenerationRating(image=image, other=other, preferred=rating.preferred, dataset=dataset)


def _check_image(image: Any, field: str, modalities: Collection[str] | None,
                 limits: GenerationLimits) -> GeneratedImage:
    """``image`` with its values checked against ``/generate``'s (``limits``); ``negative_prompt`` "" -> None."""
    if not isinstance(image, GeneratedImage):
        raise InvalidValue(field, type(image).__name__, "expected a GeneratedImage")

    def text(name: str, value: Any, most: int, *, empty: bool = False) -> str:
        if not isinstance(value, str) or (not empty and not value.strip()) or len(value) > most \
                or any(ord(c) < 32 and c not in "\t\n" for c in value):
            raise InvalidValue(f"{field}.{name}", value, f"expected {'a' if empty else 'a non-empty'} string of at "
                                                         f"most {most} characters")
        return value

    def integer(name: str, value: Any, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidValue(f"{field}.{name}", value, f"expected an integer in [{low}, {high}]")
        return value

    prompt = text("prompt", image.prompt, limits.max_prompt_chars)
    modality = text("modality", image.modality, 64)
    if modalities is not None and modality not in modalities:
        raise InvalidValue(f"{field}.modality", modality, f"unknown modality; expected one of {sorted(modalities)}")
    negative = image.negative_prompt
    if negative is not None:
        negative = text("negative_prompt", negative, limits.max_prompt_chars, empty=True) or None
    seed = integer("seed", image.seed, 0, 2**63 - 1024 - 1)  # the pipeline's bound: seed + k stays an int64
    steps = integer("steps", image.steps, limits.min_steps, limits.max_steps)
    guidance = image.guidance_scale
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or not limits.min_guidance <= guidance <= limits.max_guidance:
        raise InvalidValue(f"{field}.guidance_scale", guidance,
                           f"expected a number in [{limits.min_guidance}, {limits.max_guidance}]")
    version = image.generator_version
    if not isinstance(version, str) or not version or len(version) > MAX_VERSION_CHARS \
            or not version.isprintable() or version != version.strip():
        raise InvalidValue(f"{field}.generator_version", version,
                           "expected the generator's version (model.version of /generate's answer)")
    if image.best_of is not None:
        best_of = integer("best_of", image.best_of, 1, limits.max_images)
        integer("num_images", image.num_images, 1, 1)  # best-of answers one image per prompt
        index = integer("index", image.index, 0, 0)
        if image.rank_by is not None and image.rank_by not in BEST_OF_RANKERS:
            raise InvalidValue(f"{field}.rank_by", image.rank_by, f"expected one of {list(BEST_OF_RANKERS)}")
    else:
        best_of = None
        num_images = integer("num_images", image.num_images, 1, limits.max_images)
        index = integer("index", image.index, 0, num_images - 1)
        if image.rank_by is not None:
            raise InvalidValue(f"{field}.rank_by", image.rank_by, "only a best_of image is ranked; expected null")
    return GeneratedImage(prompt=prompt, modality=modality, seed=seed, steps=steps, guidance_scale=float(guidance),
                          generator_version=version, index=index, negative_prompt=negative,
                          num_images=image.num_images, best_of=best_of, rank_by=image.rank_by)


def _rating_details(rating: GenerationRating) -> dict[str, Any]:
    details: dict[str, Any] = {"image": asdict(rating.image)}
    if rating.rating is not None:
        details["rating"] = rating.rating
    else:
        details["other"] = asdict(rating.other) if rating.other is not None else None
        details["preferred"] = rating.preferred
    return details
