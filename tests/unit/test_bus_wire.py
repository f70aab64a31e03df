"""The hub's wire (engine/bus/wire.py): framing and message shapes, no socket."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.bus import wire
from engine.bus.base import History, Snapshot, Update
from engine.protocol.codec import NIL, make_pos

NOW_POS = make_pos(1_760_000_000_123, 7)  # a real position: about 73 bits, over msgpack's ints


def frames_of(*objs: object) -> bytes:
    return b"".join(wire.encode_frame(o) for o in objs)


def test_a_frame_is_a_big_endian_length_then_msgpack() -> None:
    frame = wire.encode_frame(("hello", "abc"))
    body = msgpack.packb(["hello", "abc"], use_bin_type=True)
    assert frame == len(body).to_bytes(4, "big") + body


def test_whole_frame() -> None:
    reader = wire.FrameReader()
    assert reader.feed(wire.encode_frame(("hello", "e1"))) == [("hello", "e1")]
    assert reader.buffered == 0


def test_byte_by_byte() -> None:
    data = frames_of(("hello", "e1"), ("d",), ("r", 3, [1, 2]))
    reader = wire.FrameReader()
    got: list[object] = []
    for i in range(len(data)):
        got.extend(reader.feed(data[i : i + 1]))
    assert got == [("hello", "e1"), ("d",), ("r", 3, (1, 2))]
    assert reader.buffered == 0


def test_several_frames_in_one_chunk_and_a_partial_one() -> None:
    data = frames_of(("a", 1), ("b", 2), ("c", b"\x00" * 100))
    reader = wire.FrameReader()
    assert reader.feed(data[:-10]) == [("a", 1), ("b", 2)]
    assert reader.buffered == len(wire.encode_frame(("c", b"\x00" * 100))) - 10
    assert reader.feed(data[-10:]) == [("c", b"\x00" * 100)]
    assert reader.buffered == 0


def test_a_split_header_waits_for_the_rest() -> None:
    frame = wire.encode_frame(("x",))
    reader = wire.FrameReader()
    assert reader.feed(frame[:2]) == []
    assert reader.feed(frame[2:]) == [("x",)]


@given(st.lists(st.integers(min_value=1, max_value=50), max_size=30))
def test_any_chunking_gives_the_same_messages(cuts: list[int]) -> None:
    messages = [("e", i, b"v" * i) for i in range(20)]
    data = frames_of(*messages)
    reader = wire.FrameReader()
    got: list[object] = []
    pos = 0
    for n in cuts:
        got.extend(reader.feed(data[pos : pos + n]))
        pos += n
    got.extend(reader.feed(data[pos:]))
    assert got == messages


def test_an_oversized_frame_is_refused_from_its_header() -> None:
    reader = wire.FrameReader(max_frame_bytes=100)
    assert reader.feed(wire.encode_frame(b"x" * 90)) == [b"x" * 90]  # under the limit: fine
    with pytest.raises(wire.WireError, match="over the limit"):
        reader.feed((101).to_bytes(4, "big"))  # refused before any body is buffered
    assert reader.buffered == 0


def test_an_undecodable_frame_is_an_error() -> None:
    reader = wire.FrameReader()
    with pytest.raises(wire.WireError):
        reader.feed(b"\x00\x00\x00\x01\xc1")  # 0xc1 is never valid msgpack
    with pytest.raises(wire.WireError):
        wire.FrameReader().feed(b"\x00\x00\x00\x02\x01\x02")  # two values in one frame
    with pytest.raises(wire.WireError):
        wire.FrameReader().feed(b"\x00\x00\x00\x02\x92\x01")  # a truncated array


def test_entries_round_trip_with_real_positions() -> None:
    entries = [
        ("prices.fx", "EURUSD", NOW_POS, b"\xcb" + b"\x01" * 8),
        ("t", "gone", NOW_POS + 1, NIL),
    ]
    (frame,) = wire.entry_frames(entries)
    (msg,) = wire.FrameReader().feed(frame)
    assert msg[0] == "e"
    assert wire.entries_of(msg[1]) == entries


def test_no_entries_no_frames() -> None:
    assert wire.entry_frames([]) == []


def test_a_big_batch_is_cut_into_frames_in_order() -> None:
    entries = [(f"t{i % 3}", f"k{i}", NOW_POS + i, b"v" * 1000) for i in range(1000)]
    frames = wire.entry_frames(entries, target_bytes=64 * 1024)
    assert len(frames) > 10
    assert all(len(f) <= 64 * 1024 for f in frames)
    got = [e for m in wire.FrameReader().feed(b"".join(frames)) for e in wire.entries_of(m[1])]
    assert got == entries


def test_an_entry_over_the_target_gets_its_own_frame() -> None:
    entries = [("t", "small", 1, b"s"), ("t", "big", 2, b"B" * 5000), ("t", "small2", 3, b"s")]
    frames = wire.entry_frames(entries, target_bytes=1000)
    got = [e for m in wire.FrameReader().feed(b"".join(frames)) for e in wire.entries_of(m[1])]
    assert got == entries
    assert sum(1 for f in frames if len(f) > 1000) == 1


def test_replies_round_trip() -> None:
    positions = [NOW_POS, NOW_POS + 1, make_pos(0, 1), 0]
    (msg,) = wire.FrameReader().feed(wire.published(9, positions))
    assert msg[:2] == ("r", 9) and wire.positions_of(msg[2]) == positions

    snap = Snapshot(
        epoch="ab12", pos=NOW_POS, items=[("a", NOW_POS - 1, b"\x01"), ("b", NOW_POS, NIL)]
    )
    (msg,) = wire.FrameReader().feed(wire.snapshot_reply(4, snap))
    assert msg[:2] == ("s", 4)
    assert wire.snapshot_of(msg) == Snapshot(epoch="ab12", pos=NOW_POS, items=list(snap.items))

    (msg,) = wire.FrameReader().feed(wire.failed(5, "bad_request", "nope"))
    assert msg == ("x", 5, "bad_request", "nope")

    history = History("ab12", [(NOW_POS - 1, "", b"\x01"), (NOW_POS, "k", NIL)], False)
    (msg,) = wire.FrameReader().feed(wire.history_reply(6, history))
    assert msg[:2] == ("y", 6)
    assert wire.history_of(msg) == History("ab12", list(history.events), False)


def test_floors_round_trip_in_frames_of_bounded_size() -> None:
    floors = [(f"ev.t{i}", NOW_POS + i) for i in range(wire.FLOORS_PER_FRAME + 3)]
    frames = wire.floor_frames(floors)
    assert len(frames) == 2
    got = [wire.floors_of(m[1]) for m in wire.FrameReader().feed(b"".join(frames))]
    assert [f for part in got for f in part] == floors
    assert wire.floor_frames([]) == []


def test_requests_parse() -> None:
    reader = wire.FrameReader()
    frames = (
        wire.handshake(True)
        + wire.publish_request(1, [Update("t", "k", b"\x01"), Update("u", "", NIL)])
        + wire.snapshot_request(2, "t")
        + wire.history_request(3, "ev", NOW_POS, None)
        + wire.history_request(4, "ev", 0, 10)
    )
    parsed = [wire.parse_request(m) for m in reader.feed(frames)]
    assert parsed == [
        wire.Handshake(True),
        wire.PublishRequest(1, (("t", "k", b"\x01"), ("u", "", NIL))),
        wire.SnapshotRequest(2, "t"),
        wire.HistoryRequest(3, "ev", NOW_POS, None),
        wire.HistoryRequest(4, "ev", 0, 10),
    ]


@pytest.mark.parametrize(
    ("msg", "request_id"),
    [
        ("not an array", None),
        ((), None),
        ((1, 2), None),
        (("h",), None),
        (("h", 1), None),
        (("zz", 1, 2), None),
        (("p", -1, ()), None),
        (("p", True, ()), None),
        (("p", 1), None),
        (("p", 3, "x"), 3),
        (("p", 3, (("t", "k"),)), 3),
        (("p", 3, (("t", "k", "str, not bin"),)), 3),
        (("p", 3, (("t", 5, b"x"),)), 3),
        (("s", 4, 5), 4),
        (("y", -1, "t", 0, 0, -1), None),
        (("y", 5, "t", 0, 0), 5),
        (("y", 5, 7, 0, 0, -1), 5),
        (("y", 5, "t", 0, 2**32, -1), 5),
        (("y", 5, "t", -1, 0, -1), 5),
        (("y", 5, "t", 0, 0, -2), 5),
        (("y", 5, "t", 0, 0, "all"), 5),
    ],
)
def test_bad_requests_are_refused(msg: object, request_id: int | None) -> None:
    with pytest.raises(wire.WireError) as info:
        wire.parse_request(msg)
    assert info.value.request_id == request_id
    assert info.value.code == "bad_request"
