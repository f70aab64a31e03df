"""The latest-state table of one topic (engine/fanout/state.py), rule by rule.

What a client would see is decoded from the packed items the table hands out:
`live_items` is a full snapshot, `changed_since` a recovery or an `upd`.
"""

from __future__ import annotations

from typing import Any

import msgpack

from engine.fanout.state import TopicState
from engine.protocol.codec import NIL, make_pos, pack_item

MS = 1_700_000_000_000  # a realistic millisecond: positions exceed 64 bits


def pos(n: int) -> int:
    return make_pos(MS + n, n % 3)


def val(obj: object) -> bytes:
    out: bytes = msgpack.packb(obj)
    return out


def decode_items(items: list[bytes]) -> list[tuple[str, Any]]:
    """The (key, value) pairs of packed items, in order (None for a deletion)."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(b"".join(items))
    flat = list(unpacker)
    return list(zip(flat[::2], flat[1::2], strict=True))


def live(t: TopicState) -> dict[str, Any]:
    return dict(decode_items(t.live_items()))


def positions(t: TopicState) -> list[int]:
    return [p for p, _, _ in t.entries.values()]


def test_a_new_topic_is_empty() -> None:
    t = TopicState("prices")
    assert t.pos == 0
    assert t.live == 0
    assert t.live_items() == []
    assert t.changed_since(0) == []
    assert t.packed_name == val("prices")


def test_latest_value_per_key_wins() -> None:
    t = TopicState("prices")
    assert t.apply("a", pos(1), val(1))
    assert t.apply("b", pos(2), val(2))
    assert t.apply("a", pos(3), val(3))
    assert live(t) == {"a": 3, "b": 2}
    assert len(t.entries) == 2
    assert t.pos == pos(3)


def test_replaying_an_entry_changes_nothing() -> None:
    t = TopicState("prices")
    assert t.apply("a", pos(1), val(1))
    before = dict(t.entries)
    assert not t.apply("a", pos(1), val(1))
    assert t.entries == before
    assert t.pos == pos(1)
    assert t.live == 1


def test_an_older_or_equal_position_is_ignored() -> None:
    t = TopicState("prices")
    t.apply("a", pos(5), val("new"))
    assert not t.apply("a", pos(4), val("old"))
    assert not t.apply("a", pos(5), val("same position, other data"))
    assert not t.apply("a", pos(4), NIL)  # an old deletion does not delete a newer value
    assert live(t) == {"a": "new"}
    assert t.pos == pos(5)


def test_out_of_order_applies_keep_entries_sorted_by_position() -> None:
    # A snapshot merged under the live stream brings keys older than the topic position.
    t = TopicState("prices")
    t.apply("live", pos(10), val("stream"))
    assert t.apply("snap1", pos(3), val("s1"))
    assert t.apply("snap2", pos(7), val("s2"))
    assert t.apply("snap0", pos(1), val("s0"))
    assert positions(t) == sorted(positions(t))
    assert list(t.entries) == ["snap0", "snap1", "snap2", "live"]
    assert t.pos == pos(10)  # never moves back
    assert [k for k, _ in decode_items(t.changed_since(pos(2)))] == ["snap1", "snap2", "live"]


def test_changed_since_is_the_keys_after_a_position_oldest_first_with_deletions() -> None:
    t = TopicState("prices")
    t.apply("a", pos(1), val(1))
    t.apply("b", pos(2), val(2))
    t.apply("c", pos(3), val(3))
    t.apply("a", pos(4), val(4))  # a moves to the newest end
    t.apply("b", pos(5), NIL)  # b deleted
    assert decode_items(t.changed_since(0)) == [("c", 3), ("a", 4), ("b", None)]
    assert decode_items(t.changed_since(pos(3))) == [("a", 4), ("b", None)]
    assert decode_items(t.changed_since(pos(4))) == [("b", None)]
    assert t.changed_since(pos(5)) == []
    assert t.changed_since(pos(99)) == []  # a position from the future: nothing


def test_changed_since_a_position_between_entries() -> None:
    t = TopicState("prices")
    t.apply("a", make_pos(MS, 0), val(1))
    t.apply("b", make_pos(MS + 10, 0), val(2))
    assert decode_items(t.changed_since(make_pos(MS + 5, 7))) == [("b", 2)]


def test_a_deletion_is_a_tombstone_left_out_of_live_items() -> None:
    t = TopicState("prices")
    t.apply("a", pos(1), val(1))
    t.apply("b", pos(2), val(2))
    t.apply("a", pos(3), NIL)
    assert live(t) == {"b": 2}
    assert t.live == 1
    assert len(t.entries) == 2  # the tombstone keeps a's position
    assert t.entries["a"][2] is True
    # Deleting a key that was never seen still records the tombstone (for `since`).
    t.apply("ghost", pos(4), NIL)
    assert t.live == 1
    assert decode_items(t.changed_since(pos(3))) == [("ghost", None)]
    # A deleted key may come back.
    t.apply("a", pos(5), val("back"))
    assert live(t) == {"b": 2, "a": "back"}
    assert t.live == 2


def test_deleting_twice_counts_once() -> None:
    t = TopicState("prices")
    t.apply("a", pos(1), val(1))
    t.apply("a", pos(2), NIL)
    t.apply("a", pos(3), NIL)
    assert t.live == 0
    assert t.live_items() == []


def test_memory_is_bounded_by_keys_not_updates() -> None:
    t = TopicState("prices")
    for n in range(1, 10_001):
        t.apply(f"k{n % 100}", pos(n), NIL if n % 7 == 0 else val(n))
    assert len(t.entries) == 100
    assert t.pos == pos(10_000)
    assert t.live == len(t.live_items())
    assert positions(t) == sorted(positions(t))


def test_items_splice_the_publisher_bytes_unchanged() -> None:
    # A non-canonical encoding (int 1 as int8) must come out exactly as it went in.
    data = b"\xd0\x01"
    t = TopicState("prices")
    t.apply("a", pos(1), data)
    assert t.live_items() == [pack_item("a", data)]
    assert t.live_items()[0].endswith(data)


def test_clear_forgets_every_key_for_a_new_epoch() -> None:
    t = TopicState("prices")
    t.apply("a", pos(5), val(1))
    t.apply("b", pos(6), NIL)
    t.clear()
    assert t.entries == {}
    assert t.pos == 0
    assert t.live == 0
    # Positions of the new epoch may be lower than the old ones.
    assert t.apply("a", pos(1), val("new epoch"))
    assert live(t) == {"a": "new epoch"}
