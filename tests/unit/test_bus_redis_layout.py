"""engine/bus/redis/layout.py: key names and reply parsing of the redis bus, without Redis."""

from __future__ import annotations

import re

import pytest

from engine.bus.base import shard_of
from engine.bus.redis import layout as layout_module
from engine.bus.redis.layout import Layout, parse_events, parse_state, pos_of, text_of
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
