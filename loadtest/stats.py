"""Per-request records and the latency/throughput summary of one load step."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["RequestRecord", "latency_summary", "percentile", "summarise"]


@dataclass(frozen=True)
class RequestRecord:
    """One request: ``start`` and ``end`` in seconds since the step began; ``error`` None when it succeeded.

    ``error`` is a short kind such as ``"http-503"``, ``"grpc-UNAVAILABLE"`` or an exception class name;
    ``shed`` is True when that error is documented load shedding (429/503 with ``Retry-After``).
    """

    start: float
    end: float
    error: str | None = None
    shed: bool = False

    @property
    def latency_s(self) -> float:
        return self.end - self.start

    @property
    def ok(self) -> bool:
        return self.error is None


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (``q`` in [0, 100]) of ``samples`` by linear interpolation.

    Raises:
        ValueError: empty ``samples`` or ``q`` outside [0, 100].
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    if len(samples) == 0:
        raise ValueError("percentile of an empty sample")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float | None]:
    """``{"p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms"}`` of latencies in seconds (None when empty)."""
    keys = ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms")
    if not latencies_s:
        return dict.fromkeys(keys)
    return {
        "p50_ms": 1000.0 * percentile(latencies_s, 50),
        "p95_ms": 1000.0 * percentile(latencies_s, 95),
        "p99_ms": 1000.0 * percentile(latencies_s, 99),
        "mean_ms": 1000.0 * sum(latencies_s) / len(latencies_s),
        "max_ms": 1000.0 * max(latencies_s),
    }


def summarise(
    records: Iterable[RequestRecord],
    *,
    window: tuple[float, float],
    issued_in_window: int | None = None,
    dropped: int = 0,
) -> dict[str, Any]:
    """Throughput, error rate and latency percentiles of the requests that completed inside ``window``.

    Args:
        records: every request of the step.
        window: ``(begin, end)`` in step seconds; a request counts when ``begin <= record.end <= end``
            (completion-based, so throughput = completions per second at steady state).
        issued_in_window: requests sent inside the window (open loop: the offered load actually achieved).
        dropped: open-loop arrivals not sent because the generator's in-flight cap was reached.

    Returns:
        ``{"window_s", "completed", "ok", "errors", "error_rate", "errors_by_kind", "shed", "throughput_rps",
        "offered_rps", "dropped", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms"}``; latencies are
        those of the successful requests.
    """
    begin, end = window
    if end <= begin:
        raise ValueError(f"summary window must have end > begin, got {window}")
    inside = [r for r in records if begin <= r.end <= end]
    ok = [r for r in inside if r.ok]
    kinds = Counter(r.error for r in inside if not r.ok)
    span = end - begin
    summary: dict[str, Any] = {
        "window_s": span,
        "completed": len(inside),
        "ok": len(ok),
        "errors": len(inside) - len(ok),
        "error_rate": (len(inside) - len(ok)) / len(inside) if inside else 0.0,
        "errors_by_kind": dict(sorted(kinds.items())),
        "shed": sum(1 for r in inside if r.shed),
        "throughput_rps": len(ok) / span,
        "offered_rps": issued_in_window / span if issued_in_window is not None else None,
        "dropped": dropped,
    }
    summary.update(latency_summary([r.latency_s for r in ok]))
    return summary
