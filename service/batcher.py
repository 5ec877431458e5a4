"""``AdaptiveBatcher``: the one asyncio inference queue shared by REST, OIP-HTTP and gRPC; bounded, with
per-request deadlines and a drain (how it batches and fails: docs/architecture.md, "service").
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from service.errors import NotReady, QueueFullError, RequestTimeoutError

__all__ = ["AdaptiveBatcher", "BatchObserver", "BatcherConfig"]

logger = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


class BatchObserver(Protocol):
    """Receives batcher events from the loop and from worker threads (``service.metrics.ServiceMetrics``)."""

    def observe_queue_depth(self, depth: int) -> None: ...

    def observe_batch(self, size: int, queue_waits_s: Sequence[float]) -> None: ...


@dataclass(frozen=True)
class BatcherConfig:
    """Batching limits (see ``service.settings`` for the documented defaults).

    ``max_latency_ms`` bounds how long the oldest queued item waits for company; ``max_queue`` bounds
    waiting items (running batches are not counted); ``timeout_s`` is the default per-request deadline;
    ``lanes`` is how many batches run at once, each on its own worker thread; ``adaptive_window``: the head
    waits for company only when the batch before it had company (a lone request after a lone request, or
    the first one, goes at once: no load, nothing to wait for); ``prefetch``: one more batch than ``lanes``
    is formed and handed to the worker threads while they run, so a worker starts it the moment it finishes
    instead of waiting for the event loop to wake up and form it. While every lane is busy, the next batch
    keeps gathering company until the running batch is about to end (its expected run time from the
    measured time per item, or ``max_latency_ms``, whichever is later; at once when a lane frees up): its
    items would wait for the lane anyway, and a fuller batch runs more images per CPU-second.
    ``preferred_sizes``: batch sizes the engine runs best (static shapes, ascending); a batch that is not one
    of them takes the largest that fits and leaves the rest at the head of the queue, to run with whoever
    comes next instead of as an engine call of its own (empty: every size is as good).
    """

    max_batch_size: int = 8  # the service default (ServiceSettings.max_batch_size); callers pass theirs
    max_latency_ms: float = 10.0
    max_queue: int = 64
    timeout_s: float = 30.0
    lanes: int = 1
    adaptive_window: bool = False
    prefetch: bool = False
    preferred_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        sizes = tuple(self.preferred_sizes)
        if sizes and (sizes[0] < 1 or list(sizes) != sorted(set(sizes))):
            raise ValueError(f"preferred_sizes must be ascending positive batch sizes, got {list(sizes)}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_latency_ms < 0:
            raise ValueError(f"max_latency_ms must be >= 0, got {self.max_latency_ms}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {self.lanes}")


# repr=False: a failed deque.remove formats the entry, and its repr would print the whole image.
@dataclass(eq=False, repr=False)
class _Entry:
    key: Hashable
    item: Any
    future: asyncio.Future[Any]
    enqueued: float
    batchable: bool = True
    started: bool = field(default=False)
    # Prefetch bookkeeping, under AdaptiveBatcher._at_worker_lock: handed to a worker and not started yet;
    # the caller left (the worker skips it).
    at_worker: bool = field(default=False)
    gone: bool = field(default=False)


class AdaptiveBatcher(Generic[ItemT, ResultT]):
    """Queue items, run them in batches on ``config.lanes`` worker threads, hand each caller its own result.

    Args:
        run_batch: ``run_batch(key, items) -> results`` runs in the worker thread; ``len(results)`` must
            equal ``len(items)``. A result that is an ``Exception`` instance is raised to that item's
            caller only; an exception raised by ``run_batch`` goes to every caller in the batch.
        config: limits.
        observer: optional metrics sink.
        name: thread-name prefix of the worker.

    Call :meth:`start` from the event loop that will submit; :meth:`drain` before the loop closes.
    """

    def __init__(
        self,
        run_batch: Callable[[Hashable, list[ItemT]], Sequence[ResultT | BaseException]],
        config: BatcherConfig | None = None,
        *,
        observer: BatchObserver | None = None,
        name: str = "medrefine-infer",
    ) -> None:
        self.config = config or BatcherConfig()
        self._run_batch = run_batch
        self._observer = observer
        self._name = name
        self._queue: collections.deque[_Entry] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._accepting = False
        self._running: set[asyncio.Task[None]] = set()  # one task per batch handed to the workers
        self._at_worker = 0  # items handed to the workers and not started yet (prefetch)
        self._at_worker_lock = threading.Lock()
        self._batch_seconds = 0.0  # moving average of a batch's run time (for Retry-After)
        self._item_seconds = 0.0  # moving average of a batch's run time per item
        self._started_batch: tuple[float, int] | None = None  # (monotonic start, items) of the newest batch
        self.batches_run = 0
        self._last_batch_size = 0  # size of the batch dispatched last (adaptive_window)

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the dispatcher on the running loop (idempotent)."""
        if self._task is not None:
            return
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=self.config.lanes,
                                                               thread_name_prefix=self._name)
        self._accepting = True
        self._task = asyncio.get_running_loop().create_task(self._dispatch_loop(), name=f"{self._name}-dispatch")

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queue_depth(self) -> int:
        """Items waiting (not counting running batches; counting a prefetched batch not started yet)."""
        return len(self._queue) + self._at_worker

    @property
    def busy(self) -> bool:
        """True while a batch runs or items wait."""
        return bool(self._queue) or bool(self._running)

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Stop admissions, finish every accepted request, then stop the worker.

        Args:
            timeout_s: give up waiting after this long; requests still queued then get :class:`NotReady`.

        Returns:
            True if every accepted request completed.
        """
        self._accepting = False
        if self._task is None:
            return True
        assert self._idle is not None and self._wakeup is not None
        completed = True
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.busy:
            self._idle.clear()
            self._wakeup.set()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                completed = False
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=remaining)
        for entry in list(self._queue):
            if not entry.future.done():
                entry.future.set_exception(NotReady("server shutting down"))
        self._queue.clear()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        for task in list(self._running):  # only when the drain ran out of time
            task.cancel()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=completed)
            self._executor = None
        self._notify_depth()
        return completed

    # -- submission -----------------------------------------------------------------------------------

    def check_capacity(self) -> None:
        """Raise :class:`QueueFullError` if ``submit`` would refuse for a full queue right now."""
        if self.queue_depth >= self.config.max_queue:
            raise QueueFullError(
                f"server busy: {self.queue_depth} requests queued (max_queue={self.config.max_queue})",
                retry_after=self._retry_after(),
            )

    async def submit(self, item: ItemT, key: Hashable = None, *, batchable: bool = True,
                     timeout_s: float | None = None) -> ResultT:
        """Queue ``item`` and wait for its result.

        Args:
            item: passed to ``run_batch`` as one element of its list.
            key: items are only batched with items of an equal key (e.g. the same options).
            batchable: False runs the item in a batch of its own without waiting for company.
            timeout_s: deadline for queue wait + inference (default ``config.timeout_s``).

        Raises:
            QueueFullError: ``max_queue`` items are already waiting.
            NotReady: the batcher is not started or is draining.
            RequestTimeoutError: the deadline passed first.
        """
        if not self._accepting or self._wakeup is None:
            raise NotReady("server not accepting requests (starting or shutting down)")
        self.check_capacity()
        loop = asyncio.get_running_loop()
        entry = _Entry(key=key, item=item, future=loop.create_future(), enqueued=time.monotonic(),
                       batchable=batchable)
        self._queue.append(entry)
        self._notify_depth()
        self._wakeup.set()
        timeout = self.config.timeout_s if timeout_s is None else timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(entry.future), timeout=timeout)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"request not finished within {timeout:g} s (request_timeout_s)") from None
        finally:
            # Timed out or cancelled (client gone): never run it, or drop its result if it is running.
            if not entry.future.done():
                entry.future.cancel()
                self._leave_worker(entry)
            self._remove(entry)

    # -- internals ------------------------------------------------------------------------------------

    def _retry_after(self) -> float:
        """Seconds until the queue has likely drained: queued batches (plus the running one) x the average
        batch time; at least 1 s, at most the request timeout."""
        batches = -(-len(self._queue) // self.config.max_batch_size) + len(self._running)
        estimate = batches * self._batch_seconds / self.config.lanes + self.config.max_latency_ms / 1000.0
        return min(max(1.0, estimate), max(1.0, self.config.timeout_s))

    def _remove(self, entry: _Entry) -> None:
        # Usually already taken by a batch: check first instead of paying for a ValueError.
        if entry in self._queue:
            self._queue.remove(entry)
            self._notify_depth()

    def _notify_depth(self) -> None:
        if self._observer is not None:
            self._observer.observe_queue_depth(self.queue_depth)

    def _prune(self) -> None:
        """Drop entries whose caller has gone (future cancelled or already answered)."""
        if any(e.future.done() for e in self._queue):
            self._queue = collections.deque(e for e in self._queue if not e.future.done())
            self._notify_depth()

    def _count_key(self, key: Hashable) -> int:
        return sum(1 for e in self._queue if e.batchable and e.key == key and not e.future.done())

    async def _next_batch(self) -> list[_Entry]:
        """Wait for a batch to form and take it out of the queue."""
        assert self._wakeup is not None and self._idle is not None
        while True:
            self._prune()
            if not self._queue:
                if not self._running:
                    self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self._queue[0]
            wait = not self.config.adaptive_window or self._last_batch_size > 1
            lanes_busy = len(self._running) >= self.config.lanes  # this batch would wait at a worker
            if head.batchable and self._accepting and (wait or lanes_busy):
                deadline = head.enqueued + self.config.max_latency_ms / 1000.0
                if lanes_busy:
                    deadline = max(deadline, self._expected_lane_free())
                while self._count_key(head.key) < self.config.max_batch_size and not head.future.done():
                    if lanes_busy and len(self._running) < self.config.lanes:
                        break  # a lane is free: go now with the company gathered so far
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._accepting:
                        break
                    self._wakeup.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
                if head.future.done():
                    continue  # the head left while we waited; start over from the new head
            batch: list[_Entry] = []
            if head.batchable:
                for entry in self._queue:
                    if entry.batchable and entry.key == head.key and not entry.future.done():
                        batch.append(entry)
                        if len(batch) == self.config.max_batch_size:
                            break
                batch = batch[: self._preferred_size(len(batch))]
            else:
                batch.append(head)
            self._last_batch_size = len(batch)
            taken = set(map(id, batch))
            self._queue = collections.deque(e for e in self._queue if id(e) not in taken)
            self._notify_depth()
            return batch

    def _preferred_size(self, available: int) -> int:
        """How many of ``available`` items to run: the largest preferred size that fits (all of them when
        none fits or none is preferred)."""
        fitting = [size for size in self.config.preferred_sizes if size <= available]
        return fitting[-1] if fitting else available

    def _expected_lane_free(self) -> float:
        """When the newest running batch should end (monotonic; 0 before the first batch), less a 10 % margin
        so that the next batch is formed just before the lane frees up."""
        started = self._started_batch
        if started is None:
            return 0.0
        return started[0] + 0.9 * self._item_seconds * started[1]

    async def _dispatch_loop(self) -> None:
        assert self._wakeup is not None
        while True:
            while len(self._running) >= self.config.lanes + self.config.prefetch:  # wait for a lane to free up
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = await self._next_batch()
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)

    def _leave_worker(self, entry: _Entry) -> None:
        """The caller of ``entry`` left: a batch waiting at a worker no longer counts it, and skips it."""
        with self._at_worker_lock:
            entry.gone = True
            if entry.at_worker:
                entry.at_worker = False
                self._at_worker -= 1
                self._notify_depth()

    def _start(self, batch: list[_Entry]) -> tuple[list[_Entry], Sequence[Any], float]:
        """Worker thread: drop the items whose callers left while the batch waited here (prefetch), record
        the batch, run it. Returns the items that ran, their results and the run time."""
        with self._at_worker_lock:
            for entry in batch:
                if entry.at_worker:
                    entry.at_worker = False
                    self._at_worker -= 1
            live = [e for e in batch if not e.gone]
        self._notify_depth()
        if not live:
            return live, [], 0.0
        started = time.monotonic()
        self._started_batch = (started, len(live))
        if self._observer is not None:
            self._observer.observe_batch(len(live), [started - e.enqueued for e in live])
        results = self._run_batch(live[0].key, [e.item for e in live])
        return live, results, time.monotonic() - started

    async def _run(self, batch: list[_Entry]) -> None:
        """Run ``batch`` on a worker thread and answer its callers (one loop wake-up for the whole batch)."""
        loop = asyncio.get_running_loop()
        with self._at_worker_lock:
            for entry in batch:
                entry.started = entry.at_worker = True
            self._at_worker += len(batch)
        try:
            assert self._executor is not None
            batch, results, elapsed = await loop.run_in_executor(self._executor, self._start, batch)
            if batch:
                self._batch_seconds = elapsed if not self.batches_run else 0.8 * self._batch_seconds + 0.2 * elapsed
                per_item = elapsed / len(batch)
                self._item_seconds = per_item if self.batches_run == 0 else 0.8 * self._item_seconds + 0.2 * per_item
                self.batches_run += 1
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except asyncio.CancelledError:
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(NotReady("server shutting down"))
            raise
        except BaseException as exc:  # delivered to every caller of the batch
            logger.exception("batch of %d failed", len(batch))
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(exc)
        else:
            for entry, result in zip(batch, results, strict=True):
                if entry.future.done():
                    continue
                if isinstance(result, BaseException):
                    entry.future.set_exception(result)
                else:
                    entry.future.set_result(result)
        finally:
            self._running.discard(asyncio.current_task())  # type: ignore[arg-type]
            assert self._idle is not None and self._wakeup is not None
            if not self._queue and not self._running:
                self._idle.set()
            self._wakeup.set()  # a lane is free
