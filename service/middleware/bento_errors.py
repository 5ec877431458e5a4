"""BentoML's own error answers on the REST routes, in our ``{"error", "field"}`` shape."""

from __future__ import annotations

import contextvars
import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from service.errors import BadRequest
from service.middleware.exchange import Exchange, Message, Next, Receive, Send

__all__ = ["BentoErrorShape", "rest_api"]

_ENTERED: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar("medrefine_handler_entered",
                                                                             default=None)
Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def rest_api(answer_error: Callable[[BaseException], Any]) -> Callable[[Handler], Handler]:
    """Decorate a BentoML API method (under ``@bentoml.api``): mark the request as reached by our handler
    and answer any exception it raises with ``answer_error(exc)`` (the REST error response)."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def run(*args: Any, **kwargs: Any) -> Any:
            entered = _ENTERED.get()
            if entered is not None:
                entered[0] = True
            try:
                return await handler(*args, **kwargs)
            except Exception as exc:
                return answer_error(exc)

        run.answers_own_errors = True  # type: ignore[attr-defined]
        return run  # type: ignore[return-value]

    return decorate


class BentoErrorShape:
    """On REST API routes: BentoML's 400 bodies rewritten to ``{"error", "field"}``; its 500 before the
    handler ran answered as a 400 (a body it could not parse)."""

    def __init__(self, app: Next) -> None:
        self.app = app

    async def __call__(self, ex: Exchange, receive: Receive, send: Send) -> None:
        if ex.policy.endpoint is None:
            await self.app(ex, receive, send)
            return
        entered = [False]
        held: list[Message] = []
        status = 0

        async def shaped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if status == 500 and not entered[0]:
                    status = 400
                    held.append({**message, "unparsed": True})
                elif status == 400:
                    held.append(message)
                else:
                    await send(message)
                return
            if status != 400:
                await send(message)
                return
            held.append(message)
            if not message.get("more_body", False):
                await _send_reshaped(send, held, ex.policy.content_type)

        token = _ENTERED.set(entered)  # the app's task gets a copy of this context, sharing the list
        try:
            await self.app(ex, receive, shaped)
        finally:
            _ENTERED.reset(token)


async def _send_reshaped(send: Send, held: list[Message], content_type: str | None) -> None:
    start, *bodies = held
    if start.get("unparsed"):
        kind = "JSON" if content_type == "application/json" else "multipart/form-data"
        body = json.dumps(BadRequest(f"malformed {kind} body: it could not be parsed").to_dict()).encode()
    else:
        body = _normalise_validation_error(b"".join(m.get("body", b"") for m in bodies))
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": body})


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
        if first.get("type") == "list_type":  # e.g. box=10,20,110,140: a form field holds JSON text
            message = f"expected JSON array text such as [10, 20, 110, 140] ({message})"
        prefix = ".".join(loc)
        return json.dumps({"error": f"{prefix}: {message}" if prefix else message, "field": field},
                          separators=(",", ":")).encode()
    if isinstance(data.get("error"), str):
        return json.dumps({"error": data["error"], "field": None}, separators=(",", ":")).encode()
    return body
