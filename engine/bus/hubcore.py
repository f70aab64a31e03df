"""The hub's state: positions per shard and the latest value of every key. PURE: no I/O.

Rules this module owns (the local backend's half of `engine.bus.base`'s guarantees):

1. Positions are assigned per shard the way Redis `XADD *` assigns stream IDs:
   the millisecond part is max(now_ms, the shard's last ms) and the sequence
   grows within one millisecond, so positions are strictly increasing per
   shard even when the clock goes backwards. Time is passed in (`now_ms`).
2. A publish is applied whole inside one call: no reader (dump, snapshot) can
   observe part of it.
3. Each key keeps only its latest (pos, data). A deletion (`data == NIL`)
   keeps a tombstone, so a client recovering from an old position learns that
   the key is gone. Memory is bounded by the number of keys (and topics) ever
   written, never by the number of updates.
4. Within a topic, keys are held in position order (a written key moves to the
   end), so a dump lists each topic's entries in position order at no sorting
   cost.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.bus.base import Entry, Snapshot, shard_of
from engine.protocol.codec import make_pos


class HubCore:
    """Orders publishes and keeps the latest state of every topic.

    Not thread-safe; owned by the hub's event loop. Topic names are taken as
    given (the hub's clients validate them before publishing).
    """

    __slots__ = ("_last", "_shard", "_topics", "entries", "epoch", "shards")

    def __init__(self, shards: int, epoch: str) -> None:
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        self.shards = shards
        self.epoch = epoch
        self.entries = 0  # entries published since start (a counter for status)
        self._last = [0] * shards  # per shard: the last position assigned
        self._shard: dict[str, int] = {}  # topic -> shard (crc32 once per topic)
        # topic -> key -> (pos, data), each topic's keys in position order.
        self._topics: dict[str, dict[str, tuple[int, bytes]]] = {}

    def publish(self, updates: Sequence[tuple[str, str, bytes]], now_ms: int) -> list[Entry]:
        """Apply `updates` (topic, key, data) atomically; return their entries in order."""
        out: list[Entry] = []
        last = self._last
        floor = make_pos(max(now_ms, 0), 0)
        for topic, key, data in updates:
            shard = self._shard.get(topic)
            if shard is None:
                shard = self._shard[topic] = shard_of(topic, self.shards)
            prev = last[shard]
            # XADD's rule. `prev + 1` bumps the sequence, and carries into the
            # millisecond part when the sequence is full (positions are ms << 32 | seq).
            pos = floor if floor > prev else prev + 1
            last[shard] = pos
            keys = self._topics.get(topic)
            if keys is None:
                keys = self._topics[topic] = {}
            else:
                keys.pop(key, None)  # re-insert at the end: keeps position order
            keys[key] = (pos, data)
            out.append((topic, key, pos, data))
        self.entries += len(out)
        return out

    def state_entries(self) -> list[Entry]:
        """Every key's latest entry (tombstones included), in position order per topic."""
        return [
            (topic, key, pos, data)
            for topic, keys in self._topics.items()
            for key, (pos, data) in keys.items()
        ]

    def snapshot(self, topic: str) -> Snapshot:
        """The topic's latest state; `pos` is its newest entry's (0 for an unknown topic)."""
        keys = self._topics.get(topic)
        if not keys:
            return Snapshot(epoch=self.epoch, pos=0, items=[])
        items = [(key, pos, data) for key, (pos, data) in keys.items()]
        return Snapshot(epoch=self.epoch, pos=items[-1][1], items=items)

    def topic_pos(self, topic: str) -> int:
        """The position of the topic's newest entry, 0 for a topic never written."""
        keys = self._topics.get(topic)
        if not keys:
            return 0
        return next(reversed(keys.values()))[0]

    @property
    def topic_count(self) -> int:
        return len(self._topics)

    @property
    def key_count(self) -> int:
        return sum(len(keys) for keys in self._topics.values())
