"""The platform's HTTP routes (/datasets, /jobs, /models) as a Starlette app over ``medplatform``: parsing, keys,
and errors mapped by type; every decision is medplatform's. Jobs run in worker processes (or Ray), never here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from service.errors import (
    BadRequest,
    NotReady,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
    as_service_error,
)
from service.feedback_api import feedback_routes
from service.model_versions import LoadedVersions
from service.oip_http import presented_api_key

if TYPE_CHECKING:
    import subprocess

    from medplatform.context import Platform
    from medplatform.ray_runner import RayRunner
    from service.generation import GenerationRuntime
    from service.settings import ServiceSettings

__all__ = ["PlatformState", "ServedVersions", "create_platform_app", "dataset_upload_limit", "start_platform",
           "stop_platform"]

logger = logging.getLogger("service.platform_api")

JSON_BODY_LIMIT = 64 * 1024  # POST /jobs, PUT aliases, POST /datasets with a URL
MULTIPART_OVERHEAD = 1024 * 1024  # part headers and boundaries on top of MEDREFINE_DATASET_MAX_BYTES
SSE_POLL_S = 1.0  # how often a stream re-reads the job
SSE_HEARTBEAT_S = 15.0  # a comment line when nothing changed, so proxies keep the stream and a gone client is seen
SSE_MAX_S = 600.0  # a stream ends after this (the client reconnects); under BentoML's request timeout
WORKER_STOP_S = 5.0  # SIGTERM -> SIGKILL for the local workers at shutdown
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class ServedVersions(LoadedVersions, Protocol):
    """The serving layer as the platform routes see it (``service.model_versions.ModelVersions``): a loaded
    version cannot be deleted (409), and a moved alias is re-read at once instead of after its TTL."""

    def on_alias_changed(self, name: str) -> None: ...


@dataclass
class PlatformState:
    """The platform as this server process holds it; filled by ``start_platform`` in the start-up hook."""

    platform: Platform | None = None
    served: ServedVersions | None = None
    ray: RayRunner | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    unavailable: str = "platform starting"


def dataset_upload_limit(env: Mapping[str, str] | None = None) -> int:
    """Bytes a ``POST /datasets`` body may have: MEDREFINE_DATASET_MAX_BYTES (1 GiB) plus multipart overhead.

    Enforced here while the body streams (413, field ``file``); the guard in front must let such a body
    through (its own ``max_upload_bytes``, 20 MiB, is for inference uploads).
    """
    from medplatform.dataset_limits import DatasetLimits

    return DatasetLimits.from_env(env).max_bytes + MULTIPART_OVERHEAD


# -- start and stop -------------------------------------------------------------------------------------------


def worker_env(settings: ServiceSettings, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a job worker: the server's, without the keys (a job needs neither)."""
    env = dict(os.environ if env is None else env)
    for name in (settings.api_key_env, "MEDREFINE_API_KEY", "MEDREFINE_ADMIN_KEY"):
        env.pop(name, None)
    return env


def start_platform(state: PlatformState, settings: ServiceSettings, served: ServedVersions | None) -> None:
    """Open the platform (database migrated), fail jobs whose worker died, start the job runner.

    ``served``: the runtime's versions (None without a runtime: nothing is loaded).

    Runner: Ray when ``settings.ray_address`` is set, else ``settings.platform_workers`` local worker
    processes (0: none here). A failure leaves the platform routes answering 503 while inference serves on.
    """
    try:
        from medplatform.context import open_platform
        from medplatform.jobs import reap_stale
        from medplatform.worker import WorkerSettings, start_local_workers

        platform = open_platform()
        reaped = reap_stale(platform, WorkerSettings.from_env().stale_after_s)
        if reaped:
            logger.warning("%d job(s) whose worker stopped heartbeating marked failed", len(reaped))
        if settings.ray_address:
            from medplatform.ray_runner import RayRunner

            state.ray = RayRunner(settings.ray_address)
        elif settings.platform_workers > 0:
            state.workers = start_local_workers(settings.platform_workers, env=worker_env(settings))
        state.served = served
        state.platform = platform
        logger.info("platform ready: %s", "jobs on Ray" if state.ray is not None else
                    f"{len(state.workers)} local job worker(s)")
    except Exception as exc:  # the service still serves inference
        state.unavailable = f"platform unavailable ({type(exc).__name__}; see the server log)"
        logger.error("platform failed to start: %s\n%s", type(exc).__name__, "".join(traceback.format_tb(
            exc.__traceback__)))


def stop_platform(state: PlatformState, timeout_s: float = WORKER_STOP_S) -> None:
    """Stop the local workers (a running job goes back to the queue at its next report, or is reaped later)."""
    state.platform = None
    state.unavailable = "platform stopped"
    if state.workers:
        from medplatform.worker import stop_local_workers

        stop_local_workers(state.workers, timeout_s=timeout_s)
        state.workers = []


# -- the app ------------------------------------------------------------------------------------------------


def create_platform_app(state: PlatformState, *, settings: Callable[[], ServiceSettings],
                        stopping: Callable[[], bool] = lambda: False,
                        generation: Callable[[], GenerationRuntime | None] = lambda: None) -> Starlette:
    """The routes; mount with ``MedRefine.mount_asgi_app(app, path="/")`` (BentoML's PassiveMount).

    Args:
        state: filled at start-up; routes answer 503 until ``state.platform`` is set.
        settings: the server's settings (keys: ``api_key`` for reads, ``admin_key`` for changes).
        stopping: True once the server drains: event streams end so the drain is not held open.
        generation: the served generator (None: none), whose modalities and limits ratings are checked against.
    """
    api = _PlatformApi(state, settings, stopping)
    routes = [
        Route("/datasets", api.endpoint(api.list_datasets), methods=["GET"]),
        Route("/datasets", api.endpoint(api.create_dataset, admin=True), methods=["POST"]),
        Route("/datasets/{id}", api.endpoint(api.get_dataset), methods=["GET"]),
        Route("/datasets/{id}", api.endpoint(api.delete_dataset, admin=True), methods=["DELETE"]),
        Route("/jobs", api.endpoint(api.list_jobs), methods=["GET"]),
        Route("/jobs", api.endpoint(api.create_job, admin=True), methods=["POST"]),
        Route("/jobs/{id}", api.endpoint(api.get_job), methods=["GET"]),
        Route("/jobs/{id}", api.endpoint(api.cancel_job, admin=True), methods=["DELETE"]),
        Route("/jobs/{id}/events", api.endpoint(api.job_events), methods=["GET"]),
        Route("/jobs/{id}/logs", api.endpoint(api.job_logs), methods=["GET"]),
        Route("/models", api.endpoint(api.list_models), methods=["GET"]),
        Route("/models/{name}/versions", api.endpoint(api.list_versions), methods=["GET"]),
        Route("/models/{name}/versions/{version}", api.endpoint(api.get_version), methods=["GET"]),
        Route("/models/{name}/versions/{version}", api.endpoint(api.delete_version, admin=True),
              methods=["DELETE"]),
        Route("/models/{name}/aliases/{alias}", api.endpoint(api.set_alias, admin=True), methods=["PUT"]),
        Route("/models/{name}/aliases/{alias}", api.endpoint(api.remove_alias, admin=True), methods=["DELETE"]),
        *feedback_routes(api.endpoint, generation),  # /feedback/... (service.feedback_api), same keys and errors
    ]
    return Starlette(routes=routes)


Handler = Callable[["Platform", Request], Awaitable[Response]]


class _PlatformApi:
    def __init__(self, state: PlatformState, settings: Callable[[], ServiceSettings],
                 stopping: Callable[[], bool]) -> None:
        self.state, self.settings, self.stopping = state, settings, stopping

    # -- keys, errors ---------------------------------------------------------------------------------------

    def _authorised(self, request: Request, *, admin: bool) -> bool:
        """Reads: the API key or the admin key; changes: the admin key (when none is set, what reads need)."""
        settings = self.settings()
        presented = presented_api_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
        if admin and settings.admin_key:
            needed = [settings.admin_key]
        elif not settings.api_key:  # reads are as open as inference
            return True
        else:
            needed = [key for key in (settings.api_key, settings.admin_key) if key]
        given = (presented or "").encode("utf-8")
        # every key compared (constant time each), so the answer's timing does not tell which one matched
        return any([hmac.compare_digest(given, key.encode("utf-8")) for key in needed])

    def endpoint(self, handler: Handler, *, admin: bool = False) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            try:
                if not self._authorised(request, admin=admin):
                    raise Unauthorized("this call changes the platform: send the admin key as 'Authorization: "
                                       "Bearer <key>' or 'X-API-Key'" if admin else
                                       "missing or invalid API key (send 'Authorization: Bearer <key>')")
                platform = self.state.platform
                if platform is None:
                    raise NotReady(self.state.unavailable, retry_after=5)
                return await handler(platform, request)
            except Exception as exc:
                return _error_response(exc)

        return run

    # -- datasets -------------------------------------------------------------------------------------------

    async def list_datasets(self, platform: Platform, request: Request) -> Response:
        from medplatform import datasets

        rows = await run_in_threadpool(datasets.list_datasets, platform)
        return JSONResponse([datasets.describe(row) for row in rows])

    async def get_dataset(self, platform: Platform, request: Request) -> Response:
        from medplatform import datasets

        n = _query_int(request, "thumbnails", 4, 0, 16)
        size = _query_int(request, "size", 128, 16, 512)
        row = await run_in_threadpool(datasets.get_dataset, platform, request.path_params["id"])
        thumbs = await run_in_threadpool(datasets.thumbnails, platform, row.id, n, size) if n else []
        body = datasets.describe(row)
        body["thumbnails"] = [{"name": t.name, "png": base64.b64encode(t.png).decode("ascii")} for t in thumbs]
        return JSONResponse(body)

    async def create_dataset(self, platform: Platform, request: Request) -> Response:
        """A ZIP (multipart ``file``), a set of files (multipart ``files``), or ``{"url", "name"}`` (JSON).
        201 with the new dataset (``ready`` or ``error``); 200 with the existing one for the same content."""
        from medplatform import datasets
        from medplatform.dataset_limits import DatasetLimits

        started = time.time()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        limits = await run_in_threadpool(DatasetLimits.from_env)
        if content_type == "application/json":
            body = await _json_object(request, ("url", "name", "deidentify"))
            url = body.get("url")
            if not isinstance(url, str) or not url:
                raise BadRequest("a JSON upload needs \"url\": the ZIP to fetch", "url")
            name = body.get("name") or PurePosixPath(urlsplit(url).path).stem or "dataset"
            deidentify = _flag(body.get("deidentify"), "deidentify")
            row = await run_in_threadpool(lambda: datasets.ingest_url(platform, name, url, deidentify=deidentify))
        elif content_type == "multipart/form-data":
            row = await self._ingest_multipart(platform, request, limits)
        else:
            raise UnsupportedMediaType("POST /datasets takes multipart/form-data ('file': a ZIP, or 'files') or "
                                       f"application/json ({{\"url\"}}), got {content_type or 'none'!r}", "file")
        created = row.created_at.timestamp() >= started  # the same content uploaded before: its older row
        return JSONResponse(datasets.describe(row), status_code=201 if created else 200,
                            headers={"location": f"/datasets/{row.id}"})

    async def _ingest_multipart(self, platform: Platform, request: Request, limits: Any) -> Any:
        from starlette.exceptions import HTTPException
        from starlette.formparsers import MultiPartException

        from medplatform import datasets
        from medplatform.settings import data_dir

        limit = limits.max_bytes + MULTIPART_OVERHEAD  # dataset_upload_limit()
        limited = Request(request.scope, _limited_receive(request.receive, limit))
        try:
            form = await limited.form(max_files=limits.max_files + 1, max_fields=8)
        except (MultiPartException, HTTPException) as exc:
            raise BadRequest(f"malformed multipart/form-data body ({getattr(exc, 'detail', exc)})", "file") from exc
        try:
            archive, many = form.getlist("file"), form.getlist("files")
            for key, parts in (("file", archive), ("files", many)):
                if any(not isinstance(part, UploadFile) for part in parts):
                    raise BadRequest(f"{key!r} must be a file upload (a part with a filename)", key)
            if archive and many or len(archive) > 1:
                raise BadRequest("send one ZIP as 'file' or the files themselves as 'files', not both", "file")
            if not archive and not many:
                raise BadRequest("no upload: send a ZIP as 'file' or the files as 'files'", "file")
            name_field = form.get("name")
            if name_field is not None and not isinstance(name_field, str):
                raise BadRequest("'name' must be a text field", "name")
            deidentify = _flag(form.get("deidentify"), "deidentify")
            if archive:
                upload = archive[0]
                name = name_field or PurePosixPath(upload.filename or "").stem or "dataset"
                return await run_in_threadpool(
                    lambda: datasets.ingest_zip(platform, name, upload.file, deidentify=deidentify, limits=limits))
            stage = data_dir() / "tmp"

            def ingest_set() -> Any:
                stage.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(prefix="upload-", dir=stage) as tmp:
                    files = []
                    for index, part in enumerate(many):  # spooled parts -> files, so memory stays small
                        path = Path(tmp) / f"part-{index:05d}"
                        with path.open("wb") as out:
                            part.file.seek(0)
                            shutil.copyfileobj(part.file, out, 1 << 20)
                        files.append((part.filename or "", path))
                    return datasets.ingest_files(platform, name_field or "dataset", files, deidentify=deidentify,
                                                 limits=limits)

            return await run_in_threadpool(ingest_set)
        finally:
            await form.close()

    async def delete_dataset(self, platform: Platform, request: Request) -> Response:
        from medplatform import datasets

        dataset_id = request.path_params["id"]
        await run_in_threadpool(datasets.delete_dataset, platform, dataset_id)
        return JSONResponse({"id": dataset_id, "deleted": True})

    # -- jobs -------------------------------------------------------------------------------------------------

    async def list_jobs(self, platform: Platform, request: Request) -> Response:
        from medplatform import jobs

        limit = _query_int(request, "limit", 100, 1, jobs.MAX_LIST)
        rows = await run_in_threadpool(lambda: jobs.list_jobs(platform, status=request.query_params.get("status"),
                                                              limit=limit))
        return JSONResponse([jobs.job_to_dict(row) for row in rows])

    async def create_job(self, platform: Platform, request: Request) -> Response:
        """202 with the queued job; the runner (local workers or Ray) picks it up."""
        from medplatform import jobs

        body = await _json_object(request, ("kind", "dataset", "recipe", "hyperparameters"))
        job = await run_in_threadpool(lambda: jobs.submit_job(platform, body.get("kind"), body.get("dataset"),
                                                              body.get("recipe"), body.get("hyperparameters")))
        if self.state.ray is not None:
            ray = self.state.ray
            with contextlib.suppress(Exception):  # a refused submission fails the job itself (its row says why)
                await run_in_threadpool(ray.submit, platform, job.id)
            job = await run_in_threadpool(jobs.get_job, platform, job.id)
        return JSONResponse(jobs.job_to_dict(job), status_code=202, headers={"location": f"/jobs/{job.id}"})

    def _read_job(self, platform: Platform, job_id: str) -> Any:
        """The job's row; a Ray-run job is reconciled with Ray first (a run that died ends the row)."""
        from medplatform import jobs

        job = jobs.get_job(platform, job_id)
        if self.state.ray is not None and job.status not in jobs.FINISHED and (job.worker_id or "").startswith(
                "ray:"):
            with contextlib.suppress(Exception):  # Ray unreachable: the row as stored
                job = self.state.ray.sync(platform, job_id)
        return job

    async def get_job(self, platform: Platform, request: Request) -> Response:
        from medplatform import jobs

        job = await run_in_threadpool(self._read_job, platform, request.path_params["id"])
        return JSONResponse(jobs.job_to_dict(job))

    async def job_events(self, platform: Platform, request: Request) -> Response:
        """Server-sent events: ``event: job`` with the job (as ``GET /jobs/{id}``) at start and on each change,
        ``: keep-alive`` comments in between, ``event: end`` once it finished; ends early on disconnect, server
        drain, or after ``SSE_MAX_S`` (``event: timeout``; reconnect to go on)."""
        from medplatform import jobs

        job_id = request.path_params["id"]
        first = await run_in_threadpool(self._read_job, platform, job_id)  # 404 before the stream starts

        async def stream() -> AsyncIterator[str]:
            job, last, count = first, None, 0
            started = last_sent = time.monotonic()
            while True:
                payload = jobs.job_to_dict(job)
                if payload != last:
                    count += 1
                    yield f"id: {count}\nevent: job\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"
                    last, last_sent = payload, time.monotonic()
                if job.status in jobs.FINISHED:
                    yield f"event: end\ndata: {json.dumps({'status': job.status})}\n\n"
                    return
                if self.stopping() or time.monotonic() - started > SSE_MAX_S:
                    yield "event: timeout\ndata: {}\n\n"
                    return
                if time.monotonic() - last_sent >= SSE_HEARTBEAT_S:
                    yield ": keep-alive\n\n"
                    last_sent = time.monotonic()
                await asyncio.sleep(SSE_POLL_S)
                try:
                    job = await run_in_threadpool(self._read_job, platform, job_id)
                except Exception as exc:  # deleted meanwhile, database gone: end the stream, say why
                    yield f"event: error\ndata: {json.dumps({'error': type(exc).__name__})}\n\n"
                    return

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    async def job_logs(self, platform: Platform, request: Request) -> Response:
        from medplatform import jobs

        text = await run_in_threadpool(jobs.job_log, platform, request.path_params["id"])
        return PlainTextResponse(text, headers={"cache-control": "no-store"})

    async def cancel_job(self, platform: Platform, request: Request) -> Response:
        """Cancel: a queued job at once, a running one at its next report (``progress.cancel_requested``)."""
        from medplatform import jobs

        job_id = request.path_params["id"]

        def cancel() -> Any:
            job = jobs.get_job(platform, job_id)
            if self.state.ray is not None and (job.worker_id or "").startswith("ray:"):
                return self.state.ray.cancel(platform, job_id)
            return jobs.cancel_job(platform, job_id)

        return JSONResponse(jobs.job_to_dict(await run_in_threadpool(cancel)))

    # -- models -----------------------------------------------------------------------------------------------

    async def list_models(self, platform: Platform, request: Request) -> Response:
        models = await run_in_threadpool(platform.registry.list_models)
        return JSONResponse([model.to_dict() for model in models])

    async def list_versions(self, platform: Platform, request: Request) -> Response:
        versions = await run_in_threadpool(platform.registry.list_versions, request.path_params["name"])
        return JSONResponse([info.to_dict() for info in versions])

    async def get_version(self, platform: Platform, request: Request) -> Response:
        version = _version(request.path_params["version"])
        info = await run_in_threadpool(platform.registry.get_version, request.path_params["name"], version)
        return JSONResponse(info.to_dict())

    async def set_alias(self, platform: Platform, request: Request) -> Response:
        """``{"version": N}``: point the alias (e.g. ``production``) at version N; 200 with that version."""
        body = await _json_object(request, ("version",))
        version = body.get("version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise BadRequest(f"expected an integer version, got {version!r}", "version")
        name, alias = request.path_params["name"], request.path_params["alias"]
        info = await run_in_threadpool(platform.registry.set_alias, name, alias, version)
        self._alias_changed(name)
        return JSONResponse(info.to_dict())

    def _alias_changed(self, name: str) -> None:
        if self.state.served is not None:
            self.state.served.on_alias_changed(name)

    async def remove_alias(self, platform: Platform, request: Request) -> Response:
        name, alias = request.path_params["name"], request.path_params["alias"]
        await run_in_threadpool(platform.registry.remove_alias, name, alias)
        self._alias_changed(name)
        return JSONResponse({"name": name, "alias": alias, "deleted": True})

    async def delete_version(self, platform: Platform, request: Request) -> Response:
        """Refused (409) while an alias points at it or this server has it loaded."""
        from medplatform.errors import Conflict

        name, version = request.path_params["name"], _version(request.path_params["version"])
        served = self.state.served

        def delete() -> None:
            if served is not None and served.is_loaded(name, version):
                raise Conflict("version", version, f"version {version} of {name!r} is loaded by the server; "
                                                   "serve another version first")
            platform.registry.delete_version(name, version)

        await run_in_threadpool(delete)
        return JSONResponse({"name": name, "version": version, "deleted": True})


# -- parsing and errors -----------------------------------------------------------------------------------------


def _error_response(exc: Exception) -> JSONResponse:
    """By type (``service.errors.as_service_error``: medplatform NotFound 404, Conflict 409, other
    PlatformError 400, ``field`` named); anything else a generic 500 (logged with its frames, without its message)."""
    error = as_service_error(exc)
    if error is not None:
        return JSONResponse(error.to_dict(), status_code=error.code, headers=error.headers())
    logger.error("platform request failed: %s\n%s", type(exc).__name__,
                 "".join(traceback.format_tb(exc.__traceback__)))
    return JSONResponse({"error": "internal server error", "field": None}, status_code=500)


class _BodyTooLarge(PayloadTooLarge):
    pass


def _limited_receive(receive: Callable[[], Awaitable[Any]], limit: int) -> Callable[[], Awaitable[Any]]:
    """``receive`` that refuses (413, field ``file``) once more than ``limit`` body bytes arrived."""
    received = 0

    async def limited() -> Any:
        nonlocal received
        message = await receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise _BodyTooLarge(f"upload over {limit} bytes (MEDREFINE_DATASET_MAX_BYTES plus multipart "
                                "overhead)", "file")
        return message

    return limited


async def _json_object(request: Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    """The body as a JSON object of the ``allowed`` keys (at most ``JSON_BODY_LIMIT`` bytes); 400 naming the key."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise UnsupportedMediaType(f"expected an application/json body, got {content_type or 'none'!r}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > JSON_BODY_LIMIT:
            raise PayloadTooLarge(f"JSON body over {JSON_BODY_LIMIT} bytes")
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"the body is not valid JSON ({exc.msg} at {exc.pos})") from exc
    if not isinstance(data, dict):
        raise BadRequest(f"expected a JSON object, got {type(data).__name__}")
    for key in data:
        if key not in allowed:
            raise BadRequest(f"unknown field {key!r}; expected {', '.join(allowed)}", str(key))
    return data


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise BadRequest(f"expected an integer in [{low}, {high}], got {raw!r}", name)
    return value


def _version(raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 2**31:
        raise BadRequest(f"expected a positive integer version, got {raw!r}", "version")
    return int(raw)


def _flag(value: Any, name: str) -> bool:
    """A yes/no field: JSON true/false or the text forms (``1``/``0``, ``true``/``false``, ...); absent: False."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise BadRequest(f"expected true or false, got {value!r}", name)
