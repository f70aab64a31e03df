"""The bus' bounds as pure rules (engine/bus/limits.py, engine/bus/hubcore.py
rules 6-7) and the supervision of bus tasks (engine/bus/tasks.py)."""

from __future__ import annotations

import asyncio

import pytest

from engine.backoff import Backoff
from engine.bus.base import Update
from engine.bus.hubcore import HubCore
from engine.bus.limits import Limits, check_updates, topics_per_shard
from engine.bus.tasks import TaskHealth, supervise
from engine.codes import ErrorCode
from engine.errors import BusError, BusRefused


def test_check_updates_refuses_what_is_not_utf8_and_names_it() -> None:
    for bad in (Update("t", "\ud800", b"\x01"), Update("t.\udfff", "k", b"\x01")):
        with pytest.raises(BusError, match="not valid UTF-8") as err:
            check_updates([Update("ok", "k", b"\x01"), bad], 100)
        assert "update 1" in str(err.value)
    check_updates([Update("t", "é😀", b"\x01")], 100)  # any valid UTF-8 passes


def test_check_updates_refuses_data_over_the_limit_with_too_large() -> None:
    check_updates([Update("t", "k", b"x" * 100)], 100)
    with pytest.raises(BusRefused) as err:
        check_updates([Update("t", "k", b"x" * 101)], 100)
    assert err.value.code == ErrorCode.TOO_LARGE and err.value.topic == "t"
    assert "bus.max_data_bytes (100)" in err.value.message


def test_topics_per_shard_rounds_up_and_zero_means_no_limit() -> None:
    assert topics_per_shard(0, 16) == 0
    assert topics_per_shard(10, 4) == 3
    assert topics_per_shard(1, 16) == 1


def core(**limits: int) -> HubCore:
    return HubCore(1, "e", limits=Limits(**limits))


def test_keys_over_the_limit_refuse_the_whole_batch() -> None:
    c = core(max_keys_per_topic=2)
    c.publish([("t", "a", b"1"), ("t", "b", b"1")], 1)
    with pytest.raises(BusRefused) as err:
        c.publish([("u", "a", b"1"), ("t", "c", b"1")], 2)
    assert err.value.code == ErrorCode.TOO_MANY_KEYS
    assert c.snapshot("u").items == [] and c.key_count == 2  # nothing applied
    c.publish([("t", "a", b"2"), ("t", "a", b"3"), ("t", "b", b"2")], 3)  # rewrites pass
    with pytest.raises(BusRefused):  # two new keys of a new topic in one batch
        c.publish([("v", "a", b"1"), ("v", "b", b"1"), ("v", "c", b"1")], 4)


def test_topics_over_the_limit_are_refused_and_expiry_frees_them() -> None:
    c = HubCore(
        1,
        "e",
        limits=Limits(max_topics=2),
        expiry_of=lambda topic: 1.0 if topic.startswith("tmp.") else 0.0,
    )
    c.publish([("tmp.a", "k", b"1"), ("keep", "k", b"1")], 1000)
    with pytest.raises(BusRefused) as err:
        c.publish([("tmp.b", "k", b"1")], 1500)
    assert err.value.code == ErrorCode.TOO_MANY_TOPICS
    assert c.expire(1999) == []  # 999 ms idle: kept
    c.publish([("tmp.a", "k", b"2")], 1999)  # a publish resets the deadline
    assert c.expire(2998) == []
    assert c.expire(2999) == ["tmp.a"]
    assert c.snapshot("tmp.a").items == [] and c.topic_count == 1
    c.publish([("tmp.b", "k", b"1")], 3000)  # room again
    assert c.topic_count == 2


def test_a_refused_new_topic_leaves_no_trace() -> None:
    c = core(max_topics=1)
    c.publish([("a", "k", b"1")], 1)
    for i in range(100):
        with pytest.raises(BusRefused):
            c.publish([(f"n{i}", "k", b"1")], 2)
    assert len(c._shard) == 1  # refused names are not cached


async def test_a_failing_task_is_restarted_counted_and_down_meanwhile() -> None:
    health = TaskHealth()
    runs = 0
    failed = asyncio.Event()
    finish = asyncio.Event()

    async def run() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            failed.set()
            raise RuntimeError("boom")
        await finish.wait()

    task = asyncio.create_task(supervise("t", run, health, backoff=Backoff(10, 10)))
    await failed.wait()
    await asyncio.sleep(0)  # supervise handles the failure and starts its backoff
    assert health.down == {"t"} and not health.ok
    while runs < 3:
        await asyncio.sleep(0.005)
    assert health.ok and health.restarts == {"t": 2}
    finish.set()
    await task  # a task that returns is done, not restarted
    assert runs == 3


def test_readyz_names_a_bus_task_that_is_restarting() -> None:
    """A worker whose bus task failed reports bus_connected false and the task:
    /readyz says which (engine/admin/http.py `_worker_fault`)."""
    from engine.admin import http
    from engine.status import SupervisorStatus, WorkerStatus

    now = 1000.0
    supervisor = {"ts": now, "state": "running", "workers_expected": 1, "workers": {"1": 7}}
    worker = {"ts": now, "pid": 7, "accepting": True, "bus_connected": False}
    args: dict[str, object] = {"now": now, "heartbeat_timeout_s": 10.0, "parent_alive": False}
    sup = SupervisorStatus.from_json(supervisor)
    down = WorkerStatus.from_json({**worker, "bus_tasks_down": ["publisher"]})
    ok, reasons = http.readiness(sup, {1: down}, bus_connected=True, **args)  # type: ignore[arg-type]
    assert not ok and reasons == ["worker 1: bus task publisher restarting"]
    up = WorkerStatus.from_json(worker)
    ok, reasons = http.readiness(sup, {1: up}, bus_connected=True, **args)  # type: ignore[arg-type]
    assert reasons == ["worker 1: bus disconnected"]


def test_updates_checked_at_the_edge_get_only_the_size_check() -> None:
    # CheckedUpdates: an ingest edge checked the strings and data (rule 1, "once")
    from engine.bus.base import CheckedUpdates

    ok = CheckedUpdates([Update("t", "k", b"\x01"), Update("t", "k2", b"\x02" * 10)])
    check_updates(ok, 10)
    check_updates(CheckedUpdates([]), 10)
    with pytest.raises(BusRefused) as info:
        check_updates(CheckedUpdates([*ok, Update("t", "big", b"\x03" * 11)]), 10)
    assert info.value.code == ErrorCode.TOO_LARGE and "'big'" in str(info.value)
    # the same updates not marked checked still get every check of rule 1
    with pytest.raises(BusError, match="not valid UTF-8"):
        check_updates([Update("t", "\ud800", b"\x01")], 10)
