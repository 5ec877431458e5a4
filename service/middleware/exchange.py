"""One request's passage through the guard: its policy, settings and what the guard decided about it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from service.errors import ServiceError
from service.middleware.policy import BODY_METHODS, RoutePolicy

if TYPE_CHECKING:
    from service.middleware.admission import Admission

__all__ = ["Exchange", "Message", "Next", "Receive", "Refused", "Send", "error_response_parts", "header", "send_json"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Refused(BaseException):  # noqa: N818 - a signal, not an error
    """Raised out of the downstream app's ``receive`` to stop it without an answer: the guard answers (or
    the client has gone). A BaseException, so BentoML's and Starlette's ``except Exception`` handlers let
    it pass instead of logging a traceback for a client's fault."""


@dataclass(eq=False)
class Exchange:
    """One request as the guard sees it. ``settings`` and ``body_limit`` are read once, when it arrives."""

    scope: Scope
    policy: RoutePolicy
    settings: Any
    runtime: Callable[[], Any]  # the process's runtime now (None before start-up)
    receive: Receive  # the server's own receive (the disconnect watcher reads it directly)
    body_limit: int = 0  # bytes: the route's own limit or max_upload_bytes
    boundary: bytes | None = None  # of a multipart body, once its content type was checked
    admission: Admission | None = None
    refusal: ServiceError | None = None
    client_gone: bool = False  # left mid-upload or while its handler ran: 499
    replied: bool = False  # the guard's own answer (refusal or 499) went out
    started: bool = False  # the app began its answer
    responded: bool = False  # the app finished its answer
    status: int = 500  # what the client was answered (for the request metrics)
    body_done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def method(self) -> str:
        return str(self.scope.get("method", "GET"))

    @property
    def path(self) -> str:
        return str(self.scope.get("path", ""))

    @property
    def has_body(self) -> bool:
        return self.method in BODY_METHODS

    def refuse(self, problem: ServiceError) -> Refused:
        """Record ``problem`` as the answer and return the signal to raise out of ``receive``."""
        self.refusal = problem
        return Refused()

    async def send_error(self, send: Send, error: ServiceError, *, close: bool = False) -> None:
        status, headers, body = error_response_parts(error, oip=self.policy.oip)
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


Next = Callable[[Exchange, Receive, Send], Awaitable[None]]


def error_response_parts(error: ServiceError, *, oip: bool = False) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and JSON body of ``error`` as an HTTP response: REST's ``{"error", "field"}``, or the
    Open Inference Protocol's ``{"error"}`` for ``/v2`` routes (``oip``)."""
    payload = {"error": error.message} if oip else error.to_dict()
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    return error.code, headers, body


async def send_json(send: Send, status: int, payload: dict[str, Any], extra: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None
