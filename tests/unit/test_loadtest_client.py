"""The load tools' client (loadtest/client.py): what a bench client holds after the
frames the engine sends it (the probes' sink, `CountingSink`), counting clients that
decode nothing, and the snapshot check that ends their run."""

from __future__ import annotations

from typing import Any

import msgpack

from loadtest.client import (
    CountingSink,
    DecodingSink,
    SnapshotSink,
    listener_class,
    snapshot_matches,
)


class View:
    """What `CountingSink.feed` needs of a bench client."""

    def __init__(self, *topics: str) -> None:
        self.views: dict[str, dict[str, Any]] = {t: {} for t in topics}
        self.epochs: dict[str, Any] = {}
        self.positions: dict[str, Any] = {}
        self.order_keys: dict[str, tuple[int, int]] = {}
        self.snapped: set[str] = set()
        self.ready = False


def pack(**msg: Any) -> bytes:
    out: bytes = msgpack.packb(msg)
    return out


def upd(topic: str, pos: str, **items: Any) -> bytes:
    return pack(op="upd", topic=topic, pos=pos, items=items)


def test_a_frame_of_several_messages_updates_each_topic_and_counts_every_value() -> None:
    st, c = CountingSink(), View("a", "b")
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
    st = CountingSink()
    clients = [View("a", "b") for _ in range(3)]
    shared = upd("a", "2-0", x=[2, 7])
    st.feed(clients[0], shared)  # a frame of that one message
    st.feed(clients[1], shared + upd("b", "2-0", y=[3, 7]))
    st.feed(clients[2], upd("b", "2-0", z=[4, 7]) + shared)
    assert [c.views["a"] for c in clients] == [{"x": [2, 7]}] * 3
    assert len(st.ucache) == 3  # the shared message, and each one's other message


def test_an_undecodable_frame_is_counted_and_the_next_frames_decode() -> None:
    st, c = CountingSink(), View("a")
    st.feed(c, upd("a", "2-0", x=[2, 7])[:-3])  # cut short
    st.feed(c, b"\xc1")  # never valid msgpack
    st.feed(c, upd("a", "3-0", x=[3, 7]))
    assert st.errors["undecodable"] == 2
    assert c.views["a"] == {"x": [3, 7]}


def test_control_messages_are_counted_not_cached() -> None:
    st, c = CountingSink(), View("a")
    bye = pack(op="bye", reason="drain", retry_ms=100)
    st.feed(c, bye)
    st.feed(c, bye)
    st.feed(c, pack(op="err", code="rate_limited", message="slow down"))
    assert st.byes == 2
    assert st.errors["err:rate_limited"] == 1
    assert not st.mcache


# -- the listener: one for every tool -------------------------------------------------------


class Frame:
    """What the listener reads of a picows frame."""

    def __init__(self, msg_type: Any, payload: bytes = b"", fin: bool = True, code: int = 0):
        self.msg_type, self.fin, self.payload, self.code = msg_type, fin, payload, code
        self.rsv1 = False  # permessage-deflate: tests/conformance/test_rfc7692_deflate.py

    def get_payload_as_bytes(self) -> bytes:
        return self.payload

    def get_close_code(self) -> int:
        return self.code


class Transport:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, bytes]] = []
        self.closes: list[int] = []
        self.disconnects = 0

    def send(self, mtype: Any, payload: bytes) -> None:
        self.sent.append((mtype, payload))

    def send_close(self, code: int) -> None:
        self.closes.append(code)

    def disconnect(self, graceful: bool = True) -> None:
        self.disconnects += 1


def test_the_listener_subscribes_on_connect_and_reassembles_a_fragmented_message() -> None:
    from picows import WSMsgType

    st = CountingSink()
    c = listener_class()(st, ["a"], max_hz=5, since={"a": ["e", "1-0"]})
    t = Transport()
    c.on_ws_connected(t)
    ((mtype, sub),) = t.sent
    assert mtype == WSMsgType.BINARY
    assert msgpack.unpackb(sub) == {
        "op": "sub", "topics": ["a"], "id": 1, "max_hz": 5, "since": {"a": ["e", "1-0"]},
    }  # fmt: skip
    whole = upd("a", "2-0", x=[2, 7])
    c.on_ws_frame(t, Frame(WSMsgType.BINARY, whole[:5], fin=False))
    c.on_ws_frame(t, Frame(WSMsgType.CONTINUATION, whole[5:9], fin=False))
    assert st.frames == 0  # nothing is fed before the last fragment
    c.on_ws_frame(t, Frame(WSMsgType.CONTINUATION, whole[9:], fin=True))
    c.on_ws_frame(t, Frame(WSMsgType.BINARY, upd("a", "3-0", y=[3, 7])))
    assert st.frames == 2
    assert c.views == {"a": {"x": [2, 7], "y": [3, 7]}}
    c.on_ws_frame(t, Frame(WSMsgType.TEXT, b"{}"))
    assert st.errors["frame:TEXT"] == 1


def test_a_server_close_is_answered_and_counted_a_dropped_client_is_not() -> None:
    from picows import WSMsgType

    st = CountingSink()
    cls = listener_class()
    closed, dropped, slow = cls(st, ["a"]), cls(st, ["a"]), cls(st, ["a"], slow=True)
    for c in (closed, dropped, slow):
        c.on_ws_connected(Transport())
    t = closed.transport
    closed.on_ws_frame(t, Frame(WSMsgType.CLOSE, code=4001))
    assert t.closes == [4001] and t.disconnects == 1
    closed.on_ws_disconnected(t)
    closed.on_ws_disconnected(t)  # once only
    dropped.drop()
    assert dropped.transport.disconnects == 1
    dropped.on_ws_disconnected(dropped.transport)
    slow.on_ws_disconnected(slow.transport)
    assert st.close_codes == {4001: 1}
    assert st.slow_close_codes == {1006: 1}
    assert st.closed == 2


class Recorder(DecodingSink):
    def __init__(self) -> None:
        self.seen: list[tuple[Any, bool]] = []
        self.bad_payloads: list[str] = []

    def message(self, client: Any, msg: Any, now_ns: int, size: int) -> None:
        self.seen.append((msg.get("op"), client.ready))

    def bad(self, client: Any, error: str, size: int) -> None:
        self.bad_payloads.append(error)


def test_decoding_mode_hands_every_message_and_marks_snaps_first() -> None:
    sink = Recorder()
    c = listener_class()(sink, ["a", "b"])
    snap_a = pack(op="snap", topic="a", epoch="e", pos="1-0", full=True, items={})
    snap_b = pack(op="snap", topic="b", epoch="e", pos="1-0", full=True, items={})
    sink.feed(c, snap_a + upd("a", "2-0", x=[2, 7]))
    sink.feed(c, snap_b)
    sink.feed(c, upd("b", "3-0")[:-2])
    assert sink.seen == [("snap", False), ("upd", False), ("snap", True)]
    assert c.snapped == {"a", "b"} and c.ready
    assert len(sink.seen) == 3  # a message cut short is not handed over
    sink.feed(c, b"\xc1")  # never valid msgpack
    assert len(sink.bad_payloads) == 1


# -- probes and counting clients (issue 13, item 1) -----------------------------------------


class SizeOnly(Frame):
    """A frame whose payload must not be copied: a counting client reads its size only."""

    @property
    def payload_size(self) -> int:
        return len(self.payload)

    def get_payload_as_bytes(self) -> bytes:
        raise AssertionError("a counting client copied a payload")


def snap(topic: str, **items: Any) -> bytes:
    return pack(op="snap", topic=topic, epoch="e", pos="1-0", full=True, items=items)


def test_a_counting_client_counts_frames_and_bytes_without_decoding_and_a_probe_decodes() -> None:
    from picows import WSMsgType

    st = CountingSink()
    cls = listener_class()
    probe, counter = cls(st, ["a"]), cls(st, ["a"])
    for c in (probe, counter):
        c.on_ws_connected(Transport())
        c.on_ws_frame(c.transport, Frame(WSMsgType.BINARY, snap("a", x=[1, 5])))
    assert probe.ready and counter.ready  # both decoded their snap
    counter.count()
    frame = upd("a", "2-0", x=[2, 7])
    counter.on_ws_frame(counter.transport, SizeOnly(WSMsgType.BINARY, frame))
    counter.on_ws_frame(counter.transport, SizeOnly(WSMsgType.BINARY, frame + frame))
    probe.on_ws_frame(probe.transport, Frame(WSMsgType.BINARY, frame))
    assert (counter.frames, counter.bytes) == (2, 3 * len(frame))
    assert counter.views == {"a": {"x": [1, 5]}}  # not decoded
    assert probe.views == {"a": {"x": [2, 7]}} and probe.frames == 0
    assert st.frames == 3  # the two snaps and the probe's frame
    counter.on_ws_frame(counter.transport, SizeOnly(WSMsgType.CLOSE, code=1001))
    counter.on_ws_disconnected(counter.transport)
    assert st.close_codes == {1001: 1}  # a counting client's close is still counted


def test_a_probe_counts_an_update_whose_position_goes_backwards() -> None:
    st, c = CountingSink(), View("a")
    st.feed(c, snap("a"))
    st.feed(c, upd("a", "1700000000001-0", x=[1, 7]))
    st.feed(c, upd("a", "1700000000001-10", x=[2, 7]))
    assert st.errors["order"] == 0  # 10 after 0: numbers, not text
    st.feed(c, upd("a", "1700000000000-99", x=[3, 7]))
    assert st.errors["order"] == 1


def test_resubscribing_sends_the_sub_again_and_the_snapshot_is_compared_with_the_finals() -> None:
    from picows import WSMsgType

    st = CountingSink()
    cls = listener_class()
    finals = {"a": {"x": 9, "y": 4}, "b": {"z": 3}}
    good, stale, partial = (cls(st, ["a", "b"], since={"a": ["e", "1-0"]}) for _ in range(3))
    check = SnapshotSink(st)
    for c in (good, stale, partial):
        c.on_ws_connected(Transport())
        c.count(4096)  # no socket here: no SO_RCVLOWAT, still counting
        assert c.counting
        c.resubscribe(check)
        assert not c.counting and not c.ready
        (_, again) = c.transport.sent[-1]
        assert msgpack.unpackb(again) == {"op": "sub", "topics": ["a", "b"], "id": 1}
    for c, x in ((good, 9), (stale, 8)):  # stale: a snap that differs from the finals
        c.on_ws_frame(c.transport, Frame(WSMsgType.BINARY, snap("a", x=[x, 1], y=[4, 1])))
        c.on_ws_frame(c.transport, Frame(WSMsgType.BINARY, upd("a", "2-0", x=[9, 2])))
        c.on_ws_frame(c.transport, Frame(WSMsgType.BINARY, snap("b", z=[3, 1])))
    partial.on_ws_frame(partial.transport, Frame(WSMsgType.BINARY, snap("a", x=[9, 1], y=[4, 1])))
    assert good.ready and stale.ready and not partial.ready
    assert check.matched(good, finals)
    assert not check.matched(stale, finals)  # a later upd does not make its snap right
    assert not check.matched(partial, finals)  # no snap of b
    good.on_ws_disconnected(good.transport)
    assert not check.matched(good, finals)  # closed
    assert st.closed == 1


def test_snapshot_matches_wants_every_topic_and_the_final_seq_of_every_key() -> None:
    finals = {"a": {"x": 2}, "b": {}}
    assert snapshot_matches({"a": {"x": [2, 0], "w": [1, 0]}, "b": {}}, ["a", "b"], finals)
    assert not snapshot_matches({"a": {"x": [2, 0]}}, ["a", "b"], finals)
    assert not snapshot_matches({"a": {"x": [1, 0]}, "b": {}}, ["a", "b"], finals)
    assert not snapshot_matches({"a": {"x": "2"}, "b": {}}, ["a", "b"], finals)
    assert not snapshot_matches({"a": {}, "b": {}}, ["a", "b"], finals)


# -- the probes' fast path (rule 9): the same checks as message by message ------------


def test_a_position_going_backwards_inside_a_frame_of_updates_is_counted() -> None:
    st, c = CountingSink(), View("a", "b")
    st.feed(c, snap("a") + snap("b"))
    st.feed(c, upd("a", "5-0", x=[1, 7]) + upd("b", "5-0", y=[1, 7]))
    assert st.errors["order"] == 0
    st.feed(c, upd("b", "6-0", y=[2, 7]) + upd("a", "4-9", x=[0, 7]))  # a goes back
    assert st.errors["order"] == 1
    assert c.positions == {"a": "4-9", "b": "6-0"}


def test_an_update_older_than_the_snap_is_counted() -> None:
    st, c = CountingSink(), View("a")
    st.feed(c, pack(op="snap", topic="a", epoch="e", pos="9-0", full=True, items={}))
    st.feed(c, upd("a", "8-0", x=[1, 7]))
    assert st.errors["order"] == 1


def test_a_probe_missing_the_last_value_of_a_key_has_not_converged() -> None:
    from loadtest.bench.subscriber import converged

    st, c = CountingSink(), View("a")
    st.feed(c, snap("a", x=[1, 5]))
    st.feed(c, upd("a", "2-0", x=[2, 7], y=[3, 7]))
    shared = upd("a", "3-0", y=[4, 8])
    st.feed(View("a"), shared)  # the message is cached: a second probe gets it decoded
    assert converged(c, {"a": {"x": 2, "y": 3}})
    assert not converged(c, {"a": {"x": 2, "y": 4}})  # y's last value never came
    st.feed(c, shared)
    assert converged(c, {"a": {"x": 2, "y": 4}})
    assert not converged(c, {"a": {"x": 2, "y": 4, "z": 1}})  # a key it never had


def test_a_frame_mixing_updates_and_a_snap_takes_the_general_path() -> None:
    st, c = CountingSink(), View("a", "b")
    st.feed(c, snap("a"))
    st.feed(c, upd("a", "2-0", x=[2, 7]) + snap("b", z=[1, 5]) + upd("b", "3-0", z=[2, 8]))
    assert c.ready and c.views == {"a": {"x": [2, 7]}, "b": {"z": [2, 8]}}
    assert st.updates == 2 and st.errors == {}


def test_the_head_of_an_update_inside_a_value_does_not_split_the_message() -> None:
    from loadtest.client import _UPD_HEAD

    st, c = CountingSink(), View("a")
    st.feed(c, snap("a"))
    st.measuring = True
    odd = b"x" + _UPD_HEAD + b"y"
    frame = upd("a", "2-0", x=[2, 7], note=odd) + upd("a", "3-0", x=[3, 8])
    st.feed(c, frame[:-1])  # cut short: its first message applies, the rest is undecodable
    assert c.views["a"] == {"x": [2, 7], "note": odd} and st.updates == 2
    st.feed(c, frame)
    assert c.views["a"] == {"x": [3, 8], "note": odd}
    assert c.positions["a"] == "3-0"
    assert st.updates == 5 and st.samples == 3  # note is not a [seq, stamp] value
    assert st.errors == {"undecodable": 1}
