"""engine/bus/redis/layout.py: key names and reply parsing of the redis bus, without Redis."""

from __future__ import annotations

import re

import msgpack
import pytest

from engine.bus.base import shard_of
from engine.bus.redis import layout as layout_module
from engine.bus.redis.layout import (
    BadEntry,
    Layout,
    entries_of,
    newer_layout,
    parse_events,
    parse_state,
    pos_of,
    text_of,
)
from engine.protocol.codec import make_pos


def test_stream_ids_are_positions() -> None:
    assert pos_of(b"1700000000123-7") == make_pos(1700000000123, 7)
    assert pos_of("0-0") == 0
    raw = {b"b": b"5-1 \x02", b"a": b"5-0 \xc0", b"c": b"4-9 two words"}
    assert parse_state(raw) == [
        ("c", make_pos(4, 9), b"two words"),
        ("a", make_pos(5, 0), b"\xc0"),
        ("b", make_pos(5, 1), b"\x02"),
    ]


def test_a_state_value_written_with_a_request_offset_has_its_own_position() -> None:
    """Rule 6: "<id>+<j>" is the request's first position plus j; "<id>" (layout 1) as is."""
    raw = {b"a": b"9-4+2 \x01", b"b": b"9-4 \x02", b"c": b"9-4+1 with space"}
    assert parse_state(raw) == [
        ("b", make_pos(9, 4), b"\x02"),
        ("c", make_pos(9, 5), b"with space"),
        ("a", make_pos(9, 6), b"\x01"),
    ]


def _batch(*runs: tuple[str, list[tuple[str, bytes]]]) -> dict[bytes, bytes]:
    packed = b"".join(msgpack.packb([t, [x for kd in kds for x in kd]]) for t, kds in runs)
    return {b"n": str(sum(len(kds) for _, kds in runs)).encode(), b"b": packed}


def test_a_batch_entry_is_its_updates_at_consecutive_positions_ending_at_its_id() -> None:
    """Rule 5: n updates, the last at the entry's ID, runs of one topic one after another."""
    fields = _batch(("t", [("a", b"\x01")]), ("u", [("b", b"\x02")]), ("t", [("a", b"\x03")]))
    assert entries_of(b"1700000000123-9", fields) == [
        ("t", "a", make_pos(1700000000123, 7), b"\x01"),
        ("u", "b", make_pos(1700000000123, 8), b"\x02"),
        ("t", "a", make_pos(1700000000123, 9), b"\x03"),
    ]


def test_runs_of_topics_the_sink_does_not_want_are_skipped_at_their_positions() -> None:
    """Rule 5: `wants(topic, updates)` is asked once per run; a refused run
    yields nothing and the others keep their positions."""
    asked: list[tuple[str, int]] = []

    def wants(topic: str, updates: int) -> bool:
        asked.append((topic, updates))
        return topic != "u"

    fields = _batch(("u", [("a", b"\x01"), ("b", b"\x02")]), ("t", [("a", b"\x03")]))
    assert entries_of(b"7-9", fields, wants) == [("t", "a", make_pos(7, 9), b"\x03")]
    assert asked == [("u", 2), ("t", 1)]
    assert entries_of(b"5-3", {b"t": b"u", b"k": b"k", b"d": b"\x01"}, wants) == []


def test_an_entry_past_msgpacks_default_buffer_bound_is_read_whole() -> None:
    """Rule 5: an entry holds up to a call's updates of up to bus.max_data_bytes
    each, more than msgpack's default 100 MiB buffer: its own size is the bound."""
    big = b"\x00" * (51 << 20)
    fields = _batch(("t", [("a", big), ("b", big)]))
    assert [(t, k, len(d)) for t, k, _, d in entries_of(b"7-1", fields)] == [
        ("t", "a", len(big)),
        ("t", "b", len(big)),
    ]


def test_an_entry_of_layout_1_is_one_update_at_its_id() -> None:
    fields = {b"t": b"t", b"k": b"\xff", b"d": b"\xc0"}
    assert entries_of(b"5-3", fields) == [("t", "\ufffd", make_pos(5, 3), b"\xc0")]


@pytest.mark.parametrize(
    "fields",
    [
        {b"x": b"1"},  # neither layout
        {b"n": b"2", b"b": msgpack.packb(["t", ["k", b"\x01"]])},  # fewer updates than n
        {b"n": b"1", b"b": msgpack.packb(["t", ["k", b"\x01"]])[:-1]},  # cut
        {b"n": b"1", b"b": msgpack.packb(["t", ["k", "not bytes"]])},
        {b"n": b"1", b"b": msgpack.packb(["t", [7, b"\x01"]])},
        {b"n": b"1", b"b": msgpack.packb([7, ["k", b"\x01"]])},
        {b"n": b"1", b"b": msgpack.packb(["t", ["k"]])},
        {b"n": b"1", b"b": msgpack.packb(["t", "k", b"\x01"])},
        {b"n": b"1", b"b": msgpack.packb(["t", 5])},
        {b"n": b"one", b"b": msgpack.packb(["t", ["k", b"\x01"]])},
        {b"n": b"1", b"b": msgpack.packb({"t": "k"})},
        {b"n": b"1", b"b": b"\xc1"},  # never used by msgpack
    ],
)
def test_an_unreadable_entry_is_bad_entry_and_nothing_else(fields: dict[bytes, bytes]) -> None:
    """Rule 5: the reader skips it and counts it; no other exception escapes."""
    with pytest.raises(BadEntry):
        entries_of(b"5-3", fields)


def test_history_rows_are_events() -> None:
    rows = [[b"7-0", [b"k", b"a", b"d", b"\x01"]], [b"7-1", [b"d", b"\xc0", b"k", b""]]]
    assert parse_events(rows) == [(make_pos(7, 0), "a", b"\x01"), (make_pos(7, 1), "", b"\xc0")]


def test_every_key_of_a_shard_shares_its_hash_tag() -> None:
    """Rule 1: a shard's keys live in one Redis Cluster slot."""
    lay = Layout("fx", 4)
    for s in range(4):
        names = [
            *lay.shard_keys[s],
            lay.state_key("t", s),
            lay.hist_key("t", s),
            lay.shard_prefix(s) + "anything",
        ]
        tags = {m.group(1) for n in names if (m := re.search(r"\{(.*?)\}", n)) is not None}
        assert tags == {f"s{s}"}
        assert all("{" in n for n in names)
        assert lay.shard_of_log[lay.logs[s].encode()] == s
    assert lay.shard_keys[0] == [
        "fx:{s0}:log",
        "fx:{s0}:topics",
        "fx:{s0}:streams",
        "fx:{s0}:meta",
        "fx:{s0}:expiry",
    ]
    assert lay.epoch_key == "fx:epoch"


def test_text_read_from_redis_never_fails() -> None:
    """Rule 3: bytes that are not UTF-8 become U+FFFD, never an exception."""
    assert text_of(b"caf\xc3\xa9") == "café"
    assert text_of(b"bad\xff") == "bad\ufffd"


def test_the_shard_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rule 4: topic names come from clients; the cache never passes its bound."""
    monkeypatch.setattr(layout_module, "SHARD_CACHE_MAX", 10)
    lay = Layout("fx", 8)
    for i in range(35):
        topic = f"t{i}"
        assert lay.shard(topic) == shard_of(topic, 8)
        assert len(lay._shard_cache) <= 10


def test_a_newer_layout_is_refused_an_older_or_absent_one_is_not() -> None:
    """Rule 7."""
    assert newer_layout(None) is None
    assert newer_layout(str(layout_module.VERSION).encode()) is None
    assert newer_layout(b"1") is None
    why = newer_layout(str(layout_module.VERSION + 1).encode())
    assert why is not None and "upgrade this node" in why
    assert newer_layout(b"two") is not None
