"""A thread-safe LRU cache of SAM image embeddings, bounded in bytes.
(Details: docs/architecture.md, "inference".)
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["CacheStats", "EmbeddingCache", "pixels_digest"]

DEFAULT_MAX_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the cache counters (the service exports them as Prometheus metrics)."""

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    max_bytes: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def pixels_digest(pixels: np.ndarray) -> str:
    """sha256 hex of an array's dtype, shape and C-contiguous bytes (a content key for decoded images)."""
    array = np.ascontiguousarray(pixels)
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}:{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def _nbytes(value: object) -> int:
    """Bytes held by a cached value: an array, or a mapping/tuple/list of arrays (other leaves count 0)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, Mapping):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


class EmbeddingCache:
    """LRU mapping ``key -> value`` whose total array bytes never exceed ``max_bytes``.

    Values are numpy arrays or mappings/tuples of them; they are stored as given, so callers must not
    mutate a value after ``put`` or after ``get`` returns it. ``max_bytes=0`` disables caching.

    Args:
        max_bytes: upper bound on the sum of ``nbytes`` over all entries.

    Raises:
        ValueError: if ``max_bytes`` is negative.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if int(max_bytes) < 0:
            raise ValueError(f"EmbeddingCache max_bytes must be >= 0, got {max_bytes}")
        self._max_bytes = int(max_bytes)
        self._entries: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._lock = threading.Lock()

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    def get(self, key: Hashable) -> object | None:
        """The value for ``key`` (marking it most recently used) or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry[0]

    def put(self, key: Hashable, value: object) -> bool:
        """Store ``value`` under ``key``, evicting least recently used entries to stay within budget.

        Returns:
            True if stored; False if the value alone is larger than ``max_bytes`` (nothing is evicted then).
        """
        size = _nbytes(value)
        with self._lock:
            if size > self._max_bytes:
                return False
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            while self._entries and self._bytes + size > self._max_bytes:
                _, (_, evicted_size) = self._entries.popitem(last=False)
                self._bytes -= evicted_size
                self._evictions += 1
            self._entries[key] = (value, size)
            self._bytes += size
            return True

    def __contains__(self, key: Hashable) -> bool:
        """Membership without touching recency or the hit/miss counters."""
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=len(self._entries),
                bytes=self._bytes,
                max_bytes=self._max_bytes,
            )
