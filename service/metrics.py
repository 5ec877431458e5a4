"""Prometheus metrics of the service: module-level objects plus a small facade the runtime calls.
(Details: docs/architecture.md, "service".)
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as _prom_values

__all__ = [
    "BATCH_SIZE",
    "CACHE_BYTES",
    "CACHE_HITS",
    "CACHE_MISSES",
    "GENERATION_BATCH_SIZE",
    "GENERATION_QUEUE_DEPTH",
    "GENERATION_STEPS",
    "INFLIGHT",
    "MODEL_INFO",
    "QUEUE_DEPTH",
    "QUEUE_WAIT",
    "REGISTRY",
    "REQUESTS",
    "REQUEST_LATENCY",
    "STAGE_LATENCY",
    "UNKNOWN_MODEL",
    "ServiceMetrics",
    "exposition_if_separate",
    "model_label",
    "multiprocess_mode",
]

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

REQUESTS = Counter(
    "medrefine_requests_total", "Requests answered, by endpoint, protocol (rest|oip-http|grpc), OIP model "
    "(segment|generate|synthesize; unknown for other names; empty where none is named) and status code.",
    ["endpoint", "protocol", "model", "status"], registry=REGISTRY,
)
REQUEST_LATENCY = Histogram(
    "medrefine_request_latency_seconds", "Wall time from request parsed to response ready.",
    ["endpoint", "protocol"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
STAGE_LATENCY = Histogram(
    "medrefine_stage_latency_seconds", "Time per pipeline stage per batch (decode, transunet, encoder, ...).",
    ["stage"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "medrefine_batch_size", "Items per batch run by the shared adaptive batcher.",
    buckets=_BATCH_BUCKETS, registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "medrefine_queue_wait_seconds", "Time an item waited in the batching queue before its batch started.",
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
INFLIGHT = Gauge(
    "medrefine_inflight_requests", "Inference requests being handled (queued or running).",
    registry=REGISTRY, multiprocess_mode="livesum",
)
QUEUE_DEPTH = Gauge(
    "medrefine_queue_depth", "Items waiting in the batching queue.", registry=REGISTRY, multiprocess_mode="livesum",
)
GENERATION_BATCH_SIZE = Histogram(
    "medrefine_generation_batch_size", "Requests per batch run by the generation batcher (generate, synthesize).",
    buckets=_BATCH_BUCKETS, registry=REGISTRY,
)
GENERATION_QUEUE_DEPTH = Gauge(
    "medrefine_generation_queue_depth", "Requests waiting in the generation queue.", registry=REGISTRY,
    multiprocess_mode="livesum",
)
GENERATION_STEPS = Counter(
    "medrefine_generation_steps_total", "Denoising steps run, summed over requests (a request that timed out "
    "or left stops counting at its next step).", registry=REGISTRY,
)
CACHE_HITS = Counter(
    "medrefine_embedding_cache_hits_total", "SAM embedding cache hits.", registry=REGISTRY,
)
CACHE_MISSES = Counter(
    "medrefine_embedding_cache_misses_total", "SAM embedding cache misses.", registry=REGISTRY,
)
CACHE_BYTES = Gauge(
    "medrefine_embedding_cache_bytes", "Bytes held by the SAM embedding cache.",
    registry=REGISTRY, multiprocess_mode="livesum",
)
MODEL_INFO = Gauge(
    "medrefine_model_info", "Constant 1 labelled with the served model version and backend.",
    ["version", "backend"], registry=REGISTRY, multiprocess_mode="livemax",
)


UNKNOWN_MODEL = "unknown"


def model_label(name: str | None, known: Collection[str]) -> str:
    """The ``model`` label for a request naming OIP model ``name``: the name when ``known`` lists it,
    :data:`UNKNOWN_MODEL` otherwise (a client's made-up names never make new series), ``""`` for none."""
    if not name:
        return ""
    return name if name in known else UNKNOWN_MODEL


def multiprocess_mode() -> bool:
    """True when prometheus_client stores values in ``PROMETHEUS_MULTIPROC_DIR`` (BentoML workers)."""
    return _prom_values.ValueClass is not _prom_values.MutexValue


def exposition_if_separate() -> bytes:
    """Our metrics in text exposition format when BentoML's collector cannot see them, else ``b""``."""
    if multiprocess_mode():
        return b""
    return generate_latest(REGISTRY)


class ServiceMetrics:
    """What the runtime and the front ends record; also the batcher's ``BatchObserver``."""

    def __init__(self) -> None:
        self._cache_hits_seen = 0
        self._cache_misses_seen = 0
        self._cache_lock = threading.Lock()  # the inference thread and /metrics scrapes both sync

    # -- requests ---------------------------------------------------------------------------------------

    def observe_request(self, endpoint: str, protocol: str, status: str | int, seconds: float, *,
                        model: str = "") -> None:
        """Count one answered request and its latency (status is the HTTP code, e.g. ``"200"``; ``model``:
        the OIP model it named, already bounded by :func:`model_label`)."""
        REQUESTS.labels(endpoint=endpoint, protocol=protocol, model=model, status=str(status)).inc()
        REQUEST_LATENCY.labels(endpoint=endpoint, protocol=protocol).observe(max(0.0, float(seconds)))

    @contextlib.contextmanager
    def inflight(self) -> Iterator[None]:
        """Count a request as in flight for the duration of the block."""
        INFLIGHT.inc()
        try:
            yield
        finally:
            INFLIGHT.dec()

    @contextlib.contextmanager
    def request(self, endpoint: str, protocol: str) -> Iterator[dict[str, str]]:
        """Time a request; the block sets ``state["status"]`` (default ``"200"``, ``"500"`` on an exception)."""
        state = {"status": "200"}
        start = time.perf_counter()
        try:
            yield state
        except BaseException:
            if state["status"] == "200":
                state["status"] = "500"
            raise
        finally:
            self.observe_request(endpoint, protocol, state["status"], time.perf_counter() - start)

    # -- pipeline ---------------------------------------------------------------------------------------

    def observe_stages(self, timings_ms: Mapping[str, float]) -> None:
        """Record per-stage wall times given in milliseconds (one observation per stage per batch)."""
        for stage, ms in timings_ms.items():
            STAGE_LATENCY.labels(stage=str(stage)).observe(max(0.0, float(ms)) / 1000.0)

    def set_model_info(self, version: str, backend: str) -> None:
        MODEL_INFO.labels(version=version, backend=backend).set(1)

    def sync_cache(self, hits: int, misses: int, nbytes: int) -> None:
        """Mirror the embedding cache's cumulative counters (the cache counts; Prometheus gets the deltas)."""
        with self._cache_lock:
            if hits > self._cache_hits_seen:
                CACHE_HITS.inc(hits - self._cache_hits_seen)
                self._cache_hits_seen = hits
            if misses > self._cache_misses_seen:
                CACHE_MISSES.inc(misses - self._cache_misses_seen)
                self._cache_misses_seen = misses
            CACHE_BYTES.set(nbytes)

    # -- batcher (BatchObserver) ------------------------------------------------------------------------

    def observe_queue_depth(self, depth: int) -> None:
        QUEUE_DEPTH.set(depth)

    def observe_batch(self, size: int, queue_waits_s: Sequence[float]) -> None:
        BATCH_SIZE.observe(size)
        for wait in queue_waits_s:
            QUEUE_WAIT.observe(max(0.0, wait))
