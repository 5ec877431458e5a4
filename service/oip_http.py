"""Open Inference Protocol (KServe v2) over HTTP/REST: a Starlette ASGI app.
(Details: docs/architecture.md, "service".)
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.errors import NotReady, PayloadTooLarge, Unauthorized, UnsupportedMediaType, client_error
from service.metrics import model_label
from service.oip import ModelNotFoundError, OipError, encode_http_infer_response, parse_http_infer_request
from service.oip_models import ModelRegistry, default_registry, server_metadata
from service.protocols import FrontEndRuntime

__all__ = ["PROTOCOL", "create_oip_app", "model_ready_unlisted", "presented_api_key"]

logger = logging.getLogger(__name__)

PROTOCOL = "oip-http"
_HEADER_LENGTH = "inference-header-content-length"

Handler = Callable[[Request, Any], Awaitable[Response]]  # runtime None only where needs_runtime=False
# The runtime, or a callable returning it (None while it is being built).
RuntimeSource = FrontEndRuntime | Callable[[], FrontEndRuntime | None]


def presented_api_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The API key a client presented: ``Authorization: Bearer <key>`` wins over ``X-API-Key``; None if neither."""
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if x_api_key:
        return x_api_key.strip()
    return None


def _error_response(exc: Exception) -> JSONResponse:
    """The OIP error body ``{"error"}`` of ``exc``, mapped by type (``service.errors.client_error``)."""
    error = client_error(exc, generic=f"internal server error ({type(exc).__name__})")
    return JSONResponse({"error": error.message}, status_code=error.code, headers=error.headers())


def _decompress(data: bytes, encoding: str, limit: int) -> bytes:
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS  # HTTP "deflate" is zlib-wrapped
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise OipError(f"request body is not valid {encoding} data: {exc}", field="Content-Encoding") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(
            f"decompressed request body exceeds the limit of {limit} bytes (max_upload_bytes)", "body"
        )
    if not inflater.eof:
        raise OipError(f"request body is truncated {encoding} data", field="Content-Encoding")
    return out


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes ``limit`` bytes (before or after decompression)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes (max_upload_bytes)", "body"
        )
    buffer = bytearray()
    async for chunk in request.stream():
        buffer += chunk
        if len(buffer) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes (max_upload_bytes)", "body")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return bytes(buffer)
    if encoding in ("gzip", "deflate"):
        return _decompress(bytes(buffer), encoding, limit)
    raise UnsupportedMediaType(
        f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none", "Content-Encoding"
    )


class _OipHttp:
    """The route handlers, bound to a runtime source and a model registry."""

    def __init__(self, runtime: RuntimeSource, registry: ModelRegistry) -> None:
        if isinstance(runtime, FrontEndRuntime):
            self._runtime_source: Callable[[], FrontEndRuntime | None] = lambda: runtime
        elif callable(runtime):
            self._runtime_source = runtime
        else:
            raise TypeError(f"create_oip_app: expected a ServiceRuntime or a callable returning one, got {runtime!r}")
        self.registry = registry

    def runtime(self) -> FrontEndRuntime:
        runtime = self._runtime_source()
        if runtime is None:
            raise NotReady("server is starting: the inference runtime is not built yet")
        return runtime

    def endpoint(
        self, label: str, handler: Handler, *, auth: bool = True, needs_runtime: bool = True
    ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap ``handler`` with the API-key check, error mapping and request metrics (``label``: the route).

        ``needs_runtime=False``: the handler also runs (with ``runtime=None``) while the runtime is not built.
        """

        async def run(request: Request) -> Response:
            start = time.perf_counter()
            runtime = None
            model = model_label(request.path_params.get("model"), self.registry.names)
            try:
                runtime = self._runtime_source() if not needs_runtime else self.runtime()
                if auth and not runtime.check_api_key(
                    presented_api_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
                ):
                    raise Unauthorized()
                response = await handler(request, runtime)
            except ClientDisconnect:
                response = Response(status_code=499)  # nobody is listening; counted as 499, like nginx
            except asyncio.CancelledError:  # the guard cancels the handler of a client that hung up
                if runtime is not None:
                    runtime.metrics.observe_request(label, PROTOCOL, "499", time.perf_counter() - start, model=model)
                raise
            except Exception as exc:  # every failure becomes an OIP error body
                response = _error_response(exc)
            if runtime is not None:
                runtime.metrics.observe_request(label, PROTOCOL, str(response.status_code), time.perf_counter() - start,
                                                model=model)
            return response

        return run

    # -- handlers -------------------------------------------------------------------------------------------

    async def server_metadata(self, request: Request, runtime: FrontEndRuntime | None) -> Response:
        return JSONResponse(server_metadata())

    async def live(self, request: Request, runtime: FrontEndRuntime | None) -> Response:
        live = True if runtime is None else bool(runtime.live)  # answering at all means the process is live
        return JSONResponse({"live": live}, status_code=200 if live else 503)

    async def ready(self, request: Request, runtime: FrontEndRuntime) -> Response:
        ready = bool(runtime.ready)
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def model_metadata(self, request: Request, runtime: FrontEndRuntime) -> Response:
        name, version = _model_path(request)
        return JSONResponse(self.registry.model_metadata(runtime, name, version))

    async def model_ready(self, request: Request, runtime: FrontEndRuntime) -> Response:
        name, version = _model_path(request)
        ready = model_ready_unlisted(self.registry, runtime, name, version)
        body: dict[str, Any] = {"name": name, "ready": ready}
        if not ready:
            body["error"] = f"model '{name}' is not ready"
        return JSONResponse(body, status_code=200 if ready else 503)

    async def infer(self, request: Request, runtime: FrontEndRuntime) -> Response:
        name, version = _model_path(request)
        self.registry.get(runtime, name, version)  # 404 before reading the body
        body = await _read_body(request, int(runtime.settings.max_upload_bytes))
        header_length = request.headers.get(_HEADER_LENGTH)
        infer_request = await run_in_threadpool(
            parse_http_infer_request, body, model_name=name, model_version=version, header_length=header_length
        )
        infer_response = await self.registry.infer(runtime, infer_request, protocol=PROTOCOL)
        payload, json_length = await run_in_threadpool(encode_http_infer_response, infer_response, infer_request)
        if json_length is None:
            return Response(payload, media_type="application/json")
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(json_length)},
        )


def model_ready_unlisted(registry: ModelRegistry, runtime: FrontEndRuntime, name: str, version: str = "") -> bool:
    """``registry.model_ready`` for the key-less readiness probe: an unknown model or version is a 404
    whose message does not list what the server serves (model metadata, which does, needs the key).

    Raises:
        ModelNotFoundError: unknown model or version.
    """
    try:
        return registry.model_ready(runtime, name, version)
    except ModelNotFoundError as exc:
        what = f"model '{name}'" + (f" version '{version}'" if version else "")
        raise ModelNotFoundError(f"{what} is not served here", field=exc.field) from None


def _model_path(request: Request) -> tuple[str, str]:
    return request.path_params["model"], request.path_params.get("version", "")


def create_oip_app(
    runtime: RuntimeSource,
    *,
    registry: ModelRegistry | None = None,
    prefix: str = "",
) -> Starlette:
    """The OIP HTTP app.

    Args:
        runtime: the ``service.runtime.ServiceRuntime``, or a zero-argument callable returning it (or
            None while it is being built: every route but ``/health/live`` then answers 503). Use the
            callable form when the app must exist before the runtime (BentoML mounts apps at import time
            and builds the service instance later, in the worker).
        registry: the models to serve (default: ``default_registry()``, the ``segment`` model).
        prefix: path prefix of every route. ``""`` when mounted at ``/v2`` (BentoML
            ``mount_asgi_app(app, path="/v2")``; a bare ``GET /v2`` is then redirected to ``/v2/`` by the
            outer router), ``"/v2"`` when mounted at ``/`` or served on its own (then ``GET /v2``
            answers directly, as ``tritonclient.http.get_server_metadata`` needs: it does not follow redirects).
    """
    prefix = prefix.rstrip("/")
    if prefix and not prefix.startswith("/"):
        raise ValueError(f"create_oip_app: prefix must start with '/', got {prefix!r}")
    oip = _OipHttp(runtime, registry or default_registry())
    model = "/models/{model}"
    versioned = "/models/{model}/versions/{version}"
    routes = [
        Route(prefix or "/", oip.endpoint("/v2", oip.server_metadata), methods=["GET"]),
        Route(
            prefix + "/health/live",
            oip.endpoint("/v2/health/live", oip.live, auth=False, needs_runtime=False),
            methods=["GET"],
        ),
        Route(prefix + "/health/ready", oip.endpoint("/v2/health/ready", oip.ready, auth=False), methods=["GET"]),
    ]
    if prefix:
        routes.append(Route(prefix + "/", oip.endpoint("/v2", oip.server_metadata), methods=["GET"]))
    for path in (model, versioned):
        label = "/v2" + path
        routes += [
            Route(prefix + path, oip.endpoint(label, oip.model_metadata), methods=["GET"]),
            # model readiness is a health probe (KServe v2 "Health" API): no API key, as over gRPC
            Route(prefix + path + "/ready", oip.endpoint(label + "/ready", oip.model_ready, auth=False),
                  methods=["GET"]),
            Route(prefix + path + "/infer", oip.endpoint(label + "/infer", oip.infer), methods=["POST"]),
        ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"no OIP route {request.method} {request.url.path}"}, status_code=404)

    async def bad_method(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"method {request.method} not allowed on {request.url.path}"}, status_code=405)

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method})
