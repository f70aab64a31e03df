"""A client's view of the topics it subscribed to, and its reconnect policy. PURE: no I/O.

The Python client (`engine.client.client`) feeds every decoded server message
to `StateView.apply` and asks `ReconnectPolicy` how long to wait before the
next connection attempt; the browser client (`engine/static/fanout.js`)
implements the same rules. Nothing here reads a clock, draws a random number
or touches a socket: callers pass `now` and `rand`, so every rule is tested
without a loop.

Rules this module owns (docs/protocol.md sections 4.1, 4.2 and 6):

1. A `snap` with `full: true` replaces the topic's view; with `full: false` it
   is applied on top of the view kept from before (recovery with `since`).
   In `snap` and `upd`, a nil value deletes the key.
2. A topic's mark (`epoch`, `pos`) is what a reconnecting client sends back in
   `since`; it moves only forward with the frames received, and it is only
   kept for the epoch the frames came from (a new epoch in a `snap` resets it).
3. A change (`Change`) names exactly the keys a frame changed, with their new
   values (None for a deleted key): what the client's iterators and callbacks
   see. A full `snap` also reports the keys it removed (as deleted).
4. Stream topics (`evt`, `gap`) advance the mark to the newest event position;
   a `gap` is surfaced as a change of kind "gap", never skipped silently.
5. A value the client could not decode (engine.protocol.codec rule 5: not
   UTF-8, nested deeper than `MAX_DATA_DEPTH`) arrives as an `Undecodable`.
   It is a value, not a deletion: the view holds it for its key (a newer,
   readable value replaces it), and `Change.undecodable()` lists it so that
   the client can report it. It never ends the connection.
6. Reconnect delays: exponential backoff with full jitter (a uniform draw in
   [0, ceiling], the ceiling growing by `factor` per consecutive failure up to
   `max_ms`), the streak forgotten once a connection stayed up `stable_s`;
   a `bye` replaces the next delay with its `retry_ms` (the engine jittered it
   already); after close 4001 or 4003 there is no delay at all: no reconnect
   until a new token is given (`new_token`, which ends the streak, or
   `unblock` from a token provider, which keeps it).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from engine.backoff import Backoff, FailureStreak
from engine.codes import CLOSE_NOT_AUTHENTICATED, CLOSE_TOKEN_EXPIRED
from engine.protocol.codec import Undecodable

# Close codes after which reconnecting with the same token is pointless.
AUTH_CLOSE_CODES: Final = frozenset({CLOSE_NOT_AUTHENTICATED, CLOSE_TOKEN_EXPIRED})


@dataclass(frozen=True, slots=True)
class Change:
    """What one server message changed in the view of `topic`.

    kind: "snap" (a snapshot; `full` says whether it replaced the view),
    "upd" (keys changed), "evt" (stream events, in `events`), "gap" (stream
    events between `gap_from` and `gap_to` were lost for this connection).
    `items` maps each changed key to its new value, None for a deleted key.
    """

    topic: str
    kind: str
    pos: str
    items: Mapping[str, Any] = field(default_factory=dict)
    full: bool = False
    epoch: str | None = None
    events: tuple[tuple[str, Any], ...] = ()
    gap_from: str | None = None
    gap_to: str | None = None

    def undecodable(self) -> list[tuple[str, Undecodable]]:
        """(key, or a stream event's position; the placeholder) of every value of
        this change the client could not decode (rule 5), in order."""
        out = [(k, v) for k, v in self.items.items() if type(v) is Undecodable]
        out.extend((pos, v) for pos, v in self.events if type(v) is Undecodable)
        return out


class TopicView(Mapping[str, Any]):
    """The latest value of every key of one state topic, as far as this client knows.

    A read-only Mapping for users; only `StateView` changes it. `epoch` and
    `pos` are the mark sent back in `since` after a reconnect (None before the
    first `snap`).
    """

    __slots__ = ("_items", "epoch", "pos", "topic")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._items: dict[str, Any] = {}
        self.epoch: str | None = None
        self.pos: str | None = None

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"TopicView({self.topic!r}, {len(self._items)} keys, pos={self.pos!r})"


def _apply_items(target: dict[str, Any], items: Mapping[str, Any]) -> None:
    for key, value in items.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value


class StateView:
    """Every subscribed topic's view, fed with decoded server messages.

    `apply(msg)` returns the `Change` a message made (None for messages that
    change no topic: hello, ack, err, pong, bye, unknown ops). Messages that
    are malformed (missing or ill-typed fields) raise `ValueError`: the
    server broke the protocol, and guessing would corrupt the view.
    """

    __slots__ = ("topics",)

    def __init__(self) -> None:
        self.topics: dict[str, TopicView] = {}

    def view(self, topic: str) -> TopicView:
        """The view of `topic` (created empty if unknown)."""
        tv = self.topics.get(topic)
        if tv is None:
            tv = self.topics[topic] = TopicView(topic)
        return tv

    def forget(self, topic: str) -> None:
        """Drop a topic's view and mark (after unsubscribing)."""
        self.topics.pop(topic, None)

    def since(self, topics: Collection[str] | None = None) -> dict[str, tuple[str, str]]:
        """topic -> (epoch, pos) for every topic with a mark (restricted to
        `topics` when given): the `since` of a resubscription."""
        out: dict[str, tuple[str, str]] = {}
        for name, tv in self.topics.items():
            if topics is not None and name not in topics:
                continue
            if tv.epoch is not None and tv.pos is not None:
                out[name] = (tv.epoch, tv.pos)
        return out

    def apply(self, msg: Mapping[str, Any]) -> Change | None:
        op = msg.get("op")
        if op == "snap":
            return self._snap(msg)
        if op == "upd":
            return self._upd(msg)
        if op == "evt":
            return self._evt(msg)
        if op == "gap":
            topic = _str(msg, "topic")
            return Change(
                topic, "gap", _str(msg, "to"), gap_from=_str(msg, "from"), gap_to=_str(msg, "to")
            )
        return None

    def _snap(self, msg: Mapping[str, Any]) -> Change:
        topic = _str(msg, "topic")
        epoch = _str(msg, "epoch")
        pos = _str(msg, "pos")
        full = msg.get("full")
        if not isinstance(full, bool):
            raise ValueError("snap: 'full' must be a boolean")
        items = msg.get("items")
        tv = self.view(topic)
        if isinstance(items, list):  # a stream topic's snapshot: [[pos, data], ...]
            events = _events(items)
            tv.epoch, tv.pos = epoch, (events[-1][0] if events else pos)
            return Change(topic, "snap", tv.pos, full=full, epoch=epoch, events=events)
        if not isinstance(items, Mapping):
            raise ValueError("snap: 'items' must be a map")
        if full or tv.epoch != epoch:
            # a full snapshot replaces the view: report what it removed too
            removed = {k: None for k in tv._items if k not in items or items[k] is None}
            tv._items = {}
            _apply_items(tv._items, items)
            changed = {**removed, **items}
            full = True
        else:
            _apply_items(tv._items, items)
            changed = dict(items)
        tv.epoch, tv.pos = epoch, pos
        return Change(topic, "snap", pos, changed, full=full, epoch=epoch)

    def _upd(self, msg: Mapping[str, Any]) -> Change:
        topic = _str(msg, "topic")
        pos = _str(msg, "pos")
        items = msg.get("items")
        if not isinstance(items, Mapping):
            raise ValueError("upd: 'items' must be a map")
        tv = self.view(topic)
        _apply_items(tv._items, items)
        tv.pos = pos
        return Change(topic, "upd", pos, dict(items))

    def _evt(self, msg: Mapping[str, Any]) -> Change:
        topic = _str(msg, "topic")
        items = msg.get("items")
        if not isinstance(items, list):
            raise ValueError("evt: 'items' must be a list of [pos, data]")
        events = _events(items)
        tv = self.view(topic)
        if events:
            tv.pos = events[-1][0]
        return Change(topic, "evt", tv.pos or "", events=events)


def _str(msg: Mapping[str, Any], name: str) -> str:
    value = msg.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{msg.get('op')}: {name!r} must be a string")
    return value


def _events(items: list[Any]) -> tuple[tuple[str, Any], ...]:
    out = []
    for item in items:
        if not isinstance(item, list | tuple) or len(item) != 2 or not isinstance(item[0], str):
            raise ValueError("events must be [pos, data] pairs")
        out.append((item[0], item[1]))
    return tuple(out)


# -- reconnecting ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """Exponential backoff with full jitter, reset after a stable connection.

    Retry n of a streak (0-based) waits `rand * min(max_ms, base_ms * factor**n)`.
    `stable_s`: a connection that stayed up this long ends the streak.
    """

    base_ms: float = 250.0
    max_ms: float = 30_000.0
    factor: float = 2.0
    stable_s: float = 30.0

    def __post_init__(self) -> None:
        # Backoff validates base/max/factor; it is the ceiling's source of truth
        Backoff(self.base_ms, self.max_ms, self.factor)
        if not (math.isfinite(self.stable_s) and self.stable_s >= 0):
            raise ValueError(f"stable_s must be a finite number >= 0, got {self.stable_s!r}")


class Reconnector:
    """When to reconnect, decided from what happened to the last connection.

    Call `connected(now)` once a connection is usable, `bye(retry_ms)` when the
    server announced a close, and `closed(now, code)` (or `failed(now)` for a
    connection that never opened) when it ended; then `delay_ms(rand)` is the
    wait before the next attempt, or None when the client must not reconnect
    until `new_token()` (4001/4003).
    """

    __slots__ = ("_bye_ms", "backoff", "blocked", "streak")

    def __init__(self, policy: ReconnectPolicy) -> None:
        # Backoff(min=base) gives ceiling(0) = base and ceiling(n) = base * factor**n
        self.backoff = Backoff(policy.base_ms, policy.max_ms, policy.factor)
        self.streak = FailureStreak(self.backoff, policy.stable_s)
        self._bye_ms: float | None = None
        self.blocked = False

    def connected(self, now: float) -> None:
        self.streak.record_success(now)

    def bye(self, retry_ms: float) -> None:
        self._bye_ms = max(0.0, float(retry_ms))

    def closed(self, now: float, code: int) -> None:
        if code in AUTH_CLOSE_CODES:
            self.blocked = True
        self.streak.record_failure(now)
        if self._bye_ms is not None:
            # a planned close (after `bye`) does not grow the streak
            self.streak.failures -= 1

    def failed(self, now: float) -> None:
        self._bye_ms = None
        self.streak.record_failure(now)

    def new_token(self) -> None:
        self.blocked = False
        self.streak.reset()

    def unblock(self) -> None:
        """A token provider gave a new token: reconnect after the usual delay
        (the streak is kept: tokens the server keeps refusing back off)."""
        self.blocked = False

    def delay_ms(self, rand: float) -> float | None:
        """The wait before the next attempt (consumes a pending `bye`), or None
        while blocked on a new token."""
        if self.blocked:
            return None
        if self._bye_ms is not None:
            delay, self._bye_ms = self._bye_ms, None
            return delay
        attempt = max(self.streak.failures - 1, 0)
        r = min(max(rand, 0.0), 1.0)
        return r * self.backoff.ceiling_ms(attempt)
