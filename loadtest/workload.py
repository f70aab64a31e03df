"""The benchmark workloads, as pure data and pure functions (no I/O).

Two named workloads (issue 5) that every report uses:

- **hot**: one topic of 50 keys; every subscriber subscribes to it; the
  publisher spreads updates evenly over the keys (round robin).
- **market**: 100 topics of 50 keys (5,000 keys); key popularity is Zipf
  distributed (s = 1.1) over a fixed random ranking of all keys; each
  subscriber subscribes to 5 random topics.

And **stream**: one topic in stream mode (every event delivered, nothing
coalesced): the per-frame cost.

Everything random is drawn from `random.Random(seed)`: the same seed gives the
same subscriptions and the same sequence of published keys, so fanout and the
baseline see exactly the same workload in one run.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Workload:
    """T topics of K keys; how keys are picked; how many topics each subscriber takes."""

    name: str
    topics: int
    keys: int
    zipf_s: float | None  # None: round robin over every key
    topics_per_sub: int
    prefix: str = "bench"
    mode: str = "state"  # "stream": every event delivered in order (fanout topic config)

    @property
    def total_keys(self) -> int:
        return self.topics * self.keys

    def topic_names(self) -> list[str]:
        if self.topics == 1:
            return [f"{self.prefix}.{self.name}"]
        width = len(str(self.topics - 1))
        return [f"{self.prefix}.{self.name}.t{i:0{width}d}" for i in range(self.topics)]

    def key_names(self) -> list[str]:
        width = len(str(self.keys - 1))
        return [f"k{i:0{width}d}" for i in range(self.keys)]

    def all_pairs(self) -> list[tuple[str, str]]:
        """Every (topic, key), topic-major."""
        return [(t, k) for t in self.topic_names() for k in self.key_names()]

    def subscriptions(self, subscribers: int, seed: int) -> list[tuple[str, ...]]:
        """The topics of each subscriber (sorted), the same for the same seed."""
        names = self.topic_names()
        n = min(self.topics_per_sub, len(names))
        if n == len(names):
            return [tuple(names)] * subscribers
        rng = random.Random(seed)
        return [tuple(sorted(rng.sample(names, n))) for _ in range(subscribers)]

    def describe(self) -> str:
        pick = "round robin" if self.zipf_s is None else f"Zipf s={self.zipf_s:g}"
        return (
            f"{self.name}: {self.topics} topic(s) x {self.keys} keys, keys picked {pick}, "
            f"{self.topics_per_sub} topic(s) per subscriber"
        )


HOT = Workload("hot", topics=1, keys=50, zipf_s=None, topics_per_sub=1)
MARKET = Workload("market", topics=100, keys=50, zipf_s=1.1, topics_per_sub=5)
# nothing can be coalesced: one stream topic, every event to every subscriber (per-frame cost)
STREAM = Workload("stream", topics=1, keys=1, zipf_s=None, topics_per_sub=1, mode="stream")
WORKLOADS = {"hot": HOT, "market": MARKET, "stream": STREAM}
STREAM_KEY = "k0"  # a stream client's view keeps the last event under this key


def key_sampler(w: Workload, seed: int) -> Callable[[int], list[tuple[str, str]]]:
    """A function returning the next `n` (topic, key) pairs to publish.

    Round robin over every key when `w.zipf_s` is None; otherwise key of rank r
    (1-based, over a seeded shuffle of all keys) has weight 1 / r**s."""
    pairs = w.all_pairs()
    if w.zipf_s is None:
        cycle = itertools.cycle(pairs)
        return lambda n: list(itertools.islice(cycle, n))
    rng = random.Random(seed)
    ranked = pairs[:]
    rng.shuffle(ranked)
    cum: list[float] = []
    total = 0.0
    for r in range(1, len(ranked) + 1):
        total += 1.0 / r**w.zipf_s
        cum.append(total)

    def sample(n: int) -> list[tuple[str, str]]:
        # the same draws as bisecting `cum` at rng.random() * total, for a third of the CPU
        return rng.choices(ranked, cum_weights=cum, k=n)

    return sample


__all__ = ["HOT", "MARKET", "STREAM", "STREAM_KEY", "WORKLOADS", "Workload", "key_sampler"]
