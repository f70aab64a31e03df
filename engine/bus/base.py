"""The bus interface: one ordered log per shard, positions, epochs, latest state.

Every backend (`local`: the embedded hub; `redis`: Redis Streams) implements
`Bus` and passes the same contract suite (tests/contract).

Guarantees every backend gives:

1. Each topic belongs to one shard (`shard_of`); entries of one topic are
   delivered to every bus client in position order, with strictly increasing
   positions. Positions are integers (see `engine.protocol.codec.make_pos`).
2. A publish is accepted whole or not at all, per shard: the local hub applies
   a whole batch at once; the Redis backend applies each shard's part of a
   batch atomically (one script call per shard). When `publish` reports
   positions, the entries are in the log and in the latest state;
   `BusUnavailable` means nothing was published.
3. Applying an entry is idempotent by position: a client may see an entry twice
   (replays after a reconnect); it keeps a key's value only if the entry's
   position is newer than what it holds.
4. The epoch names the history positions belong to. It changes only when the
   bus lost its data (a restarted hub, an emptied Redis); a client that sees a
   new epoch drops what it holds (`BusSink.on_bus_epoch`).
5. `data` is the publisher's msgpack bytes, never decoded; `NIL` (b"\\xc0")
   deletes the key.
6. Stream topics (`mode = "stream"` in the `[[topics]]` rules the bus is
   given): the bus keeps no per-key state for them but their retained history,
   the newest `history` events (any `key`, even ""), served by `history`.
   Every (re)connect that delivers state delivers, per stream topic, first its
   floor (`BusSink.on_bus_floors`: the position of the newest event the bus no
   longer retains, 0 for none), then its retained events as entries, so a
   client that was away longer than the history learns what it lost.
   `snapshot` of a stream topic has no items.
7. Bounds (`engine/bus/limits.py`): a publish with a string that is not
   UTF-8, or `data` over `bus.max_data_bytes`, fails alone; one that would
   exceed `bus.max_keys_per_topic` or `bus.max_topics` is refused whole
   (`BusRefused`, its `code` the `err` code); a topic idle past its rule's
   `idle_expiry_s` is removed. No call waits on the bus longer than
   `bus.publish_timeout_s` (`BusUnavailable`), and a background task that
   fails is restarted; while it is down the client reports `connected = False`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

from engine.errors import BusError

# One bus entry as it travels: (topic, key, pos, data). A plain tuple: it is
# created per update on the hot path, so no object per entry.
Entry = tuple[str, str, int, bytes]


class Update(NamedTuple):
    """A publish request: a new value for `key` of `topic` (`data` msgpack bytes).

    A named tuple, not a frozen dataclass: one is made per published update on
    the hot path (a frozen dataclass' `__init__` costs three `object.__setattr__`
    calls), and the hub's wire packs it as the `[topic, key, data]` row it is.
    """

    topic: str
    key: str
    data: bytes


class CheckedUpdates(tuple[Update, ...]):
    """Updates an ingest edge has checked already: every topic and key a `str`
    decoded from UTF-8 or checked by `utf8_problem`, every `data` non-empty
    msgpack bytes (`engine/bus/limits.py` rule 1 but the size, which depends
    on the bus). Made only by the edges that checked them (a WebSocket `pub`
    in engine/connection.py, a `POST /publish` body in engine/admin/http.py);
    `check_updates` then checks only their sizes, in C. Check once, at the edge."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A topic's latest state at `pos`: `items` are (key, pos, data), deletions included."""

    epoch: str
    pos: int
    items: Sequence[tuple[str, int, bytes]]


@dataclass(frozen=True, slots=True)
class History:
    """A stream topic's retained events after a position (`Bus.history`).

    `events` are (pos, key, data), oldest first. `complete` is True when they
    are every event published after the position asked for (the history still
    reaches back to it, and `limit` cut nothing off).
    """

    epoch: str
    events: Sequence[tuple[int, str, bytes]]
    complete: bool


PublishDone = Callable[[Sequence[int] | BusError], None]
# topic -> `history` of a stream topic, None for a state topic (the `[[topics]]` rules)
HistoryOf = Callable[[str], int | None]
# topic -> its rule's `idle_expiry_s` (0: never expires)
ExpiryOf = Callable[[str], float]


def shard_of(topic: str, shards: int) -> int:
    """The shard a topic lives in: a stable hash, the same on every node and backend.

    Raises `BusError` for a topic that is not encodable as UTF-8 (a lone surrogate).
    """
    try:
        return zlib.crc32(topic.encode()) % shards
    except UnicodeEncodeError:
        raise BusError(f"topic {topic!r} is not valid UTF-8") from None


class BusSink(Protocol):
    """What a bus client delivers to (a worker's fan-out core, a test)."""

    def on_bus_epoch(self, epoch: str) -> None:
        """Called on every (re)connect before any entry. A new epoch: drop all state."""

    def on_bus_entries(self, entries: Sequence[Entry]) -> None:
        """Entries in position order per topic. Called from the event loop, synchronously."""

    def on_bus_floors(self, floors: Sequence[tuple[str, int]]) -> None:
        """During a (re)connect, before the retained events of these stream
        topics: (topic, floor), the bus no longer holds the topic's events at or
        before `floor`; those after it follow as entries (guarantee 6)."""

    def on_bus_connected(self, connected: bool) -> None:
        """The link to the bus went up or down."""


@runtime_checkable
class TopicFilter(Protocol):
    """A sink that drops the entries of topics it does not hold may say so
    before they are decoded: the redis reader skips a run of `updates`
    updates of `topic` when `wants` is False (the sink counts what it
    refused). Optional: a sink without it gets every entry."""

    def wants(self, topic: str, updates: int) -> bool: ...


class Bus(Protocol):
    """A client of the bus inside one process (worker, admin, demo feed)."""

    @property
    def epoch(self) -> str | None:
        """The current epoch, None before the first connect."""

    @property
    def connected(self) -> bool: ...

    @property
    def holds_all_state(self) -> bool:
        """True when the backend delivers every topic's full state on connect
        (the local hub does), so no `snapshot` call is needed for a new subscription."""

    def lag_ms(self) -> float | None:
        """How far this client is behind the bus head (the worst shard), in ms;
        None when the backend cannot tell. `/readyz` fails past `bus.max_lag_ms`."""

    # Figures some backends cannot tell: each has a documented default
    # (`engine.bus.backend.BusBackend`), so callers ask, never probe with getattr.

    def shard_lags_ms(self) -> list[float] | None:
        """Each shard's lag in ms (index = shard), for metrics; None while
        disconnected, or when the backend has no per-shard figure (the local hub)."""

    def last_entry_age_ms(self) -> float | None:
        """Milliseconds since this client last received an entry; None when
        it never did, or the backend does not track it (the local hub)."""

    def bus_stats(self) -> dict[str, int]:
        """Counters of the client's failure modes (task restarts, publish
        timeouts, ...: `engine.metrics.bus_events_family`); {} when it has none."""

    def tasks_down(self) -> list[str]:
        """The client's background tasks down right now (restarting), sorted;
        while any is, `connected` is False (guarantee 7)."""

    async def start(self, sink: BusSink | None) -> None:
        """Connect (and keep reconnecting with backoff in the background).

        With a sink, entries of every shard are delivered to it; without one the
        client only publishes and takes snapshots (admin, demo feed).
        Returns once the first connection is up or failed (it keeps retrying).
        """

    def publish(self, updates: Sequence[Update], done: PublishDone) -> None:
        """Publish atomically, without awaiting: `done` is called from the event
        loop with the positions (one per update) or a `BusError`."""

    async def publish_wait(self, updates: Sequence[Update]) -> list[int]:
        """`publish`, awaited. Raises `BusUnavailable` / `BusError` (`BusRefused`
        over a limit). Never waits longer than the bus' `publish_timeout_s`."""

    async def snapshot(self, topic: str) -> Snapshot:
        """The topic's latest state (deleted keys included with data NIL)."""

    async def history(self, topic: str, since: int = 0, limit: int | None = None) -> History:
        """Stream topic `topic`'s retained events after position `since` (the
        newest `limit` of them when more), oldest first. Raises `BusError` for a
        topic the rules make a state topic, `BusUnavailable` when not connected."""

    async def close(self) -> None: ...
