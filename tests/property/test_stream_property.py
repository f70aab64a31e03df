"""Properties of stream topics in the fan-out core (engine/fanout/stream.py, core.py).

Random runs of bus events, flush ticks, back-pressure (paused sessions,
writers that refuse) and (re)subscriptions with and without `since`. Every
frame a client is written is checked as it arrives, against the list of every
event the bus published:

- never a silent skip: each `evt` event is the very next event after the
  client's position, and a `gap` starts exactly at its position and ends
  before the next event it receives; so every event is either received once,
  in order, or inside a gap the client was told about;
- a `snap` with a `since` the history reaches holds exactly the events after
  it (`full: false`); otherwise the newest `history` events (`full: true`);
- the worker's buffer never holds more than UNFLUSHED_FACTOR * max(history,
  buffer) events, nor more than max(history, buffer) of those a flush planned,
  and nothing is kept per session;
- a client that never fell behind (period 1, never paused, never refusing)
  gets no gap unless more than UNFLUSHED_FACTOR buffers were published
  between two flushes (finding 10 of issue 11).

After a final resume and flush every client is at the topic's position.
"""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.fanout.core import Fanout, Session
from engine.fanout.stream import UNFLUSHED_FACTOR, StreamState
from engine.protocol.codec import decode_frame, make_pos, parse_pos

HISTORY = 3
BUFFER = 8
TOPIC = "s"
EPOCH = "e"


class Client:
    def __init__(self, published: list[int]) -> None:
        self.published = published  # every event position, in order
        self.refuse = False
        self.at = -1  # the client's position (-1: not subscribed yet)
        self.received = 0
        self.gaps = 0

    def write(self, frame: bytes) -> bool:
        if self.refuse:
            return False
        for m in decode_frame(frame):
            self.receive(m)
        return True

    def receive(self, m: dict[str, Any]) -> None:
        assert m["topic"] == TOPIC
        if m["op"] == "gap":
            frm, to = parse_pos(m["from"]), parse_pos(m["to"])
            assert frm == self.at, "a gap starts at the client's position"
            assert frm < to
            self.at = to
            self.gaps += 1
        elif m["op"] == "evt":
            assert m["items"]
            for p, _ in m["items"]:
                p = parse_pos(p)
                after = [q for q in self.published if q > self.at]
                assert after and after[0] == p, "an event is the next one after the position"
                self.at = p
                self.received += 1
        else:
            raise AssertionError(f"unexpected {m['op']}")

    def snap(self, msg: dict[str, Any], since: int | None) -> None:
        assert msg["op"] == "snap" and msg["epoch"] == EPOCH
        items = [parse_pos(p) for p, _ in msg["items"]]
        newest = self.published[-1] if self.published else 0
        if msg["full"]:
            assert items == self.published[-HISTORY:]
            assert parse_pos(msg["pos"]) == newest
        else:
            assert since is not None
            assert items == [q for q in self.published if q > since]
            # the history reached back to `since`: at most HISTORY events after it
            assert len(items) <= HISTORY
        self.at = parse_pos(msg["pos"])


ops = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(1, 20)),
        st.tuples(st.just("flush"), st.just(0)),
        st.tuples(st.just("pause"), st.integers(0, 1)),
        st.tuples(st.just("resume"), st.integers(0, 1)),
        st.tuples(st.just("refuse"), st.integers(0, 1)),
        st.tuples(st.just("accept"), st.integers(0, 1)),
        st.tuples(st.just("resub"), st.integers(0, 1)),
        st.tuples(st.just("resub_since"), st.integers(0, 1)),
        st.tuples(st.just("resub_old"), st.integers(0, 1)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops, periods=st.tuples(st.sampled_from((1, 2)), st.sampled_from((1, 3))))
def test_every_event_is_received_in_order_or_named_in_a_gap(
    ops: list[tuple[str, int]], periods: tuple[int, int]
) -> None:
    fo = Fanout(EPOCH, history_of=lambda t: HISTORY, stream_buffer_events=BUFFER)
    published: list[int] = []
    clients = [Client(published) for _ in range(2)]
    sessions = [Session(c) for c in clients]
    seq = 0
    burst = max_burst = 0  # events published between two flushes
    kept_up = [periods[i] == 1 for i in range(2)]  # never paused, never refusing

    def subscribe(i: int, since: int | None) -> None:
        snap, n = fo.subscribe(
            sessions[i], TOPIC, None if since is None else (EPOCH, since), periods[i]
        )
        (msg,) = decode_frame(snap)
        assert n == len(msg["items"])
        clients[i].snap(msg, since)

    def flush() -> None:
        nonlocal burst
        burst = 0
        plan = fo.collect()
        for s, deliveries in plan.items():
            assert len(deliveries) == 1
            fo.deliver(s, deliveries)

    for i in range(2):
        subscribe(i, None)
    for op, arg in ops:
        if op == "publish":
            for _ in range(arg):
                seq += 1
                p = make_pos(1000 + seq // 3, seq % 3)
                published.append(p)
                fo.apply(TOPIC, "k", p, msgpack.packb(seq))
            burst += arg
            max_burst = max(max_burst, burst)
        elif op == "flush":
            flush()
        elif op == "pause":
            sessions[arg].paused = True
            kept_up[arg] = False
        elif op == "resume":
            fo.resume(sessions[arg])
        elif op == "refuse":
            clients[arg].refuse = True
            kept_up[arg] = False
        elif op == "accept":
            clients[arg].refuse = False
        elif op == "resub":
            subscribe(arg, None)
        elif op == "resub_since":
            subscribe(arg, clients[arg].at)
        else:  # a mark older than the history (or the very start)
            subscribe(arg, published[-HISTORY - 2] if len(published) > HISTORY + 1 else 0)
        t = fo.topics[TOPIC]
        assert isinstance(t, StreamState)
        assert len(t.events) <= UNFLUSHED_FACTOR * max(HISTORY, BUFFER)
        planned = sum(1 for p, _ in t.events if p <= t.sent_mark)
        assert planned <= max(HISTORY, BUFFER) or op != "publish"
    if max_burst <= UNFLUSHED_FACTOR * max(HISTORY, BUFFER):
        for i in range(2):
            if kept_up[i]:
                assert clients[i].gaps == 0, "a gap for a client that kept up"

    for i in range(2):
        clients[i].refuse = False
        fo.resume(sessions[i])
    for _ in range(6):  # long enough for every period to come due
        flush()
    for c in clients:
        assert c.at == (published[-1] if published else 0)
    assert fo.collect() == {}
