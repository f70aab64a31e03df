"""Stream topics in the fan-out core (engine/fanout/core.py, engine/fanout/stream.py).

Driven the way a worker drives the core. Each session writes through a fake
`Writer` that decodes every frame and keeps what a stream client keeps: the
events it received, in order, and the gaps it was told about. Tests assert on
those (docs/protocol.md 4.2): every event in order with its position, nothing
coalesced, `snap` with `since`, and a `gap` (never a silent skip) for a
subscriber that fell behind.
"""

from __future__ import annotations

from typing import Any

import msgpack

from engine.fanout.core import Delivery, Fanout, Session
from engine.fanout.stream import STREAM_BUFFER_MIN, UNFLUSHED_FACTOR, StreamState
from engine.protocol.codec import decode_frame, format_pos, make_pos, parse_pos

MS = 1_700_000_000_000
EPOCH = "e1"
HISTORY = {"trades": 5, "logs": 0, "big": 1000}


def pos(n: int) -> int:
    return make_pos(MS + n, n % 3)


def val(obj: object) -> bytes:
    out: bytes = msgpack.packb(obj)
    return out


def history_of(topic: str) -> int | None:
    return HISTORY.get(topic)


def fanout(buffer_events: int = STREAM_BUFFER_MIN) -> Fanout:
    return Fanout(EPOCH, history_of=history_of, stream_buffer_events=buffer_events)


class Client:
    """A fake `Writer` (it can refuse: over budget) and a stream client's view."""

    def __init__(self) -> None:
        self.refuse = False
        self.frames: list[list[dict[str, Any]]] = []
        self.events: dict[str, list[tuple[str, Any]]] = {}
        self.gaps: dict[str, list[tuple[str, str]]] = {}
        self.snaps: list[dict[str, Any]] = []
        self.log: list[tuple[str, Any]] = []  # ("evt", (pos, data)) / ("gap", (from, to)), in order

    def write(self, frame: bytes) -> bool:
        if self.refuse:
            return False
        self.receive(frame)
        return True

    def receive(self, frame: bytes) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = decode_frame(frame)
        self.frames.append(messages)
        for m in messages:
            topic = m["topic"]
            if m["op"] == "snap" and topic in HISTORY:
                self.snaps.append(m)
                assert isinstance(m["items"], list), "a stream topic's snap holds a list"
                if m["full"]:
                    self.events[topic] = []
                for p, data in m["items"]:
                    self.events.setdefault(topic, []).append((p, data))
                    self.log.append(("evt", (p, data)))
            elif m["op"] == "evt":
                assert m["items"], "an evt is never empty"
                for p, data in m["items"]:
                    self.events.setdefault(topic, []).append((p, data))
                    self.log.append(("evt", (p, data)))
            elif m["op"] == "gap":
                assert topic in HISTORY
                self.gaps.setdefault(topic, []).append((m["from"], m["to"]))
                self.log.append(("gap", (m["from"], m["to"])))
            else:
                assert m["op"] == "upd", m  # a state topic's, beside a stream topic
        return messages

    def positions(self, topic: str) -> list[int]:
        return [parse_pos(p) for p, _ in self.events.get(topic, [])]

    def data(self, topic: str) -> list[Any]:
        return [d for _, d in self.events.get(topic, [])]


def connect() -> tuple[Session, Client]:
    c = Client()
    return Session(c), c


def sub(
    fo: Fanout, s: Session, topic: str, since: int | None = None, period: int = 1
) -> dict[str, Any]:
    snap, n = fo.subscribe(s, topic, None if since is None else (EPOCH, since), period)
    client = s.writer
    assert isinstance(client, Client)
    (msg,) = client.receive(snap)
    assert msg["op"] == "snap" and n == len(msg["items"])
    return msg


def flush(fo: Fanout) -> dict[Session, list[Delivery]]:
    plan = fo.collect()
    for s, deliveries in plan.items():
        fo.deliver(s, deliveries)
    return plan


def publish(fo: Fanout, topic: str, first: int, last: int) -> None:
    """Events first..last (inclusive), all on one key: data is the event number."""
    for n in range(first, last + 1):
        fo.apply(topic, "k", pos(n), val(n))


def held(fo: Fanout, topic: str) -> int:
    t = fo.topics[topic]
    assert isinstance(t, StreamState)
    return len(t.events)


# -- delivery ------------------------------------------------------------------------


def test_every_event_is_delivered_in_order_nothing_coalesced() -> None:
    fo = fanout()
    s, c = connect()
    sub(fo, s, "trades")
    publish(fo, "trades", 1, 100)  # one key, 100 events between two flushes
    flush(fo)
    (evt,) = c.frames[-1]
    assert evt == {
        "op": "evt",
        "topic": "trades",
        "items": [[format_pos(pos(n)), n] for n in range(1, 101)],
    }
    publish(fo, "trades", 101, 103)
    flush(fo)
    assert c.data("trades") == list(range(1, 104))
    assert c.positions("trades") == [pos(n) for n in range(1, 104)]
    assert c.gaps == {}
    assert fo.stats.updates_delivered == 103
    assert fo.stats.updates_coalesced == 0


def test_up_to_date_subscribers_share_one_evt_message() -> None:
    fo = fanout()
    sessions = [connect() for _ in range(4)]
    for s, _ in sessions:
        sub(fo, s, "trades")
    publish(fo, "trades", 1, 3)
    plan = fo.collect()
    messages = [d[1] for s, _ in sessions for d in plan[s]]
    assert len(messages) == 4 and all(m is messages[0] for m in messages)


def test_a_stream_topic_and_a_state_topic_share_one_frame() -> None:
    fo = fanout()
    s, c = connect()
    sub(fo, s, "trades")
    snap, _ = fo.subscribe(s, "prices", None, 1)  # no rule: a state topic
    assert decode_frame(snap)[0]["items"] == {}
    fo.apply("prices", "a", pos(1), val(1))
    fo.apply("prices", "a", pos(2), val(2))
    publish(fo, "trades", 3, 4)
    flush(fo)
    last = c.frames[-1]
    assert sorted(m["op"] for m in last) == ["evt", "upd"]
    upd = next(m for m in last if m["op"] == "upd")
    assert upd["items"] == {"a": 2}  # the state topic is still coalesced
    assert c.data("trades") == [3, 4]


def test_a_slower_period_gets_every_event_batched() -> None:
    fo = fanout()
    fast, cf = connect()
    slow, cs = connect()
    sub(fo, fast, "trades", period=1)
    sub(fo, slow, "trades", period=4)
    for n in range(1, 9):
        publish(fo, "trades", n, n)
        flush(fo)
    assert cf.data("trades") == cs.data("trades") == list(range(1, 9))
    assert len(cf.frames) == 1 + 8
    assert len(cs.frames) == 1 + 2


def test_a_replayed_event_is_not_delivered_twice() -> None:
    fo = fanout()
    s, c = connect()
    sub(fo, s, "trades")
    publish(fo, "trades", 1, 3)
    flush(fo)
    publish(fo, "trades", 2, 3)  # the bus replays after a reconnect
    assert flush(fo) == {}
    assert c.data("trades") == [1, 2, 3]
    assert fo.stats.updates_stale == 2


# -- snap and since --------------------------------------------------------------------


def test_a_snap_without_since_holds_the_newest_history_events() -> None:
    fo = fanout()
    publish(fo, "trades", 1, 9)
    s, _ = connect()
    snap = sub(fo, s, "trades")
    assert snap["full"] is True
    assert snap["items"] == [[format_pos(pos(n)), n] for n in range(5, 10)]  # history = 5
    assert snap["pos"] == format_pos(pos(9))
    assert snap["epoch"] == EPOCH


def test_since_inside_history_gives_exactly_the_events_after_it() -> None:
    fo = fanout()
    publish(fo, "trades", 1, 9)
    s, c = connect()
    snap = sub(fo, s, "trades", since=pos(6))
    assert snap["full"] is False
    assert snap["items"] == [[format_pos(pos(n)), n] for n in (7, 8, 9)]
    # the oldest `since` history still answers: the event before the newest five
    snap = sub(fo, s, "trades", since=pos(4))
    assert (snap["full"], [d for _, d in snap["items"]]) == (False, [5, 6, 7, 8, 9])
    # and nothing missed: the subscriber is at the topic's position
    snap = sub(fo, s, "trades", since=pos(9))
    assert (snap["full"], snap["items"], snap["pos"]) == (False, [], format_pos(pos(9)))
    publish(fo, "trades", 10, 10)
    flush(fo)
    assert c.data("trades")[-1:] == [10]


def test_since_older_than_history_gives_a_full_snap_of_the_newest_events() -> None:
    fo = fanout()
    publish(fo, "trades", 1, 9)
    s, _ = connect()
    for since in (pos(3), 0):
        snap = sub(fo, s, "trades", since=since)
        assert snap["full"] is True
        assert [d for _, d in snap["items"]] == [5, 6, 7, 8, 9]


def test_since_is_bounded_by_history_even_while_the_buffer_holds_more() -> None:
    fo = fanout()
    watcher, _ = connect()
    sub(fo, watcher, "trades")  # a subscriber: the worker buffers up to 256 events
    publish(fo, "trades", 1, 20)
    assert held(fo, "trades") == 20
    s, _ = connect()
    snap = sub(fo, s, "trades", since=pos(2))
    assert snap["full"] is True  # history is 5: a new client cannot reach back further
    assert [d for _, d in snap["items"]] == [16, 17, 18, 19, 20]


def test_since_in_another_epoch_gives_a_full_snap() -> None:
    fo = fanout()
    publish(fo, "trades", 1, 9)
    s, _ = connect()
    snap, _ = fo.subscribe(s, "trades", ("another", pos(8)), 1)
    (msg,) = decode_frame(snap)
    assert msg["full"] is True and [d for _, d in msg["items"]] == [5, 6, 7, 8, 9]


def test_since_ahead_of_this_worker_is_not_sent_what_it_has() -> None:
    fo = fanout()
    publish(fo, "trades", 1, 5)
    s, c = connect()
    snap = sub(fo, s, "trades", since=pos(7))  # it saw 6 and 7 on a worker further along
    assert (snap["full"], snap["items"], snap["pos"]) == (False, [], format_pos(pos(7)))
    publish(fo, "trades", 6, 8)
    flush(fo)
    assert c.data("trades") == [8]
    assert c.gaps == {}


def test_history_zero_serves_no_events_but_an_up_to_date_since_is_partial() -> None:
    fo = fanout()
    publish(fo, "logs", 1, 3)
    s, c = connect()
    snap = sub(fo, s, "logs")
    assert (snap["full"], snap["items"], snap["pos"]) == (True, [], format_pos(pos(3)))
    snap = sub(fo, s, "logs", since=pos(3))
    assert (snap["full"], snap["items"]) == (False, [])
    snap = sub(fo, s, "logs", since=pos(2))
    assert (snap["full"], snap["items"]) == (True, [])
    publish(fo, "logs", 4, 6)
    flush(fo)
    assert c.data("logs") == [4, 5, 6]


def test_an_unknown_stream_topic_gives_an_empty_full_snap() -> None:
    fo = fanout()
    s, _ = connect()
    snap = sub(fo, s, "trades")
    assert snap == {
        "op": "snap",
        "topic": "trades",
        "epoch": EPOCH,
        "pos": "0-0",
        "full": True,
        "items": [],
    }


# -- memory ----------------------------------------------------------------------------


def test_a_topic_without_subscribers_keeps_only_its_history() -> None:
    fo = fanout()
    publish(fo, "trades", 1, 1000)
    publish(fo, "logs", 1, 1000)
    assert held(fo, "trades") == 5
    assert held(fo, "logs") == 0


def test_a_subscribed_topic_keeps_at_most_its_buffer_once_flushed() -> None:
    fo = fanout(buffer_events=16)
    s, _ = connect()
    sub(fo, s, "trades")
    sub(fo, s, "big")
    for n in range(1, 1001):
        publish(fo, "trades", n, n)
        publish(fo, "big", 3 * n - 2, 3 * n)
        flush(fo)
    assert held(fo, "trades") == 16
    assert held(fo, "big") == 1000  # history above the minimum: the history


def test_events_since_the_last_flush_are_held_up_to_four_buffers() -> None:
    # stream.py rule 2: an event no flush has planned yet is kept (up to
    # UNFLUSHED_FACTOR buffers), whatever was published since
    fo = fanout(buffer_events=16)
    s, _ = connect()
    sub(fo, s, "trades")
    publish(fo, "trades", 1, 1000)
    assert held(fo, "trades") == UNFLUSHED_FACTOR * 16
    flush(fo)
    publish(fo, "trades", 1001, 1001)  # the flushed events beyond the buffer go
    assert held(fo, "trades") == 16


# -- slow subscribers: catch-up or gap ----------------------------------------------------


def test_a_paused_subscriber_gets_what_it_missed_when_the_buffer_holds_it() -> None:
    fo = fanout(buffer_events=16)
    s, c = connect()
    other, co = connect()
    sub(fo, s, "trades")
    sub(fo, other, "trades")
    publish(fo, "trades", 1, 2)
    flush(fo)
    s.paused = True
    for n in range(3, 13):  # ten events while it cannot take them
        publish(fo, "trades", n, n)
        flush(fo)
    assert c.data("trades") == [1, 2]
    fo.resume(s)
    flush(fo)
    assert c.data("trades") == co.data("trades") == list(range(1, 13))
    assert c.gaps == {}


def test_a_subscriber_that_fell_behind_the_buffer_gets_a_gap_then_the_later_events() -> None:
    fo = fanout(buffer_events=16)
    s, c = connect()
    sub(fo, s, "trades")
    publish(fo, "trades", 1, 4)
    flush(fo)
    s.paused = True
    for n in range(5, 105):
        publish(fo, "trades", n, n)
        flush(fo)
    assert held(fo, "trades") == 16  # nothing more was kept for it
    fo.resume(s)
    flush(fo)
    gap = c.frames[-1][0]
    assert gap == {
        "op": "gap",
        "topic": "trades",
        "from": format_pos(pos(4)),
        "to": format_pos(pos(88)),
    }
    assert c.frames[-1][1]["op"] == "evt"  # the gap and the events in one frame
    assert c.data("trades") == [1, 2, 3, 4, *range(89, 105)]
    # what it was told accounts for every event: received, or inside the gap
    got = set(c.positions("trades"))
    lost = {p for n in range(1, 105) if (p := pos(n)) not in got}
    (frm, to) = c.gaps["trades"][0]
    assert all(parse_pos(frm) < p <= parse_pos(to) for p in lost)
    assert parse_pos(frm) == c.positions("trades")[3] and parse_pos(to) < pos(89)
    publish(fo, "trades", 105, 106)
    flush(fo)
    assert c.data("trades")[-3:] == [104, 105, 106]


def test_a_refused_frame_is_retried_from_the_subscriber_position() -> None:
    fo = fanout(buffer_events=8)
    s, c = connect()
    sub(fo, s, "trades")
    c.refuse = True
    publish(fo, "trades", 1, 3)
    flush(fo)  # refused: over budget
    c.refuse = False
    publish(fo, "trades", 4, 5)
    flush(fo)
    assert c.data("trades") == [1, 2, 3, 4, 5]
    c.refuse = True
    publish(fo, "trades", 6, 30)
    flush(fo)  # refused: the events it planned may now go (rule 2)
    publish(fo, "trades", 31, 31)
    c.refuse = False
    flush(fo)
    assert c.gaps["trades"] == [(format_pos(pos(5)), format_pos(pos(23)))]
    assert c.data("trades")[5:] == list(range(24, 32))


def test_a_burst_beyond_the_buffer_within_one_flush_reaches_every_subscriber_whole() -> None:
    # Finding 10 (issue 11): 300 events published between two flushes (faster
    # than one flush interval) to subscribers that read everything. The buffer
    # (256) used to drop the oldest before any flush had planned them: every
    # subscriber got `gap {from: "0-0"}` although none had fallen behind.
    fo = fanout()
    sessions = [connect() for _ in range(3)]
    for s, _ in sessions:
        sub(fo, s, "trades")
    publish(fo, "trades", 1, 300)
    flush(fo)
    for _, c in sessions:
        assert c.gaps == {}
        assert c.data("trades") == list(range(1, 301))
    publish(fo, "trades", 301, 302)
    flush(fo)
    for _, c in sessions:
        assert c.gaps == {} and c.data("trades")[-3:] == [300, 301, 302]


def test_a_burst_beyond_four_buffers_within_one_flush_is_a_gap_for_everyone() -> None:
    fo = fanout(buffer_events=8)  # holds 32 unflushed events at most
    sessions = [connect() for _ in range(3)]
    for s, _ in sessions:
        sub(fo, s, "trades")
    publish(fo, "trades", 1, 40)
    flush(fo)
    for _, c in sessions:
        assert c.log[0] == ("gap", ("0-0", format_pos(pos(8))))
        assert c.data("trades") == list(range(9, 41))


def test_a_bus_loss_gives_every_subscriber_a_gap() -> None:
    fo = fanout()
    s, c = connect()
    sub(fo, s, "trades")
    publish(fo, "trades", 1, 3)
    flush(fo)
    fo.lose("trades", pos(2))  # nothing lost: it holds everything up to 3
    assert flush(fo) == {}
    fo.lose("trades", pos(7))  # the bus dropped 4..7 while this worker was away
    publish(fo, "trades", 6, 7)  # replays at or before the floor are ignored
    publish(fo, "trades", 8, 9)
    flush(fo)
    assert c.gaps["trades"] == [(format_pos(pos(3)), format_pos(pos(7)))]
    assert c.data("trades") == [1, 2, 3, 8, 9]
    fo.lose("prices", pos(5))  # a state topic: ignored
    assert fo.topics["prices"].entries == {}


def test_a_new_epoch_sends_a_full_snap_of_the_stream() -> None:
    fo = fanout()
    s, c = connect()
    sub(fo, s, "trades")
    publish(fo, "trades", 1, 3)
    flush(fo)
    fo.reset("e2")
    publish(fo, "trades", 1, 2)
    flush(fo)
    snap = c.frames[-1][0]
    assert (snap["op"], snap["epoch"], snap["full"]) == ("snap", "e2", True)
    assert [d for _, d in snap["items"]] == [1, 2]
    publish(fo, "trades", 3, 3)
    flush(fo)
    assert c.data("trades") == [1, 2, 3]


# -- loaded for a sub (core rule 9, stream.py rule 6) -------------------------------------


def lazy() -> Fanout:
    return Fanout(EPOCH, history_of=history_of, lazy=True)


def events(first: int, last: int) -> list[tuple[int, str, bytes]]:
    return [(pos(n), "k", val(n)) for n in range(first, last + 1)]


def test_a_loaded_stream_merges_the_bus_history_under_the_live_events() -> None:
    fo = lazy()
    publish(fo, "trades", 1, 3)  # not held: ignored
    assert fo.topics == {}
    assert fo.begin_load("trades")
    publish(fo, "trades", 9, 10)  # live while the load is under way
    # the bus's history (5 retained of 9 published; 9 both in it and live)
    assert fo.load_stream("trades", EPOCH, events(5, 9), complete=False)
    s, c = connect()
    snap = sub(fo, s, "trades")
    assert snap["full"] and c.data("trades") == [6, 7, 8, 9, 10]  # the newest `history`
    assert sub(fo, s, "trades", since=pos(7))["items"] == [
        [format_pos(pos(n)), n] for n in (8, 9, 10)
    ]
    # before the oldest event held: it cannot be proved nothing was lost, a full snap
    assert sub(fo, s, "trades", since=pos(3))["full"] is True
    publish(fo, "trades", 11, 11)
    flush(fo)
    assert c.data("trades")[-2:] == [10, 11] and c.gaps == {}


def test_a_loaded_stream_with_its_whole_history_answers_any_since_exactly() -> None:
    fo = lazy()
    assert fo.begin_load("trades")
    assert fo.load_stream("trades", EPOCH, events(1, 3), complete=True)
    s, _ = connect()
    snap = sub(fo, s, "trades", since=0)
    assert (snap["full"], len(snap["items"])) == (False, 3)


def test_a_loaded_stream_without_history_proves_no_since_until_an_event_arrives() -> None:
    fo = lazy()
    assert fo.begin_load("logs")
    assert fo.load_stream("logs", EPOCH, [], complete=False)  # history 0: the bus kept none
    s, c = connect()
    assert sub(fo, s, "logs", since=pos(4))["full"] is True
    publish(fo, "logs", 6, 6)
    flush(fo)
    assert c.data("logs") == [6] and c.gaps == {}
    late, _ = connect()
    snap = sub(fo, late, "logs", since=pos(6))
    assert (snap["full"], snap["items"]) == (False, [])
