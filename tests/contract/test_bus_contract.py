"""The bus contract (engine/bus/base.py, guarantees 1-6), for every backend.

Written against the `Bus` interface only: clients come from `create_bus`,
the bus is started and stopped through `bus_env`.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import msgpack
import pytest

from engine.bus import Bus, Snapshot, Update, shard_of
from engine.errors import BusError, BusUnavailable
from engine.protocol.codec import NIL
from tests.contract.conftest import STREAM_HISTORY, BusEnv, Recorder, until

TOPICS = ("prices.fx", "prices.rates", "scores.live", "dash.cpu", "dash.mem")


def val(x: object) -> bytes:
    return msgpack.packb(x, use_bin_type=True)


def snap_state(snap: Snapshot) -> dict[str, tuple[int, bytes]]:
    return {key: (pos, data) for key, pos, data in snap.items}


async def publish_many(bus_env: BusEnv, n: int) -> list[tuple[Update, int]]:
    """Publish `n` updates over TOPICS in batches of 1..4, without awaiting each one."""
    pub = await bus_env.client(want_entries=False)
    batches: list[list[Update]] = []
    answers: dict[int, object] = {}
    sent = 0
    while sent < n:
        size = min(1 + len(batches) % 4, n - sent)
        batch = [
            Update(TOPICS[(sent + i) % len(TOPICS)], f"k{(sent + i) % 7}", val(sent + i))
            for i in range(size)
        ]
        index = len(batches)
        pub.publish(batch, lambda r, i=index: answers.__setitem__(i, r))
        batches.append(batch)
        sent += size
    await until(lambda: len(answers) == len(batches), "every publish answered")
    out: list[tuple[Update, int]] = []
    for i, batch in enumerate(batches):
        positions = answers[i]
        assert isinstance(positions, list), positions
        out.extend(zip(batch, positions, strict=True))
    return out


async def test_entries_arrive_in_position_order_per_topic(bus_env: BusEnv) -> None:
    sink = Recorder()
    await bus_env.client(sink)
    published = await publish_many(bus_env, 300)
    await until(lambda: len(sink.entries) >= len(published), "all entries delivered")

    per_topic: dict[str, list[int]] = defaultdict(list)
    for topic, _key, pos, _data in sink.entries:
        per_topic[topic].append(pos)
    for topic, positions in per_topic.items():
        assert positions == sorted(positions), topic
        assert len(set(positions)) == len(positions), f"{topic}: positions must strictly increase"
    # Topics of one shard share one increasing sequence as well.
    shards = bus_env.cfg.bus.shards
    per_shard: dict[int, list[int]] = defaultdict(list)
    for topic, _key, pos, _data in sink.entries:
        per_shard[shard_of(topic, shards)].append(pos)
    for positions in per_shard.values():
        assert all(a < b for a, b in itertools.pairwise(positions))
    # Published order is delivered order, per topic.
    sent_order: dict[str, list[bytes]] = defaultdict(list)
    for update, _pos in sorted(published, key=lambda p: p[1]):
        sent_order[update.topic].append(update.data)
    got_order: dict[str, list[bytes]] = defaultdict(list)
    for topic, _key, _pos, data in sink.entries:
        got_order[topic].append(data)
    assert got_order == sent_order


async def test_every_client_receives_every_entry(bus_env: BusEnv) -> None:
    sinks = [Recorder() for _ in range(3)]
    for sink in sinks:
        await bus_env.client(sink)
    published = await publish_many(bus_env, 120)
    expected = {(u.topic, pos) for u, pos in published}
    for sink in sinks:
        await until(lambda s=sink: expected <= s.marks(), "every entry at every client")
        assert sink.marks() == expected
        assert sink.links == [True]


async def test_publish_positions_name_the_delivered_entries(bus_env: BusEnv) -> None:
    sink = Recorder()
    await bus_env.client(sink)
    published = await publish_many(bus_env, 60)
    await until(lambda: len(sink.entries) >= len(published), "all entries delivered")
    delivered = {(topic, pos): (key, data) for topic, key, pos, data in sink.entries}
    for update, pos in published:
        assert delivered[(update.topic, pos)] == (update.key, update.data)


async def test_publish_wait_returns_one_position_per_update(bus_env: BusEnv) -> None:
    pub = await bus_env.client(want_entries=False)
    batch = [
        Update("a.one", "x", val(1)),
        Update("b.two", "y", val(2)),
        Update("a.one", "z", val(3)),
    ]
    positions = await pub.publish_wait(batch)
    assert len(positions) == 3
    assert positions[0] < positions[2]  # same topic: later in the batch, later in the log
    assert await pub.publish_wait([]) == []


async def test_a_batch_is_published_whole(bus_env: BusEnv) -> None:
    """Every update of an accepted batch is in the log and the state. (A link
    lost in the middle of a batch: the local hub applies a batch whole or not
    at all; the redis bus is atomic per shard only: engine/bus/redis/publisher.py
    rule 1.)"""
    sink = Recorder()
    await bus_env.client(sink)
    pub = await bus_env.client(want_entries=False)
    batch = [Update(t, "k", val(t)) for t in TOPICS]
    positions = await pub.publish_wait(batch)
    for update, pos in zip(batch, positions, strict=True):
        snap = await pub.snapshot(update.topic)
        assert snap_state(snap) == {"k": (pos, update.data)}
    marks = {(u.topic, p) for u, p in zip(batch, positions, strict=True)}
    await until(lambda: sink.marks() >= marks, "the whole batch delivered")


async def test_a_refused_batch_publishes_nothing(bus_env: BusEnv) -> None:
    sink = Recorder()
    await bus_env.client(sink)
    pub = await bus_env.client(want_entries=False)
    # An unencodable value (misuse: data must be msgpack bytes) fails the whole batch.
    bad = [Update("whole.a", "k", val(1)), Update("whole.b", "k", None)]
    with pytest.raises(BusError):
        await pub.publish_wait(bad)
    # The next publish is delivered; nothing of the refused batch came before it.
    marker = await pub.publish_wait([Update("whole.a", "after", val(2))])
    await until(lambda: ("whole.a", marker[0]) in sink.marks(), "the later publish delivered")
    assert [e[1] for e in sink.entries if e[0].startswith("whole.")] == ["after"]
    assert snap_state(await pub.snapshot("whole.b")) == {}
    assert set(snap_state(await pub.snapshot("whole.a"))) == {"after"}


async def test_snapshot_equals_the_state_built_from_entries(bus_env: BusEnv) -> None:
    sink = Recorder()
    await bus_env.client(sink)
    pub = await bus_env.client(want_entries=False)
    topic = "consistency.t"
    answers: list[object] = []
    for i in range(200):
        data = NIL if i % 17 == 0 else val(i)  # some deletions among the writes
        pub.publish([Update(topic, f"k{i % 13}", data)], answers.append)
    (last,) = await pub.publish_wait([Update(topic, "final", val("end"))])
    assert len(answers) == 200 and all(isinstance(a, list) for a in answers)
    await until(lambda: (topic, last) in sink.marks(), "stream caught up")
    snap = await pub.snapshot(topic)
    assert snap.epoch == pub.epoch
    assert snap_state(snap) == sink.topic_state(topic)
    assert snap.pos == max(pos for pos, _ in sink.topic_state(topic).values()) == last


async def test_snapshot_of_an_unknown_topic_is_empty(bus_env: BusEnv) -> None:
    pub = await bus_env.client(want_entries=False)
    snap = await pub.snapshot("never.written")
    assert (snap.pos, list(snap.items), snap.epoch) == (0, [], pub.epoch)


async def test_deletion_is_a_tombstone(bus_env: BusEnv) -> None:
    sink = Recorder()
    await bus_env.client(sink)
    pub = await bus_env.client(want_entries=False)
    (p1,) = await pub.publish_wait([Update("del.t", "gone", val("here"))])
    (p2,) = await pub.publish_wait([Update("del.t", "gone", NIL)])
    assert p2 > p1
    snap = await pub.snapshot("del.t")
    assert list(snap.items) == [("gone", p2, NIL)]
    await until(lambda: ("del.t", p2) in sink.marks(), "deletion delivered")
    assert sink.state[("del.t", "gone")] == (p2, NIL)


async def test_a_reconnecting_client_converges_by_position(bus_env: BusEnv) -> None:
    sink = Recorder()
    first = await bus_env.client(sink)
    published = await publish_many(bus_env, 80)
    await until(lambda: len(sink.entries) >= len(published), "all entries delivered")
    before = dict(sink.state)
    epoch = first.epoch
    await first.close()

    # The same sink (what a worker keeps) on a new connection: replays are harmless.
    again = await bus_env.client(sink)
    assert again.epoch == epoch
    if again.holds_all_state:
        assert sink.replayed >= len(before), "the state is delivered again on connect"
    pub = await bus_env.client(want_entries=False)
    (p,) = await pub.publish_wait([Update(TOPICS[0], "k0", val("newest"))])
    await until(lambda: (TOPICS[0], p) in sink.marks(), "live entry after reconnect")
    expected = {**before, (TOPICS[0], "k0"): (p, val("newest"))}
    assert sink.state == expected
    for topic in TOPICS:
        assert snap_state(await pub.snapshot(topic)) == sink.topic_state(topic)


async def test_publish_while_the_bus_is_down_fails_and_publishes_nothing(bus_env: BusEnv) -> None:
    sink = Recorder()
    watcher = await bus_env.client(sink)
    pub = await bus_env.client(want_entries=False)
    await bus_env.down()
    await until(lambda: not pub.connected and not watcher.connected, "clients see the bus down")
    assert sink.links[-1] is False

    answers: list[object] = []
    pub.publish([Update("down.t", "k", val(1))], answers.append)
    assert answers == [], "done is never called from inside publish"
    await until(lambda: bool(answers), "publish answered")
    assert len(answers) == 1 and isinstance(answers[0], BusUnavailable)
    with pytest.raises(BusUnavailable):
        await pub.publish_wait([Update("down.t", "k", val(2))])
    with pytest.raises(BusUnavailable):
        await pub.snapshot("down.t")

    await bus_env.up()
    await until(lambda: pub.connected and watcher.connected, "clients reconnect")
    assert snap_state(await pub.snapshot("down.t")) == {}
    (p,) = await pub.publish_wait([Update("down.t", "later", val(3))])
    await until(lambda: ("down.t", p) in sink.marks(), "live entry after the outage")
    assert [e for e in sink.entries if e[0] == "down.t"] == [("down.t", "later", p, val(3))]
    assert answers == [answers[0]], "the failed publish was answered once"


async def test_a_restarted_bus_has_a_new_epoch(bus_env: BusEnv) -> None:
    sink = Recorder()
    bus = await bus_env.client(sink)
    pub = await bus_env.client(want_entries=False)
    await pub.publish_wait([Update("epoch.t", "k", val(1))])
    await until(lambda: ("epoch.t", "k") in sink.state, "entry delivered")
    old = bus.epoch
    assert old is not None and sink.epochs == [old]

    await bus_env.down()
    await until(lambda: not bus.connected, "client sees the bus down")
    await bus_env.up()
    await until(lambda: bus.connected and pub.connected, "clients reconnect")
    assert bus.epoch is not None and bus.epoch != old
    assert pub.epoch == bus.epoch
    assert sink.epochs == [old, bus.epoch]
    assert sink.links == [True, False, True]
    assert ("epoch.t", "k") not in sink.state  # the sink dropped the old history
    assert (await pub.snapshot("epoch.t")).epoch == bus.epoch


async def test_start_while_the_bus_is_down_connects_later(bus_env: BusEnv) -> None:
    await bus_env.down()
    sink = Recorder()
    bus = await bus_env.client(sink)  # returns after the first attempt failed
    assert not bus.connected and bus.epoch is None
    await bus_env.up()
    await until(lambda: bus.connected, "connects in the background")
    assert sink.epochs == [bus.epoch] and sink.links == [True]


async def test_a_client_without_entries_only_publishes(bus_env: BusEnv) -> None:
    sink = Recorder()
    quiet = await bus_env.client(sink, want_entries=False)
    loud = Recorder()
    await bus_env.client(loud)
    (p,) = await quiet.publish_wait([Update("quiet.t", "k", val(1))])
    await until(lambda: ("quiet.t", p) in loud.marks(), "the subscriber got it")
    assert sink.entries == []
    assert snap_state(await quiet.snapshot("quiet.t")) == {"k": (p, val(1))}


async def test_a_new_client_gets_the_current_state(bus_env: BusEnv) -> None:
    pub = await bus_env.client(want_entries=False)
    (p1,) = await pub.publish_wait([Update("late.t", "a", val(1))])
    (p2,) = await pub.publish_wait([Update("late.t", "a", val(2))])
    (p3,) = await pub.publish_wait([Update("late.t", "b", NIL)])
    sink = Recorder()
    bus = await bus_env.client(sink)
    if not bus.holds_all_state:
        pytest.skip("this backend delivers state through snapshot(), tested above")
    # start() returned after the state was delivered: no waiting needed.
    assert sink.topic_state("late.t") == {"a": (p2, val(2)), "b": (p3, NIL)}
    assert ("late.t", p1) not in sink.marks()  # latest state only, not history


# -- stream topics (guarantee 6): retained history --------------------------------------
# `ev.>` retains STREAM_HISTORY events, `ev0.>` none (tests/contract/conftest.py).


async def publish_events(pub: Bus, topic: str, n: int, start: int = 0) -> list[int]:
    """`n` events on `topic` (without a key, one key, or several, in batches of 1..3)."""
    positions: list[int] = []
    i = start
    while i < start + n:
        batch = [
            Update(topic, ("", "k", f"k{j % 2}")[j % 3], val(j))
            for j in range(i, min(i + 1 + i % 3, start + n))
        ]
        positions += await pub.publish_wait(batch)
        i += len(batch)
    assert positions == sorted(positions)
    return positions


async def test_stream_history_keeps_the_newest_events_in_order(bus_env: BusEnv) -> None:
    sink = Recorder()
    await bus_env.client(sink)
    pub = await bus_env.client(want_entries=False)
    topic = "ev.trades"
    positions = await publish_events(pub, topic, 12)
    # Every event is delivered live, in order: a stream topic is not coalesced.
    await until(lambda: (topic, positions[-1]) in sink.marks(), "every event delivered")
    assert [(e[2], e[3]) for e in sink.entries if e[0] == topic] == [
        (p, val(i)) for i, p in enumerate(positions)
    ]

    h = await pub.history(topic)
    assert h.epoch == pub.epoch
    assert [(p, d) for p, _k, d in h.events] == [(p, val(i)) for i, p in enumerate(positions)][
        -STREAM_HISTORY:
    ]
    assert [k for _p, k, _d in h.events] == [("", "k", f"k{j % 2}")[j % 3] for j in range(7, 12)]
    assert h.complete is False  # seven events are no longer retained
    # since inside the history: exactly the events after it, complete
    h = await pub.history(topic, since=positions[8])
    assert ([p for p, _, _ in h.events], h.complete) == (positions[9:], True)
    h = await pub.history(topic, since=positions[6])  # the newest event no longer retained
    assert ([p for p, _, _ in h.events], h.complete) == (positions[7:], True)
    # since older than the history: what it holds, incomplete
    h = await pub.history(topic, since=positions[5])
    assert ([p for p, _, _ in h.events], h.complete) == (positions[7:], False)
    h = await pub.history(topic, since=positions[-1])
    assert (list(h.events), h.complete) == ([], True)
    # limit: the newest events, and complete only if nothing was cut off
    h = await pub.history(topic, since=positions[8], limit=2)
    assert ([p for p, _, _ in h.events], h.complete) == (positions[10:], False)
    h = await pub.history(topic, since=positions[8], limit=3)
    assert ([p for p, _, _ in h.events], h.complete) == (positions[9:], True)
    # a stream topic has no per-key state
    assert list((await pub.snapshot(topic)).items) == []


async def test_stream_history_zero_retains_nothing(bus_env: BusEnv) -> None:
    sink = Recorder()
    await bus_env.client(sink)
    pub = await bus_env.client(want_entries=False)
    topic = "ev0.log"
    positions = await publish_events(pub, topic, 4)
    await until(lambda: (topic, positions[-1]) in sink.marks(), "events delivered live")
    h = await pub.history(topic)
    assert (list(h.events), h.complete) == ([], False)
    h = await pub.history(topic, since=positions[-1])
    assert (list(h.events), h.complete) == ([], True)
    late = Recorder()
    await bus_env.client(late)
    assert late.floors[topic] == positions[-1]
    assert [e for e in late.entries if e[0] == topic] == []


async def test_stream_history_of_a_topic_never_written_is_empty_and_complete(
    bus_env: BusEnv,
) -> None:
    pub = await bus_env.client(want_entries=False)
    h = await pub.history("ev.never")
    assert (list(h.events), h.complete, h.epoch) == ([], True, pub.epoch)
    with pytest.raises(BusError):
        await pub.history("prices.fx")  # a state topic has no history


async def test_a_new_client_gets_the_floor_then_the_retained_events(bus_env: BusEnv) -> None:
    pub = await bus_env.client(want_entries=False)
    topic = "ev.orders"
    positions = await publish_events(pub, topic, 9)
    (p_state,) = await pub.publish_wait([Update("prices.fx", "k", val("state"))])
    sink = Recorder()
    await bus_env.client(sink)
    # start() returned after the sync: floors first, then the entries, then connected
    assert sink.calls.index("floors") < sink.calls.index("entries") < sink.calls.index("up")
    assert sink.floors[topic] == positions[3]  # the newest event not retained
    assert [e[2] for e in sink.entries if e[0] == topic] == positions[4:]
    assert sink.state[("prices.fx", "k")] == (p_state, val("state"))  # state topics as before
    assert "prices.fx" not in sink.floors


async def test_a_client_away_longer_than_the_history_learns_what_it_lost(
    bus_env: BusEnv,
) -> None:
    sink = Recorder()
    first = await bus_env.client(sink)
    pub = await bus_env.client(want_entries=False)
    topic = "ev.away"
    before = await publish_events(pub, topic, 3)
    await until(lambda: (topic, before[-1]) in sink.marks(), "events delivered")
    await first.close()
    during = await publish_events(pub, topic, 8, start=3)  # more than the history retains
    # The same sink (what a worker keeps) on a new connection.
    await bus_env.client(sink)
    lost = during[: len(during) - STREAM_HISTORY]
    assert sink.floors[topic] == lost[-1] > before[-1]
    again = [e[2] for e in sink.entries if e[0] == topic][len(before) :]
    assert again == during[len(lost) :]
    # Had it been away briefly, nothing is lost: the floor is below what it holds.
    h = await pub.history(topic, since=during[-2])
    assert h.complete and [p for p, _, _ in h.events] == [during[-1]]


async def test_stream_history_belongs_to_the_epoch(bus_env: BusEnv) -> None:
    sink = Recorder()
    bus = await bus_env.client(sink)
    pub = await bus_env.client(want_entries=False)
    topic = "ev.epoch"
    await publish_events(pub, topic, 3)
    old = pub.epoch
    assert (await pub.history(topic)).epoch == old
    await bus_env.down()
    await until(lambda: not bus.connected, "client sees the bus down")
    with pytest.raises(BusUnavailable):
        await pub.history(topic)
    await bus_env.up()
    await until(lambda: bus.connected and pub.connected, "clients reconnect")
    h = await pub.history(topic)
    assert h.epoch == pub.epoch != old
    assert (list(h.events), h.complete) == ([], True)
    (p,) = await pub.publish_wait([Update(topic, "", val("new"))])
    assert [(q, d) for q, _, d in (await pub.history(topic)).events] == [(p, val("new"))]
