"""``GuardMiddleware``: the ASGI guard in front of every HTTP route, composed of single-purpose middlewares."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from service.middleware.admission import AdmissionMiddleware, OpenRequests, SlotOnArrival
from service.middleware.bento_errors import BentoErrorShape
from service.middleware.body import MultipartStructure, StreamedSize, UploadPace
from service.middleware.checks import ApiKey, DeclaredLength, MethodAndContentType
from service.middleware.exchange import Exchange, Message, Next, Receive, Refused, Scope, Send
from service.middleware.policy import policy_for
from service.middleware.probes import answer_probe
from service.middleware.watch import HandlerWatch

__all__ = ["GuardMiddleware", "RequestMetrics", "Responder"]


class RequestMetrics:
    """Every REST API request in ``medrefine_requests_total{protocol="rest"}`` with the status it got."""

    def __init__(self, app: Next) -> None:
        self.app = app

    async def __call__(self, ex: Exchange, receive: Receive, send: Send) -> None:
        runtime = ex.runtime()
        metrics = None if ex.policy.endpoint is None or runtime is None else runtime.metrics
        start = time.perf_counter()

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                ex.status = int(message["status"])
            await send(message)

        try:
            await self.app(ex, receive, counted)
        finally:
            if metrics is not None:
                metrics.observe_request(ex.policy.endpoint, "rest", str(ex.status), time.perf_counter() - start)


class Responder:
    """Owns the answer of a request with a body: once a middleware refused it mid-stream (``ex.refusal``) or
    the client left, the app's own answer is dropped and the refusal (or 499) goes out instead."""

    def __init__(self, app: Next) -> None:
        self.app = app

    async def __call__(self, ex: Exchange, receive: Receive, send: Send) -> None:
        if not ex.has_body:
            await self.app(ex, receive, send)
            return

        async def gated() -> Message:
            if ex.refusal is not None or ex.client_gone:
                raise Refused()
            return await receive()

        async def answered(message: Message) -> None:
            if message["type"] == "http.response.start":
                ex.started = True
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                ex.responded = True
            if ex.refusal is not None or ex.client_gone:
                await self._reply(ex, send)
            else:
                await send(message)

        try:
            await self.app(ex, gated, answered)
        except Refused:
            pass
        except Exception:
            if ex.refusal is None and not ex.client_gone:
                raise
        await self._reply(ex, send)

    @staticmethod
    async def _reply(ex: Exchange, send: Send) -> None:
        if ex.replied or (ex.refusal is None and not ex.client_gone):
            return
        ex.replied = True
        if ex.refusal is not None:
            # A client cut off mid-body may still be sending: close rather than read the rest.
            await ex.send_error(send, ex.refusal, close=not ex.body_done.is_set())
            return
        # 499: the client closed the request (nginx's code). Nobody reads it, but the layers outside must see
        # the request end: BentoML's timeout middleware would hold it open, a graceful shutdown wait for it.
        ex.status = 499
        with contextlib.suppress(Exception):
            await send({"type": "http.response.start", "status": 499, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})


# Outermost first; each takes the next and reads only the exchange (its policy, settings, state).
_STAGES: tuple[Callable[[Next], Next], ...] = (
    Responder, ApiKey, MethodAndContentType, DeclaredLength, UploadPace, StreamedSize, MultipartStructure,
    SlotOnArrival, BentoErrorShape, HandlerWatch,
)


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
        self._runtime = runtime
        self._settings = settings
        self._not_ready_reason = not_ready_reason
        self._upload_limits = dict(upload_limits or {})
        self.open_requests = open_requests if open_requests is not None else OpenRequests()
        chain: Next = self._downstream
        for stage in reversed(_STAGES):
            chain = stage(chain)
        chain = AdmissionMiddleware(chain, self.open_requests)
        self._chain = RequestMetrics(chain)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = str(scope.get("method", "GET")), str(scope.get("path", ""))
        if await answer_probe(method, path, send, self._runtime(), self._not_ready_reason):
            return
        policy = policy_for(method, path, self._upload_limits)
        if not policy.guarded:
            await self.app(scope, receive, send)
            return
        ex = Exchange(scope, policy, self._settings(), self._runtime, receive)
        if ex.has_body:
            ex.body_limit = int(policy.body_limit() if policy.body_limit is not None else ex.settings.max_upload_bytes)
        await self._chain(ex, receive, send)

    async def _downstream(self, ex: Exchange, receive: Receive, send: Send) -> None:
        await self.app(ex.scope, receive, send)
