"""The hub's state: positions per shard, the latest value of every key, stream histories. PURE: no I/O.

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
5. A stream topic (`history_of` gives its `history`; decided when the topic
   is first written, the rules do not change while the hub runs) keeps no
   per-key state but its newest `history` events, oldest first, and its
   floor: the position of the newest event it dropped (0: none). Memory is
   bounded by `history` per stream topic.
6. Bounds (`engine/bus/limits.py`): a publish is checked whole before any of
   it is applied; over `max_data_bytes`, `max_keys_per_topic` or a shard's
   share of `max_topics` it raises `BusRefused` and changes nothing. So the
   hub's memory is bounded by topics x keys x `max_data_bytes` (plus the
   stream histories), whatever publishers send.
7. A topic whose rule has an idle expiry (`expiry_of`) is removed by
   `expire(now_ms)` once nothing was published to it for that long: its keys,
   tombstones or history, and its place in the topic count. Topics are kept
   in last-publish order per expiry value, so `expire` looks only at those due.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

from engine.bus.base import Entry, ExpiryOf, History, HistoryOf, Snapshot, shard_of
from engine.bus.limits import Limits, too_large, too_many_keys, too_many_topics
from engine.protocol.codec import make_pos


def _no_streams(topic: str) -> int | None:
    return None  # without rules, every topic is a state topic


class StreamHistory:
    """The retained events of one stream topic (rule 5)."""

    __slots__ = ("events", "floor", "history")

    def __init__(self, history: int) -> None:
        self.history = history
        self.events: deque[tuple[int, str, bytes]] = deque()  # (pos, key, data)
        self.floor = 0

    def append(self, pos: int, key: str, data: bytes) -> None:
        events = self.events
        events.append((pos, key, data))
        while len(events) > self.history:
            self.floor = events.popleft()[0]

    def after(self, since: int, limit: int | None) -> tuple[list[tuple[int, str, bytes]], bool]:
        """The events after `since` (the newest `limit` of them), and whether
        they are all the events published after it."""
        out: list[tuple[int, str, bytes]] = []
        for event in reversed(self.events):
            if event[0] <= since:
                break
            out.append(event)
        out.reverse()
        complete = since >= self.floor
        if limit is not None and len(out) > limit:
            out = out[len(out) - limit :]
            complete = False
        return out, complete


class HubCore:
    """Orders publishes and keeps the latest state of every topic.

    Not thread-safe; owned by the hub's event loop. Topic names are taken as
    given (the hub's clients validate them before publishing).
    """

    __slots__ = (
        "_expiry_of",
        "_history_of",
        "_idle",
        "_last",
        "_max_keys",
        "_max_topics",
        "_shard",
        "_shard_topics",
        "_streams",
        "_topics",
        "entries",
        "epoch",
        "expired",
        "limits",
        "shards",
    )

    def __init__(
        self,
        shards: int,
        epoch: str,
        history_of: HistoryOf | None = None,
        *,
        limits: Limits | None = None,
        expiry_of: ExpiryOf | None = None,
    ) -> None:
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        self.shards = shards
        self.epoch = epoch
        self.entries = 0  # entries published since start (a counter for status)
        self.expired = 0  # topics removed by `expire` (rule 7)
        self._last = [0] * shards  # per shard: the last position assigned
        self._shard: dict[str, int] = {}  # topic -> shard (crc32 once per topic)
        # topic -> key -> (pos, data), each topic's keys in position order.
        self._topics: dict[str, dict[str, tuple[int, bytes]]] = {}
        self._streams: dict[str, StreamHistory] = {}  # stream topic -> its history
        self._history_of = history_of or _no_streams
        self.limits = limits or Limits()
        self._max_keys = self.limits.max_keys_per_topic
        self._max_topics = self.limits.topics_per_shard(shards)
        self._shard_topics = [0] * shards  # topics held per shard (rule 6)
        self._expiry_of = expiry_of
        # expiry in ms -> topic -> its last publish (ms), oldest first (rule 7)
        self._idle: dict[int, OrderedDict[str, int]] = {}

    def check(self, updates: Sequence[tuple[str, str, bytes]]) -> None:
        """Raise `BusRefused` if applying `updates` would break a bound (rule 6)."""
        max_data = self.limits.max_data_bytes
        max_keys = self._max_keys
        max_topics = self._max_topics
        added_keys: dict[str, set[str]] = {}  # topic -> keys this batch adds
        added_topics: dict[int, set[str]] = {}  # shard -> topics this batch adds
        for topic, key, data in updates:
            if len(data) > max_data:
                raise too_large(topic, key, len(data), max_data)
            keys = self._topics.get(topic)
            if keys is None:
                if topic in self._streams:
                    continue
                if max_topics:
                    # not cached: a refused name must not stay in `_shard`
                    shard = shard_of(topic, self.shards)
                    adding = added_topics.setdefault(shard, set())
                    adding.add(topic)
                    if self._shard_topics[shard] + len(adding) > max_topics:
                        raise too_many_topics(topic, max_topics)
                if self._history_of(topic) is not None:
                    continue  # a stream topic has no keys
            if max_keys and (keys is None or key not in keys):
                fresh = added_keys.setdefault(topic, set())
                fresh.add(key)
                if (len(keys) if keys else 0) + len(fresh) > max_keys:
                    raise too_many_keys(topic, key, max_keys)

    def _shard_for(self, topic: str) -> int:
        shard = self._shard.get(topic)
        if shard is None:
            shard = self._shard[topic] = shard_of(topic, self.shards)
        return shard

    def publish(self, updates: Sequence[tuple[str, str, bytes]], now_ms: int) -> list[Entry]:
        """Apply `updates` (topic, key, data) atomically; return their entries in order.

        Raises `BusRefused` (and applies nothing) when a bound would break (rule 6).
        """
        self.check(updates)
        out: list[Entry] = []
        last = self._last
        floor = make_pos(max(now_ms, 0), 0)
        for topic, key, data in updates:
            shard = self._shard.get(topic)
            if shard is None:
                shard = self._shard_for(topic)
            prev = last[shard]
            # XADD's rule. `prev + 1` bumps the sequence, and carries into the
            # millisecond part when the sequence is full (positions are ms << 32 | seq).
            pos = floor if floor > prev else prev + 1
            last[shard] = pos
            keys = self._topics.get(topic)
            if keys is not None:
                keys.pop(key, None)  # re-insert at the end: keeps position order
                keys[key] = (pos, data)
            else:
                self._write_new_or_stream(topic, key, pos, data)
            if self._expiry_of is not None:
                self._touch(topic, now_ms)
            out.append((topic, key, pos, data))
        self.entries += len(out)
        return out

    def _touch(self, topic: str, now_ms: int) -> None:
        assert self._expiry_of is not None
        expiry_ms = round(self._expiry_of(topic) * 1000)
        if expiry_ms <= 0:
            return
        order = self._idle.get(expiry_ms)
        if order is None:
            order = self._idle[expiry_ms] = OrderedDict()
        order[topic] = now_ms
        order.move_to_end(topic)

    def expire(self, now_ms: int) -> list[str]:
        """Remove the topics idle past their rule's expiry (rule 7); return them."""
        gone: list[str] = []
        for expiry_ms, order in self._idle.items():
            while order:
                topic, last = next(iter(order.items()))
                if now_ms - last < expiry_ms:
                    break
                del order[topic]
                self._remove(topic)
                gone.append(topic)
        self.expired += len(gone)
        return gone

    def _remove(self, topic: str) -> None:
        if self._topics.pop(topic, None) is None and self._streams.pop(topic, None) is None:
            return
        shard = self._shard.pop(topic, None)
        if shard is None:
            shard = shard_of(topic, self.shards)
        self._shard_topics[shard] -= 1

    def _write_new_or_stream(self, topic: str, key: str, pos: int, data: bytes) -> None:
        """A stream topic's event, or the first entry of a topic."""
        stream = self._streams.get(topic)
        if stream is None:
            self._shard_topics[self._shard_for(topic)] += 1
            history = self._history_of(topic)
            if history is None:
                self._topics[topic] = {key: (pos, data)}
                return
            stream = self._streams[topic] = StreamHistory(history)
        stream.append(pos, key, data)

    def state_entries(self) -> list[Entry]:
        """Every key's latest entry (tombstones included), then every stream
        topic's retained events, in position order per topic."""
        out = [
            (topic, key, pos, data)
            for topic, keys in self._topics.items()
            for key, (pos, data) in keys.items()
        ]
        out.extend(
            (topic, key, pos, data)
            for topic, stream in self._streams.items()
            for pos, key, data in stream.events
        )
        return out

    def floors(self) -> list[tuple[str, int]]:
        """(topic, floor) of every stream topic (rule 5)."""
        return [(topic, stream.floor) for topic, stream in self._streams.items()]

    def history(self, topic: str, since: int, limit: int | None) -> History | None:
        """A stream topic's retained events after `since` (`Bus.history`);
        None for a state topic."""
        stream = self._streams.get(topic)
        if stream is None:
            if topic in self._topics or self._history_of(topic) is None:
                return None
            return History(self.epoch, [], True)  # never written: nothing was lost
        events, complete = stream.after(since, limit)
        return History(self.epoch, events, complete)

    def snapshot(self, topic: str) -> Snapshot:
        """The topic's latest state; `pos` is its newest entry's (0 for an unknown
        topic, and for a stream topic, which has no per-key state)."""
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
        return len(self._topics) + len(self._streams)

    @property
    def key_count(self) -> int:
        return sum(len(keys) for keys in self._topics.values())
