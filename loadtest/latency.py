"""The latency histogram of the load tools: integer buckets, bounded memory, percentiles.

Buckets are integers so that a subscriber adds a sample with one shift and one
dict update. Fine buckets are 2**16 ns (65.5 us) wide up to 2**32 ns (4.3 s);
beyond that, coarse buckets of 2**26 ns (67 ms). Negative differences (a clock
step) go to bucket 0 and are counted apart. Pure: no I/O.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

_FINE_SHIFT = 16
_FINE_BUCKETS = 1 << 16
_COARSE_SHIFT = 26


def bucket_of(d_ns: int) -> int:
    """The histogram bucket of a latency in nanoseconds."""
    if d_ns < 0:
        return 0
    b = d_ns >> _FINE_SHIFT
    if b < _FINE_BUCKETS:
        return b
    return _FINE_BUCKETS + (d_ns >> _COARSE_SHIFT)


def bucket_mid_ns(b: int) -> float:
    """The middle of a bucket, in nanoseconds."""
    if b < _FINE_BUCKETS:
        return (b + 0.5) * (1 << _FINE_SHIFT)
    return (b - _FINE_BUCKETS + 0.5) * (1 << _COARSE_SHIFT)


class LatencyRecorder:
    """One process's latency histogram and its counts, fed with the
    ((stamp_ns, count), ...) of each received message (`record`)."""

    def __init__(self) -> None:
        self.hist: dict[int, int] = {}
        self.samples = 0
        self.negative = 0  # clock steps: the receive time before the stamp
        self.max_ns = 0

    def record(self, stamps: Iterable[tuple[int, int]], now: int) -> None:
        hist = self.hist
        for t, c in stamps:
            d = now - t
            b = d >> _FINE_SHIFT
            if b >= _FINE_BUCKETS or d < 0:
                b = bucket_of(d)
                if d < 0:
                    self.negative += c
            hist[b] = hist.get(b, 0) + c
            self.samples += c
            if d > self.max_ns:
                self.max_ns = d


def merge_hist(into: dict[int, int], other: Mapping[int, int]) -> None:
    for b, c in other.items():
        into[b] = into.get(b, 0) + c


def percentiles_ms(hist: Mapping[int, int], qs: Sequence[float]) -> dict[str, float | None]:
    """Percentiles (0 < q <= 1) of a histogram, in milliseconds (bucket middles)."""
    total = sum(hist.values())
    out: dict[str, float | None] = {}
    if not total:
        return {qname(q): None for q in qs}
    # in C: a wide histogram (latencies up to seconds: tens of thousands of buckets) is
    # read every 5 s by each subscriber process for its progress line
    buckets = sorted(hist)
    cumulative = list(itertools.accumulate(map(hist.__getitem__, buckets)))
    for q in qs:
        rank = max(1, math.ceil(q * total))
        at = min(bisect.bisect_left(cumulative, rank), len(buckets) - 1)
        out[qname(q)] = round(bucket_mid_ns(buckets[at]) / 1e6, 3)
    return out


def qname(q: float) -> str:
    return "p" + f"{q * 100:g}".replace(".", "")
