"""Decoding's own few threads: costly uploads queue behind each other, not in front of the rest of the server.

Work starts only while its request still wants it (its caller is not cancelled, its deadline not passed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from service.errors import RequestTimeoutError

__all__ = ["DECODE_THREADS", "DecodePool", "shared_decode_pool"]

T = TypeVar("T")

# Decoding is CPU-bound (zlib, numpy and Pillow release the GIL): more threads than cores only queue.
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))


class DecodePool:
    """A bounded thread pool for reading and decoding uploads, apart from asyncio's default executor.

    asyncio's default executor also serves ``asyncio.to_thread`` for every small blocking step (reading a
    part, encoding an answer); uploads that cost seconds to decode would hold its threads and stall those
    steps for every other request. Here at most ``threads`` decodes run at once and the rest wait in order.

    A waiting job never starts for a request that is gone: when the awaiting task is cancelled (the client
    hung up, or a timeout cancelled the handler) the queued job is cancelled with it, and a job whose
    ``deadline`` (``time.monotonic()`` seconds) passed while it waited raises ``RequestTimeoutError`` (504)
    instead of running. A job that has started runs to its end; the decode budget bounds what that costs.

    Args:
        threads: most jobs running at once (>= 1).
    """

    def __init__(self, threads: int = DECODE_THREADS) -> None:
        if threads < 1:
            raise ValueError(f"DecodePool threads must be >= 1, got {threads}")
        self.threads = int(threads)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=self.threads,
                                                               thread_name_prefix="medrefine-decode")

    async def run(self, fn: Callable[[], T], *, deadline: float | None = None) -> T:
        """``fn()`` on a decode thread; its result or its exception.

        Raises:
            RequestTimeoutError: ``deadline`` passed before a thread was free for ``fn``.
            asyncio.CancelledError: the caller was cancelled (``fn`` did not start, or runs on unawaited).
        """
        def guarded() -> T:
            if deadline is not None and time.monotonic() > deadline:
                waited = time.monotonic() - queued
                raise RequestTimeoutError(
                    f"the upload waited {waited:.1f} s for a decode thread and was not decoded before the "
                    "request's deadline (request_timeout_s)"
                )
            return fn()

        queued = time.monotonic()
        return await asyncio.wrap_future(self._executor.submit(guarded))

    def shutdown(self) -> None:
        """Finish the running jobs, drop the waiting ones."""
        self._executor.shutdown(wait=True, cancel_futures=True)


_SHARED: DecodePool | None = None
_SHARED_LOCK = threading.Lock()


def shared_decode_pool() -> DecodePool:
    """The process's one :class:`DecodePool` (each BentoML worker process gets its own), made on first use."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = DecodePool()
        return _SHARED
