"""The shared adaptive batcher: batching, keys, back-pressure, timeouts, cancellation, drain."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.batcher import AdaptiveBatcher, BatcherConfig
from service.errors import NotReady, QueueFullError, RequestTimeoutError


class Recorder:
    """run_batch that records every batch and can be held closed by an event."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[tuple[object, list[int]]] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def __call__(self, key, items):
        self.started.set()
        self.gate.wait(10)
        self.threads.add(threading.current_thread().name)
        if self.delay_s:
            time.sleep(self.delay_s)
        self.batches.append((key, list(items)))
        return [x * 10 if x >= 0 else ValueError(f"negative item {x}") for x in items]


class Observer:
    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.depths: list[int] = []

    def observe_queue_depth(self, depth):
        self.depths.append(depth)

    def observe_batch(self, size, waits):
        assert len(waits) == size and all(w >= 0 for w in waits)
        self.sizes.append(size)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_items_share_batches_and_get_their_own_results():
    async def main():
        rec, obs = Recorder(), Observer()
        b = AdaptiveBatcher(rec, BatcherConfig(max_batch_size=4, max_latency_ms=50, max_queue=64), observer=obs)
        await b.start()
        results = await asyncio.gather(*(b.submit(i, key="k") for i in range(10)))
        await b.drain()
        return rec, obs, results

    rec, obs, results = run(main())
    assert results == [i * 10 for i in range(10)]
    sizes = [len(items) for _, items in rec.batches]
    assert sum(sizes) == 10 and max(sizes) == 4 and len(sizes) == 3
    assert obs.sizes == sizes
    assert len(rec.threads) == 1  # one inference thread
    assert obs.depths[-1] == 0


def test_items_with_different_keys_are_never_batched_together():
    async def main():
        rec = Recorder()
        b = AdaptiveBatcher(rec, BatcherConfig(max_batch_size=8, max_latency_ms=30))
        await b.start()
        keys = ["a", "b"] * 4
        out = await asyncio.gather(*(b.submit(i, key=k) for i, k in enumerate(keys)))
        await b.drain()
        return rec, out

    rec, out = run(main())
    assert out == [i * 10 for i in range(8)]
    for key, items in rec.batches:
        assert all(("a" if i % 2 == 0 else "b") == key for i in items)
    assert sorted(len(items) for _, items in rec.batches) == [4, 4]


def test_lone_request_waits_about_max_latency_not_more():
    async def main():
        rec = Recorder()
        b = AdaptiveBatcher(rec, BatcherConfig(max_batch_size=16, max_latency_ms=40))
        await b.start()
        t0 = time.perf_counter()
        await b.submit(1)
        dt = time.perf_counter() - t0
        t1 = time.perf_counter()
        await b.submit(2, batchable=False)
        dt_unbatched = time.perf_counter() - t1
        await b.drain()
        return dt, dt_unbatched

    dt, dt_unbatched = run(main())
    assert 0.035 <= dt < 1.0
    assert dt_unbatched < 0.035


def test_per_item_exception_goes_to_its_caller_only():
    async def main():
        b = AdaptiveBatcher(Recorder(), BatcherConfig(max_batch_size=4, max_latency_ms=20))
        await b.start()
        out = await asyncio.gather(b.submit(1), b.submit(-1), b.submit(2), return_exceptions=True)
        await b.drain()
        return out

    out = run(main())
    assert out[0] == 10 and out[2] == 20
    assert isinstance(out[1], ValueError) and "negative item -1" in str(out[1])


def test_full_queue_rejects_immediately_with_retry_after():
    async def main():
        rec = Recorder()
        rec.gate.clear()  # hold the first batch in the worker
        b = AdaptiveBatcher(rec, BatcherConfig(max_batch_size=1, max_latency_ms=0, max_queue=2))
        await b.start()
        first = asyncio.ensure_future(b.submit(0))
        while not rec.started.is_set():
            await asyncio.sleep(0.005)
        waiting = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        with pytest.raises(QueueFullError) as info:
            await b.submit(3)
        rejected_in = time.perf_counter() - t0
        rec.gate.set()
        results = await asyncio.gather(first, *waiting)
        await b.drain()
        return info.value, rejected_in, results

    err, rejected_in, results = run(main())
    assert err.code == 503 and int(err.headers()["Retry-After"]) >= 1
    assert rejected_in < 0.05
    assert results == [0, 10, 20]


def test_timeout_raises_504_error_and_item_never_runs():
    async def main():
        rec = Recorder()
        rec.gate.clear()
        b = AdaptiveBatcher(rec, BatcherConfig(max_batch_size=1, max_latency_ms=0))
        await b.start()
        first = asyncio.ensure_future(b.submit(0))
        while not rec.started.is_set():
            await asyncio.sleep(0.005)
        with pytest.raises(RequestTimeoutError) as info:
            await b.submit(7, timeout_s=0.05)
        depth_after_timeout = b.queue_depth
        rec.gate.set()
        await first
        await b.drain()
        return info.value, depth_after_timeout, rec

    err, depth, rec = run(main())
    assert err.code == 504
    assert depth == 0
    assert [items for _, items in rec.batches] == [[0]]


def test_cancelled_request_is_dropped_before_running():
    async def main():
        rec = Recorder()
        rec.gate.clear()
        b = AdaptiveBatcher(rec, BatcherConfig(max_batch_size=4, max_latency_ms=0))
        await b.start()
        first = asyncio.ensure_future(b.submit(0))
        while not rec.started.is_set():
            await asyncio.sleep(0.005)
        gone = asyncio.ensure_future(b.submit(5))
        kept = asyncio.ensure_future(b.submit(6))
        await asyncio.sleep(0.01)
        gone.cancel()  # what a client disconnect does to the handler task
        await asyncio.sleep(0.01)
        rec.gate.set()
        out = await asyncio.gather(first, kept)
        await b.drain()
        return rec, out, gone

    rec, out, gone = run(main())
    assert gone.cancelled()
    assert out == [0, 60]
    ran = [i for _, items in rec.batches for i in items]
    assert 5 not in ran and sorted(ran) == [0, 6]


def test_drain_completes_accepted_requests_and_refuses_new_ones():
    async def main():
        rec = Recorder(delay_s=0.02)
        b = AdaptiveBatcher(rec, BatcherConfig(max_batch_size=2, max_latency_ms=5))
        await b.start()
        pending = [asyncio.ensure_future(b.submit(i)) for i in range(6)]
        await asyncio.sleep(0)
        drained = asyncio.ensure_future(b.drain(timeout_s=5))
        await asyncio.sleep(0)
        with pytest.raises(NotReady):
            await b.submit(99)
        ok = await drained
        return ok, [p.result() for p in pending]

    ok, results = run(main())
    assert ok is True
    assert results == [i * 10 for i in range(6)]


def test_config_rejects_bad_limits():
    with pytest.raises(ValueError, match="max_batch_size"):
        BatcherConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="max_queue"):
        BatcherConfig(max_queue=0)


def test_two_lanes_run_two_batches_at_once_each_caller_gets_its_result():
    both_running = threading.Barrier(2, timeout=10)  # broken (BrokenBarrierError) unless two batches overlap
    threads: set[str] = set()

    def run_batch(key, items):
        both_running.wait()
        threads.add(threading.current_thread().name)
        return [x * 10 for x in items]

    async def main():
        b = AdaptiveBatcher(run_batch, BatcherConfig(max_batch_size=1, max_latency_ms=0, lanes=2))
        await b.start()
        results = await asyncio.gather(b.submit(1), b.submit(2), b.submit(3), b.submit(4))
        drained = await b.drain(timeout_s=10)
        return results, drained

    results, drained = run(main())
    assert results == [10, 20, 30, 40]
    assert drained is True
    assert len(threads) == 2


def test_drain_waits_for_batches_running_on_every_lane():
    async def main():
        rec = Recorder(delay_s=0.05)
        b = AdaptiveBatcher(rec, BatcherConfig(max_batch_size=2, max_latency_ms=0, lanes=2))
        await b.start()
        pending = [asyncio.ensure_future(b.submit(i)) for i in range(7)]
        await asyncio.sleep(0)
        ok = await b.drain(timeout_s=10)
        return ok, [p.result() for p in pending], b.busy

    ok, results, busy = run(main())
    assert ok is True and busy is False
    assert results == [i * 10 for i in range(7)]


def test_config_rejects_zero_lanes():
    with pytest.raises(ValueError, match="lanes"):
        BatcherConfig(lanes=0)


def test_adaptive_window_sends_a_lone_request_at_once_and_waits_after_a_batch_with_company():
    async def main():
        rec = Recorder()
        b = AdaptiveBatcher(rec, BatcherConfig(max_batch_size=16, max_latency_ms=300, adaptive_window=True))
        await b.start()
        t0 = time.perf_counter()
        await b.submit(1)  # no batch before it: nothing to wait for
        lone = time.perf_counter() - t0
        rec.gate.clear()  # hold the next batch so two more requests queue behind it
        rec.started.clear()
        first = asyncio.ensure_future(b.submit(2))
        while not rec.started.is_set():
            await asyncio.sleep(0.005)
        queued = [asyncio.ensure_future(b.submit(i)) for i in (3, 4)]
        await asyncio.sleep(0.01)
        rec.gate.set()
        await asyncio.gather(first, *queued)  # [3, 4] ran as one batch: the next head waits for company
        t1 = time.perf_counter()
        await b.submit(5)
        after_company = time.perf_counter() - t1
        await b.drain()
        return lone, after_company, [items for _, items in rec.batches]

    lone, after_company, batches = run(main())
    assert batches == [[1], [2], [3, 4], [5]]
    assert lone < 0.25  # well under the 300 ms window
    assert after_company >= 0.25


def test_prefetch_hands_the_next_batch_to_the_worker_while_one_runs():
    async def main():
        rec = Recorder()
        rec.gate.clear()  # the first batch is held in the worker
        b = AdaptiveBatcher(rec, BatcherConfig(max_batch_size=2, max_latency_ms=0, max_queue=8, prefetch=True))
        await b.start()
        first = asyncio.ensure_future(b.submit(0))
        while not rec.started.is_set():
            await asyncio.sleep(0.005)
        rest = [asyncio.ensure_future(b.submit(i)) for i in (1, 2, 3, 4)]
        await asyncio.sleep(0.05)
        depth_while_held = b.queue_depth  # [1, 2] wait at the worker, [3, 4] in the queue: all four wait
        rec.gate.set()
        results = await asyncio.gather(first, *rest)
        await b.drain()
        return depth_while_held, results, [items for _, items in rec.batches], rec.threads

    depth, results, batches, threads = run(main())
    assert depth == 4
    assert results == [0, 10, 20, 30, 40]
    assert batches == [[0], [1, 2], [3, 4]]
    assert len(threads) == 1  # still one inference thread


def test_prefetched_request_whose_caller_left_never_runs():
    async def main():
        rec = Recorder()
        rec.gate.clear()
        b = AdaptiveBatcher(rec, BatcherConfig(max_batch_size=1, max_latency_ms=0, prefetch=True))
        await b.start()
        first = asyncio.ensure_future(b.submit(0))
        while not rec.started.is_set():
            await asyncio.sleep(0.005)
        gone = asyncio.ensure_future(b.submit(5))  # handed to the worker behind the held batch
        kept = asyncio.ensure_future(b.submit(6))  # in the queue
        await asyncio.sleep(0.05)
        depth_before = b.queue_depth
        gone.cancel()  # what a client disconnect does to the handler task
        await asyncio.sleep(0.01)
        depth_after = b.queue_depth  # no longer counted while the first batch still runs
        rec.gate.set()
        out = await asyncio.gather(first, kept)
        await b.drain()
        return out, gone, [items for _, items in rec.batches], (depth_before, depth_after, b.queue_depth)

    out, gone, batches, depths = run(main())
    assert gone.cancelled()
    assert out == [0, 60]
    assert batches == [[0], [6]]
    assert depths == (2, 1, 0)


def test_while_the_lane_is_busy_the_next_batch_gathers_every_request_that_arrives():
    """The service's configuration (adaptive window, prefetch, one lane): requests arriving one by one while a
    batch runs go to the engine together when it frees up, not the first alone as a prefetched batch."""

    async def main():
        rec = Recorder(delay_s=0.5)  # every batch takes 0.5 s: the batcher's estimate of the running one's end
        b = AdaptiveBatcher(rec, BatcherConfig(max_batch_size=16, max_latency_ms=5, adaptive_window=True,
                                               prefetch=True))
        await b.start()
        await b.submit(0)  # a lone request: runs at once
        rec.gate.clear()
        rec.started.clear()
        held = asyncio.ensure_future(b.submit(1))
        while not rec.started.is_set():
            await asyncio.sleep(0.005)
        arrivals = []
        for i in (2, 3, 4):  # spaced wider than max_latency_ms: each would have been a batch of its own
            arrivals.append(asyncio.ensure_future(b.submit(i)))
            await asyncio.sleep(0.03)
        rec.gate.set()  # batch [1] ends 0.5 s after it started; the next one is formed at about 0.45 s
        results = await asyncio.gather(held, *arrivals)
        await b.drain()
        return results, [items for _, items in rec.batches]

    results, batches = run(main())
    assert results == [10, 20, 30, 40]
    assert batches == [[0], [1], [2, 3, 4]]


def _eleven_queued_behind_one(config: BatcherConfig) -> tuple[list[int], list[list[int]]]:
    """Item 0 runs alone and holds the worker while items 1-11 queue; returns every result and the batches."""

    async def main():
        rec = Recorder()
        b = AdaptiveBatcher(rec, config)
        await b.start()
        rec.gate.clear()
        rec.started.clear()
        first = asyncio.ensure_future(b.submit(0))
        while not rec.started.is_set():
            await asyncio.sleep(0.005)
        waiting = [asyncio.ensure_future(b.submit(i)) for i in range(1, 12)]
        await asyncio.sleep(0.05)
        rec.gate.set()
        results = await asyncio.gather(first, *waiting)
        await b.drain()
        return results, [items for _, items in rec.batches]

    return run(main())


def test_preferred_sizes_run_whole_static_shape_batches_and_leave_the_rest_for_the_next():
    """An engine with static shapes 1/2/4/8: 11 waiting items run as 8, then 2, then 1 (each batch one engine
    call at its own shape, the rest left queued for whoever comes next); every caller gets its own result."""
    results, batches = _eleven_queued_behind_one(
        BatcherConfig(max_batch_size=16, max_latency_ms=5, preferred_sizes=(1, 2, 4, 8)))
    assert results == [i * 10 for i in range(12)]
    assert batches == [[0], [1, 2, 3, 4, 5, 6, 7, 8], [9, 10], [11]]


def test_without_preferred_sizes_every_waiting_item_runs_in_one_batch():
    _, batches = _eleven_queued_behind_one(BatcherConfig(max_batch_size=16, max_latency_ms=5))
    assert batches == [[0], list(range(1, 12))]


def test_config_rejects_unordered_preferred_sizes():
    with pytest.raises(ValueError, match="preferred_sizes"):
        BatcherConfig(preferred_sizes=(4, 2))
    with pytest.raises(ValueError, match="preferred_sizes"):
        BatcherConfig(preferred_sizes=(0, 2))
