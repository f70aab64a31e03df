"""The load generator's frame decoding (loadtest/bench/subscriber.py `ProcState`):
what a bench client holds after the frames the engine sends it."""

from __future__ import annotations

from typing import Any

import msgpack

from loadtest.bench.subscriber import ProcState


class View:
    """What `ProcState.feed` needs of a bench client."""

    def __init__(self, *topics: str) -> None:
        self.views: dict[str, dict[str, Any]] = {t: {} for t in topics}
        self.epochs: dict[str, Any] = {}
        self.positions: dict[str, Any] = {}
        self.snapped: set[str] = set()
        self.ready = False


def pack(**msg: Any) -> bytes:
    out: bytes = msgpack.packb(msg)
    return out


def upd(topic: str, pos: str, **items: Any) -> bytes:
    return pack(op="upd", topic=topic, pos=pos, items=items)


def test_a_frame_of_several_messages_updates_each_topic_and_counts_every_value() -> None:
    st, c = ProcState(), View("a", "b")
    st.feed(c, pack(op="snap", topic="a", epoch="e", pos="1-0", full=True, items={"x": [1, 5]}))
    st.feed(c, pack(op="snap", topic="b", epoch="e", pos="1-0", full=True, items={}))
    assert c.ready
    st.measuring = True
    st.feed(c, upd("a", "2-0", x=[2, 7], y=[3, 7]) + upd("b", "3-0", z=[4, 8]) + upd("c", "4-0"))
    assert c.views == {"a": {"x": [2, 7], "y": [3, 7]}, "b": {"z": [4, 8]}}
    assert c.positions == {"a": "2-0", "b": "3-0"}
    assert st.frames == 3
    assert st.updates == 3  # x, y, z: a snap's values are not delivered updates
    assert st.samples == 3  # one latency sample per value (stamps 7, 7, 8)


def test_the_same_message_in_other_frames_is_decoded_once() -> None:
    st = ProcState()
    clients = [View("a", "b") for _ in range(3)]
    shared = upd("a", "2-0", x=[2, 7])
    st.feed(clients[0], shared)  # a frame of that one message
    st.feed(clients[1], shared + upd("b", "2-0", y=[3, 7]))
    st.feed(clients[2], upd("b", "2-0", z=[4, 7]) + shared)
    assert [c.views["a"] for c in clients] == [{"x": [2, 7]}] * 3
    assert len(st.mcache) == 3  # the shared message, and each one's other message


def test_an_undecodable_frame_is_counted_and_the_next_frames_decode() -> None:
    st, c = ProcState(), View("a")
    st.feed(c, upd("a", "2-0", x=[2, 7])[:-3])  # cut short
    st.feed(c, b"\xc1")  # never valid msgpack
    st.feed(c, upd("a", "3-0", x=[3, 7]))
    assert st.errors["undecodable"] == 2
    assert c.views["a"] == {"x": [3, 7]}


def test_control_messages_are_counted_not_cached() -> None:
    st, c = ProcState(), View("a")
    bye = pack(op="bye", reason="drain", retry_ms=100)
    st.feed(c, bye)
    st.feed(c, bye)
    st.feed(c, pack(op="err", code="rate_limited", message="slow down"))
    assert st.byes == 2
    assert st.errors["err:rate_limited"] == 1
    assert not st.mcache
