"""The ASGI guard in front of every HTTP route of the BentoML app (REST, /v2 OIP, /ui, probes).

BentoML 1.4 has no request-body limit and answers its own probes with plain text, so this middleware
(installed with ``MedRefine.add_asgi_middleware``) does, in order:

1. ``GET /livez`` and ``GET /readyz``: JSON probes from the runtime (ready only once every artifact is
   loaded and verified and the batcher runs; false again as soon as draining starts).
1b. Draining for shutdown: new requests (not probes or ``/metrics``) -> 503 + ``Retry-After`` +
   ``Connection: close``; requests let in before the drain began run to completion.
1c. Concurrency: a request holds a slot only once its body has arrived whole, so clients that send slowly
   cannot lock others out: more than ``max_concurrency`` such requests (probes and ``/metrics`` not
   counted) -> 429 with ``Retry-After`` and our JSON body; more than ``max_receiving`` bodies still
   arriving -> 429 before any is read; a body slower than ``min_upload_bytes_per_s`` after
   ``upload_grace_s`` -> 408 and the connection is closed.
2. API key: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` on the REST routes (``/segment``,
   ``/refine``, ``/synthesize``, ``/generate``) when a key is configured -> 401 (``/v2`` checks it
   itself, except its health probes).
3. Content type: ``multipart/form-data`` on ``/segment``, ``/refine`` and ``/synthesize``,
   ``application/json`` on ``/generate`` -> 415 otherwise.
4. Body size: a ``Content-Length`` over ``max_upload_bytes`` is refused before any byte is read, and
   streamed (chunked) bodies are counted as they arrive -> 413.
5. Multipart structure: the body must start with its boundary and end with the closing one, and the
   ``file``/``prior_mask`` fields must be file parts (BentoML's form parser would fetch a text value
   as a URL, and answers 500 to malformed bodies) -> 400 before the body is parsed.
6. BentoML's own input-validation 400s (pydantic) on the REST routes are rewritten to our body
   ``{"error": ..., "field": ...}``.

Refusals discovered mid-stream (4, 5, and the slot taken when the body is whole) stop the downstream app
from inside its ``receive`` (nothing for it to log) and the refusal goes out instead. A client that disconnects after
sending a REST or ``/v2/.../infer`` request cancels its handler, which drops the request from the
batching queue (counted with status 499, as is one that leaves mid-upload). Every REST request is counted
in ``medrefine_requests_total{protocol="rest"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import (
    BadRequest,
    NotReady,
    PayloadTooLarge,
    RequestTimeoutError,
    ServiceError,
    TooManyRequests,
    Unauthorized,
    UnsupportedMediaType,
    UploadTooSlow,
)

__all__ = [
    "API_ROUTES",
    "UNLIMITED_PATHS",
    "UPLOAD_FIELDS",
    "GuardMiddleware",
    "OpenRequests",
    "error_response_parts",
    "mark_handler_entered",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

API_ROUTES = {"/segment": "segment", "/refine": "refine", "/synthesize": "synthesize", "/generate": "generate"}
JSON_ROUTES = frozenset({"/generate"})  # the others take multipart/form-data uploads
# Never refused for concurrency or while draining (probes and scrapes must answer); no API key either.
# The model-readiness probes /v2/models/{model}[/versions/{v}]/ready are matched by _is_probe as well.
UNLIMITED_PATHS = frozenset({"/metrics", "/v2/health/live", "/v2/health/ready"})
UPLOAD_FIELDS = (b"file", b"prior_mask")
_BODY_METHODS = {"POST", "PUT", "PATCH"}
# python-multipart logs a warning before raising on a malformed body; the guard answers 400 for it instead.
logging.getLogger("python_multipart.multipart").setLevel(logging.ERROR)
ANSWER_GRACE_S = 5.0  # decoding and encoding around the batcher's request_timeout_s


def error_response_parts(error: ServiceError, *, oip: bool = False) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and JSON body of ``error`` as an HTTP response: REST's ``{"error", "field"}``, or the
    Open Inference Protocol's ``{"error"}`` for ``/v2`` routes (``oip``)."""
    payload = {"error": error.message} if oip else error.to_dict()
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    return error.code, headers, body


async def _send_json(send: Send, status: int, payload: dict[str, Any], extra: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, error: ServiceError, *, close: bool = False, oip: bool = False) -> None:
    status, headers, body = error_response_parts(error, oip=oip)
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _normalise_validation_error(body: bytes) -> bytes:
    """BentoML's ``{"error": "1 validation error for Input", "detail": [...]}`` -> ``{"error", "field"}``."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict) or "field" in data:
        return body
    detail = data.get("detail")
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
        field = loc[0] if loc else None
        message = str(first.get("msg", "invalid value"))
        prefix = ".".join(loc)
        return json.dumps({"error": f"{prefix}: {message}" if prefix else message, "field": field},
                          separators=(",", ":")).encode()
    if isinstance(data.get("error"), str):
        return json.dumps({"error": data["error"], "field": None}, separators=(",", ":")).encode()
    return body


class _MultipartGuard:
    """Structural checks of a multipart body as it streams past, with the parser Starlette (and so BentoML)
    will use on it, python-multipart, so the guard sees the parts and names the app will see:

    * the body is well-formed multipart and ends with its closing boundary (BentoML would answer 500);
    * every part has a field name;
    * a part named like an upload field (``file``, ``prior_mask``) is a file part (has a ``filename``),
      and comes once: BentoML would fetch a text value as a URL, and silently keep one of two files.
    """

    def __init__(self, boundary: bytes) -> None:
        self._problem: ServiceError | None = None
        self._seen: set[bytes] = set()
        self._header_field = b""
        self._header_value = b""
        self._disposition: bytes | None = None
        self._ended = False

        def on_header_field(data: bytes, start: int, end: int) -> None:
            self._header_field += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            self._header_value += data[start:end]

        def on_header_end() -> None:
            if self._header_field.strip().lower() == b"content-disposition":
                self._disposition = self._header_value
            self._header_field = self._header_value = b""

        def on_headers_finished() -> None:
            self._check_part()
            self._disposition = None

        def on_end() -> None:
            self._ended = True

        self._parser = MultipartParser(boundary, {
            "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_end": on_end,
        })

    def _check_part(self) -> None:
        if self._problem is not None:
            return
        _, options = parse_options_header(self._disposition or b"")
        name = options.get(b"name")
        if not name:
            self._problem = BadRequest("malformed multipart/form-data body: a part has no field name "
                                       "(Content-Disposition: form-data; name=\"...\")")
            return
        if name not in UPLOAD_FIELDS:
            return
        field = name.decode("latin-1")
        if b"filename" not in options:
            self._problem = BadRequest(f"field {field!r} must be a file upload (a multipart part with a filename); "
                                       "text values and URLs are not accepted", field)
        elif name in self._seen:
            self._problem = BadRequest(f"field {field!r} was sent more than once; send one file", field)
        self._seen.add(name)

    def feed(self, chunk: bytes, more_body: bool) -> ServiceError | None:
        if self._problem is None:
            try:
                self._parser.write(chunk)
            except MultipartParseError as exc:
                self._problem = BadRequest(f"malformed multipart/form-data body: {_printable(str(exc))}")
        if self._problem is None and not more_body and not self._ended:
            self._problem = BadRequest("malformed multipart/form-data body: truncated (no closing boundary)")
        return self._problem


def _printable(text: str, limit: int = 120) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


def _boundary(content_type: str) -> bytes | None:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("latin-1")
    return None


class OpenRequests:
    """Requests the guard has let in and not yet answered (probes, ``/metrics`` and refusals not counted).

    ``count``: requests that arrived whole and are being answered (bounded by ``max_concurrency``; the
    shutdown path waits for it to reach 0). ``receiving``: requests whose body is still arriving (bounded
    by ``max_receiving``). One event loop per worker touches them, so plain integers suffice.
    """

    def __init__(self) -> None:
        self.count = 0
        self.receiving = 0


class _Admission:
    """One request's claim on :class:`OpenRequests`: a receiving place while its body arrives, then an open
    slot from the moment it has arrived whole until it is answered."""

    def __init__(self, counts: OpenRequests, settings: Any, draining: Callable[[], bool]) -> None:
        self._counts = counts
        self._limit = int(settings.max_concurrency)
        self._draining = draining
        self.receiving = False
        self.open = False

    def start_receiving(self, limit: int) -> ServiceError | None:
        if self._counts.receiving >= limit:
            return TooManyRequests(f"server busy: {self._counts.receiving} uploads arriving "
                                   f"(max_receiving={limit}); retry later")
        self._counts.receiving += 1
        self.receiving = True
        return None

    def arrived(self) -> ServiceError | None:
        """The request is whole: trade the receiving place for an open slot (or say why not)."""
        if self.open:
            return None
        self._stop_receiving()
        if self._draining():
            return NotReady("server shutting down; retry on another instance", retry_after=1)
        if self._counts.count >= self._limit:
            return TooManyRequests(f"server busy: {self._counts.count} requests open "
                                   f"(max_concurrency={self._limit}); retry later")
        self._counts.count += 1
        self.open = True
        return None

    def release(self) -> None:
        self._stop_receiving()
        if self.open:
            self._counts.count -= 1
            self.open = False

    def _stop_receiving(self) -> None:
        if self.receiving:
            self._counts.receiving -= 1
            self.receiving = False


class GuardMiddleware:
    """See the module docstring.

    Args:
        app: the downstream ASGI app (BentoML's).
        runtime: zero-argument callable returning the process's ``ServiceRuntime`` (None before start-up).
        settings: zero-argument callable returning the ``ServiceSettings``.
        not_ready_reason: why there is no runtime yet (``/readyz`` says it; never a server path).
        open_requests: the shared count of requests in progress (the shutdown path waits for it to reach 0).
        upload_limits: body limits of routes that take more than ``max_upload_bytes`` (``POST /datasets``:
            a dataset archive), by exact path; the route enforces its own limit as the body streams too.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], *, runtime: Callable[[], Any],
                 settings: Callable[[], Any], not_ready_reason: Callable[[], str] = lambda: "starting",
                 open_requests: OpenRequests | None = None,
                 upload_limits: Mapping[str, Callable[[], int]] | None = None) -> None:
        self.app = app
        self._upload_limits = dict(upload_limits or {})
        self._runtime = runtime
        self._settings = settings
        self._not_ready_reason = not_ready_reason
        self.open_requests = open_requests if open_requests is not None else OpenRequests()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET")
        if method in ("GET", "HEAD") and path in ("/livez", "/healthz"):
            await self._livez(send)
            return
        if method in ("GET", "HEAD") and path == "/readyz":
            await self._readyz(send)
            return
        if path == "/ui":
            await send({"type": "http.response.start", "status": 307, "headers": [(b"location", b"/ui/")]})
            await send({"type": "http.response.body", "body": b""})
            return
        if _is_probe(method, path):
            await self.app(scope, receive, send)
            return
        endpoint = API_ROUTES.get(path)
        metrics = self._metrics() if endpoint is not None else None
        start = time.perf_counter()
        status_box = {"status": 500}

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = int(message["status"])
            await send(message)

        settings = self._settings()
        runtime = self._runtime()
        send_error = functools.partial(_send_error, oip=path.startswith("/v2/"))
        admission = _Admission(self.open_requests, settings,
                               lambda: getattr(self._runtime(), "draining", False) is True)
        try:
            if getattr(runtime, "draining", False) is True:
                # Shutting down: requests accepted before the signal finish; new ones are turned away
                # cleanly (the listening socket stays open until they have, see service.app).
                await send_error(counting_send, NotReady("server shutting down; retry on another instance",
                                                          retry_after=1), close=True)
                return
            # A request with a body takes its slot when the body has arrived (guarded_receive); one
            # without takes it now.
            refusal = (admission.start_receiving(int(settings.max_receiving)) if method in _BODY_METHODS
                       else admission.arrived())
            if refusal is not None:
                await send_error(counting_send, refusal)
                return
            try:
                await self._guarded(scope, receive, counting_send, path, endpoint, status_box, admission)
            finally:
                admission.release()
        finally:
            if metrics is not None:
                metrics.observe_request(endpoint, "rest", str(status_box["status"]), time.perf_counter() - start)

    # -- probes -----------------------------------------------------------------------------------------

    async def _livez(self, send: Send) -> None:
        runtime = self._runtime()
        live = True if runtime is None else bool(runtime.live)
        await _send_json(send, 200 if live else 503, {"live": live})

    async def _readyz(self, send: Send) -> None:
        runtime = self._runtime()
        if runtime is None:
            await _send_json(send, 503, {"ready": False, "reason": self._not_ready_reason()}, [(b"retry-after", b"1")])
            return
        report = runtime.readiness()
        status = 200 if report.get("ready") else 503
        extra = [] if status == 200 else [(b"retry-after", b"1")]
        await _send_json(send, status, report, extra)

    # -- guarded routes ---------------------------------------------------------------------------------

    def _metrics(self) -> Any:
        runtime = self._runtime()
        return None if runtime is None else runtime.metrics

    def _needs_key(self, path: str) -> bool:
        # /v2 checks the key itself (service.oip_http), with the same headers and constant-time compare.
        return path in API_ROUTES

    def _check_key(self, scope: Scope) -> bool:
        settings = self._settings()
        if not settings.api_key:
            return True
        presented = None
        auth = _header(scope, b"authorization")
        if auth and auth[:7].lower() == "bearer ":
            presented = auth[7:].strip()
        if presented is None:
            presented = _header(scope, b"x-api-key")
        runtime = self._runtime()
        if runtime is not None:
            return bool(runtime.check_api_key(presented))
        import hmac

        return presented is not None and hmac.compare_digest(presented.encode(), settings.api_key.encode())

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, path: str, endpoint: str | None,
                       status_box: dict[str, int], admission: _Admission) -> None:
        method = scope.get("method", "GET")
        send_error = functools.partial(_send_error, oip=path.startswith("/v2/"))
        if self._needs_key(path) and not self._check_key(scope):
            await send_error(send, Unauthorized())
            return
        json_body = path in JSON_ROUTES
        boundary: bytes | None = None
        if endpoint is not None:
            content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
            if method != "POST":
                await _send_json(send, 405, {"error": f"{path} accepts POST only, got {method}", "field": None},
                                 [(b"allow", b"POST")])
                return
            if json_body and content_type != "application/json":
                await send_error(send, UnsupportedMediaType(
                    f"{path} expects an application/json body, got content type {content_type or 'none'!r}"))
                return
            if not json_body and content_type != "multipart/form-data":
                await send_error(send, UnsupportedMediaType(
                    f"{path} expects multipart/form-data with a 'file' part, got content type "
                    f"{content_type or 'none'!r}", "file"))
                return
            boundary = None if json_body else _boundary(_header(scope, b"content-type") or "")
            if not json_body and boundary is None:
                await send_error(send, BadRequest("multipart/form-data content type without a boundary"))
                return
        if method not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return

        settings = self._settings()
        route_limit = self._upload_limits.get(path) if method == "POST" else None
        limit = int(route_limit()) if route_limit is not None else int(settings.max_upload_bytes)
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                declared_bytes = int(declared)
            except ValueError:
                await send_error(send, BadRequest(f"invalid Content-Length {declared!r}"))
                return
            if declared_bytes > limit:
                await send_error(send, _too_large(declared_bytes, limit))
                return

        guard = _MultipartGuard(boundary) if boundary is not None else None
        marker = {"entered": False}
        state: dict[str, Any] = {"received": 0, "reject": None, "replied": False, "status": None, "held": [],
                                 "started": False, "responded": False, "client_gone": False, "timed_out": False}
        body_done = asyncio.Event()
        upload_start = time.monotonic()
        grace_s = float(settings.upload_grace_s)
        min_rate = float(settings.min_upload_bytes_per_s)

        async def receive_body() -> Message | None:
            """The next body message, or None when the client falls below the minimum upload rate: after
            ``grace_s`` the body must keep arriving at ``min_rate`` bytes/s on average."""
            if min_rate <= 0:
                return await receive()
            due = upload_start + grace_s + (state["received"] + 1) / min_rate
            try:
                return await asyncio.wait_for(receive(), timeout=max(0.0, due - time.monotonic()))
            except asyncio.TimeoutError:
                return None

        def refuse(problem: ServiceError) -> _Refused:
            state["reject"] = problem
            return _Refused()

        async def guarded_receive() -> Message:
            if state["reject"] is not None or state["client_gone"]:
                raise _Refused()
            if body_done.is_set():
                return await receive()
            message = await receive_body()
            if message is None:
                raise refuse(UploadTooSlow(
                    f"request body arrived too slowly: {state['received']} bytes in "
                    f"{time.monotonic() - upload_start:.0f} s (at least {min_rate:g} bytes/s after "
                    f"{grace_s:g} s: min_upload_bytes_per_s, upload_grace_s)", "file"))
            if message["type"] == "http.disconnect":
                state["client_gone"] = True  # left mid-upload: 499, and nothing for the app to log
                raise _Refused()
            if message["type"] != "http.request":
                return message
            chunk = message.get("body", b"")
            state["received"] += len(chunk)
            if state["received"] > limit:
                raise refuse(_too_large(state["received"], limit, streamed=True))
            if guard is not None:
                problem = guard.feed(chunk, bool(message.get("more_body", False)))
                if problem is not None:
                    raise refuse(problem)
            if not message.get("more_body", False):
                body_done.set()
                problem = admission.arrived()
                if problem is not None:
                    raise refuse(problem)
            return message

        async def reply_reject() -> None:
            if not state["replied"]:
                state["replied"] = True
                # A client cut off mid-body may still be sending: close rather than read the rest.
                await send_error(send, state["reject"], close=not body_done.is_set())

        async def reply_gone() -> None:
            # 499: the client closed the request (nginx's code). Nobody reads this answer (the server drops
            # writes to a closed connection), but the layers outside us must see the request end: BentoML's
            # timeout middleware would otherwise hold it open until its timeout, and a graceful shutdown
            # would wait for it.
            if not state["replied"]:
                state["replied"] = True
                status_box["status"] = 499
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.start", "status": 499, "headers": [(b"content-length", b"0")]})
                    await send({"type": "http.response.body", "body": b""})

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                state["responded"] = True
            if state["reject"] is not None:
                await reply_reject()
                return
            if state["client_gone"]:
                await reply_gone()  # left mid-upload: whatever the app answers, nobody hears it
                return
            if endpoint is None:
                await send(message)
                return
            # Hold a 400 from BentoML's validator to rewrite its body into our error shape, and turn a 500
            # answered before our handler ran into a 400: BentoML could not parse the form (the client's
            # malformed multipart body); every error after that point is answered by our handler itself.
            if message["type"] == "http.response.start":
                state["status"] = int(message["status"])
                if state["status"] == 500 and not marker["entered"]:
                    state["status"], state["unparsed"] = 400, True
                if state["status"] != 400:
                    await send(message)
                else:
                    state["held"].append(message)
                return
            if state["status"] != 400:
                await send(message)
                return
            state["held"].append(message)
            if message.get("more_body", False):
                return
            start, *bodies = state["held"]
            if state.get("unparsed"):
                kind = "JSON" if json_body else "multipart/form-data"
                body = json.dumps(BadRequest(
                    f"malformed {kind} body: it could not be parsed").to_dict()).encode()
            else:
                body = _normalise_validation_error(b"".join(m.get("body", b"") for m in bodies))
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({"type": "http.response.start", "status": 400, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        if endpoint is None and not _is_oip_infer(method, path):
            try:
                await self.app(scope, guarded_receive, guarded_send)
            except _Refused:
                pass
            except Exception:
                if state["reject"] is None and not state["client_gone"]:
                    raise
            if state["reject"] is not None:
                await reply_reject()
            elif state["client_gone"]:
                await reply_gone()
            return

        # Inference routes (/segment, /refine, /v2/.../infer): a client that hangs up after sending its
        # request cancels the handler, so a request still waiting in the batching queue is dropped
        # instead of run for nobody.
        marker_token = _HANDLER_ENTERED.set(marker)  # the app task gets a copy of this context
        try:
            app_task = asyncio.ensure_future(self.app(scope, guarded_receive, guarded_send))
        finally:
            _HANDLER_ENTERED.reset(marker_token)

        async def watch_disconnect() -> None:
            await body_done.wait()
            while not app_task.done():
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not state["responded"] and not app_task.done():
                        state["client_gone"] = True
                        app_task.cancel()
                    return

        async def watch_deadline() -> None:
            # The backstop behind the batcher's own deadline: an answer not begun this long after the request
            # arrived whole is a 504 in our shape (BentoML's timeout is set past the longest allowed upload).
            await body_done.wait()
            await asyncio.sleep(float(settings.request_timeout_s) + ANSWER_GRACE_S)
            if not app_task.done() and not state["started"]:
                state["timed_out"] = True
                app_task.cancel()

        watchers = [asyncio.ensure_future(watch_disconnect()), asyncio.ensure_future(watch_deadline())]
        try:
            await app_task
        except asyncio.CancelledError:
            if state["timed_out"]:
                await send_error(send, RequestTimeoutError(
                    f"request not answered within {float(settings.request_timeout_s) + ANSWER_GRACE_S:g} s "
                    "(request_timeout_s)"))
                return
            if not state["client_gone"]:
                raise
            await reply_gone()
            return
        except _Refused:
            pass
        except Exception:
            if state["reject"] is None and not state["client_gone"]:
                raise
        finally:
            for watcher in watchers:
                watcher.cancel()
        if state["reject"] is not None:
            await reply_reject()
        elif state["client_gone"]:
            await reply_gone()


class _Refused(BaseException):  # noqa: N818 - a signal, not an error
    """Raised out of the downstream app's ``receive`` to stop it without an answer: the guard answers (or
    the client has gone). A BaseException, so BentoML's and Starlette's ``except Exception`` handlers let
    it pass instead of logging a traceback for a client's fault."""


_HANDLER_ENTERED: contextvars.ContextVar[dict[str, bool] | None] = contextvars.ContextVar(
    "medrefine_handler_entered", default=None)


def mark_handler_entered() -> None:
    """Called first by the ``/segment`` and ``/refine`` handlers: BentoML parsed the request, so any error
    from here on is answered by our handler, and a bare BentoML 500 can only mean an unparsable form."""
    marker = _HANDLER_ENTERED.get()
    if marker is not None:
        marker["entered"] = True


def _is_probe(method: str, path: str) -> bool:
    if path in UNLIMITED_PATHS:
        return True
    return method in ("GET", "HEAD") and path.startswith("/v2/models/") and path.endswith("/ready")


def _is_oip_infer(method: str, path: str) -> bool:
    return method == "POST" and path.startswith("/v2/models/") and path.endswith("/infer")


def _too_large(size: int, limit: int, *, streamed: bool = False) -> PayloadTooLarge:
    what = f"more than {limit} bytes received" if streamed else f"request body of {size} bytes"
    return PayloadTooLarge(f"{what}; the limit is {limit} bytes (max_upload_bytes)", "file")
