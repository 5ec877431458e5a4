"""Admission: draining refusals, ``max_receiving`` bodies arriving and ``max_concurrency`` open requests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from service.errors import NotReady, ServiceError, TooManyRequests
from service.middleware.exchange import Exchange, Message, Next, Receive, Send

__all__ = ["Admission", "AdmissionMiddleware", "OpenRequests", "SlotOnArrival"]


class OpenRequests:
    """Requests the guard has let in and not yet answered (probes, ``/metrics`` and refusals not counted).

    ``count``: requests that arrived whole and are being answered (bounded by ``max_concurrency``; the
    shutdown path waits for it to reach 0). ``receiving``: requests whose body is still arriving (bounded
    by ``max_receiving``). One event loop per worker touches them, so plain integers suffice.
    """

    def __init__(self) -> None:
        self.count = 0
        self.receiving = 0


class Admission:
    """One request's claim on :class:`OpenRequests`: a receiving place while its body arrives, then an open
    slot from the moment it has arrived whole until it is answered."""

    def __init__(self, counts: OpenRequests, settings: Any, draining: Callable[[], bool]) -> None:
        self._counts = counts
        self._limit = int(settings.max_concurrency)
        self._receiving_limit = int(settings.max_receiving)
        self._draining = draining
        self.receiving = False
        self.open = False

    def start_receiving(self) -> ServiceError | None:
        if self._counts.receiving >= self._receiving_limit:
            return TooManyRequests(f"server busy: {self._counts.receiving} uploads arriving "
                                   f"(max_receiving={self._receiving_limit}); retry later")
        self._counts.receiving += 1
        self.receiving = True
        return None

    def arrived(self) -> ServiceError | None:
        """The request is whole: trade the receiving place for an open slot (or say why not)."""
        if self.open:
            return None
        self._stop_receiving()
        refusal = self.draining_refusal()  # the drain may have begun while the body arrived
        if refusal is not None:
            return refusal
        if self._counts.count >= self._limit:
            return TooManyRequests(f"server busy: {self._counts.count} requests open "
                                   f"(max_concurrency={self._limit}); retry later")
        self._counts.count += 1
        self.open = True
        return None

    def draining_refusal(self) -> ServiceError | None:
        """503 once the server drains for shutdown (requests let in before it began run to completion)."""
        if self._draining():
            return NotReady("server shutting down; retry on another instance", retry_after=1)
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


class AdmissionMiddleware:
    """At entry: 503 + ``Connection: close`` while draining; a receiving place for a request with a body,
    the open slot at once for one without; the claim is released when the request is answered."""

    def __init__(self, app: Next, counts: OpenRequests) -> None:
        self.app = app
        self.counts = counts

    async def __call__(self, ex: Exchange, receive: Receive, send: Send) -> None:
        ex.admission = Admission(self.counts, ex.settings, lambda: getattr(ex.runtime(), "draining", False) is True)
        refusal = ex.admission.draining_refusal()
        if refusal is not None:  # the listening socket stays open until accepted requests finish (service.app)
            await ex.send_error(send, refusal, close=True)
            return
        refusal = ex.admission.start_receiving() if ex.has_body else ex.admission.arrived()
        if refusal is not None:
            await ex.send_error(send, refusal)
            return
        try:
            await self.app(ex, receive, send)
        finally:
            ex.admission.release()


class SlotOnArrival:
    """The body's last message, once every body check passed, takes the open slot (429/503 if refused)."""

    def __init__(self, app: Next) -> None:
        self.app = app

    async def __call__(self, ex: Exchange, receive: Receive, send: Send) -> None:
        if not ex.has_body:
            await self.app(ex, receive, send)
            return

        async def arriving() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False) and not ex.body_done.is_set():
                ex.body_done.set()
                problem = ex.admission.arrived()
                if problem is not None:
                    raise ex.refuse(problem)
            return message

        await self.app(ex, arriving, send)
