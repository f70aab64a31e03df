"""Properties of the state table and the fan-out core (engine/fanout/).

The core is driven the way a worker drives it: bus entries (`apply`), flush
ticks (`collect`, then `deliver` per session, possibly with other events
handled between two sessions of one plan), client requests (`subscribe` with
or without `since`, `unsubscribe`, closing), back-pressure (a paused session,
a writer that refuses) and new epochs (`reset`). Every frame a session is
written is decoded into that client's view, and checked as it arrives:

- the view after a `snap`/`upd` at position P is the topic's state at P
  (a frame reflects every update up to its position and nothing after);
- `upd` positions of a topic strictly increase for a subscriber, and no key's
  value ever goes back to an older one;
- at most one frame per session per flush, at most one message per topic in
  it, and only on ticks due for the subscription's period;
- nothing is written for a topic the session is not subscribed to, nor to a
  closed session;
- a `since` in the current epoch is answered with exactly the keys changed
  after it (deletions as nil), `full: false`.

After a final resume and flush, every subscriber's view equals the topic's
live state, and nothing more is planned.

A lazy core (rule 9), driven with subs that wait for a load the bus answers
later, holds exactly the subscribed, loading and idle topics, each equal to
the bus's state; every snap (with or without `since`) brings its client to
the bus's latest state.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from typing import Any

import msgpack
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine.fanout.core import Delivery, Fanout, Session, Shared, phase_in
from engine.fanout.session import APPLIED, COALESCED, STALE
from engine.fanout.state import TopicState
from engine.protocol.codec import NIL, decode_frame, make_pos, pack_item, parse_pos

TOPICS = ("t0", "t1")
KEYS = ("k0", "k1", "k2", "k3")
PERIODS = (1, 2, 3)
SLOTS = 2


def val(obj: object) -> bytes:
    out: bytes = msgpack.packb(obj)
    return out


# -- TopicState ----------------------------------------------------------------------

entries = st.lists(
    st.tuples(st.sampled_from(KEYS), st.booleans()),  # (key, deleted) at positions 1..n
    min_size=1,
    max_size=30,
)


@given(entries=entries, data=st.data())
def test_topic_state_keeps_the_newest_entry_per_key_whatever_the_order(
    entries: list[tuple[str, bool]], data: st.DataObject
) -> None:
    log = [
        (key, make_pos(1000 + n, n % 4), NIL if deleted else val(n))
        for n, (key, deleted) in enumerate(entries)
    ]
    # Arbitrary order, with replays (a reconnect, a snapshot racing the stream).
    order = data.draw(st.lists(st.sampled_from(log), max_size=60))
    t = TopicState("t")
    held: dict[str, tuple[int, bytes]] = {}
    last_pos = 0
    for key, pos, value in order:
        newer = key not in held or held[key][0] < pos
        # sent_mark is 0 (no flush): a value replaced was never planned (session.py rule 2)
        expected = (COALESCED if key in held else APPLIED) if newer else STALE
        assert t.apply(key, pos, value) == expected
        if newer:
            held[key] = (pos, value)
        # positions only move forward, entries stay sorted, one entry per key
        assert t.pos >= last_pos
        last_pos = t.pos
        assert t.pos == max(p for p, _ in held.values())
        positions = [p for p, _, _ in t.entries.values()]
        assert positions == sorted(positions)
        assert len(t.entries) == len(held) <= len(KEYS)

    by_pos = sorted(held.items(), key=lambda kv: kv[1][0])
    assert {k: (p, item) for k, (p, item, _) in t.entries.items()} == {
        k: (p, pack_item(k, v)) for k, (p, v) in held.items()
    }
    assert t.live_items() == [pack_item(k, v) for k, (_, v) in by_pos if v != NIL]
    assert t.live == len(t.live_items())
    # changed_since: exactly the keys after `since`, each once, oldest first, deletions too
    marks = {0, make_pos(10**6, 0)} | {p + d for _, p, _ in log for d in (-1, 0, 1)}
    for since in sorted(marks):
        assert t.changed_since(since) == [pack_item(k, v) for k, (p, v) in by_pos if p > since]


# -- the fan-out core ----------------------------------------------------------------


@dataclass
class Model:
    """The bus side: what every topic holds in the current epoch, and its history."""

    epoch: str = "e1"
    serial: int = 0  # the value of an entry: increasing forever, across epochs
    seq: int = 0  # position counter; restarts (lower!) with each epoch
    keys: dict[str, dict[str, tuple[int, int | None]]] = field(default_factory=dict)
    # topic -> [(pos, live state after the entry at pos)], starting at (0, {})
    history: dict[str, list[tuple[int, dict[str, int]]]] = field(default_factory=dict)
    log: list[tuple[str, str, int, bytes]] = field(default_factory=list)

    def live(self, topic: str) -> dict[str, int]:
        return {k: v for k, (_, v) in self.keys.get(topic, {}).items() if v is not None}

    def pos(self, topic: str) -> int:
        return max((p for p, _ in self.keys.get(topic, {}).values()), default=0)

    def at(self, topic: str, pos: int) -> dict[str, int]:
        """The topic's live state at `pos`."""
        hist = self.history.get(topic, [(0, {})])
        i = bisect.bisect_right([p for p, _ in hist], pos) - 1
        return hist[i][1]


class Client:
    """A fake `Writer` (refuses while over budget) and the view its frames build."""

    def __init__(self, run: Run, kept: Client | None = None) -> None:
        self.run = run
        self.refuse = False
        self.closed = False
        self.subscribed: dict[str, int] = {}  # topic -> period
        # What the client holds per topic (kept across unsub and reconnects, for `since`).
        self.views: dict[str, dict[str, int]] = dict(kept.views) if kept else {}
        self.epoch: dict[str, str] = dict(kept.epoch) if kept else {}
        self.pos: dict[str, int] = dict(kept.pos) if kept else {}
        self.flush_ticks: set[int] = set()
        self.phase = 0  # its session's

    def write(self, frame: bytes) -> bool:
        assert not self.closed, "a frame was written to a closed session"
        if self.refuse:
            return False
        tick = self.run.fo.tick
        assert tick not in self.flush_ticks, "two frames to one session in one flush"
        self.flush_ticks.add(tick)
        messages = decode_frame(frame)
        topics = [m["topic"] for m in messages]
        assert len(set(topics)) == len(topics), "two messages for one topic in one frame"
        for m in messages:
            assert m["topic"] in self.subscribed, f"{m['op']} for a topic not subscribed"
            period = self.subscribed[m["topic"]]
            assert tick % period == phase_in(period, self.phase), (
                f"sent on tick {tick} with a period of {period} and a phase of {self.phase}"
            )
            self.receive(m)
        return True

    def receive(self, m: dict[str, Any]) -> None:
        model = self.run.model
        topic = m["topic"]
        pos = parse_pos(m["pos"])
        same_epoch = self.epoch.get(topic) == model.epoch
        view = self.views.setdefault(topic, {})
        if m["op"] == "snap":
            assert m["epoch"] == model.epoch
            if m["full"]:
                view.clear()
            else:
                assert same_epoch, "a partial snap on top of another epoch's view"
                assert pos >= self.pos[topic]
            self.epoch[topic] = m["epoch"]
        else:
            assert m["op"] == "upd"
            assert same_epoch, "an upd of another epoch"
            assert pos > self.pos[topic], "upd positions must strictly increase"
        for key, value in m["items"].items():
            if value is None:
                view.pop(key, None)
                continue
            # Values are entry serials: a key never goes back to an older value.
            old = view.get(key)
            assert old is None or value > old, f"{key} went back from {old} to {value}"
            view[key] = value
        self.pos[topic] = pos
        assert view == model.at(topic, pos), "the view is not the topic's state at pos"


class Run:
    def __init__(self) -> None:
        self.model = Model()
        self.fo = Fanout(self.model.epoch)
        self.clients = [Client(self) for _ in range(SLOTS)]
        # distinct phases: rate-limited frames of different sessions fall on different ticks
        self.phases = itertools.count(3)
        self.sessions = [self.new_session(c) for c in self.clients]
        # steps of the current plan: one session's deliveries, or a slice of a
        # group's shared message (the worker writes those by group, two at a time here)
        self.plan: list[tuple[Session, list[Delivery]] | tuple[Shared, int, int]] = []

    def new_session(self, c: Client) -> Session:
        c.phase = next(self.phases)
        return Session(c, c.phase)

    # -- bus side

    def apply(self, topic: str, key: str, deleted: bool) -> None:
        m = self.model
        m.serial += 1
        m.seq += 1
        pos = make_pos(m.seq, m.serial % 3)
        data = NIL if deleted else val(m.serial)
        m.keys.setdefault(topic, {})[key] = (pos, None if deleted else m.serial)
        m.history.setdefault(topic, [(0, {})]).append((pos, m.live(topic)))
        m.log.append((topic, key, pos, data))
        self.fo.apply(topic, key, pos, data)
        assert self.fo.topics[topic].pos == pos

    def replay(self, index: int) -> None:
        if not self.model.log:
            return
        topic, key, pos, data = self.model.log[index % len(self.model.log)]
        before = self.fo.topics[topic].pos, dict(self.fo.topics[topic].entries)
        stale = self.fo.stats.updates_stale
        self.fo.apply(topic, key, pos, data)
        assert (self.fo.topics[topic].pos, self.fo.topics[topic].entries) == before
        assert self.fo.stats.updates_stale == stale + 1

    def reset(self) -> None:
        m = self.model
        m.epoch = f"e{int(m.epoch[1:]) + 1}"
        m.seq = 0
        m.keys.clear()
        m.history.clear()
        m.log.clear()
        self.fo.reset(m.epoch)

    # -- flush side

    def finish_plan(self) -> None:
        while self.plan:
            self.deliver_next()

    def deliver_next(self) -> None:
        if self.plan:
            step = self.plan.pop(0)
            if isinstance(step[0], Shared):
                sh, start, stop = step  # type: ignore[misc]
                self.fo.deliver_shared(sh, start, stop)
            else:
                session, deliveries = step  # type: ignore[misc]
                self.fo.deliver(session, deliveries)

    def collect(self) -> None:
        self.finish_plan()
        by_session, shared = self.fo.plan()
        self.plan = list(by_session.items())
        for sh in shared:
            assert sh.subs, "a shared message planned for nobody"
            for sub in sh.subs:
                assert len(sub.session.subs) == 1 and sub.sent_pos < sh.pos
                assert sub.session not in by_session, "a session planned twice"
            self.plan.extend((sh, i, i + 2) for i in range(0, len(sh.subs), 2))
        for session, _ in by_session.items():
            assert not session.paused, "a paused session was planned"
        for sh in shared:
            for sub in sh.subs:
                assert not sub.session.paused, "a paused session was planned"

    def flush(self) -> None:
        self.collect()
        self.finish_plan()

    # -- session side

    def pause(self, slot: int) -> None:
        self.sessions[slot].paused = True
        self.clients[slot].refuse = True

    def refuse(self, slot: int) -> None:
        self.clients[slot].refuse = True

    def resume(self, slot: int) -> None:
        self.clients[slot].refuse = False
        self.fo.resume(self.sessions[slot])
        assert not self.sessions[slot].paused

    def subscribe(self, slot: int, topic: str, period: int, since_kind: str, index: int) -> None:
        c, m = self.clients[slot], self.model
        since: tuple[str, int] | None = None
        if since_kind == "kept" and topic in c.pos:
            since = (c.epoch[topic], c.pos[topic])  # what the client holds
        elif since_kind == "history":
            hist = m.history.get(topic, [(0, {})])
            pos, held = hist[index % len(hist)]
            since = (m.epoch, pos)
            c.views[topic] = dict(held)  # a client that kept the state at `pos`
            c.epoch[topic], c.pos[topic] = m.epoch, pos
        elif since_kind == "other_epoch":
            since = ("not-an-epoch", make_pos(index, 0))
        snap, n = self.fo.subscribe(self.sessions[slot], topic, since, period)
        c.subscribed[topic] = period
        (msg,) = decode_frame(snap)
        assert n == len(msg["items"])
        assert msg["op"] == "snap"
        assert parse_pos(msg["pos"]) == m.pos(topic)
        if since is not None and since[0] == m.epoch:
            assert msg["full"] is False
            changed = {k: v for k, (p, v) in m.keys.get(topic, {}).items() if p > since[1]}
            assert msg["items"] == changed
        else:
            assert msg["full"] is True
            assert msg["items"] == m.live(topic)
        c.receive(msg)
        assert c.views[topic] == m.live(topic)

    def unsubscribe(self, slot: int, topic: str) -> None:
        c = self.clients[slot]
        assert self.fo.unsubscribe(self.sessions[slot], topic) is (topic in c.subscribed)
        c.subscribed.pop(topic, None)

    def close(self, slot: int) -> None:
        """The connection closes; the client reconnects at once, keeping its views."""
        old = self.clients[slot]
        self.fo.close_session(self.sessions[slot])
        old.closed = True
        self.clients[slot] = Client(self, kept=old)
        self.sessions[slot] = self.new_session(self.clients[slot])

    # -- checks

    def check_bounds(self) -> None:
        fo = self.fo
        assert fo.subscription_count() == sum(len(c.subscribed) for c in self.clients)
        for session, c in zip(self.sessions, self.clients, strict=True):
            assert set(session.subs) == set(c.subscribed)
            for topic, sub in session.subs.items():
                assert sub.group.period == c.subscribed[topic]
                assert sub in sub.group.subs
        for t in fo.topics.values():
            assert len(t.entries) <= len(KEYS)  # memory bounded by keys, not updates
            for slot, g in t.groups.items():
                assert g.slot == slot
                for sub in g.subs:  # a group: one period, one phase
                    assert slot == (g.period, phase_in(g.period, sub.session.phase))
                assert g.subs  # no empty group lingers
                assert g.behind <= g.subs
                for sub in g.behind:  # behind means behind: it has something to catch up
                    assert sub.sent_pos < t.pos or sub.sent_pos == -1
        for topics in fo.pending.values():
            assert len(topics) <= len(TOPICS)
        assert set(fo.periods) == {p for t in fo.topics.values() for p in t.groups}

    def converge(self) -> None:
        self.finish_plan()
        # A writer that accepts again is retried without a resume (it was never paused).
        for slot, session in enumerate(self.sessions):
            if not session.paused:
                self.clients[slot].refuse = False
        for _ in range(max(PERIODS)):
            self.flush()
        self.check_converged(paused_too=False)
        for slot in range(SLOTS):
            self.resume(slot)
        for _ in range(max(PERIODS)):
            self.flush()
        self.check_converged(paused_too=True)
        for t in self.fo.topics.values():
            for g in t.groups.values():
                assert not g.behind
        for _ in range(max(PERIODS)):
            self.collect()
            assert self.plan == [], "converged, yet more frames were planned"

    def check_converged(self, paused_too: bool) -> None:
        m = self.model
        for session, c in zip(self.sessions, self.clients, strict=True):
            if session.paused and not paused_too:
                continue
            for topic in c.subscribed:
                assert c.epoch[topic] == m.epoch
                assert c.pos[topic] == m.pos(topic)
                assert c.views[topic] == m.live(topic)


slots = st.integers(0, SLOTS - 1)
topics = st.sampled_from(TOPICS)
apply_op = st.tuples(st.just("apply"), topics, st.sampled_from(KEYS), st.booleans())
operations = st.one_of(
    apply_op,
    apply_op,
    apply_op,
    st.tuples(st.just("replay"), st.integers(0, 1000)),
    st.tuples(st.just("flush")),
    st.tuples(st.just("flush")),
    st.tuples(st.just("collect")),
    st.tuples(st.just("deliver_next")),
    st.tuples(st.just("pause"), slots),
    st.tuples(st.just("refuse"), slots),
    st.tuples(st.just("resume"), slots),
    st.tuples(
        st.just("subscribe"),
        slots,
        topics,
        st.sampled_from(PERIODS),
        st.sampled_from(("none", "kept", "history", "other_epoch")),
        st.integers(0, 1000),
    ),
    st.tuples(
        st.just("subscribe"), slots, topics, st.sampled_from(PERIODS), st.just("kept"), st.just(0)
    ),
    st.tuples(st.just("unsubscribe"), slots, topics),
    st.tuples(st.just("close"), slots),
    st.tuples(st.just("reset")),
    st.tuples(st.just("converge")),
)


# More than the default: the interleavings that matter are a few specific steps in a row.
# (The "fuzz" profile, loaded by conftest before this import, raises it further.)
@settings(max_examples=max(300, settings().max_examples))
@given(ops=st.lists(operations, max_size=80))
def test_every_subscriber_converges_to_the_live_state(ops: list[tuple[Any, ...]]) -> None:
    run = Run()
    for op, *args in ops:
        getattr(run, op)(*args)
        run.check_bounds()
    run.converge()
    run.check_bounds()


@settings(max_examples=50)
@given(
    updates=st.lists(
        st.tuples(topics, st.sampled_from(KEYS), st.booleans()), min_size=1, max_size=200
    ),
    period=st.sampled_from(PERIODS),
    flush_every=st.integers(1, 5),
)
def test_a_paused_session_is_written_nothing_then_one_catch_up_per_topic(
    updates: list[tuple[str, str, bool]], period: int, flush_every: int
) -> None:
    run = Run()
    for topic in TOPICS:
        run.subscribe(0, topic, period, "none", 0)
        run.subscribe(1, topic, 1, "none", 0)
    run.pause(0)
    written = len(run.clients[0].flush_ticks)
    for n, (topic, key, deleted) in enumerate(updates, start=1):
        run.apply(topic, key, deleted)
        if n % flush_every == 0:
            run.flush()
            run.check_bounds()
    run.flush()
    assert len(run.clients[0].flush_ticks) == written
    assert run.fo.stats.frames_refused == 0
    run.clients[0].refuse = False
    run.fo.resume(run.sessions[0])
    for _ in range(period):
        run.flush()
    # one frame, holding one catch-up per topic that changed, with every missed key
    assert len(run.clients[0].flush_ticks) == written + 1
    changed = {t for t, _, _ in updates}
    for topic in TOPICS:
        assert run.clients[0].views[topic] == run.model.live(topic)
        assert run.clients[0].views[topic] == run.clients[1].views[topic]
    assert {t for t in TOPICS if run.clients[0].pos[t] > 0} == changed


# -- topic lifetime (core rule 9) -------------------------------------------------------


class LazyClient:
    """A `Writer` keeping a state client's view of each topic."""

    def __init__(self) -> None:
        self.views: dict[str, dict[str, Any]] = {}

    def write(self, frame: bytes) -> bool:
        self.receive(frame)
        return True

    def receive(self, frame: bytes) -> None:
        for m in decode_frame(frame):
            if m["op"] == "snap" and m["full"]:
                self.views[m["topic"]] = {}
            view = self.views.setdefault(m["topic"], {})
            for k, v in m["items"].items():
                if v is None:
                    view.pop(k, None)
                else:
                    view[k] = v


lazy_ops = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), topics, st.sampled_from(KEYS), st.booleans()),
        st.tuples(st.just("sub"), slots, topics, st.none() | st.integers(0, 8)),
        st.tuples(st.just("finish"), topics),  # the bus answers the topic's load
        st.tuples(st.just("unsub"), slots, topics),
        st.tuples(st.just("close"), slots),
        st.tuples(st.just("tick")),
        st.tuples(st.just("drop"), st.integers(0, 2)),
    ),
    max_size=80,
)


@settings(max_examples=max(300, settings().max_examples))
@given(ops=lazy_ops, max_idle=st.integers(0, 2))
@example(  # a tombstone loaded from the bus answers a `since` before the deletion
    ops=[
        ("publish", "t0", "k0", False),
        ("publish", "t0", "k0", True),
        ("sub", 0, "t0", 1),
        ("finish", "t0"),
    ],
    max_idle=0,
)
def test_a_lazy_core_holds_what_is_subscribed_and_serves_the_bus_state(
    ops: list[tuple[Any, ...]], max_idle: int
) -> None:
    fo = Fanout("e", lazy=True, max_idle_topics=max_idle)
    bus: dict[str, dict[str, tuple[int, bytes]]] = {t: {} for t in TOPICS}  # tombstones kept
    clients = [LazyClient() for _ in range(SLOTS)]
    sessions = [Session(c) for c in clients]
    waiting: list[tuple[int, str, int | None]] = []  # subs waiting for a load: (slot, topic, since)
    log: list[tuple[str, str, int, bytes]] = []  # every publish, in order
    seq = 0

    def state_at(topic: str, mark: int) -> dict[str, Any]:
        view: dict[str, Any] = {}
        for t, k, p, d in log:
            if t == topic and p <= mark:
                if d == NIL:
                    view.pop(k, None)
                else:
                    view[k] = msgpack.unpackb(d)
        return view

    def live(topic: str) -> dict[str, Any]:
        return {k: msgpack.unpackb(d) for k, (_, d) in bus[topic].items() if d != NIL}

    def subscribe(slot: int, topic: str, since: int | None) -> None:
        mark = None if since is None else make_pos(1000 + since, 0)
        snap, _ = fo.subscribe(sessions[slot], topic, None if mark is None else ("e", mark), 1)
        if mark is not None:
            # exactly the keys changed after `since`, deletions as nil (tombstones loaded too)
            (msg,) = decode_frame(snap)
            assert msg["full"] is False
            assert msg["items"] == {
                k: None if d == NIL else msgpack.unpackb(d)
                for k, (p, d) in bus[topic].items()
                if p > mark
            }
            clients[slot].views[topic] = state_at(topic, mark)  # what such a client holds
        clients[slot].receive(snap)
        assert clients[slot].views[topic] == live(topic), (
            "a snap brings the client to the bus state"
        )

    def flush() -> None:
        for s, deliveries in fo.collect().items():
            fo.deliver(s, deliveries)

    for op, *args in ops:
        if op == "publish":
            topic, key, deleted = args
            seq += 1
            p = make_pos(1000 + seq, 0)
            data = NIL if deleted else val(seq)
            bus[topic][key] = (p, data)
            log.append((topic, key, p, data))
            fo.apply(topic, key, p, data)
        elif op == "sub":
            slot, topic, since = args
            waiting = [w for w in waiting if w[:2] != (slot, topic)]
            if fo.needs_load(topic):
                fo.begin_load(topic)
                waiting.append((slot, topic, since))
            else:
                subscribe(slot, topic, since)
        elif op == "finish":
            (topic,) = args
            if topic in fo.loading:
                items = sorted(((k, p, d) for k, (p, d) in bus[topic].items()), key=lambda i: i[1])
                assert fo.load_state(topic, "e", items)
                for slot, t, since in [w for w in waiting if w[1] == topic]:
                    subscribe(slot, t, since)
                waiting = [w for w in waiting if w[1] != topic]
        elif op == "unsub":
            slot, topic = args
            waiting = [w for w in waiting if w[:2] != (slot, topic)]
            fo.unsubscribe(sessions[slot], topic)
        elif op == "close":
            (slot,) = args
            waiting = [w for w in waiting if w[0] != slot]
            fo.close_session(sessions[slot])
        elif op == "tick":
            flush()
        else:
            fo.drop_idle(args[0])
        # what is held: the subscribed, the loading and the idle topics, nothing else
        subscribed = {t for s in sessions for t in s.subs}
        assert set(fo.topics) == subscribed | fo.loading | set(fo.idle)
        assert not (subscribed & set(fo.idle)) and not (fo.loading & set(fo.idle))
        assert len(fo.idle) <= max_idle + len(TOPICS)  # a load's topic waits in it uncapped
        for t in fo.topics:
            if t not in fo.loading:
                assert state_of(fo.topics[t]) == live(t), "a held topic is the bus's state"
    flush()
    for s, c in zip(sessions, clients, strict=True):
        for topic in s.subs:
            assert c.views[topic] == live(topic)


def state_of(t: Any) -> dict[str, Any]:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(b"".join(t.live_items()))
    flat = list(unpacker)
    return dict(zip(flat[::2], flat[1::2], strict=True))
