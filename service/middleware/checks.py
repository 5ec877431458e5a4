"""Checks on a request's head, before any body byte is read: API key (401), method and content type
(405/415/400) and the declared ``Content-Length`` (400/413)."""

from __future__ import annotations

import hmac

from service.errors import BadRequest, PayloadTooLarge, Unauthorized, UnsupportedMediaType
from service.middleware.exchange import Exchange, Next, Receive, Send, header, send_json

__all__ = ["ApiKey", "DeclaredLength", "MethodAndContentType", "boundary", "too_large"]


class ApiKey:
    """``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` where the policy asks for it -> 401."""

    def __init__(self, app: Next) -> None:
        self.app = app

    async def __call__(self, ex: Exchange, receive: Receive, send: Send) -> None:
        if ex.policy.api_key and not _key_accepted(ex):
            await ex.send_error(send, Unauthorized())
            return
        await self.app(ex, receive, send)


def _key_accepted(ex: Exchange) -> bool:
    if not ex.settings.api_key:
        return True
    presented = None
    auth = header(ex.scope, b"authorization")
    if auth and auth[:7].lower() == "bearer ":
        presented = auth[7:].strip()
    if presented is None:
        presented = header(ex.scope, b"x-api-key")
    runtime = ex.runtime()
    if runtime is not None:
        return bool(runtime.check_api_key(presented))
    return presented is not None and hmac.compare_digest(presented.encode(), ex.settings.api_key.encode())


class MethodAndContentType:
    """The policy's methods (405) and media type (415); a multipart body needs its boundary (400)."""

    def __init__(self, app: Next) -> None:
        self.app = app

    async def __call__(self, ex: Exchange, receive: Receive, send: Send) -> None:
        policy, path, method = ex.policy, ex.path, ex.method
        if policy.methods and method not in policy.methods:
            allowed = ", ".join(sorted(policy.methods))
            await send_json(send, 405, {"error": f"{path} accepts {allowed} only, got {method}", "field": None},
                            [(b"allow", allowed.encode())])
            return
        raw_type = header(ex.scope, b"content-type") or ""
        content_type = raw_type.split(";")[0].strip().lower()
        if policy.content_type is not None and content_type != policy.content_type:
            got = repr(content_type or "none")
            if policy.multipart:
                error = UnsupportedMediaType(f"{path} expects multipart/form-data with a 'file' part, got content "
                                             f"type {got}", "file")
            else:
                error = UnsupportedMediaType(f"{path} expects an {policy.content_type} body, got content type {got}")
            await ex.send_error(send, error)
            return
        if policy.multipart:
            ex.boundary = boundary(raw_type)
            if ex.boundary is None:
                await ex.send_error(send, BadRequest("multipart/form-data content type without a boundary"))
                return
        await self.app(ex, receive, send)


class DeclaredLength:
    """A ``Content-Length`` that is not a number (400) or over the route's limit (413), refused unread."""

    def __init__(self, app: Next) -> None:
        self.app = app

    async def __call__(self, ex: Exchange, receive: Receive, send: Send) -> None:
        declared = header(ex.scope, b"content-length") if ex.has_body else None
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await ex.send_error(send, BadRequest(f"invalid Content-Length {declared!r}"))
                return
            if size > ex.body_limit:
                await ex.send_error(send, too_large(size, ex.body_limit))
                return
        await self.app(ex, receive, send)


def boundary(content_type: str) -> bytes | None:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("latin-1")
    return None


def too_large(size: int, limit: int, *, streamed: bool = False) -> PayloadTooLarge:
    what = f"more than {limit} bytes received" if streamed else f"request body of {size} bytes"
    return PayloadTooLarge(f"{what}; the limit is {limit} bytes (max_upload_bytes)", "file")
