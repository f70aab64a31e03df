"""The fan-out core (engine/fanout/core.py), driven the way a worker drives it.

Each session writes through a fake `Writer` that decodes every frame and keeps
the view a client builds from it: `snap` full replaces a topic, `snap` with
`full: false` and `upd` merge, nil deletes. Tests assert on that view and on
the frames, i.e. on what a client would see.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import msgpack
import pytest

from engine.fanout.core import (
    Delivery,
    Fanout,
    Session,
    period_ticks,
    phase_in,
    quantize_period,
)
from engine.fanout.stream import StreamState
from engine.protocol.codec import NIL, decode_frame, format_pos, make_pos

REPO = Path(__file__).resolve().parents[2]

MS = 1_700_000_000_000
EPOCH = "e1"


def pos(n: int) -> int:
    return make_pos(MS + n, n % 3)


def val(obj: object) -> bytes:
    out: bytes = msgpack.packb(obj)
    return out


class Client:
    """A fake `Writer` (it can refuse: over budget) and the client's view of each topic."""

    def __init__(self) -> None:
        self.refuse = False
        self.frames: list[list[dict[str, Any]]] = []  # decoded messages of each frame
        self.raw: list[bytes] = []
        self.views: dict[str, dict[str, Any]] = {}
        self.pos: dict[str, str] = {}
        self.epoch: dict[str, str] = {}

    def write(self, frame: bytes) -> bool:
        if self.refuse:
            return False
        self.receive(frame)
        return True

    def receive(self, frame: bytes) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = decode_frame(frame)
        self.raw.append(frame)
        self.frames.append(messages)
        for m in messages:
            topic = m["topic"]
            if m["op"] == "snap":
                self.epoch[topic] = m["epoch"]
                if m["full"]:
                    self.views[topic] = {}
            else:
                assert m["op"] == "upd"
            view = self.views.setdefault(topic, {})
            for k, v in m["items"].items():
                if v is None:
                    view.pop(k, None)
                else:
                    view[k] = v
            self.pos[topic] = m["pos"]
        return messages


def connect() -> tuple[Session, Client]:
    c = Client()
    return Session(c), c


def sub(
    fo: Fanout,
    s: Session,
    topic: str,
    since: tuple[str, int] | None = None,
    period: int = 1,
) -> dict[str, Any]:
    """Subscribe as the shell does (the snap goes out at once); returns the decoded snap."""
    snap, n = fo.subscribe(s, topic, since, period)
    client = s.writer
    assert isinstance(client, Client)
    (msg,) = client.receive(snap)
    assert msg["op"] == "snap"
    assert n == len(msg["items"])
    return msg


def flush(fo: Fanout) -> dict[Session, list[Delivery]]:
    """One flush as the worker runs it: the shared part by group, the rest by
    session. Returns what was planned, per session."""
    plan, shared = fo.plan()
    for sh in shared:
        fo.deliver_shared(sh)
    for s, deliveries in plan.items():
        fo.deliver(s, deliveries)
    for sh in shared:
        for one in sh.subs:
            plan[one.session] = [(one, sh.msg, sh.pos, sh.n)]
    return plan


def state(fo: Fanout, topic: str) -> dict[str, Any]:
    """The topic's live state, decoded (what a converged client must hold)."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(b"".join(fo.topics[topic].live_items()))
    flat = list(unpacker)
    return dict(zip(flat[::2], flat[1::2], strict=True))


# -- subscribe -----------------------------------------------------------------------


def test_subscribing_to_an_unknown_topic_gives_an_empty_full_snap() -> None:
    fo = Fanout(EPOCH)
    s, _ = connect()
    snap = sub(fo, s, "prices")
    assert snap == {
        "op": "snap",
        "topic": "prices",
        "epoch": EPOCH,
        "pos": "0-0",
        "full": True,
        "items": {},
    }
    assert fo.subscription_count() == 1


def test_the_snap_holds_every_live_key_at_the_topic_position() -> None:
    fo = Fanout(EPOCH)
    fo.apply("prices", "a", pos(1), val(1))
    fo.apply("prices", "b", pos(2), val(2))
    fo.apply("prices", "a", pos(3), val(3))
    fo.apply("prices", "c", pos(4), val(4))
    fo.apply("prices", "c", pos(5), NIL)
    s, c = connect()
    snap = sub(fo, s, "prices")
    assert snap["full"] is True
    assert snap["items"] == {"a": 3, "b": 2}
    assert snap["pos"] == format_pos(pos(5))
    assert c.views["prices"] == state(fo, "prices")


def test_since_in_the_current_epoch_sends_only_what_changed_after_it() -> None:
    fo = Fanout(EPOCH)
    fo.apply("prices", "a", pos(1), val(1))
    fo.apply("prices", "b", pos(2), val(2))
    fo.apply("prices", "c", pos(3), val(3))
    s, c = connect()
    sub(fo, s, "prices")
    mark = (EPOCH, pos(3))
    fo.unsubscribe(s, "prices")
    fo.apply("prices", "b", pos(4), val(40))
    fo.apply("prices", "c", pos(5), NIL)
    fo.apply("prices", "d", pos(6), val(6))
    fo.apply("prices", "e", pos(7), val(7))
    fo.apply("prices", "e", pos(8), NIL)  # created and deleted while away: sent as nil

    snap = sub(fo, s, "prices", since=mark)
    assert snap["full"] is False
    assert snap["epoch"] == EPOCH
    assert snap["pos"] == format_pos(pos(8))
    assert snap["items"] == {"b": 40, "c": None, "d": 6, "e": None}
    assert list(snap["items"]) == ["b", "c", "d", "e"]  # oldest change first
    assert c.views["prices"] == state(fo, "prices") == {"a": 1, "b": 40, "d": 6}


def test_since_however_old_is_answered_with_a_partial_snap() -> None:
    fo = Fanout(EPOCH)
    for n in range(1, 50):
        fo.apply("prices", f"k{n % 5}", pos(n), val(n))
    fo.apply("prices", "k0", pos(50), NIL)
    s, _ = connect()
    snap = sub(fo, s, "prices", since=(EPOCH, 0))
    assert snap["full"] is False
    assert snap["items"] == {"k1": 46, "k2": 47, "k3": 48, "k4": 49, "k0": None}


def test_since_at_the_topic_position_gives_an_empty_partial_snap() -> None:
    fo = Fanout(EPOCH)
    fo.apply("prices", "a", pos(1), val(1))
    s, _ = connect()
    snap = sub(fo, s, "prices", since=(EPOCH, pos(1)))
    assert snap["full"] is False
    assert snap["items"] == {}
    assert snap["pos"] == format_pos(pos(1))


def test_since_in_another_epoch_gives_a_full_snap() -> None:
    fo = Fanout(EPOCH)
    fo.apply("prices", "a", pos(1), val(1))
    fo.apply("prices", "b", pos(2), NIL)
    s, _ = connect()
    snap = sub(fo, s, "prices", since=("an-older-epoch", pos(1)))
    assert snap["full"] is True
    assert snap["items"] == {"a": 1}


def test_resubscribing_resends_the_snap_and_keeps_one_subscription() -> None:
    fo = Fanout(EPOCH)
    fo.apply("prices", "a", pos(1), val(1))
    s, c = connect()
    sub(fo, s, "prices")
    sub(fo, s, "prices", period=3)
    assert fo.subscription_count() == 1
    assert len(c.frames) == 2
    assert list(fo.topics["prices"].groups) == [(3, 0)]  # the period-1 group is gone
    fo.apply("prices", "a", pos(2), val(2))
    flush(fo)
    flush(fo)
    assert len(c.frames) == 2  # the new period (3 ticks) is honoured
    flush(fo)
    assert c.views["prices"] == {"a": 2}
    assert len(c.frames) == 3


# -- coalescing and sharing ----------------------------------------------------------


def test_updates_between_flushes_collapse_to_the_latest_value_in_one_upd() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    sub(fo, s, "prices")
    for n in range(1, 101):
        fo.apply("prices", "a", pos(n), val(n))
    fo.apply("prices", "b", pos(101), val("b"))
    flush(fo)
    assert c.frames[1:] == [
        [
            {
                "op": "upd",
                "topic": "prices",
                "pos": format_pos(pos(101)),
                "items": {"a": 100, "b": "b"},
            }
        ]
    ]
    assert fo.stats.updates_applied == 101
    assert fo.stats.updates_delivered == 2


def test_nothing_changed_means_nothing_is_sent() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    sub(fo, s, "prices")
    assert flush(fo) == {}
    fo.apply("prices", "a", pos(1), val(1))
    flush(fo)
    assert flush(fo) == {}
    assert len(c.frames) == 2


def test_a_replayed_entry_is_not_sent_again() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    sub(fo, s, "prices")
    fo.apply("prices", "a", pos(2), val(2))
    flush(fo)
    fo.apply("prices", "a", pos(2), val(2))
    fo.apply("prices", "a", pos(1), val(1))
    assert flush(fo) == {}
    assert c.views["prices"] == {"a": 2}
    assert fo.stats.updates_stale == 2


def test_a_deletion_is_sent_as_nil_in_the_upd() -> None:
    fo = Fanout(EPOCH)
    fo.apply("prices", "a", pos(1), val(1))
    s, c = connect()
    sub(fo, s, "prices")
    fo.apply("prices", "a", pos(2), NIL)
    flush(fo)
    assert c.frames[-1] == [
        {"op": "upd", "topic": "prices", "pos": format_pos(pos(2)), "items": {"a": None}}
    ]
    assert c.views["prices"] == {}


def test_one_frame_per_session_per_flush_with_its_dirty_topics_back_to_back() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    for topic in ("t1", "t2", "t3", "quiet"):
        sub(fo, s, topic)
    for n, topic in enumerate(("t1", "t2", "t3", "t1"), start=1):
        fo.apply(topic, "k", pos(n), val(n))
    plan = flush(fo)
    assert len(plan[s]) == 3
    assert len(c.raw) == 5  # four snaps, then one frame
    last = c.frames[-1]
    assert sorted(m["topic"] for m in last) == ["t1", "t2", "t3"]
    assert all(m["op"] == "upd" for m in last)
    assert c.views == {"t1": {"k": 4}, "t2": {"k": 2}, "t3": {"k": 3}, "quiet": {}}
    assert fo.stats.frames_sent == 1
    assert fo.stats.bytes_sent == len(c.raw[-1])


def test_up_to_date_subscribers_of_a_group_share_one_message_object() -> None:
    fo = Fanout(EPOCH)
    sessions = [connect() for _ in range(5)]
    for s, _ in sessions:
        sub(fo, s, "prices")
    fo.apply("prices", "a", pos(1), val(1))
    plan = fo.collect()
    messages = [d[1] for s, _ in sessions for d in plan[s]]
    assert len(messages) == 5
    assert all(m is messages[0] for m in messages)  # encoded once
    for s, deliveries in plan.items():
        fo.deliver(s, deliveries)
    assert {bytes(c.raw[-1]) for _, c in sessions} == {messages[0]}


def test_subscribers_with_another_period_get_their_own_shared_message() -> None:
    fo = Fanout(EPOCH)
    fast = [connect() for _ in range(2)]
    slow = [connect() for _ in range(2)]
    for s, _ in fast:
        sub(fo, s, "prices", period=1)
    for s, _ in slow:
        sub(fo, s, "prices", period=2)
    fo.apply("prices", "a", pos(1), val(1))
    plan1 = flush(fo)
    assert set(plan1) == {s for s, _ in fast}
    fo.apply("prices", "b", pos(2), val(2))
    plan2 = flush(fo)  # tick 2: both groups are due
    fast_msgs = {id(plan2[s][0][1]) for s, _ in fast}
    slow_msgs = {id(plan2[s][0][1]) for s, _ in slow}
    assert len(fast_msgs) == 1
    assert len(slow_msgs) == 1
    assert fast_msgs != slow_msgs
    assert [m["items"] for m in fast[0][1].frames[-1]] == [{"b": 2}]
    assert [m["items"] for m in slow[0][1].frames[-1]] == [{"a": 1, "b": 2}]


def test_a_subscriber_that_joined_after_the_change_is_not_sent_it_twice() -> None:
    fo = Fanout(EPOCH)
    early, c_early = connect()
    sub(fo, early, "prices")
    fo.apply("prices", "a", pos(1), val(1))
    late, c_late = connect()
    sub(fo, late, "prices")  # its snap already holds a=1
    plan = flush(fo)
    assert late not in plan
    assert c_early.views == c_late.views == {"prices": {"a": 1}}
    assert len(c_late.frames) == 1


def test_a_topic_without_subscribers_is_kept_but_never_flushed() -> None:
    fo = Fanout(EPOCH)
    fo.apply("prices", "a", pos(1), val(1))
    assert flush(fo) == {}
    assert fo.topic_positions() == {"prices": pos(1)}
    s, c = connect()
    sub(fo, s, "prices")
    assert c.views["prices"] == {"a": 1}


# -- unsubscribe and close -----------------------------------------------------------


def test_after_unsubscribe_nothing_more_is_sent_for_the_topic() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    sub(fo, s, "prices")
    sub(fo, s, "news")
    assert fo.unsubscribe(s, "prices")
    assert not fo.unsubscribe(s, "prices")
    assert not fo.unsubscribe(s, "never")
    fo.apply("prices", "a", pos(1), val(1))
    fo.apply("news", "a", pos(2), val(2))
    flush(fo)
    assert [m["topic"] for m in c.frames[-1]] == ["news"]
    assert fo.subscription_count() == 1
    assert fo.topics["prices"].groups == {}


def test_closing_a_session_drops_all_its_subscriptions() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    other, c_other = connect()
    for topic in ("t1", "t2"):
        sub(fo, s, topic)
        sub(fo, s, topic, period=2)  # resubscribed: still one subscription per topic
    sub(fo, other, "t1", period=2)
    fo.close_session(s)
    assert s.subs == {}
    assert fo.subscription_count() == 1
    assert fo.periods == {(2, 0): 1}
    fo.apply("t1", "a", pos(1), val(1))
    fo.apply("t2", "a", pos(2), val(2))
    flush(fo)
    flush(fo)
    assert len(c.frames) == 4  # only the snaps
    assert c_other.views["t1"] == {"a": 1}


# -- slow consumers ------------------------------------------------------------------


def test_a_paused_session_is_sent_nothing_and_holds_no_memory_per_update() -> None:
    fo = Fanout(EPOCH)
    slow, c_slow = connect()
    fast, c_fast = connect()
    topics = ("t1", "t2", "t3")
    for topic in topics:
        sub(fo, slow, topic)
        sub(fo, fast, topic)
    before = len(c_slow.frames)
    slow.paused = True
    c_slow.refuse = True
    for n in range(1, 10_001):
        fo.apply(topics[n % 3], f"k{n % 100}", pos(n), val(n))
        if n % 50 == 0:
            plan = flush(fo)
            assert slow not in plan
            # What is held for the slow session: its subscriptions, nothing per update.
            for topic in topics:
                t = fo.topics[topic]
                assert len(t.entries) <= 100
                for g in t.groups.values():
                    assert len(g.behind) <= len(g.subs)
            assert all(len(p) <= len(topics) for p in fo.pending.values())
    assert len(c_slow.frames) == before
    assert fo.stats.frames_refused == 0  # paused: not even attempted
    assert c_fast.views == {topic: state(fo, topic) for topic in topics}

    c_slow.refuse = False
    fo.resume(slow)
    plan = flush(fo)
    assert len(plan[slow]) == 3
    assert len(c_slow.frames) == before + 1  # one catch-up frame
    catch_up = c_slow.frames[-1]
    assert sorted(m["topic"] for m in catch_up) == list(topics)
    for m in catch_up:
        assert m["op"] == "upd"
        assert m["pos"] == format_pos(fo.topics[m["topic"]].pos)
        assert len(m["items"]) == len(state(fo, m["topic"]))  # every missed key, once
    assert c_slow.views == c_fast.views
    assert flush(fo) == {}


def test_resume_without_missed_updates_sends_nothing() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    sub(fo, s, "prices")
    s.paused = True
    flush(fo)
    fo.resume(s)
    assert not s.paused
    assert flush(fo) == {}
    assert len(c.frames) == 1


def test_a_refused_frame_is_retried_as_one_catch_up_with_the_latest_values() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    ok, c_ok = connect()
    sub(fo, s, "prices")
    sub(fo, ok, "prices")
    c.refuse = True  # over budget, before the transport paused it
    fo.apply("prices", "a", pos(1), val(1))
    flush(fo)
    assert fo.stats.frames_refused == 1
    fo.apply("prices", "a", pos(2), val(2))
    fo.apply("prices", "b", pos(3), val(3))
    flush(fo)  # still refusing: retried, refused again
    assert fo.stats.frames_refused == 2
    assert len(c.frames) == 1
    c.refuse = False
    plan = flush(fo)  # no new update: the laggard alone is served
    assert list(plan) == [s]
    assert c.frames[-1] == [
        {"op": "upd", "topic": "prices", "pos": format_pos(pos(3)), "items": {"a": 2, "b": 3}}
    ]
    assert c.views == c_ok.views == {"prices": {"a": 2, "b": 3}}
    assert flush(fo) == {}


def test_laggards_at_the_same_position_share_one_catch_up() -> None:
    fo = Fanout(EPOCH)
    laggards = [connect() for _ in range(3)]
    current, _ = connect()
    for s, _ in [*laggards, (current, None)]:
        sub(fo, s, "prices")
    for s, _ in laggards:
        s.paused = True
    fo.apply("prices", "a", pos(1), val(1))
    flush(fo)
    fo.apply("prices", "a", pos(2), val(2))
    for s, _ in laggards:
        fo.resume(s)
    plan = fo.collect()
    shared = plan[current][0][1]
    catch_ups = [plan[s][0][1] for s, _ in laggards]
    assert all(m is catch_ups[0] for m in catch_ups)
    assert catch_ups[0] is not shared
    for s, deliveries in plan.items():
        fo.deliver(s, deliveries)
    assert decode_frame(catch_ups[0])[0]["items"] == {"a": 2}
    assert decode_frame(shared)[0]["items"] == {"a": 2}


def test_a_session_paused_mid_plan_keeps_its_place() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    sub(fo, s, "prices")
    fo.apply("prices", "a", pos(1), val(1))
    plan = fo.collect()
    c.refuse = True  # the transport filled up before this session's turn
    s.paused = True
    assert not fo.deliver(s, plan[s])
    fo.apply("prices", "a", pos(2), val(2))
    assert s not in flush(fo)
    c.refuse = False
    fo.resume(s)
    flush(fo)
    assert c.views["prices"] == {"a": 2}
    assert c.frames[-1][0]["pos"] == format_pos(pos(2))


# -- max_hz --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_hz", "cap_hz", "flush_ms", "ticks"),
    [
        (None, 0, 50, 1),  # no limit: every tick
        (None, 0.0, 10, 1),
        (20, 0, 50, 1),  # exactly the flush rate
        (10, 0, 50, 2),
        (7, 0, 50, 3),  # 2.86 ticks: rounded up, 6.7 frames/s <= 7
        (1, 0, 50, 20),
        (0.5, 0, 50, 40),
        (1000, 0, 50, 1),  # faster than the flush: every tick
        (None, 5, 50, 4),  # the topic's cap alone
        (10, 5, 50, 4),  # the topic's cap is lower: it wins
        (2, 5, 50, 10),  # the client's max_hz is lower: it wins
        (3, 0, 333, 2),  # 1.001 ticks: one tick would be 3.003 frames/s, so two
        (0, 0, 50, 1),  # 0 means no limit
        (None, 0.5, 1000, 2),
    ],
)
def test_period_ticks(max_hz: float | None, cap_hz: float, flush_ms: int, ticks: int) -> None:
    assert period_ticks(max_hz, cap_hz, flush_ms) == ticks


def test_period_ticks_never_sends_faster_than_asked() -> None:
    for flush_ms in (1, 5, 10, 16, 25, 33, 50, 100, 250):
        for hz in (0.1, 0.3, 1, 2.5, 3, 7, 9.9, 10, 30, 60, 144, 1000):
            p = period_ticks(hz, 0, flush_ms)
            assert p >= 1
            assert 1000.0 / (p * flush_ms) <= hz * (1 + 1e-9)
            # and not needlessly slower: one tick less would be too fast
            if p > 1:
                assert 1000.0 / ((p - 1) * flush_ms) > hz


QUANTIZED = [(1, 1), (2, 2), (7, 7), (8, 8), (9, 10), (10, 10), (11, 12), (13, 14), (15, 16)]
QUANTIZED += [(16, 16), (17, 20), (21, 24), (29, 32), (33, 40), (100, 112), (500, 512)]


@pytest.mark.parametrize(("period", "quantized"), QUANTIZED)
def test_quantize_period(period: int, quantized: int) -> None:
    assert quantize_period(period) == quantized


def test_quantized_periods_never_send_faster_and_are_four_per_octave() -> None:
    seen = {quantize_period(p) for p in range(1, 4097)}
    for p in range(1, 4097):
        q = quantize_period(p)
        assert p <= q < p * 1.25 + 1  # never faster than asked, at most 25 % slower
    for octave in range(3, 12):
        assert len({q for q in seen if 1 << octave < q <= 2 << octave}) == 4


def test_phases_spread_a_period_over_its_ticks_with_one_message_per_group() -> None:
    fo = Fanout(EPOCH)
    pairs = [(Session(c, phase), c) for phase, c in enumerate(Client() for _ in range(8))]
    for s, _ in pairs:
        sub(fo, s, "prices", period=4)
    assert len(fo.topics["prices"].groups) == 4  # phases 0..3
    ticks: dict[int, list[int]] = {}
    for n in range(1, 9):
        fo.apply("prices", "a", pos(n), val(n))
        before = [len(c.frames) for _, c in pairs]
        flush(fo)
        ticks[fo.tick] = [i for i, (_, c) in enumerate(pairs) if len(c.frames) > before[i]]
    # each tick serves the sessions of one phase: a quarter of them, not all every 4th tick
    assert ticks == {t: [t % 4, t % 4 + 4] for t in range(1, 9)}
    for i, (_, c) in enumerate(pairs):
        assert c.raw[-1] is pairs[i % 4][1].raw[-1]  # the same phase shares one message
        # the value of its phase's last tick (ticks 5, 6, 7 and 8)
        assert c.views == {"prices": {"a": {1: 5, 2: 6, 3: 7, 0: 8}[i % 4]}}


def test_a_period_spreads_its_sessions_over_every_tick_or_sixteen_evenly_spaced() -> None:
    # a period of at most PHASES (16) ticks: every tick takes a share
    assert [phase_in(10, p) for p in range(12)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert [phase_in(3, p) for p in range(4)] == [0, 1, 2, 0]
    assert {phase_in(1, p) for p in range(9)} == {0}
    # a longer period: 16 evenly spaced offsets
    assert [phase_in(40, p) for p in range(17)] == [
        *(0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27, 30, 32, 35, 37),
        0,
    ]
    fo = Fanout(EPOCH)
    for phase in range(40):
        sub(fo, Session(Client(), phase), "prices", period=10)
    assert sorted(fo.topics["prices"].groups) == [(10, t) for t in range(10)]
    assert {len(g.subs) for g in fo.topics["prices"].groups.values()} == {4}


def test_a_slow_period_sends_at_most_one_frame_per_period_and_converges() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    fast, c_fast = connect()
    sub(fo, s, "prices", period=3)
    sub(fo, fast, "prices", period=1)
    sent_ticks = []
    for n in range(1, 13):
        fo.apply("prices", f"k{n % 4}", pos(n), val(n))
        before = len(c.frames)
        flush(fo)
        if len(c.frames) > before:
            sent_ticks.append(fo.tick)
    assert sent_ticks == [3, 6, 9, 12]
    assert len(c_fast.frames) == 1 + 12
    assert c.views == c_fast.views == {"prices": state(fo, "prices")}


def test_a_slow_period_refused_frame_waits_for_its_next_due_tick() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    sub(fo, s, "prices", period=2)
    fo.apply("prices", "a", pos(1), val(1))
    c.refuse = True
    flush(fo)  # tick 1: not due
    flush(fo)  # tick 2: refused
    assert fo.stats.frames_refused == 1
    c.refuse = False
    assert flush(fo) == {}  # tick 3: not due
    assert s in flush(fo)  # tick 4
    assert c.views["prices"] == {"a": 1}


# -- epochs --------------------------------------------------------------------------


def test_a_new_epoch_sends_every_subscriber_a_full_snap() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    slow, c_slow = connect()
    fo.apply("prices", "a", pos(10), val("old"))
    fo.apply("prices", "b", pos(11), val("old"))
    fo.apply("unwatched", "a", pos(12), val("old"))
    sub(fo, s, "prices")
    sub(fo, slow, "prices", period=2)
    fo.reset("e2")
    assert "unwatched" not in fo.topics
    assert fo.topics["prices"].pos == 0
    fo.apply("prices", "a", pos(1), val("new"))  # the new epoch's positions may be lower
    flush(fo)
    assert c.frames[-1] == [
        {
            "op": "snap",
            "topic": "prices",
            "epoch": "e2",
            "pos": format_pos(pos(1)),
            "full": True,
            "items": {"a": "new"},
        }
    ]
    assert c.views["prices"] == {"a": "new"}
    flush(fo)  # tick 2: the period-2 group gets its snap
    assert c_slow.frames[-1][0]["op"] == "snap"
    assert c_slow.epoch["prices"] == "e2"
    assert c_slow.views["prices"] == {"a": "new"}
    fo.apply("prices", "b", pos(2), val("new"))
    flush(fo)
    assert c.frames[-1][0]["op"] == "upd"
    assert c.views["prices"] == {"a": "new", "b": "new"}


def test_a_new_epoch_without_updates_still_sends_the_empty_snap() -> None:
    fo = Fanout(EPOCH)
    fo.apply("prices", "a", pos(10), val("old"))
    s, c = connect()
    sub(fo, s, "prices")
    fo.reset("e2")
    flush(fo)
    assert c.frames[-1][0]["full"] is True
    assert c.frames[-1][0]["epoch"] == "e2"
    assert c.views["prices"] == {}
    assert flush(fo) == {}


def test_a_session_paused_across_a_new_epoch_gets_the_full_snap_on_resume() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    sub(fo, s, "prices")
    fo.apply("prices", "a", pos(10), val("old"))
    s.paused = True
    fo.reset("e2")
    fo.apply("prices", "b", pos(1), val("new"))
    flush(fo)
    fo.resume(s)
    flush(fo)
    assert c.frames[-1][0]["op"] == "snap"
    assert c.frames[-1][0]["epoch"] == "e2"
    assert c.views["prices"] == {"b": "new"}


def test_a_since_of_the_old_epoch_is_answered_in_full_after_a_reset() -> None:
    fo = Fanout(EPOCH)
    fo.apply("prices", "a", pos(10), val("old"))
    fo.reset("e2")
    fo.apply("prices", "b", pos(1), val("new"))
    s, c = connect()
    snap = sub(fo, s, "prices", since=(EPOCH, pos(10)))
    assert snap["full"] is True
    assert snap["epoch"] == "e2"
    assert c.views["prices"] == {"b": "new"}


# -- a plan delivered later ----------------------------------------------------------
# The shell may yield to its loop between sessions of one plan; client messages and
# bus entries are handled meanwhile.


def test_entries_applied_while_a_plan_is_delivered_come_next_flush() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    sub(fo, s, "prices")
    fo.apply("prices", "a", pos(1), val(1))
    plan = fo.collect()
    fo.apply("prices", "a", pos(2), val(2))
    fo.deliver(s, plan[s])
    assert c.frames[-1][0]["pos"] == format_pos(pos(1))
    flush(fo)
    assert c.frames[-1][0]["pos"] == format_pos(pos(2))
    assert c.views["prices"] == {"a": 2}


def test_a_topic_unsubscribed_while_its_plan_waits_is_not_sent() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    sub(fo, s, "prices")
    sub(fo, s, "news")
    fo.apply("prices", "a", pos(1), val(1))
    fo.apply("news", "a", pos(2), val(2))
    plan = fo.collect()
    fo.unsubscribe(s, "prices")
    fo.deliver(s, plan[s])
    assert [m["topic"] for m in c.frames[-1]] == ["news"]


def test_a_resubscribe_while_its_plan_waits_does_not_send_older_values() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    sub(fo, s, "prices")
    fo.apply("prices", "a", pos(1), val(1))
    plan = fo.collect()
    fo.apply("prices", "a", pos(2), val(2))
    sub(fo, s, "prices")  # the snap holds a=2
    fo.deliver(s, plan[s])  # the planned upd holds a=1: it must not reach the client
    flush(fo)
    assert c.views["prices"] == {"a": 2}
    assert c.frames[-1][0]["op"] == "snap"


def test_a_closed_session_is_written_nothing_from_its_plan() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    sub(fo, s, "prices")
    fo.apply("prices", "a", pos(1), val(1))
    plan = fo.collect()
    fo.close_session(s)
    fo.deliver(s, plan[s])
    assert len(c.frames) == 1


def test_a_reset_while_a_plan_waits_still_sends_the_new_snap() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    sub(fo, s, "prices")
    fo.apply("prices", "a", pos(10), val("old"))
    plan = fo.collect()
    fo.reset("e2")
    fo.apply("prices", "b", pos(1), val("new"))  # below the planned position
    fo.deliver(s, plan[s])
    flush(fo)
    assert c.epoch["prices"] == "e2"
    assert c.views["prices"] == {"b": "new"}


# -- the shared plan: up-to-date sessions of one topic, written by group --------------


def test_up_to_date_single_topic_sessions_are_planned_by_group() -> None:
    fo = Fanout(EPOCH)
    one = [connect() for _ in range(3)]
    two, c2 = connect()
    late, cl = connect()
    for s, _ in one:
        sub(fo, s, "prices")
    sub(fo, two, "prices")
    sub(fo, two, "news")
    sub(fo, late, "prices")
    fo.apply("prices", "a", pos(1), val(1))
    cl.refuse = True
    flush(fo)  # refused: `late` is now behind
    cl.refuse = False
    fo.apply("prices", "a", pos(2), val(2))
    plan, shared = fo.plan()
    (sh,) = shared
    assert {sub.session for sub in sh.subs} == {s for s, _ in one}
    assert set(plan) == {two, late}  # several topics; behind: a catch-up of its own
    assert plan[late][0][1] is not sh.msg
    for start in range(3):
        fo.deliver_shared(sh, start, start + 1)
    for s, deliveries in plan.items():
        fo.deliver(s, deliveries)
    for c in [c for _, c in one] + [c2, cl]:
        assert c.views["prices"] == {"a": 2}
        assert c.pos["prices"] == format_pos(pos(2))
    assert all(c.raw[-1] is sh.msg for _, c in one)  # the message is the whole frame


def test_a_shared_message_is_not_written_to_a_session_that_unsubscribed_meanwhile() -> None:
    fo = Fanout(EPOCH)
    (a, ca), (b, cb) = connect(), connect()
    sub(fo, a, "prices")
    sub(fo, b, "prices")
    fo.apply("prices", "x", pos(1), val(1))
    _, (sh,) = fo.plan()
    fo.unsubscribe(a, "prices")
    fo.deliver_shared(sh)
    assert len(ca.frames) == 1  # the snap only
    assert cb.views["prices"] == {"x": 1}


def test_a_shared_message_is_not_written_after_a_resubscribe_meanwhile() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    sub(fo, s, "prices")
    fo.apply("prices", "a", pos(1), val(1))
    _, (sh,) = fo.plan()
    fo.apply("prices", "a", pos(2), val(2))
    sub(fo, s, "prices")  # the snap holds a=2
    fo.deliver_shared(sh)  # the planned upd holds a=1: it must not reach the client
    flush(fo)
    assert c.views["prices"] == {"a": 2}
    assert c.frames[-1][0]["op"] == "snap"


def test_a_shared_message_is_not_written_to_a_closed_session() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    sub(fo, s, "prices")
    fo.apply("prices", "a", pos(1), val(1))
    _, (sh,) = fo.plan()
    fo.close_session(s)
    fo.deliver_shared(sh)
    assert len(c.frames) == 1
    assert fo.stats.frames_sent == 0


def test_a_reset_while_a_shared_message_waits_drops_it_for_the_new_snap() -> None:
    fo = Fanout(EPOCH)
    s, c = connect()
    sub(fo, s, "prices")
    fo.apply("prices", "a", pos(10), val("old"))
    _, (sh,) = fo.plan()
    fo.reset("e2")
    fo.apply("prices", "b", pos(1), val("new"))  # below the planned position
    fo.deliver_shared(sh)
    assert len(c.frames) == 1
    flush(fo)
    assert c.epoch["prices"] == "e2"
    assert c.views["prices"] == {"b": "new"}


def test_a_refused_shared_message_leaves_the_session_behind_for_a_catch_up() -> None:
    fo = Fanout(EPOCH)
    (a, ca), (b, cb) = connect(), connect()
    sub(fo, a, "prices")
    sub(fo, b, "prices")
    fo.apply("prices", "x", pos(1), val(1))
    fo.apply("prices", "y", pos(2), val(2))
    ca.refuse = True
    flush(fo)
    assert fo.stats.frames_refused == 1
    assert cb.views["prices"] == {"x": 1, "y": 2}
    ca.refuse = False
    fo.apply("prices", "y", pos(3), val(3))
    flush(fo)
    assert ca.views["prices"] == {"x": 1, "y": 3}  # one catch-up with both keys
    assert len(ca.frames) == 2
    assert cb.frames[-1][0]["items"] == {"y": 3}
    assert not fo.topics["prices"].groups[(1, 0)].behind


def test_stats_count_what_was_written() -> None:
    fo = Fanout(EPOCH)
    a, ca = connect()
    b, cb = connect()
    sub(fo, a, "prices")
    sub(fo, b, "prices")
    fo.apply("prices", "x", pos(1), val(1))
    fo.apply("prices", "y", pos(2), val(2))
    fo.apply("prices", "x", pos(1), val(1))
    flush(fo)
    st = fo.stats
    assert st.updates_applied == 2
    assert st.updates_stale == 1
    assert st.frames_sent == 2
    assert st.bytes_sent == len(ca.raw[-1]) + len(cb.raw[-1])
    assert st.updates_delivered == 4
    assert st.frames_refused == 0


class _Sink:
    """A `Writer` that takes every frame (for subscribers whose frames a test ignores)."""

    def write(self, frame: bytes) -> bool:
        return True


def test_stats_count_the_updates_coalesced_before_a_flush() -> None:
    """Rule 1: a key changed again before a flush planned its value is counted
    as coalesced; a change over a value already flushed is not, nor one of a
    topic without subscribers, nor a stream topic's event (rule 8)."""
    fo = Fanout(EPOCH, history_of=lambda t: 10 if t == "log" else None)
    s, _ = connect()
    sub(fo, s, "prices")
    fo.subscribe(Session(_Sink()), "log", None, 1)
    fo.apply("prices", "a", pos(1), val(1))  # a first value
    fo.apply("prices", "a", pos(2), val(2))  # over 1, never flushed
    fo.apply("prices", "a", pos(3), val(3))  # over 2, never flushed
    fo.apply("prices", "a", pos(3), val(3))  # a replay: stale
    fo.apply("log", "e", pos(4), val(4))
    fo.apply("log", "e", pos(5), val(5))  # every event is delivered
    fo.apply("nobody", "a", pos(6), val(6))
    fo.apply("nobody", "a", pos(7), val(7))  # no subscriber: no flush to wait for
    assert (fo.stats.updates_applied, fo.stats.updates_coalesced) == (7, 2)
    flush(fo)
    fo.apply("prices", "a", pos(8), val(8))  # over a flushed value
    assert fo.stats.updates_coalesced == 2
    fo.apply("prices", "a", pos(9), val(9))  # over 8, never flushed
    fo.apply("prices", "b", pos(10), val(10))  # a new key
    assert fo.stats.updates_coalesced == 3
    assert fo.stats.updates_stale == 1


# -- both kinds of topic answer the same calls (rule 8, session.py rule 1) ----------------------


def test_a_stream_topic_has_no_per_key_entries() -> None:
    assert not hasattr(StreamState("log", 10), "entries")


def test_mypy_checks_a_topic_against_the_protocol(tmp_path: Path) -> None:
    mypy_api = pytest.importorskip("mypy.api")
    module = tmp_path / "topics_here.py"
    module.write_text(
        textwrap.dedent(
            """\
            from engine.fanout.session import Group, Slot, Topic
            from engine.fanout.state import TopicState
            from engine.fanout.stream import StreamState

            class Half:
                name = "half"
                pos = 0
                sent_mark = 0
                groups: dict[Slot, Group] = {}

                def apply(self, key: str, pos: int, data: bytes) -> int:
                    return 0

            both: list[Topic] = [TopicState("prices"), StreamState("log", 10)]
            half: Topic = Half()
            """
        )
    )
    out, _, code = mypy_api.run(
        [
            "--strict",
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--config-file",
            str(REPO / "pyproject.toml"),
            str(module),
        ]
    )
    assert code == 1, out
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "topics_here.py:15:" in errors[0], out
    assert '"Half"' in errors[0] and '"Topic"' in errors[0], out


# -- topic lifetime (rule 9) ------------------------------------------------------------


def lazy(max_idle_topics: int = 10_000) -> Fanout:
    return Fanout(EPOCH, lazy=True, max_idle_topics=max_idle_topics)


def tick(fo: Fanout, n: int = 1) -> None:
    for _ in range(n):
        flush(fo)


def load(fo: Fanout, topic: str, items: list[tuple[str, int, Any]]) -> None:
    """A sub's load as the shell runs it: hold, fetch (here: `items`), merge."""
    assert fo.needs_load(topic) and fo.begin_load(topic)
    assert fo.load_state(topic, EPOCH, [(k, p, val(v)) for k, p, v in items])
    assert not fo.needs_load(topic)


def test_lazy_entries_of_a_topic_not_held_create_nothing() -> None:
    fo = lazy()
    fo.apply("t", "a", pos(1), val(1))
    fo.lose("t", pos(1))
    assert fo.topics == {} and fo.needs_load("t")
    s, _ = connect()
    with pytest.raises(LookupError, match="'t'"):
        fo.subscribe(s, "t", None, 1)


def test_lazy_wants_only_the_topics_held_and_counts_the_others_as_apply_would() -> None:
    """Rule 9 through `wants` (the bus skips refused runs undecoded): the same
    answer and the same unheld count as `apply` for each of those updates."""
    fo = lazy()
    assert not fo.wants("t", 3)
    fo.apply("t", "a", pos(1), val(1))
    assert fo.stats.updates_unheld == 4
    load(fo, "t", [])  # held from its load on: entries are merged under it
    assert fo.wants("t", 2) and fo.stats.updates_unheld == 4
    assert Fanout(EPOCH).wants("anything", 1)  # not lazy: every topic is created


def test_fresh_topics_subscribed_then_left_are_dropped_after_the_grace() -> None:
    # issue 11, finding 2: sub + unsub of fresh names must not grow the table
    fo = lazy()
    s, _ = connect()
    honest, hc = connect()
    load(fo, "honest", [])
    sub(fo, honest, "honest")
    for i in range(300):
        load(fo, f"fresh.{i}", [])
        sub(fo, s, f"fresh.{i}")
        if i % 2:
            fo.unsubscribe(s, f"fresh.{i}")
    fo.close_session(s)  # the even ones leave with the session
    assert len(fo.topics) == 301 and len(fo.idle) == 300
    tick(fo, 2)
    assert fo.drop_idle(grace_ticks=3) == 0  # within the grace: kept
    fo.apply("honest", "k", pos(1), val(1))
    tick(fo)
    assert fo.drop_idle(grace_ticks=3) == 300
    assert list(fo.topics) == ["honest"] and fo.idle == {}
    assert fo.stats.topics_dropped == 300
    assert hc.views["honest"] == {"k": 1}  # the honest subscriber kept receiving
    fo.apply("honest", "k", pos(2), val(2))
    tick(fo)
    assert hc.views["honest"] == {"k": 2}


def test_a_topic_resubscribed_within_its_grace_is_kept_without_a_load() -> None:
    fo = lazy()
    s, c = connect()
    load(fo, "t", [("a", pos(1), 1)])
    sub(fo, s, "t")
    fo.unsubscribe(s, "t")
    fo.apply("t", "a", pos(2), val(2))  # held in its grace: still applied
    tick(fo, 5)
    assert not fo.needs_load("t")
    snap = sub(fo, s, "t")
    assert snap["items"] == {"a": 2} and fo.idle == {}
    tick(fo, 10)
    assert fo.drop_idle(grace_ticks=3) == 0  # subscribed again: not idle
    assert c.views["t"] == {"a": 2}


def test_idle_topics_are_bounded_the_oldest_dropped_first() -> None:
    fo = lazy(max_idle_topics=2)
    s, _ = connect()
    for name in ("a", "b", "c"):
        load(fo, name, [])
        sub(fo, s, name)
    for name in ("a", "b", "c"):
        fo.unsubscribe(s, name)
    assert list(fo.idle) == ["b", "c"] and set(fo.topics) == {"b", "c"}
    assert fo.needs_load("a") and fo.stats.topics_dropped == 1


def test_a_resubscribe_does_not_make_the_topic_idle_even_with_no_idle_room() -> None:
    fo = lazy(max_idle_topics=0)
    s, _ = connect()
    load(fo, "t", [("a", pos(1), 1)])  # loaded: idle until its waiter subscribes
    sub(fo, s, "t")
    assert sub(fo, s, "t")["items"] == {"a": 1}  # the old subscription goes, not the topic
    fo.unsubscribe(s, "t")
    assert fo.topics == {}  # no idle room: dropped at once


def test_a_dropped_topic_reloaded_serves_the_latest_values_and_an_exact_since() -> None:
    fo = lazy()
    s, c = connect()
    load(fo, "t", [("a", pos(1), 1), ("b", pos(2), 2), ("c", pos(3), 3)])
    first = sub(fo, s, "t")
    fo.unsubscribe(s, "t")
    tick(fo)
    assert fo.drop_idle(grace_ticks=0) == 1
    # published while not held: ignored here, kept by the bus
    fo.apply("t", "a", pos(4), val(10))
    fo.apply("t", "c", pos(5), NIL)
    assert fo.needs_load("t") and fo.begin_load("t")
    assert not fo.begin_load("t")  # one load at a time
    # live entries while the load is under way, newer than the snapshot's ...
    fo.apply("t", "d", pos(7), val(4))
    fo.apply("t", "a", pos(8), val(11))
    # ... and the snapshot (taken after begin_load; deleted keys as NIL)
    snapshot = [("b", pos(2), val(2)), ("a", pos(4), val(10)), ("c", pos(5), NIL)]
    assert fo.load_state("t", EPOCH, snapshot)
    snap = sub(fo, s, "t")
    assert snap["full"] and c.views["t"] == {"a": 11, "b": 2, "d": 4}
    assert snap["pos"] == format_pos(pos(8))
    partial = sub(fo, s, "t", since=(EPOCH, pos(3)))
    assert (partial["full"], partial["items"]) == (False, {"c": None, "d": 4, "a": 11})
    assert first["pos"] == format_pos(pos(3))
    fo.apply("t", "b", pos(9), val(3))
    tick(fo)
    assert c.views["t"] == {"a": 11, "b": 3, "d": 4}


def test_a_load_of_another_epoch_is_refused_and_fetched_again() -> None:
    fo = lazy()
    assert fo.begin_load("t")
    fo.reset("e2")  # a new epoch while the load is under way: the topic is kept
    assert fo.needs_load("t")
    assert not fo.load_state("t", EPOCH, [("a", pos(1), val(1))])
    assert fo.load_state("t", "e2", [("a", pos(1), val(2))])
    s, _ = connect()
    assert sub(fo, s, "t")["items"] == {"a": 2}


def test_an_abandoned_load_leaves_nothing() -> None:
    fo = lazy()
    assert fo.begin_load("t")
    fo.apply("t", "a", pos(1), val(1))
    fo.abandon_load("t")
    assert fo.topics == {} and fo.needs_load("t")


def test_a_new_epoch_drops_the_idle_topics() -> None:
    fo = lazy()
    s, _ = connect()
    load(fo, "kept", [])
    load(fo, "idle", [])
    sub(fo, s, "kept")
    sub(fo, s, "idle")
    fo.unsubscribe(s, "idle")
    fo.reset("e2")
    assert list(fo.topics) == ["kept"] and fo.idle == {}
