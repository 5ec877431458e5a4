"""Inference routes: a client that hangs up cancels its handler (its queued request is dropped, 499), and an
answer not begun ``request_timeout_s + ANSWER_GRACE_S`` after the body arrived is a 504 in our shape."""

from __future__ import annotations

import asyncio

from service.errors import RequestTimeoutError
from service.middleware.exchange import Exchange, Next, Receive, Send

__all__ = ["ANSWER_GRACE_S", "HandlerWatch"]

ANSWER_GRACE_S = 5.0  # decoding and encoding around the batcher's request_timeout_s


class HandlerWatch:
    """Runs the handler as a task beside two watchers that start once the body is whole."""

    def __init__(self, app: Next) -> None:
        self.app = app

    async def __call__(self, ex: Exchange, receive: Receive, send: Send) -> None:
        if not (ex.policy.watch_handler and ex.has_body):
            await self.app(ex, receive, send)
            return
        deadline_s = float(ex.settings.request_timeout_s) + ANSWER_GRACE_S
        timed_out = False
        task = asyncio.ensure_future(self.app(ex, receive, send))

        async def watch_disconnect() -> None:
            await ex.body_done.wait()
            while not task.done():
                if (await ex.receive())["type"] == "http.disconnect":
                    if not ex.responded and not task.done():
                        ex.client_gone = True
                        task.cancel()
                    return

        async def watch_deadline() -> None:
            # The backstop behind the batcher's own deadline (BentoML's timeout is set past the longest upload).
            nonlocal timed_out
            await ex.body_done.wait()
            await asyncio.sleep(deadline_s)
            if not task.done() and not ex.started:
                timed_out = True
                task.cancel()

        watchers = [asyncio.ensure_future(watch_disconnect()), asyncio.ensure_future(watch_deadline())]
        try:
            await task
        except asyncio.CancelledError:
            if timed_out:
                await ex.send_error(send, RequestTimeoutError(f"request not answered within {deadline_s:g} s "
                                                              "(request_timeout_s)"))
            elif not ex.client_gone:
                raise
        finally:
            for watcher in watchers:
                watcher.cancel()
