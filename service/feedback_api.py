"""The feedback routes (/feedback/segmentation..., /feedback/generation) over ``medplatform.feedback``: body parsing
and field names; keys and error mapping are the platform routes' (``service.platform_api``). 404 while
MEDREFINE_FEEDBACK=off."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.errors import BadRequest, NotFound, UnsupportedMediaType

if TYPE_CHECKING:
    from medplatform.context import Platform
    from service.generation import GenerationRuntime

__all__ = ["feedback_routes"]

Handler = Callable[["Platform", Request], Awaitable[Response]]
Endpoint = Callable[..., Callable[[Request], Awaitable[Response]]]  # _PlatformApi.endpoint(handler, admin=)
MAX_PART_BYTES = 64 * 1024 * 1024  # one image or mask part; the guard's max_upload_bytes bounds the body first


def feedback_routes(endpoint: Endpoint,
                    generation: Callable[[], GenerationRuntime | None] = lambda: None) -> list[Route]:
    """The routes, each behind ``endpoint`` (the platform's key check, 503 before start-up, errors by type).

    Saving and snapshots change the platform (admin key when one is set); reads take the API key.
    ``generation``: the served generator; ratings are checked against its modalities and limits.
    """
    def route(path: str, handler: Handler, method: str, *, admin: bool = False) -> Route:
        return Route(path, _when_enabled(endpoint(handler, admin=admin)), methods=[method])

    return [
        route("/feedback/segmentation", save_segmentation, "POST", admin=True),
        route("/feedback/segmentation", list_segmentation, "GET"),
        route("/feedback/segmentation/snapshot", snapshot, "POST", admin=True),
        route("/feedback/segmentation/{id}", get_case, "GET"),
        route("/feedback/segmentation/{id}/mask", lambda p, r: case_part(p, r, "mask"), "GET"),
        route("/feedback/segmentation/{id}/image", lambda p, r: case_part(p, r, "image"), "GET"),
        route("/feedback/generation", lambda p, r: save_generation(p, r, generation()), "POST", admin=True),
        route("/feedback/generation", list_generation, "GET"),
    ]


def _when_enabled(app: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def run(request: Request) -> Response:
        from medplatform.feedback import feedback_enabled

        if not feedback_enabled():
            error = NotFound("feedback is turned off on this server (MEDREFINE_FEEDBACK=off)")
            return JSONResponse(error.to_dict(), status_code=error.code)
        return await app(request)

    return run


async def save_segmentation(platform: Platform, request: Request) -> Response:
    """multipart: ``image`` and ``mask`` files, ``model_version``, ``seconds``, ``prompts``, optional ``dataset``.
    201 with the stored case (``location``: ``/feedback/segmentation/{id}``)."""
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    from medplatform import feedback

    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        raise UnsupportedMediaType("POST /feedback/segmentation takes multipart/form-data ('image', 'mask', "
                                   f"'model_version', 'seconds', 'prompts'), got {content_type or 'none'!r}",
                                   "image")
    try:
        form = await request.form(max_files=2, max_fields=8, max_part_size=64 * 1024)
    except (MultiPartException, HTTPException) as exc:
        raise BadRequest(f"malformed multipart/form-data body ({getattr(exc, 'detail', exc)})", "image") from exc
    try:
        image, mask = await _file(form, "image"), await _file(form, "mask")
        correction = feedback.SegmentationCorrection(
            image=image, mask=mask, model=_text(form, "model_version"),
            seconds=_number(form, "seconds"), prompts=_integer(form, "prompts"),
            dataset=_text(form, "dataset", required=False) or feedback.DEFAULT_DATASET)
    finally:
        await form.close()
    row = await run_in_threadpool(feedback.save_segmentation, platform, correction)
    return JSONResponse(feedback.describe(row), status_code=201,
                        headers={"location": f"/feedback/segmentation/{row.id}"})


async def list_segmentation(platform: Platform, request: Request) -> Response:
    """``?dataset=NAME&limit=N&offset=K``: cases oldest first."""
    from medplatform import feedback

    rows = await _list(platform, request, "segmentation")
    return JSONResponse([feedback.describe(row) for row in rows])


async def save_generation(platform: Platform, request: Request, generation: GenerationRuntime | None) -> Response:
    """JSON ``{"image": {...}, "rating": 1..5}`` or ``{"image": {...}, "other": {...}, "preferred": "image" |
    "other"}``, optional ``"dataset"`` (``medplatform.feedback.GenerationRating``). 201 with the stored rating.

    Checked against the served generator's modalities and limits (steps, guidance, prompt length, images); a
    server without one checks the pipeline's default limits and takes any modality name."""
    from medplatform import feedback
    from service.platform_api import _json_object

    body = await _json_object(request, ("image", "rating", "other", "preferred", "dataset"))
    rating = feedback.rating_from_json(body)
    pipeline = generation.generators.text2image if generation is not None else None
    modalities = None if pipeline is None else pipeline.modalities
    limits = None if pipeline is None else pipeline.limits
    row = await run_in_threadpool(lambda: feedback.save_generation_rating(platform, rating, modalities=modalities,
                                                                          limits=limits))
    return JSONResponse(feedback.describe_rating(row), status_code=201)


async def list_generation(platform: Platform, request: Request) -> Response:
    """``?dataset=NAME&limit=N&offset=K``: ratings oldest first (every dataset when ``dataset`` is absent)."""
    from medplatform import feedback

    rows = await _list(platform, request, "generation")
    return JSONResponse([feedback.describe_rating(row) for row in rows])


async def _list(platform: Platform, request: Request, kind: str) -> list[Any]:
    from medplatform import feedback

    params = request.query_params
    numbers = {}
    for name, default, bound in (("limit", "100", f"[1, {feedback.MAX_LIST}]"), ("offset", "0", ">= 0")):
        raw = params.get(name, default)
        if not raw.isdigit():
            raise BadRequest(f"expected an integer {bound}, got {raw[:40]!r}", name)
        numbers[name] = int(raw)
    return await run_in_threadpool(lambda: feedback.list_cases(platform, kind=kind, dataset=params.get("dataset"),
                                                               **numbers))


async def get_case(platform: Platform, request: Request) -> Response:
    from medplatform import feedback

    row = await run_in_threadpool(feedback.get_case, platform, request.path_params["id"])
    return JSONResponse(feedback.describe(row))


async def case_part(platform: Platform, request: Request, part: str) -> Response:
    """The stored mask (PNG 0/255) or de-identified image (PNG, or DICOM)."""
    from medplatform import feedback

    data = await run_in_threadpool(feedback.case_blob, platform, request.path_params["id"], part)
    media = "application/dicom" if not data.startswith(b"\x89PNG") else "image/png"
    return Response(data, media_type=media, headers={"cache-control": "no-store"})


async def snapshot(platform: Platform, request: Request) -> Response:
    """``{"dataset": "feedback", "limit": N, "name": ...}``: the oldest N cases as a dataset for ``POST /jobs``;
    201 when new, 200 when the same cases were snapshot before."""
    import time

    from medplatform import datasets, feedback
    from service.platform_api import _json_object

    started = time.time()
    body = await _json_object(request, ("dataset", "limit", "name"))
    row, count = await run_in_threadpool(lambda: feedback.snapshot(
        platform, body.get("dataset") or feedback.DEFAULT_DATASET, limit=body.get("limit"), name=body.get("name")))
    answer = {**datasets.describe(row), "cases": count}
    return JSONResponse(answer, status_code=201 if row.created_at.timestamp() >= started else 200,
                        headers={"location": f"/datasets/{row.id}"})


# -- form fields -------------------------------------------------------------------------------------------------


async def _file(form: Any, name: str) -> bytes:
    parts = form.getlist(name)
    if len(parts) != 1 or not isinstance(parts[0], UploadFile):
        raise BadRequest(f"expected one file part {name!r}", name)
    data = await parts[0].read(MAX_PART_BYTES + 1)
    if len(data) > MAX_PART_BYTES:
        raise BadRequest(f"{name!r} over {MAX_PART_BYTES} bytes", name)
    if not data:
        raise BadRequest(f"{name!r} is empty", name)
    return data


def _text(form: Any, name: str, *, required: bool = True) -> str | None:
    value = form.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"expected a text field {name!r}", name)
    return value


def _number(form: Any, name: str) -> float:
    raw = _text(form, name) or ""
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"expected a number, got {raw[:40]!r}", name) from None
    if not math.isfinite(value):
        raise BadRequest(f"expected a finite number, got {raw[:40]!r}", name)
    return value


def _integer(form: Any, name: str) -> int:
    raw = (_text(form, name) or "").strip()
    if not raw.lstrip("-").isdigit():
        raise BadRequest(f"expected an integer, got {raw[:40]!r}", name)
    return int(raw)
