"""inference.embedding_cache: byte-bounded LRU semantics, stats and thread safety."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from inference.embedding_cache import EmbeddingCache, pixels_digest


def _array(n_floats: int, fill: float = 0.0) -> np.ndarray:
    return np.full(n_floats, fill, dtype=np.float32)  # 4 bytes per element


def test_hit_miss_and_stats():
    cache = EmbeddingCache(max_bytes=1000)
    assert cache.get("a") is None
    value = _array(10, 1.0)
    assert cache.put("a", value)
    assert cache.get("a") is value
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes, stats.max_bytes) == (1, 1, 1, 40, 1000)
    assert stats.to_dict()["bytes"] == 40


def test_evicts_least_recently_used_by_bytes():
    cache = EmbeddingCache(max_bytes=100)  # room for two 40-byte entries, not three
    cache.put("a", _array(10))
    cache.put("b", _array(10))
    cache.get("a")  # "b" is now the least recently used
    cache.put("c", _array(10))
    assert "a" in cache and "c" in cache and "b" not in cache
    stats = cache.stats()
    assert stats.bytes == 80 and stats.entries == 2 and stats.evictions == 1


def test_mapping_values_count_all_arrays_and_replacing_a_key_updates_bytes():
    cache = EmbeddingCache(max_bytes=1000)
    cache.put("k", {"emb": _array(10), "size": np.zeros(2, np.int64), "note": "x"})
    assert cache.stats().bytes == 40 + 16
    cache.put("k", (_array(5),))
    assert cache.stats().bytes == 20 and len(cache) == 1


def test_oversized_value_is_refused_without_evicting():
    cache = EmbeddingCache(max_bytes=50)
    cache.put("small", _array(5))
    assert cache.put("big", _array(100)) is False
    assert "small" in cache and "big" not in cache


def test_zero_budget_disables_and_negative_is_rejected():
    cache = EmbeddingCache(max_bytes=0)
    assert cache.put("a", _array(1)) is False and len(cache) == 0
    with pytest.raises(ValueError, match="max_bytes"):
        EmbeddingCache(max_bytes=-1)


def test_clear_keeps_counters():
    cache = EmbeddingCache(max_bytes=100)
    cache.put("a", _array(1))
    cache.get("a")
    cache.clear()
    stats = cache.stats()
    assert stats.entries == 0 and stats.bytes == 0 and stats.hits == 1


def test_pixels_digest_depends_on_content_shape_and_dtype():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert pixels_digest(a) == pixels_digest(a.copy())
    assert pixels_digest(a) != pixels_digest(a.reshape(4, 3))
    assert pixels_digest(a) != pixels_digest(a.astype(np.float64))
    b = a.copy()
    b[0, 0] += 1
    assert pixels_digest(a) != pixels_digest(b)
    assert pixels_digest(a.T) == pixels_digest(np.ascontiguousarray(a.T))


def test_concurrent_puts_and_gets_stay_within_budget():
    cache = EmbeddingCache(max_bytes=400)  # ten 40-byte entries

    def worker(offset: int) -> None:
        for i in range(200):
            key = (offset + i) % 37
            if cache.get(key) is None:
                cache.put(key, _array(10))

    threads = [threading.Thread(target=worker, args=(k * 5,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = cache.stats()
    assert stats.bytes <= 400 and stats.bytes == 40 * stats.entries
    assert stats.hits + stats.misses == 800
