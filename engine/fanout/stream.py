"""The recent events of one stream topic (`mode = "stream"`). PURE: no I/O.

A stream topic delivers every event, in order, with its position; nothing is
coalesced (docs/protocol.md 4.2). A worker keeps a bounded buffer of each
stream topic's recent events, shared by every subscriber: no queue per
subscriber, so memory per slow client stays bounded by its subscriptions.

Rules this module owns:

1. Events are held in position order, each pre-packed as its `[pos, data]`
   pair (`pack_event`), so building an `evt` or a `snap` is a join. An event
   is taken only if its position is after the newest one held (`apply` is
   idempotent by position: replays of the bus are harmless).
2. The buffer is bounded (overflow policy "gap"): at most `buffer_events`
   events (max(`history`, `STREAM_BUFFER_MIN`)) while the topic has
   subscribers, `history` while it has none; the oldest goes first. While
   subscribed, an event that no flush has planned yet (after `sent_mark`) is
   not dropped for that bound, only past `UNFLUSHED_FACTOR` times it: a burst
   that arrives between two flushes reaches every up-to-date subscriber whole
   (a gap is for a subscriber that fell behind, not for the flush timer's
   phase). `floor` is the position of the newest event no longer held, so
   every event after `floor` is held (0: none was ever dropped).
3. Never a silent skip: the message for a subscriber whose position is before
   `floor` begins with a `gap` naming the lost range (`from` its position,
   `to` the floor), followed by the events held.
4. `history` bounds what a new subscriber is served: its `snap` holds the
   newest `history` events (`full: true`), or, when it gives a `since` that
   those still reach back to, exactly the events after `since`
   (`full: false`). The buffer beyond `history` only serves subscribers that
   fall behind.
5. When the bus says that events up to a position are lost to this worker
   (`lose`: it was disconnected longer than the bus retains events), the
   events held are dropped and the topic's position moves to that floor:
   every subscriber gets a `gap` for it.
6. A topic loaded for a `sub` (`load`: the bus's retained events, fetched
   after the topic began taking live events) holds their union in order.
   What the bus dropped before the topic was held bounds which `since` can be
   answered exactly (`since_floor`, set no lower than the truth: 0 when the
   bus says nothing was ever dropped, else just below the oldest event held;
   with no event to tell, `history = 0`, unknown until the next event
   arrives, every `since` until then getting a full snap). It is not a gap:
   nobody subscribed here before.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from engine.fanout.session import APPLIED, STALE
from engine.protocol.codec import build_evt, build_gap, build_stream_snap, pack_event, pack_str

if TYPE_CHECKING:
    from engine.fanout.session import Group, Slot

STREAM_BUFFER_MIN: Final = 256
"""Events a worker keeps of each subscribed stream topic at least (when its
`history` is smaller): what a subscriber may fall behind by before a `gap`."""

UNFLUSHED_FACTOR: Final = 4
"""A subscribed stream topic holds, between two flushes, up to this many times
its buffer: the events no flush has planned yet are not dropped below that
(rule 2), so a burst within one flush interval reaches every subscriber."""


_UNKNOWN: Final = 1 << 128  # above every position: a floor not known yet (rule 6)


class StreamState:
    """The recent events and position of one stream topic (see the module rules)."""

    __slots__ = (
        "buffer_events",
        "events",
        "floor",
        "groups",
        "history",
        "max_events",
        "name",
        "packed_name",
        "pos",
        "sent_mark",
        "since_floor",
    )

    def __init__(self, name: str, history: int, buffer_events: int = STREAM_BUFFER_MIN) -> None:
        self.name = name
        self.packed_name = pack_str(name)
        self.history = history
        self.buffer_events = max(history, buffer_events)
        self.max_events = UNFLUSHED_FACTOR * self.buffer_events  # rule 2, hard bound
        # (pos, packed [pos, data]), oldest first (rule 1)
        self.events: deque[tuple[int, bytes]] = deque()
        self.floor = 0  # every event after it is held (rule 2)
        self.since_floor = 0  # the oldest `since` a partial snap may answer (rule 6)
        self.pos = 0  # the newest event's position (or the floor after a loss)
        self.sent_mark = 0  # position as of the last flush that visited the topic
        # (period, phase) -> subscriber group; owned by engine.fanout.core
        self.groups: dict[Slot, Group] = {}

    def apply(self, key: str, pos: int, data: bytes) -> int:
        """Append the event at `pos` (`key` is not used): `APPLIED`, or `STALE`
        (nothing changes) when an event at or after `pos` is already known.
        Never `COALESCED`: every event is delivered (engine/fanout/session.py rule 2)."""
        if pos <= self.pos:
            return STALE
        if self.since_floor == _UNKNOWN:
            self.since_floor = pos - 1  # rule 6: every event from this one on arrives live
        events = self.events
        events.append((pos, pack_event(pos, data)))
        self.pos = pos
        if self.groups:
            # rule 2: the oldest goes only once a flush planned it, or past the hard bound
            if len(events) > self.buffer_events:
                mark = self.sent_mark
                while len(events) > self.buffer_events and (
                    events[0][0] <= mark or len(events) > self.max_events
                ):
                    self.floor = events.popleft()[0]
        else:
            while len(events) > self.history:
                self.floor = events.popleft()[0]
        return APPLIED

    def lose(self, floor: int) -> bool:
        """The events up to `floor` that this topic lacks are lost for good
        (rule 5). True when that is more than it held: subscribers get a gap."""
        if floor <= self.pos:
            return False
        self.events.clear()
        self.floor = self.pos = floor
        return True

    def load(self, events: Sequence[tuple[int, bytes]], complete: bool) -> None:
        """Merge the bus's retained events (pos, data), oldest first, under the
        events applied since the load began (rule 6). `complete`: the bus
        never dropped an event of the topic."""
        last = events[-1][0] if events else 0
        if not complete:
            if events:
                oldest = events[0][0] - 1
            elif self.events:
                oldest = self.events[0][0] - 1
            else:
                oldest = _UNKNOWN
            self.since_floor = max(self.since_floor, oldest)
        merged = deque((p, pack_event(p, d)) for p, d in events if p > self.floor)
        merged.extend(e for e in self.events if e[0] > last)
        self.events = merged
        if last > self.pos:
            self.pos = last
        limit = self.buffer_events if self.groups else self.history
        while len(merged) > limit:
            self.floor = merged.popleft()[0]

    def events_since(self, since: int) -> list[bytes]:
        """Packed events held after `since`, oldest first."""
        out: list[bytes] = []
        for pos, event in reversed(self.events):
            if pos <= since:
                break
            out.append(event)
        out.reverse()
        return out

    def update_since(self, since: int) -> tuple[bytes, int]:
        """What a subscriber at `since` is sent: a `gap` if events after it were
        dropped (rule 3), then an `evt` of the events held after it; and the
        number of events."""
        events = self.events_since(since)
        msg = build_evt(self.packed_name, events) if events else b""
        if since < self.floor:
            msg = build_gap(self.packed_name, since, self.floor) + msg
        return msg, len(events)

    def history_floor(self) -> int:
        """A position after which every event is among the newest `history`
        events held: how far back `since` may be for a `full: false` snap."""
        n = len(self.events)
        if n > self.history:
            return max(self.events[n - self.history - 1][0], self.since_floor)
        return max(self.floor, self.since_floor)

    def recent(self) -> list[bytes]:
        """The newest `history` events held, oldest first."""
        skip = max(0, len(self.events) - self.history)
        return [event for _, event in itertools.islice(self.events, skip, None)]

    def full_snap(self, epoch: str) -> tuple[bytes, int]:
        """A `full: true` snap (the newest `history` events) and its event count."""
        events = self.recent()
        return build_stream_snap(self.packed_name, epoch, self.pos, True, events), len(events)

    def snap_since(self, epoch: str, since: int | None) -> tuple[bytes, int, int]:
        """A new subscriber's `snap` (rule 4), its event count, and the position
        the subscriber is then at. `since` is a position of this epoch, or None."""
        if since is not None and since >= self.history_floor():
            events = self.events_since(since)
            # A client ahead of this worker (it came from a worker further along
            # the bus) must not be sent again the events it has.
            at = max(self.pos, since)
            return build_stream_snap(self.packed_name, epoch, at, False, events), len(events), at
        snap, n = self.full_snap(epoch)
        return snap, n, self.pos

    def clear(self) -> None:
        """Forget every event (the bus lost its history: a new epoch)."""
        self.events.clear()
        self.floor = 0
        self.since_floor = 0
        self.pos = 0
        self.sent_mark = 0
