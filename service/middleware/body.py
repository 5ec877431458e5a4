"""Checks on a body as it streams in, each raising ``Refused`` out of the app's ``receive``: the upload's
pace (408 below the minimum rate; 499 for a client that leaves mid-upload), its size (413) and its
multipart structure (400)."""

from __future__ import annotations

import asyncio
import time

from service.errors import UploadTooSlow
from service.middleware.checks import too_large
from service.middleware.exchange import Exchange, Message, Next, Receive, Refused, Send
from service.middleware.multipart import MultipartGuard

__all__ = ["MultipartStructure", "StreamedSize", "UploadPace"]


class UploadPace:
    """After ``upload_grace_s`` the body must keep arriving at ``min_upload_bytes_per_s`` on average (408,
    and the connection closed); a disconnect before it is whole is the client gone (499, nothing logged)."""

    def __init__(self, app: Next) -> None:
        self.app = app

    async def __call__(self, ex: Exchange, receive: Receive, send: Send) -> None:
        if not ex.has_body:
            await self.app(ex, receive, send)
            return
        started, received = time.monotonic(), 0
        grace_s, min_rate = float(ex.settings.upload_grace_s), float(ex.settings.min_upload_bytes_per_s)

        async def paced() -> Message:
            nonlocal received
            if ex.body_done.is_set():
                return await receive()
            try:
                if min_rate <= 0:
                    message = await receive()
                else:
                    due = started + grace_s + (received + 1) / min_rate
                    message = await asyncio.wait_for(receive(), timeout=max(0.0, due - time.monotonic()))
            except asyncio.TimeoutError:
                raise ex.refuse(UploadTooSlow(
                    f"request body arrived too slowly: {received} bytes in {time.monotonic() - started:.0f} s "
                    f"(at least {min_rate:g} bytes/s after {grace_s:g} s: min_upload_bytes_per_s, upload_grace_s)",
                    "file")) from None
            if message["type"] == "http.disconnect":
                ex.client_gone = True
                raise Refused()  # left mid-upload: 499, and nothing for the app to log
            received += len(message.get("body", b""))
            return message

        await self.app(ex, paced, send)


class StreamedSize:
    """Bytes counted as they arrive (chunked bodies declare no length): past the route's limit -> 413."""

    def __init__(self, app: Next) -> None:
        self.app = app

    async def __call__(self, ex: Exchange, receive: Receive, send: Send) -> None:
        if not ex.has_body:
            await self.app(ex, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if received > ex.body_limit:
                raise ex.refuse(too_large(received, ex.body_limit, streamed=True))
            return message

        await self.app(ex, counted, send)


class MultipartStructure:
    """A multipart body must be well formed, end with its closing boundary, and carry its upload fields as
    file parts, once each (400 before BentoML parses it; see :class:`MultipartGuard`)."""

    def __init__(self, app: Next) -> None:
        self.app = app

    async def __call__(self, ex: Exchange, receive: Receive, send: Send) -> None:
        if ex.boundary is None or not ex.has_body:
            await self.app(ex, receive, send)
            return
        guard = MultipartGuard(ex.boundary, ex.policy.fields, ex.policy.uploads)

        async def checked() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                problem = guard.feed(message.get("body", b""), bool(message.get("more_body", False)))
                if problem is not None:
                    raise ex.refuse(problem)
            return message

        await self.app(ex, checked, send)
