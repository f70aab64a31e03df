"""The fan-out core: subscriptions, coalescing and delivery planning. PURE: no I/O.

The worker's shell feeds it bus entries (`apply`), asks it for snapshots on
`sub` (`subscribe`), and once per flush tick asks it what to send (`collect`),
then hands each planned frame back to `deliver`, which writes through the
session's `Writer` (the only I/O, owned by the shell). The objects these rules
govern (`Session`, `Sub`, `Group`, and the `Topic` protocol that
engine/fanout/state.py and engine/fanout/stream.py implement) are declared in
engine/fanout/session.py.

Rules this module owns:

1. Coalescing: between two flushes a key's changes collapse into its latest
   value (the state table keeps one entry per key); a topic's `upd` carries the
   keys changed since that subscriber group's previous flush.
2. Encode once: per flush, one `upd` message per (dirty topic, period group),
   shared by every subscriber in the group that is up to date. A subscriber
   that is behind (it was over budget, or just subscribed) gets a catch-up
   built from its own last position, cached per (topic, position) for the flush.
3. Write once: a session's messages of one flush are joined into one frame.
   A session with one subscription that is up to date (most of them, on a
   ticker board) is planned by group, not by session (`Shared`): the group's
   message is its whole frame, written as is to each of them (`deliver_shared`),
   with nothing built per session.
4. Bounded memory: a subscriber that cannot take a frame keeps only its last
   delivered position (`sent_pos`); nothing is queued for it. When it can write
   again it gets one catch-up per topic with the latest values of the keys it
   missed. Memory per slow client is bounded by its subscriptions.
5. Positions only move forward: `sent_pos` is set to the topic position the
   delivered frame reflects, and a key is never delivered out of order.
6. `max_hz` maps to a period in flush ticks (`period_ticks`, rounded by
   `quantize_period` to at most four periods per octave). A session has a
   phase (any integer, fixed at its creation) that puts its subscriptions of
   period P on one of up to `PHASES` evenly spaced offsets of the period
   (`phase_in`), so the frames of rate-limited clients are spread over the
   period instead of all leaving on one tick: a period of P <= `PHASES` ticks
   uses every tick, so each tick writes about 1/P of them (with four offsets a
   10-tick period wrote a quarter of 10,000 clients on one tick, longer than
   the tick: their frames left late and p99 doubled). A group is the
   subscribers of one topic with the same period and offset: they share
   messages. Spreading costs up to `PHASES` encodings of a topic per period
   instead of one (each tick at most one per period), which bounds it.
7. A new epoch (the bus lost its data) clears every topic (and forgets those
   without a subscriber or a load); every subscriber then gets a full `snap`
   in place of its next `upd`.
8. Stream topics (`history_of` names them, engine/fanout/stream.py) go through
   the same groups, plans and frames: their shared message per flush is one
   `evt` of the events since the group's previous flush; a subscriber that is
   behind gets the events after its own position, preceded by a `gap` when the
   topic's bounded buffer no longer holds them all. Nothing else is kept for
   it. State topics pay nothing for this: a topic's kind is decided once, when
   the core first sees it, and both kinds answer the same calls (the `Topic`
   protocol of engine/fanout/session.py, which mypy checks).
9. Topic lifetime (`lazy=True`, what a worker uses): the core holds only the
   topics that have a subscriber, are being loaded, or lost their last
   subscriber less than a grace ago (`idle`, at most `max_idle_topics`, the
   oldest dropped first). Entries and floors of a topic it does not hold are
   ignored (the bus keeps them for a later `sub`): they never create one. A
   `sub` of a topic not held waits for a load: `begin_load` starts holding it
   (live entries apply from then on), the shell fetches the bus's state or
   history, and `load_state` / `load_stream` merge it under those entries
   (idempotent by position, tombstones included, so the topic is exact: a
   `since` is answered as if it had always been held; a stream topic's
   `since_floor` is set no lower than the truth, so a `since` it cannot prove
   gets a full snap, stream.py rule 6). A load of another epoch is refused (fetch again). `drop_idle`
   forgets the topics idle for the grace. So memory follows subscriptions:
   topics held <= connections x max_topics_per_conn + loads + max_idle_topics.
   Without `lazy` (tests, tools) every entry creates its topic and none is
   ever dropped.
10. Compress once (permessage-deflate, engine/protocol/deflate.py): with a
   `Deflater`, a session that negotiated it (`Session.deflate`) gets each
   frame of at least `min_bytes` compressed, unless that would not make it
   smaller. A message is compressed at most once per flush, whoever gets it
   (a group's shared message, a catch-up cached per position): its piece is
   cached for the flush, and a session's frame of several messages is the
   join of their pieces (deflate.py rule 4). Nothing is kept per session.
   `per_client` (to measure what it saves) compresses each session's frame
   on its own instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from engine.fanout.session import COALESCED, Group, Session, Slot, Sub, Topic, Writer
from engine.fanout.state import TopicState
from engine.fanout.stream import STREAM_BUFFER_MIN, StreamState
from engine.protocol.deflate import Deflater, frame_of

# The shell builds a `Session` around its `Writer` and hands it to `Fanout`:
# both are part of the core's interface (they live in engine/fanout/session.py).
__all__ = [
    "PHASES",
    "Delivery",
    "Fanout",
    "Session",
    "Shared",
    "Stats",
    "Writer",
    "period_ticks",
    "phase_in",
    "quantize_period",
]

# One planned delivery: (subscription, message bytes, topic position it reflects, items in it)
Delivery = tuple[Sub, bytes, int, int]

_NEEDS_SNAP = -1  # sent_pos of a subscriber that must get a full snap next

PHASES = 16  # offsets a period's sessions are spread over, at most (rule 6)


def phase_in(period: int, phase: int) -> int:
    """The offset (in ticks, within `period`) of a session of this `phase`."""
    n = min(period, PHASES)
    return (phase % n) * period // n


class Shared:
    """One group's message of one flush, planned for its subscribers that have
    no other subscription and were up to date: for each of them the message is
    the whole frame (rule 3)."""

    __slots__ = ("group", "msg", "n", "pos", "subs", "topic", "zmsg")

    def __init__(self, topic: Topic, group: Group, msg: bytes, pos: int, n: int) -> None:
        self.topic = topic
        self.group = group
        self.msg = msg
        self.zmsg: bytes | None = None  # `msg` compressed, made once (rule 10)
        self.pos = pos  # the topic position the message reflects
        self.n = n  # items in it
        self.subs: list[Sub] = []


class Stats:
    """Counters of one core (exported by the shell)."""

    __slots__ = (
        "bytes_sent",
        "compressed_bytes",
        "compressed_frames",
        "compressed_input_bytes",
        "frames_refused",
        "frames_sent",
        "topics_dropped",
        "topics_loaded",
        "updates_applied",
        "updates_coalesced",
        "updates_delivered",
        "updates_stale",
        "updates_unheld",
    )

    def __init__(self) -> None:
        self.updates_applied = 0  # entries that changed a key
        self.updates_coalesced = 0  # applied over a value no flush had sent yet
        self.updates_stale = 0  # entries ignored: not newer than what was held (replays)
        self.frames_sent = 0
        self.bytes_sent = 0
        self.updates_delivered = 0  # key values in delivered upd/snap messages
        self.frames_refused = 0  # frames not written: over budget
        self.topics_dropped = 0  # topics forgotten after their grace (rule 9)
        self.topics_loaded = 0  # topics loaded from the bus for a sub (rule 9)
        self.updates_unheld = 0  # entries ignored: their topic is not held (rule 9)
        self.compressed_frames = 0  # frames sent compressed (rule 10; in frames_sent)
        self.compressed_input_bytes = 0  # their size before compression
        self.compressed_bytes = 0  # and after (in bytes_sent)


def period_ticks(max_hz: float | None, cap_hz: float, flush_interval_ms: int) -> int:
    """Flush ticks between two frames of a topic to a subscriber: honours the
    client's `max_hz` and the topic's cap (0 = none), rounding towards fewer frames."""
    hz = 0.0
    if max_hz:
        hz = max_hz
    if cap_hz and (not hz or cap_hz < hz):
        hz = cap_hz
    if not hz:
        return 1
    return max(1, math.ceil(1000.0 / (hz * flush_interval_ms) - 1e-9))


def quantize_period(period: int) -> int:
    """Round a period (in ticks) up to m * 2**e with m in 4..7: exact up to 8
    ticks, then 10, 12, 14, 16, 20, 24, 28, 32, 40, ... (at most four periods
    per octave, so a topic's subscribers form few groups, each one encoding
    per due tick; rounding up never sends faster than asked)."""
    if period <= 8:
        return max(1, period)
    e = period.bit_length() - 3
    return ((period + (1 << e) - 1) >> e) << e


class Fanout:
    """Everything one worker knows about topics and who wants them.

    `history_of(topic)` is the `history` of a stream topic, None for a state
    topic (the `[[topics]]` rules; without it every topic is a state topic).
    `stream_buffer_events` is the least a worker keeps of each subscribed
    stream topic (engine/fanout/stream.py rule 2). `lazy` holds only the
    topics subscribed here, loaded on demand, and `max_idle_topics` of those
    whose last subscriber left (rule 9).
    """

    def __init__(
        self,
        epoch: str = "",
        history_of: Callable[[str], int | None] | None = None,
        stream_buffer_events: int = STREAM_BUFFER_MIN,
        *,
        lazy: bool = False,
        max_idle_topics: int = 10_000,
        deflater: Deflater | None = None,
        per_client: bool = False,
    ) -> None:
        self.epoch = epoch
        self.history_of = history_of
        self.stream_buffer_events = stream_buffer_events
        self.lazy = lazy
        self.max_idle_topics = max_idle_topics
        self.topics: dict[str, Topic] = {}
        self.loading: set[str] = set()  # topics held and waiting for their load (rule 9)
        # topics without a subscriber -> the tick they lost the last one, oldest first
        self.idle: dict[str, int] = {}
        self.dirty: set[Topic] = set()
        # slot -> topics to visit at that slot's next due tick
        self.pending: dict[Slot, set[Topic]] = {}
        self.periods: dict[Slot, int] = {}  # slot -> number of groups using it
        self.tick = 0
        self.resets = 0  # new epochs so far
        self._plan_resets = 0  # `resets` when the plan being delivered was made
        self.stats = Stats()
        # rule 10: None = never compress; the pieces of this flush's messages
        self.deflater = deflater
        self.per_client = per_client
        self.min_bytes = deflater.min_bytes if deflater is not None else 0
        self._pieces: dict[bytes, bytes] = {}

    # -- bus side --------------------------------------------------------------------

    def topic(self, name: str) -> Topic:
        t = self.topics.get(name)
        if t is None:
            t = self._new_topic(name)
        return t

    def _new_topic(self, name: str) -> Topic:
        history = self.history_of(name) if self.history_of is not None else None
        t: Topic
        if history is None:
            t = TopicState(name)
        else:
            t = StreamState(name, history, self.stream_buffer_events)
        self.topics[name] = t
        return t

    def wants(self, topic: str, updates: int) -> bool:
        """Whether `apply` would keep entries of `topic` (rule 9); when not,
        counts `updates` unheld, as `apply` would (`TopicFilter`: the bus
        skips them undecoded)."""
        if not self.lazy or topic in self.topics:
            return True
        self.stats.updates_unheld += updates
        return False

    def apply(self, topic: str, key: str, pos: int, data: bytes) -> None:
        """Apply one bus entry (idempotent by position): a state topic's key
        update, or a stream topic's event. Lazy: ignored for a topic not held."""
        t = self.topics.get(topic)
        if t is None:
            if self.lazy:
                self.stats.updates_unheld += 1  # rule 9: nobody subscribes to it here
                return
            t = self._new_topic(topic)
        applied = t.apply(key, pos, data)
        if applied:
            self.stats.updates_applied += 1
            if t.groups:
                self.dirty.add(t)
                if applied == COALESCED:
                    self.stats.updates_coalesced += 1
            return
        self.stats.updates_stale += 1

    def lose(self, topic: str, floor: int) -> None:
        """The bus no longer holds the events of stream topic `topic` up to
        `floor` (`BusSink.on_bus_floors`): if this worker lacks some of them,
        its subscribers get a `gap` at the next flush. Ignored for state topics,
        and (lazy) for a topic not held: its load reads the bus's history."""
        t = self.topics.get(topic)
        if t is None:
            if self.lazy:
                return
            t = self._new_topic(topic)
        if isinstance(t, StreamState) and t.lose(floor) and t.groups:
            self.dirty.add(t)

    def reset(self, epoch: str) -> None:
        """The bus has a new epoch: forget all state; every subscriber gets a full snap."""
        self.epoch = epoch
        self.resets += 1
        for t in self.topics.values():
            t.clear()
            for g in t.groups.values():
                g.flushed_pos = _NEEDS_SNAP
                g.behind.clear()
                for sub in g.subs:
                    sub.sent_pos = _NEEDS_SNAP
                self._visit(t, g.slot)
        # what a subscriber or a load needs is refilled by the new epoch's sync
        kept = {n: t for n, t in self.topics.items() if t.groups or n in self.loading}
        self.stats.topics_dropped += len(self.topics) - len(kept)
        self.topics = kept
        self.idle = {}

    # -- topic lifetime (rule 9) ------------------------------------------------------

    def needs_load(self, topic: str) -> bool:
        """Whether a `sub` of `topic` must wait for a load (lazy, not held or loading)."""
        return self.lazy and (topic in self.loading or topic not in self.topics)

    def begin_load(self, topic: str) -> bool:
        """Hold `topic` from now on (live entries apply to it) and mark it
        loading. True when the caller must fetch it from the bus; False when it
        is held already or a load is under way."""
        if topic in self.topics:
            return False
        self._new_topic(topic)
        self.loading.add(topic)
        return True

    def is_stream(self, topic: str) -> bool:
        return self.history_of is not None and self.history_of(topic) is not None

    def load_state(self, topic: str, epoch: str, items: Sequence[tuple[str, int, bytes]]) -> bool:
        """Merge a state topic's loaded snapshot (key, pos, data; deletions as
        NIL), fetched after `begin_load`, under the entries applied since.
        False (nothing changes) when the topic is not loading or the snapshot
        is of another epoch: fetch it again."""
        t = self._loaded(topic, epoch)
        if t is None:
            return False
        assert isinstance(t, TopicState)
        t.merge(items)
        return True

    def load_stream(
        self, topic: str, epoch: str, events: Sequence[tuple[int, str, bytes]], complete: bool
    ) -> bool:
        """Merge a stream topic's loaded history (pos, key, data: the bus's
        retained events, `complete` when nothing was ever dropped), fetched
        after `begin_load`, under the events applied since. False as for
        `load_state`."""
        t = self._loaded(topic, epoch)
        if t is None:
            return False
        assert isinstance(t, StreamState)
        t.load([(p, d) for p, _, d in events], complete)
        return True

    def _loaded(self, topic: str, epoch: str) -> Topic | None:
        if topic not in self.loading or epoch != self.epoch:
            return None
        self.loading.discard(topic)
        self.stats.topics_loaded += 1
        t = self.topics[topic]
        if not t.groups and self.lazy:
            # its waiters subscribe now, or it goes after the grace; not `_idle`:
            # the bound on idle topics must not drop it before they do
            self.idle[topic] = self.tick
        return t

    def abandon_load(self, topic: str) -> None:
        """The load failed: forget the topic unless someone subscribes to it."""
        if topic in self.loading:
            self.loading.discard(topic)
            t = self.topics.get(topic)
            if t is not None and not t.groups:
                del self.topics[topic]

    def drop_idle(self, grace_ticks: int) -> int:
        """Forget the topics that have had no subscriber for `grace_ticks`
        flush ticks (rule 9); returns how many."""
        idle = self.idle
        due = self.tick - grace_ticks
        n = 0
        while idle:
            name = next(iter(idle))
            if idle[name] > due:
                break
            del idle[name]
            self._drop(name)
            n += 1
        return n

    def _idle(self, t: Topic) -> None:
        if not self.lazy:
            return
        idle = self.idle
        idle.pop(t.name, None)
        idle[t.name] = self.tick
        if len(idle) > self.max_idle_topics:
            oldest = next(iter(idle))
            del idle[oldest]
            self._drop(oldest)

    def _drop(self, name: str) -> None:
        t = self.topics.get(name)
        if t is not None and not t.groups and name not in self.loading:
            del self.topics[name]
            self.dirty.discard(t)
            self.stats.topics_dropped += 1

    # -- session side ----------------------------------------------------------------

    def subscribe(
        self, session: Session, topic: str, since: tuple[str, int] | None, period: int
    ) -> tuple[bytes, int]:
        """Subscribe (or re-subscribe) `session` to `topic`.

        Returns the `snap` message and the number of items in it. A state
        topic's is full unless `since` is in the current epoch, in which case
        it holds only the keys changed after that position (deletions
        included), however old it is. A stream topic's holds the events after
        `since` when its history still reaches back to it, else its newest
        `history` events (engine/fanout/stream.py rule 4).
        """
        if self.lazy and self.needs_load(topic):
            raise LookupError(f"topic {topic!r} is not held: load it first (begin_load)")
        t = self.topic(topic)
        old = session.subs.get(topic)
        if old is not None:
            self._remove(old, idle=False)
        self.idle.pop(topic, None)
        mark = since[1] if since is not None and since[0] == self.epoch else None
        snap, n, at = t.snap_since(self.epoch, mark)
        slot = (period, phase_in(period, session.phase))
        g = t.groups.get(slot)
        if g is None:
            g = t.groups[slot] = Group(slot, t.pos)
            self.periods[slot] = self.periods.get(slot, 0) + 1
            self.pending.setdefault(slot, set())
        sub = Sub(session, t, g, at)
        g.subs.add(sub)
        session.subs[topic] = sub
        return snap, n

    def unsubscribe(self, session: Session, topic: str) -> bool:
        sub = session.subs.pop(topic, None)
        if sub is None:
            return False
        self._remove(sub)
        return True

    def close_session(self, session: Session) -> None:
        for sub in session.subs.values():
            self._remove(sub)
        session.subs.clear()

    def _remove(self, sub: Sub, idle: bool = True) -> None:
        sub.live = False
        g = sub.group
        g.subs.discard(sub)
        g.behind.discard(sub)
        if not g.subs:
            t = sub.topic
            del t.groups[g.slot]
            n = self.periods[g.slot] - 1
            if n:
                self.periods[g.slot] = n
            else:
                del self.periods[g.slot]
                self.pending.pop(g.slot, None)
            if idle and not t.groups:
                self._idle(t)  # its last subscriber left (rule 9)

    def _visit(self, t: Topic, slot: Slot) -> None:
        self.pending.setdefault(slot, set()).add(t)

    # -- flush -----------------------------------------------------------------------

    def collect(self) -> dict[Session, list[Delivery]]:
        """Advance one flush tick and plan what each session is sent, session by
        session (`plan`, with its shared part spelled out per session)."""
        out, shared = self.plan()
        for sh in shared:
            for sub in sh.subs:
                out[sub.session] = [(sub, sh.msg, sh.pos, sh.n)]
        return out

    def plan(self) -> tuple[dict[Session, list[Delivery]], list[Shared]]:
        """Advance one flush tick and plan what is sent: per session (`deliver`)
        for sessions with several topics or behind on one, and per group
        (`deliver_shared`) for the up-to-date sessions of a single topic.

        The plan may be delivered later (the shell yields to its loop between
        sessions): each delivery carries the position it reflects.
        """
        self.tick += 1
        tick = self.tick
        self._plan_resets = self.resets
        if self._pieces:
            self._pieces = {}  # the last flush's: its messages are not sent again
        pending = self.pending
        if self.dirty:
            for t in self.dirty:
                for p in t.groups:
                    pending.setdefault(p, set()).add(t)
            self.dirty = set()
        out: dict[Session, list[Delivery]] = {}
        direct_all: list[Shared] = []
        stale: dict[tuple[Topic, int], tuple[bytes, int]] = {}
        epoch = self.epoch
        for slot, topics in pending.items():
            if not topics or tick % slot[0] != slot[1]:
                continue
            for t in topics:
                g = t.groups.get(slot)
                if g is None:
                    continue
                tpos = t.pos
                base = g.flushed_pos
                if base < tpos or base == _NEEDS_SNAP:
                    # The topic changed for this group: everyone is a candidate.
                    members: set[Sub] | list[Sub] = list(g.subs)
                    if base == _NEEDS_SNAP:
                        shared, shared_n = t.full_snap(epoch)
                    else:
                        shared, shared_n = t.update_since(base)
                    g.flushed_pos = tpos
                    if tpos > t.sent_mark:
                        t.sent_mark = tpos
                else:
                    # Nothing new since the group's last flush: only laggards to serve.
                    members = list(g.behind)
                    shared, shared_n = b"", 0
                g.behind.clear()
                direct: Shared | None = None
                for sub in members:
                    session = sub.session
                    if session.paused:
                        # conflate: remember nothing but sent_pos. A sub that is
                        # already at tpos (subscribed since) is not behind: resume
                        # would not visit it, so it would linger in `behind`.
                        if sub.sent_pos < tpos:
                            g.behind.add(sub)
                        continue
                    sent = sub.sent_pos
                    if sent == base:
                        if len(session.subs) == 1:
                            if direct is None:
                                direct = Shared(t, g, shared, tpos, shared_n)
                                direct_all.append(direct)
                            direct.subs.append(sub)
                            continue
                        msg, n = shared, shared_n
                    elif sent < tpos or sent == _NEEDS_SNAP:
                        cached = stale.get((t, sent))
                        if cached is None:
                            cached = stale[(t, sent)] = self._catch_up(t, sent)
                        msg, n = cached
                    else:
                        continue  # already at tpos (subscribed after the last flush)
                    d = out.get(session)
                    if d is None:
                        out[session] = [(sub, msg, tpos, n)]
                    else:
                        d.append((sub, msg, tpos, n))
            topics.clear()
        return out, direct_all

    def _catch_up(self, t: Topic, sent: int) -> tuple[bytes, int]:
        if sent == _NEEDS_SNAP:
            return t.full_snap(self.epoch)
        return t.update_since(sent)

    def deliver(self, session: Session, deliveries: list[Delivery]) -> bool:
        """Write one session's planned messages as one frame. On refusal (over
        budget) the subscriptions stay behind and are retried on a later tick.

        A planned message whose subscription ended after `plan` (unsub, re-sub,
        closed session) is dropped: it may hold values older than what the
        client got since; after a new epoch (`reset`) every planned message is
        (the next plan holds the snaps). True when nothing is left to write.
        """
        if self.resets != self._plan_resets:
            return True
        for planned in deliveries:
            if not planned[0].live:
                deliveries = [d for d in deliveries if d[0].live]
                if not deliveries:
                    return True
                break
        stats = self.stats
        if session.deflate and self.deflater is not None:
            frame, raw = self._compress(deliveries)
        else:
            frame = (
                deliveries[0][1] if len(deliveries) == 1 else b"".join([d[1] for d in deliveries])
            )
            raw = 0
        if session.writer.write(frame, True) if raw else session.writer.write(frame):
            stats.frames_sent += 1
            stats.bytes_sent += len(frame)
            if raw:
                stats.compressed_frames += 1
                stats.compressed_input_bytes += raw
                stats.compressed_bytes += len(frame)
            items = 0
            for sub, _, pos, n in deliveries:
                if pos > sub.sent_pos:
                    sub.sent_pos = pos
                behind = sub.group.behind
                if behind:
                    behind.discard(sub)
                items += n
            stats.updates_delivered += items
            return True
        stats.frames_refused += 1
        for sub, _, _, _ in deliveries:
            g = sub.group
            if sub in g.subs:
                g.behind.add(sub)
                self._visit(sub.topic, g.slot)
        return False

    def _compress(self, deliveries: list[Delivery]) -> tuple[bytes, int]:
        """One session's frame under rule 10: its messages' pieces joined (each
        compressed once per flush), or as is under `min_bytes` or when that
        would not be smaller; and its size before compression (0: as is)."""
        deflater = self.deflater
        assert deflater is not None
        if len(deliveries) == 1:
            msg = deliveries[0][1]
            if len(msg) < self.min_bytes:
                return msg, 0
            if self.per_client:
                return deflater.frame(msg), len(msg)
            z = frame_of((self._piece(msg),))
            return (msg, 0) if len(z) >= len(msg) else (z, len(msg))
        msgs = [d[1] for d in deliveries]
        size = sum(map(len, msgs))
        if size < self.min_bytes:
            return b"".join(msgs), 0
        if self.per_client:
            return deflater.frame(b"".join(msgs)), size
        pieces = [self._piece(m) for m in msgs]
        if sum(map(len, pieces)) >= size:
            return b"".join(msgs), 0  # small incompressible messages: as is
        return frame_of(pieces), size

    def _piece(self, msg: bytes) -> bytes:
        piece = self._pieces.get(msg)
        if piece is None:
            piece = self._pieces[msg] = self.deflater.piece(msg)  # type: ignore[union-attr]
        return piece

    def deliver_shared(self, sh: Shared, start: int = 0, stop: int | None = None) -> None:
        """Write the group's message as the whole frame to `sh.subs[start:stop]`.

        The same rules as `deliver`: a subscription that ended since `plan` is
        skipped, a new epoch since drops the rest of the plan (the group then
        needs a snap), a refusal leaves the subscription behind for a later tick.
        """
        if self.resets != self._plan_resets:
            return  # a new epoch began since the plan: the next plan holds the snaps
        if self.deflater is not None and len(sh.msg) >= self.min_bytes:
            self._deliver_shared_deflate(sh, start, stop)
            return
        g = sh.group
        msg, pos = sh.msg, sh.pos
        behind = g.behind
        sent = refused = 0
        for sub in sh.subs[start:stop]:
            if not sub.live:
                continue
            if sub.session.writer.write(msg):
                sub.sent_pos = pos
                sent += 1
                if behind:
                    behind.discard(sub)
            else:
                refused += 1
                behind.add(sub)
        self._count_shared(sh, sent, refused, sent * len(msg))

    def _deliver_shared_deflate(self, sh: Shared, start: int, stop: int | None) -> None:
        """`deliver_shared` when some sessions may take the message compressed
        (rule 10): compressed once for all of them (per session: `per_client`)."""
        g = sh.group
        msg, pos = sh.msg, sh.pos
        deflater = self.deflater
        assert deflater is not None
        behind = g.behind
        sent = refused = zsent = zbytes = 0
        for sub in sh.subs[start:stop]:
            if not sub.live:
                continue
            writer = sub.session.writer
            if sub.session.deflate:
                if self.per_client:
                    z = deflater.frame(msg)
                elif sh.zmsg is not None:
                    z = sh.zmsg
                else:
                    z = frame_of((self._piece(msg),))
                    if len(z) >= len(msg):
                        z = msg  # deflate does not make it smaller: as is for all
                    sh.zmsg = z
                if z is msg:
                    ok = writer.write(msg)
                else:
                    ok = writer.write(z, True)
                    if ok:
                        zsent += 1
                        zbytes += len(z)
            else:
                ok = writer.write(msg)
            if ok:
                sub.sent_pos = pos
                sent += 1
                if behind:
                    behind.discard(sub)
            else:
                refused += 1
                behind.add(sub)
        self._count_shared(sh, sent, refused, (sent - zsent) * len(msg) + zbytes)
        if zsent:
            stats = self.stats
            stats.compressed_frames += zsent
            stats.compressed_input_bytes += zsent * len(msg)
            stats.compressed_bytes += zbytes

    def _count_shared(self, sh: Shared, sent: int, refused: int, nbytes: int) -> None:
        """A group message's delivery in the stats; refused subscribers are
        visited again next tick (both `deliver_shared` paths)."""
        stats = self.stats
        if sent:
            stats.frames_sent += sent
            stats.bytes_sent += nbytes
            stats.updates_delivered += sent * sh.n
        if refused:
            stats.frames_refused += refused
            self._visit(sh.topic, sh.group.slot)

    def resume(self, session: Session) -> None:
        """The session drained below its budget: visit its lagging topics next tick."""
        session.paused = False
        for sub in session.subs.values():
            if sub.sent_pos < sub.topic.pos or sub.sent_pos == _NEEDS_SNAP:
                sub.group.behind.add(sub)
                self._visit(sub.topic, sub.group.slot)

    # -- introspection ---------------------------------------------------------------

    def subscription_count(self) -> int:
        return sum(len(g.subs) for t in self.topics.values() for g in t.groups.values())

    def topic_positions(self) -> Mapping[str, int]:
        return {name: t.pos for name, t in self.topics.items()}
