"""BentoML's own pages, tamed: no Swagger page at ``/`` (it loads Google Tag Manager), ``/schema.json`` behind the key.
(Details: docs/architecture.md, "service".)
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from service.errors import ServiceError, Unauthorized
from service.oip_http import presented_api_key

__all__ = ["BentoPagesMiddleware"]

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]

KEYED_PATHS = frozenset({"/schema.json"})
INDEX_REDIRECT = b"/ui/"


class BentoPagesMiddleware:
    """ASGI middleware: ``/`` -> 307 ``/ui/``; ``/static_content/*`` -> 404; ``/schema.json`` needs the key.

    Args:
        app: the downstream ASGI app (BentoML's).
        api_key: zero-argument callable returning the configured API key (None or "" when auth is off).
    """

    def __init__(self, app: Callable[..., Awaitable[None]], *, api_key: Callable[[], str | None]) -> None:
        self.app = app
        self._api_key = api_key

    async def __call__(self, scope: Scope, receive: Any, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else None
        if path == "/":
            await send({"type": "http.response.start", "status": 307,
                        "headers": [(b"location", INDEX_REDIRECT), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        if path is not None and (path == "/static_content" or path.startswith("/static_content/")):
            await _send_error(send, 404, {"error": "not found", "field": None}, [])
            return
        if path in KEYED_PATHS and not self._key_ok(scope):
            error: ServiceError = Unauthorized()
            extra = [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
            await _send_error(send, error.code, error.to_dict(), extra)
            return
        await self.app(scope, receive, send)

    def _key_ok(self, scope: Scope) -> bool:
        expected = self._api_key()
        if not expected:
            return True
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        presented = presented_api_key(headers.get("authorization"), headers.get("x-api-key"))
        return presented is not None and hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


async def _send_error(send: Send, status: int, payload: dict[str, Any], extra: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
