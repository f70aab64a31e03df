"""The hub's state (engine/bus/hubcore.py): positions per shard, latest values,
tombstones, stream topics' histories."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from engine.bus.base import History, shard_of
from engine.bus.hubcore import HubCore
from engine.protocol.codec import NIL, format_pos, make_pos

T = "prices.fx"


def two_topics_in_different_shards(shards: int) -> tuple[str, str]:
    names = (f"t{i}" for i in itertools.count())
    first = next(names)
    other = next(n for n in names if shard_of(n, shards) != shard_of(first, shards))
    return first, other


def test_same_ms_increments_seq_and_a_later_ms_resets_it() -> None:
    core = HubCore(4, "ep")
    got = [core.publish([(T, "k", b"\x01")], 1000)[0][2] for _ in range(3)]
    assert [format_pos(p) for p in got] == ["1000-0", "1000-1", "1000-2"]
    (entry,) = core.publish([(T, "k", b"\x02")], 1005)
    assert format_pos(entry[2]) == "1005-0"


def test_positions_keep_increasing_when_the_clock_goes_backwards() -> None:
    core = HubCore(1, "ep")
    a = core.publish([(T, "a", b"\x01")], 5000)[0][2]
    b = core.publish([(T, "b", b"\x01")], 4000)[0][2]  # clock stepped back
    c = core.publish([(T, "c", b"\x01")], 4999)[0][2]
    assert a < b < c
    assert [format_pos(p) for p in (a, b, c)] == ["5000-0", "5000-1", "5000-2"]


def test_the_first_position_is_never_zero() -> None:
    core = HubCore(1, "ep")
    (entry,) = core.publish([(T, "k", b"\x01")], 0)
    assert entry[2] > 0  # "0-0" means "nothing" to clients


def test_a_batch_gets_increasing_positions_in_its_order() -> None:
    core = HubCore(1, "ep")
    entries = core.publish([(T, "a", b"\x01"), (T, "b", b"\x02"), (T, "a", b"\x03")], 7)
    assert [(k, format_pos(p), d) for _, k, p, d in entries] == [
        ("a", "7-0", b"\x01"),
        ("b", "7-1", b"\x02"),
        ("a", "7-2", b"\x03"),
    ]
    assert core.snapshot(T).items == [
        ("b", make_pos(7, 1), b"\x02"),
        ("a", make_pos(7, 2), b"\x03"),
    ]


def test_shards_are_independent() -> None:
    core = HubCore(8, "ep")
    t1, t2 = two_topics_in_different_shards(8)
    p1 = core.publish([(t1, "k", b"\x01")], 10)[0][2]
    p2 = core.publish([(t2, "k", b"\x01")], 10)[0][2]
    assert p1 == p2 == make_pos(10, 0)  # each shard has its own sequence
    assert core.publish([(t1, "k", b"\x02")], 10)[0][2] == make_pos(10, 1)


def test_latest_value_wins_and_memory_is_bounded_by_keys() -> None:
    core = HubCore(4, "ep")
    for i in range(10_000):
        core.publish([(T, f"k{i % 10}", bytes([i % 256]))], 1000 + i // 7)
    state = core.state_entries()
    assert len(state) == 10 and core.key_count == 10 and core.entries == 10_000
    assert {k: d for _, k, _, d in state} == {f"k{j}": bytes([(9990 + j) % 256]) for j in range(10)}


def test_deletion_leaves_a_tombstone() -> None:
    core = HubCore(2, "ep")
    core.publish([(T, "gone", b"\x01"), (T, "kept", b"\x02")], 1)
    (deleted,) = core.publish([(T, "gone", NIL)], 2)
    snap = core.snapshot(T)
    assert snap.items == [("kept", make_pos(1, 1), b"\x02"), ("gone", deleted[2], NIL)]
    assert (T, "gone", deleted[2], NIL) in core.state_entries()


def test_snapshot_and_topic_pos() -> None:
    core = HubCore(2, "ep-1")
    assert core.topic_pos(T) == 0
    snap = core.snapshot(T)
    assert (snap.epoch, snap.pos, list(snap.items)) == ("ep-1", 0, [])
    core.publish([(T, "a", b"\x01")], 3)
    (last,) = core.publish([(T, "b", b"\x02")], 4)
    core.publish([("other.topic", "a", b"\x03")], 9)
    assert core.topic_pos(T) == last[2] == core.snapshot(T).pos
    assert core.snapshot(T).epoch == "ep-1"


def test_state_entries_are_in_position_order_per_topic() -> None:
    core = HubCore(3, "ep")
    for i in range(200):
        core.publish([(f"t{i % 4}", f"k{(i * 7) % 11}", b"\x01")], i // 3)
    per_topic: dict[str, list[int]] = {}
    for topic, _k, pos, _d in core.state_entries():
        per_topic.setdefault(topic, []).append(pos)
    assert per_topic and all(p == sorted(p) for p in per_topic.values())
    assert all(core.topic_pos(t) == p[-1] for t, p in per_topic.items())


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c", "d", "e"]), st.integers(0, 2**40)),
        min_size=1,
        max_size=200,
    )
)
def test_positions_strictly_increase_per_shard_whatever_the_clock(
    steps: list[tuple[str, int]],
) -> None:
    core = HubCore(2, "ep")
    last: dict[int, int] = {}
    for topic, now_ms in steps:
        (entry,) = core.publish([(topic, "k", b"\x01")], now_ms)
        shard = shard_of(topic, 2)
        assert entry[2] > last.get(shard, 0)
        assert entry[2] >= make_pos(now_ms, 0) or entry[2] == last[shard] + 1
        last[shard] = entry[2]


# -- stream topics (rule 5) -------------------------------------------------------------


def rules(topic: str) -> int | None:
    return {"ev.a": 3, "ev.none": 0}.get(topic)


def test_a_stream_topic_keeps_its_newest_history_events_and_its_floor() -> None:
    core = HubCore(2, "ep", rules)
    positions = [core.publish([("ev.a", "", bytes([i]))], 1000 + i)[0][2] for i in range(5)]
    h = core.history("ev.a", 0, None)
    assert h is not None
    assert list(h.events) == [(positions[i], "", bytes([i])) for i in (2, 3, 4)]
    assert h.complete is False and h.epoch == "ep"
    assert core.floors() == [("ev.a", positions[1])]
    # the dump: its retained events, no per-key state, none for the state topic
    core.publish([(T, "k", b"\x01")], 2000)
    assert [e[2] for e in core.state_entries() if e[0] == "ev.a"] == positions[2:]
    assert core.snapshot("ev.a").items == [] and core.key_count == 1
    assert core.topic_count == 2


def test_history_after_a_position_and_with_a_limit() -> None:
    core = HubCore(1, "ep", rules)
    positions = [core.publish([("ev.a", "k", b"\x01")], 1000 + i)[0][2] for i in range(5)]

    def got(since: int, limit: int | None) -> tuple[list[int], bool]:
        h = core.history("ev.a", since, limit)
        assert h is not None
        return [p for p, _, _ in h.events], h.complete

    assert got(positions[1], None) == (positions[2:], True)  # the floor itself: nothing lost
    assert got(positions[0], None) == (positions[2:], False)
    assert got(positions[3], None) == ([positions[4]], True)
    assert got(positions[4], None) == ([], True)
    assert got(positions[2], 1) == ([positions[4]], False)
    assert got(positions[2], 2) == (positions[3:], True)


def test_history_zero_keeps_nothing_and_a_state_topic_has_no_history() -> None:
    core = HubCore(1, "ep", rules)
    (e,) = core.publish([("ev.none", "", b"\x01")], 1000)
    assert core.floors() == [("ev.none", e[2])]
    assert core.state_entries() == []
    assert core.history("ev.none", 0, None) == History("ep", [], False)
    assert core.history("ev.a", 0, None) == History("ep", [], True)  # never written
    assert core.history(T, 0, None) is None
    core.publish([(T, "k", b"\x01")], 1001)
    assert core.history(T, 0, None) is None


def test_without_rules_every_topic_is_a_state_topic() -> None:
    core = HubCore(1, "ep")
    core.publish([("ev.a", "k", b"\x01"), ("ev.a", "k", b"\x02")], 1000)
    assert core.floors() == [] and core.key_count == 1
