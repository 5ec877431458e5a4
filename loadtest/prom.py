"""Read Prometheus histograms from a ``/metrics`` text exposition and turn them into distributions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Histogram", "parse_histogram"]


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts by upper bound (``math.inf`` for ``+Inf``), observation count and sum."""

    buckets: tuple[tuple[float, float], ...]
    count: float
    total: float

    def __sub__(self, before: Histogram) -> Histogram:
        """The observations made between the scrape ``before`` and this one."""
        earlier = dict(before.buckets)
        return Histogram(
            buckets=tuple((le, value - earlier.get(le, 0.0)) for le, value in self.buckets),
            count=self.count - before.count,
            total=self.total - before.total,
        )

    def distribution(self) -> dict[str, Any]:
        """``{"count", "mean", "buckets": [{"le", "count"}...]}`` with per-bucket (not cumulative) counts.

        ``le`` is the bucket's upper bound (``"+Inf"`` for the last); a bucket of integer observations
        such as batch sizes holds the values in (previous le, le].
        """
        rows = []
        previous = 0.0
        for le, cumulative in self.buckets:
            rows.append({"le": "+Inf" if math.isinf(le) else _number(le), "count": int(round(cumulative - previous))})
            previous = cumulative
        return {
            "count": int(round(self.count)),
            "mean": self.total / self.count if self.count > 0 else None,
            "buckets": rows,
        }


def parse_histogram(text: str, name: str) -> Histogram | None:
    """The histogram ``name`` in exposition ``text``, summed over label sets; None when absent."""
    buckets: dict[float, float] = {}
    count = total = 0.0
    found = False
    for family in text_string_to_metric_families(text):
        if family.name != name or family.type != "histogram":
            continue
        found = True
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
            elif sample.name == f"{name}_count":
                count += sample.value
            elif sample.name == f"{name}_sum":
                total += sample.value
    if not found:
        return None
    return Histogram(buckets=tuple(sorted(buckets.items())), count=count, total=total)


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value
