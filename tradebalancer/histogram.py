"""A histogram the event loop fills cheaply and anyone reads: fixed buckets, plain integers.

Owns the arithmetic of a latency distribution: ``observe`` (a bisect and two adds, on the hot
path once per frame) and quantiles estimated from the difference of two readings, which is how
``tradebalancer status`` shows the delay percentiles of the last seconds rather than since the
start. The Prometheus exposition of the same counts is metrics.py's. No I/O, no clock.

Why not prometheus_client's Histogram: it takes a lock per observation, for threads this
process does not have; the exposition still comes from prometheus_client (metrics.py).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

__all__ = ["DELAY_BOUNDS", "LATENCY_BOUNDS", "Histogram", "quantile"]

# Seconds. The delay behind the market: tens of milliseconds when all is well, seconds when
# the feed buffers for a slow consumer, minutes before it cuts it off.
DELAY_BOUNDS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
# Seconds. From the balancer waking to read the socket to the write into the pipes.
LATENCY_BOUNDS = (
    *(0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005),
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
)


class Histogram:
    """Counts per bucket (the last is +Inf), their sum, their number."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose upper bound is at least it (``le``)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def reading(self) -> list[int]:
        """The counts now, to compare with a later reading (``quantile``)."""
        return list(self.counts)


def quantile(
    bounds: Sequence[float], before: Sequence[int], after: Sequence[int], q: float
) -> float | None:
    """The ``q`` quantile of the values counted between two readings, or None if none were.

    Interpolated linearly inside the bucket, as Prometheus' histogram_quantile does; a value in
    the +Inf bucket is reported as the highest bound.
    """
    counts = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(counts)
    if total == 0:
        return None
    rank, seen = q * total, 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index == len(bounds):
                return bounds[-1]
            low = bounds[index - 1] if index else 0.0
            return low + (bounds[index] - low) * (rank - seen) / count
        seen += count
    return bounds[-1]
