"""The bus never wedges, and bounds what it stores (issue 11, findings 3 and 4), for every backend.

Findings reproduced at the bus level:

- a publish whose key or topic is not encodable as UTF-8 (a lone surrogate,
  what `JSON.stringify` emits for a split emoji) fails that publish only: the
  publishes after it succeed, and a subscriber keeps receiving;
- every wait on the bus ends (`bus.publish_timeout_s`): a bus that never
  answers gives `BusUnavailable`, never a hang;
- the bounds of `engine.bus.limits`: `data` size, keys per state topic, topics,
  each refused with `BusRefused` carrying its protocol code;
- a topic idle longer than its `[[topics]]` rule's `idle_expiry_s` is removed.
"""

from __future__ import annotations

import asyncio
import dataclasses

import msgpack
import pytest

from engine.bus import Update
from engine.codes import ErrorCode
from engine.config import TopicRule
from engine.errors import BusError, BusRefused, BusUnavailable
from tests.contract.conftest import WAIT_S, BusEnv, Recorder, Stall, until


def val(x: object) -> bytes:
    return msgpack.packb(x, use_bin_type=True)


async def answered(coro: object) -> object:
    """The result (or error) of an awaited bus call, failing the test if it hangs."""
    try:
        return await asyncio.wait_for(coro, WAIT_S)  # type: ignore[arg-type]
    except TimeoutError:
        raise AssertionError("the bus call never returned (wedged)") from None
    except BusError as exc:
        return exc


@pytest.mark.parametrize(
    "bad",
    [
        Update("wedge.t", "\ud800", val(1)),  # lone surrogate key (finding 3)
        Update("wedge.\udcff", "k", val(1)),  # lone surrogate topic
        Update("ev.wedge", "\ud83d", val(1)),  # ... in a stream topic's event key
    ],
    ids=["key", "topic", "stream-key"],
)
async def test_an_unencodable_string_fails_that_publish_only(bus_env: BusEnv, bad: Update) -> None:
    sink = Recorder()
    await bus_env.client(sink)
    pub = await bus_env.client(want_entries=False)
    before = await pub.publish_wait([Update("wedge.ok", "k", val("before"))])
    # alone, and inside a batch of good publishes sent without awaiting
    assert isinstance(await answered(pub.publish_wait([bad])), BusError)
    answers: dict[int, object] = {}
    for i in range(20):
        batch = [bad] if i == 7 else [Update("wedge.ok", f"k{i}", val(i))]
        pub.publish(batch, lambda r, i=i: answers.__setitem__(i, r))
    await until(lambda: len(answers) == 20, "every publish answered")
    assert isinstance(answers[7], BusError)
    assert all(isinstance(a, list) for i, a in answers.items() if i != 7), answers
    # later publishes succeed and the subscriber keeps receiving
    for i in range(5):
        after = await answered(pub.publish_wait([Update("wedge.ok", "k", val(i))]))
        assert isinstance(after, list), after
    await until(lambda: ("wedge.ok", after[0]) in sink.marks(), "the later publish delivered")
    assert ("wedge.ok", before[0]) in sink.marks()
    assert pub.connected


async def test_a_bad_value_cannot_be_named_in_a_snapshot_or_history(bus_env: BusEnv) -> None:
    pub = await bus_env.client(want_entries=False)
    assert isinstance(await answered(pub.snapshot("snap.\ud800")), BusError)
    assert isinstance(await answered(pub.history("ev.\ud800")), BusError)
    assert isinstance(await answered(pub.publish_wait([Update("a", "k", val(1))])), list)


# -- bounds (finding 4) ---------------------------------------------------------------


def limited(bus_env: BusEnv, **bus: object) -> None:
    """Reconfigure the bus of `bus_env` (before its first client) with `bus` settings."""
    cfg = bus_env.cfg
    bus_env.cfg = dataclasses.replace(cfg, bus=dataclasses.replace(cfg.bus, **bus))


async def restart_with(bus_env: BusEnv, **bus: object) -> None:
    await bus_env.down()
    limited(bus_env, **bus)
    await bus_env.up()


async def test_data_over_the_limit_is_refused_with_too_large(bus_env: BusEnv) -> None:
    await restart_with(bus_env, max_data_bytes=1000)
    sink = Recorder()
    await bus_env.client(sink)
    pub = await bus_env.client(want_entries=False)
    big = Update("big.t", "k", val("x" * 1000))
    err = await answered(pub.publish_wait([Update("big.t", "ok", val(1)), big]))
    assert isinstance(err, BusRefused) and err.code == ErrorCode.TOO_LARGE, err
    assert "1000" in str(err) and "big.t" in str(err)
    ok = await answered(pub.publish_wait([Update("big.t", "k", val("x" * 900))]))
    assert isinstance(ok, list)
    await until(lambda: ("big.t", ok[0]) in sink.marks(), "the publish under the limit delivered")
    assert {k for (t, k) in sink.state if t == "big.t"} == {"k"}  # the refused batch: nothing


async def test_keys_over_the_limit_are_refused_with_too_many_keys(bus_env: BusEnv) -> None:
    await restart_with(bus_env, max_keys_per_topic=3)
    pub = await bus_env.client(want_entries=False)
    ok = await answered(pub.publish_wait([Update("keys.t", f"k{i}", val(i)) for i in range(3)]))
    assert isinstance(ok, list)
    err = await answered(pub.publish_wait([Update("keys.t", "k3", val(3))]))
    assert isinstance(err, BusRefused) and err.code == ErrorCode.TOO_MANY_KEYS, err
    assert "keys.t" in str(err)
    # rewriting or deleting an existing key is still allowed; other topics too
    for update in (Update("keys.t", "k0", val(9)), Update("keys.u", "k3", val(3))):
        assert isinstance(await answered(pub.publish_wait([update])), list)
    snap = await pub.snapshot("keys.t")
    assert sorted(k for k, _, _ in snap.items) == ["k0", "k1", "k2"]


async def test_topics_over_the_limit_are_refused_with_too_many_topics(bus_env: BusEnv) -> None:
    await restart_with(bus_env, max_topics=4, shards=1)  # counted per shard
    pub = await bus_env.client(want_entries=False)
    for i in range(4):
        assert isinstance(await answered(pub.publish_wait([Update(f"top.{i}", "k", val(i))])), list)
    err = await answered(pub.publish_wait([Update("top.new", "k", val(0))]))
    assert isinstance(err, BusRefused) and err.code == ErrorCode.TOO_MANY_TOPICS, err
    assert "top.new" in str(err)
    # a topic that exists still takes publishes
    assert isinstance(await answered(pub.publish_wait([Update("top.0", "k2", val(1))])), list)


async def test_an_idle_topic_expires(bus_env: BusEnv) -> None:
    await bus_env.down()
    rules = (TopicRule(pattern="tmp.>", mode="state", idle_expiry_s=1.0), *bus_env.cfg.topics)
    bus_env.cfg = dataclasses.replace(bus_env.cfg, topics=rules)
    limited(bus_env, max_topics=3, shards=1)
    await bus_env.up()
    pub = await bus_env.client(want_entries=False)
    for topic in ("tmp.a", "tmp.b", "keep.c"):
        assert isinstance(await answered(pub.publish_wait([Update(topic, "k", val(1))])), list)
    assert isinstance(await answered(pub.publish_wait([Update("tmp.d", "k", val(1))])), BusRefused)

    async def gone() -> bool:
        return not (await pub.snapshot("tmp.a")).items and not (await pub.snapshot("tmp.b")).items

    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not await gone():
        assert asyncio.get_running_loop().time() < deadline, "idle topics never expired"
        await asyncio.sleep(0.1)
    assert (await pub.snapshot("keep.c")).items  # no expiry rule: kept
    # the expired topics no longer count: new topics fit again
    assert isinstance(await answered(pub.publish_wait([Update("tmp.d", "k", val(1))])), list)
    # a new client does not receive the expired topics
    sink = Recorder()
    await bus_env.client(sink)
    assert {t for (t, _) in sink.state} == {"tmp.d", "keep.c"}


# -- no wait without a bound; supervised tasks (finding 3) ------------------------------


async def test_a_bus_that_never_answers_gives_unavailable_not_a_hang(bus_env: BusEnv) -> None:
    limited(bus_env, publish_timeout_s=0.3)
    sink = Recorder()
    await bus_env.client(sink)
    pub = await bus_env.client(want_entries=False)
    stall = Stall(bus_env)
    await stall.start()
    try:
        answers: dict[int, object] = {}
        for i in range(5):
            pub.publish([Update("stall.t", "k", val(i))], lambda r, i=i: answers.__setitem__(i, r))
        err = await answered(pub.publish_wait([Update("stall.t", "k", val(9))]))
        assert isinstance(err, BusUnavailable), err
        assert "publish_timeout_s" in str(err)
        await until(lambda: len(answers) == 5, "every stalled publish answered")
        assert all(isinstance(a, BusUnavailable) for a in answers.values()), answers
    finally:
        await stall.release()
    ok = await answered(pub.publish_wait([Update("stall.t", "k", val("after"))]))
    assert isinstance(ok, list), ok
    await until(lambda: ("stall.t", ok[0]) in sink.marks(), "the publish after the stall delivered")
    stats = pub.bus_stats()  # type: ignore[attr-defined]
    assert stats["publish_timeouts"] >= 6


async def test_a_failed_background_task_is_restarted_and_counted(
    bus_env: BusEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = Recorder()
    await bus_env.client(sink)
    pub = await bus_env.client(want_entries=False)
    crashed = asyncio.Event()
    if bus_env.backend == "redis":
        # the publish loop: its wait for work raises once
        publisher = pub._publisher  # type: ignore[attr-defined]
        wake = publisher.wake

        class Boom:
            async def wait(self) -> None:
                publisher.wake = wake
                crashed.set()
                raise RuntimeError("injected: the publish loop fails")

            def set(self) -> None:
                wake.set()

            def clear(self) -> None:
                wake.clear()

        publisher.wake = Boom()
        publisher.wake.set()
        name = "publisher"
    else:
        # the link task: making its next link raises once
        import engine.bus.local as local

        link_class = local._Link

        class BoomLink(link_class):  # type: ignore[valid-type, misc]
            def __init__(self, *args: object) -> None:
                monkeypatch.setattr(local, "_Link", link_class)
                crashed.set()
                raise RuntimeError("injected: the link task fails")

        monkeypatch.setattr(local, "_Link", BoomLink)
        pub._current.abort()  # type: ignore[attr-defined]
        name = "link"
    await asyncio.wait_for(crashed.wait(), WAIT_S)
    await until(lambda: pub.bus_stats()["task_restarts"] == 1, "the restart counted")  # type: ignore[attr-defined]
    assert pub.health.restarts == {name: 1}  # type: ignore[attr-defined]
    await until(lambda: pub.connected, "the client connected again")
    ok = await answered(pub.publish_wait([Update("crash.t", "k", val(1))]))
    assert isinstance(ok, list), ok
    await until(
        lambda: ("crash.t", ok[0]) in sink.marks(), "the publish after the restart delivered"
    )
