"""`fanout bench --shard i/N`: generator i's share of the workload (pure).

Rules:

1. Clients: generator i takes the global client indices c with c % N == i - 1
   (each keeps its global index, so its topics are the ones the whole run
   would give it): the N shares are disjoint and their union is every client.
2. Keys: generator i publishes the (topic, key) pairs whose index j in
   `Workload.all_pairs()` has j % N == i - 1, and only those (its final values
   too): no key is published by two generators, so each one checks its own
   clients' convergence against its own finals, and per-key order holds.
3. Rate: generator i publishes at U x (its pairs' share of the workload's
   key weights), drawing from those pairs with the workload's weights (round
   robin: equal weights; Zipf: 1 / rank**s over the same seeded ranking), so
   that the union of the N streams is the full workload: U updates/s with the
   workload's key popularity.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

from loadtest.workload import Workload


@dataclass(frozen=True, slots=True)
class Shard:
    index: int  # 1-based
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """ "2/4" -> Shard(2, 4); ValueError naming the flag otherwise."""
        left, sep, right = text.partition("/")
        try:
            index, count = int(left), int(right)
        except ValueError:
            raise ValueError(f"--shard: expected i/N (e.g. 1/2), not {text!r}") from None
        if not sep or count < 1 or not 1 <= index <= count:
            raise ValueError(f"--shard: i/N needs 1 <= i <= N, not {text!r}")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def mine(self, j: int) -> bool:
        return j % self.count == self.index - 1


WHOLE = Shard(1, 1)


def shard_clients(subscribers: int, shard: Shard) -> list[int]:
    """The global client indices of this generator (rule 1)."""
    return [c for c in range(subscribers) if shard.mine(c)]


def shard_pairs(w: Workload, shard: Shard) -> list[tuple[str, str]]:
    """The (topic, key) pairs this generator publishes (rule 2)."""
    return [p for j, p in enumerate(w.all_pairs()) if shard.mine(j)]


def _weights(w: Workload, seed: int) -> dict[tuple[str, str], float]:
    """Each pair's weight, as `workload.key_sampler` draws them."""
    pairs = w.all_pairs()
    if w.zipf_s is None:
        return dict.fromkeys(pairs, 1.0)
    ranked = pairs[:]
    random.Random(seed).shuffle(ranked)
    return {p: 1.0 / r**w.zipf_s for r, p in enumerate(ranked, 1)}


def shard_mass(w: Workload, seed: int, shard: Shard) -> float:
    """This generator's share of the publish rate (rule 3); 1.0 for the whole."""
    if shard.count == 1:
        return 1.0
    weights = _weights(w, seed)
    mine = sum(weights[p] for p in shard_pairs(w, shard))
    return mine / sum(weights.values())


def shard_sampler(w: Workload, seed: int, shard: Shard) -> Callable[[int], list[tuple[str, str]]]:
    """The next `n` pairs of this generator's share, with the workload's weights."""
    pairs = shard_pairs(w, shard)
    if w.zipf_s is None:
        cycle = itertools.cycle(pairs)
        return lambda n: list(itertools.islice(cycle, n))
    weights = _weights(w, seed)
    cum = list(itertools.accumulate(weights[p] for p in pairs))
    rng = random.Random(seed * 1000 + shard.index)
    return lambda n: rng.choices(pairs, cum_weights=cum, k=n)


__all__ = ["WHOLE", "Shard", "shard_clients", "shard_mass", "shard_pairs", "shard_sampler"]
