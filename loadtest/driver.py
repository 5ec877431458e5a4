"""Closed-loop and open-loop load over any async ``send(i)``, bounded in time and in request count."""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtest.stats import RequestRecord, summarise

__all__ = ["LoadRun", "LoadSpec", "RequestFailed", "run_load"]

MODES = ("closed", "open")
ARRIVALS = ("poisson", "fixed")

Send = Callable[[int], Awaitable[Any]]
LATE_SEND_S = 0.1  # an open-loop send this far behind its schedule counts as late


class RequestFailed(Exception):
    """A request that got an answer other than success; ``kind`` is e.g. ``"http-503"``.

    ``shed`` marks the server turning the request away under load as documented (429/503 with
    ``Retry-After``, gRPC RESOURCE_EXHAUSTED/UNAVAILABLE): correct behaviour, counted apart from faults.
    """

    def __init__(self, kind: str, detail: str = "", *, shed: bool = False) -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.shed = shed


@dataclass(frozen=True)
class LoadSpec:
    """One load step.

    Attributes:
        mode: ``"closed"`` (``concurrency`` workers) or ``"open"`` (``rate_rps`` arrivals per second).
        concurrency: closed-loop workers (>= 1).
        rate_rps: open-loop arrival rate (> 0 for open loop).
        arrival: open-loop gaps: ``"poisson"`` (exponential) or ``"fixed"``.
        duration_s: stop issuing after this many seconds.
        max_requests: stop issuing after this many sends (None: time only).
        warmup_s: requests completing before this are left out of the summary.
        max_inflight: open-loop cap on concurrent requests (arrivals beyond it are dropped).
        seed: seed of the Poisson gaps.
    """

    mode: str = "closed"
    concurrency: int = 1
    rate_rps: float = 0.0
    arrival: str = "poisson"
    duration_s: float = 10.0
    max_requests: int | None = None
    warmup_s: float = 0.0
    max_inflight: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"LoadSpec.mode: expected one of {MODES}, got {self.mode!r}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"LoadSpec.arrival: expected one of {ARRIVALS}, got {self.arrival!r}")
        if self.mode == "closed" and self.concurrency < 1:
            raise ValueError(f"LoadSpec.concurrency: expected >= 1 for closed loop, got {self.concurrency}")
        if self.mode == "open" and not self.rate_rps > 0:
            raise ValueError(f"LoadSpec.rate_rps: expected > 0 for open loop, got {self.rate_rps}")
        if not self.duration_s > 0:
            raise ValueError(f"LoadSpec.duration_s: expected > 0, got {self.duration_s}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"LoadSpec.max_requests: expected >= 1 or None, got {self.max_requests}")
        if not 0 <= self.warmup_s < self.duration_s:
            raise ValueError(f"LoadSpec.warmup_s: expected in [0, duration_s={self.duration_s}), got {self.warmup_s}")
        if self.max_inflight < 1:
            raise ValueError(f"LoadSpec.max_inflight: expected >= 1, got {self.max_inflight}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadRun:
    """What one step produced: every record plus when issuing stopped (step seconds)."""

    spec: LoadSpec
    records: list[RequestRecord] = field(default_factory=list)
    issued: int = 0
    dropped: int = 0
    issue_end: float = 0.0
    stopped_by: str = "duration"  # "duration" | "max_requests"
    issue_times: list[float] = field(default_factory=list)
    # Open loop: how late the generator sent against its schedule (a late generator measures itself).
    max_lag_s: float = 0.0
    late_sends: int = 0

    @property
    def window(self) -> tuple[float, float]:
        """Summary window: warm-up to the end of issuing (time-bounded) or to the last answer (count-bounded)."""
        begin = self.spec.warmup_s
        end = self.issue_end
        if self.stopped_by == "max_requests" and self.records:
            end = max(end, max(r.end for r in self.records))
        return begin, max(end, begin + 1e-9)

    def summary(self) -> dict[str, Any]:
        """:func:`loadtest.stats.summarise` over :attr:`window` plus the spec and the totals."""
        begin, end = self.window
        issued_in_window = sum(1 for t in self.issue_times if begin <= t <= end)
        result = summarise(self.records, window=(begin, end), issued_in_window=issued_in_window, dropped=self.dropped)
        result.update(
            mode=self.spec.mode,
            concurrency=self.spec.concurrency if self.spec.mode == "closed" else None,
            target_rate_rps=self.spec.rate_rps if self.spec.mode == "open" else None,
            arrival=self.spec.arrival if self.spec.mode == "open" else None,
            issued_total=self.issued,
            answered_total=len(self.records),
            errors_total=sum(1 for r in self.records if not r.ok),
            shed_total=sum(1 for r in self.records if r.shed),
            stopped_by=self.stopped_by,
            generator_max_lag_s=self.max_lag_s if self.spec.mode == "open" else None,
            generator_late_sends=self.late_sends if self.spec.mode == "open" else None,
        )
        return result


async def _timed(send: Send, index: int, t0: float) -> RequestRecord:
    start = time.perf_counter() - t0
    try:
        await send(index)
    except RequestFailed as exc:
        return RequestRecord(start, time.perf_counter() - t0, exc.kind, shed=exc.shed)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # any transport failure is a counted error, not a crash of the generator
        return RequestRecord(start, time.perf_counter() - t0, type(exc).__name__)
    return RequestRecord(start, time.perf_counter() - t0, None)


async def _closed(send: Send, spec: LoadSpec, run: LoadRun, t0: float) -> None:
    async def worker() -> None:
        while True:
            now = time.perf_counter() - t0
            if now >= spec.duration_s:
                return
            if spec.max_requests is not None and run.issued >= spec.max_requests:
                run.stopped_by = "max_requests"
                return
            index = run.issued
            run.issued += 1
            run.issue_times.append(now)
            run.issue_end = max(run.issue_end, now)
            run.records.append(await _timed(send, index, t0))

    await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
    if run.stopped_by == "duration":
        run.issue_end = spec.duration_s


async def _open(send: Send, spec: LoadSpec, run: LoadRun, t0: float) -> None:
    rng = random.Random(spec.seed)
    tasks: set[asyncio.Task[None]] = set()

    async def one(index: int) -> None:
        run.records.append(await _timed(send, index, t0))

    next_at = 0.0
    while True:
        if next_at >= spec.duration_s:
            run.issue_end = spec.duration_s
            break
        if spec.max_requests is not None and run.issued + run.dropped >= spec.max_requests:
            run.stopped_by = "max_requests"
            run.issue_end = time.perf_counter() - t0
            break
        delay = next_at - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= spec.max_inflight:
            run.dropped += 1
        else:
            index = run.issued
            run.issued += 1
            sent_at = time.perf_counter() - t0
            lag = sent_at - next_at
            run.max_lag_s = max(run.max_lag_s, lag)
            run.late_sends += lag > LATE_SEND_S
            run.issue_times.append(sent_at)
            task = asyncio.create_task(one(index))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        gap = rng.expovariate(spec.rate_rps) if spec.arrival == "poisson" else 1.0 / spec.rate_rps
        next_at += gap
    if tasks:
        await asyncio.gather(*tasks)


async def run_load(send: Send, spec: LoadSpec) -> LoadRun:
    """Drive ``send`` according to ``spec``; returns every record (see :meth:`LoadRun.summary`)."""
    run = LoadRun(spec=spec)
    # The generator's own full collections would read as server latency: what is alive before the step
    # (earlier steps' records, the workload, the client libraries) leaves the collector's scans for its length.
    gc.collect()
    gc.freeze()
    try:
        t0 = time.perf_counter()
        if spec.mode == "closed":
            await _closed(send, spec, run, t0)
        else:
            await _open(send, spec, run, t0)
    finally:
        gc.unfreeze()
    return run
