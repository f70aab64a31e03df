"""Fixtures of the bus contract suite: one bus per test, for each backend and event loop.

`bus_env` gives a running bus of the backend named by `bus_backend` and lets a
test stop it (`down`: its data is lost) and start it again (`up`). Tests build
clients with `bus_env.client(...)` (`engine.bus.create_bus` underneath) and use
only the `Bus` interface, so a new backend joins by adding a param and an env.
Every test runs on plain asyncio and on uvloop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
import uvloop

from engine.bus import Bus, Entry, create_bus
from engine.bus.hub import Hub, serve_hub
from engine.config import Config, TopicRule, default_config
from tests.support.redis_server import RedisServer, redis_available

WAIT_S = 10.0 * float(os.environ.get("FANOUT_TEST_TIMEOUT_FACTOR", "1"))

# Stream topics of the suite (every other topic is a state topic).
STREAM_HISTORY = 5
STREAM_RULES = (
    TopicRule(pattern="ev.>", mode="stream", max_hz=0.0, history=STREAM_HISTORY),
    TopicRule(pattern="ev0.>", mode="stream", max_hz=0.0, history=0),
)


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Mapping[str, Callable[[], Any]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


async def until(cond: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Wait until `cond()` holds (a guard against hangs, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.005)


class Recorder:
    """A `BusSink` that records what it is given and keeps state applied by position."""

    def __init__(self) -> None:
        self.epochs: list[str] = []
        self.links: list[bool] = []
        self.entries: list[Entry] = []
        self.state: dict[tuple[str, str], tuple[int, bytes]] = {}
        self.replayed = 0  # entries not newer than what was held (ignored)
        self.floors: dict[str, int] = {}  # stream topic -> the floor last announced
        self.calls: list[str] = []  # "epoch", "floors", "entries", "up"/"down", in order

    def on_bus_epoch(self, epoch: str) -> None:
        if self.epochs and self.epochs[-1] != epoch:
            self.state.clear()  # guarantee 4: a new epoch, drop everything
        self.epochs.append(epoch)
        self.calls.append("epoch")

    def on_bus_floors(self, floors: Sequence[tuple[str, int]]) -> None:
        self.floors.update(floors)
        self.calls.append("floors")

    def on_bus_entries(self, entries: Sequence[Entry]) -> None:
        self.calls.append("entries")
        for topic, key, pos, data in entries:
            self.entries.append((topic, key, pos, data))
            held = self.state.get((topic, key))
            if held is None or pos > held[0]:
                self.state[(topic, key)] = (pos, data)
            else:
                self.replayed += 1

    def on_bus_connected(self, connected: bool) -> None:
        self.links.append(connected)
        self.calls.append("up" if connected else "down")

    def topic_state(self, topic: str) -> dict[str, tuple[int, bytes]]:
        return {k: v for (t, k), v in self.state.items() if t == topic}

    def marks(self) -> set[tuple[str, int]]:
        """(topic, pos) of every entry received. Positions are per shard, so a
        position alone does not name an entry: two shards may both have it."""
        return {(e[0], e[2]) for e in self.entries}


class BusEnv:
    """A bus for one test, plus the clients made on it (closed at teardown)."""

    def __init__(
        self, backend: str, cfg: Config, run_dir: str, redis: RedisServer | None = None
    ) -> None:
        self.backend = backend
        self.cfg = cfg
        self.run_dir = run_dir
        self.clients: list[Bus] = []
        self._hub: Hub | None = None
        self.redis = redis  # the redis backend's real redis-server (no persistence)
        self._redis_started = False

    async def up(self) -> None:
        """Start the bus, empty."""
        if self.backend == "local":
            assert self._hub is None
            self._hub = await serve_hub(self.cfg, self.run_dir)
        elif self.backend == "redis":
            assert self.redis is not None
            await asyncio.to_thread(self.redis.start, wipe=self._redis_started)
            self._redis_started = True
        else:  # pragma: no cover - a backend this suite does not know yet
            raise AssertionError(self.backend)

    async def down(self) -> None:
        """Stop the bus; its data is lost."""
        if self.backend == "local" and self._hub is not None:
            hub, self._hub = self._hub, None
            await hub.close()
        elif self.backend == "redis" and self.redis is not None:
            await asyncio.to_thread(self.redis.kill)  # SIGKILL, no persistence: data lost

    async def client(self, sink: Recorder | None = None, *, want_entries: bool = True) -> Bus:
        """A started client (connected if the bus is up)."""
        bus = create_bus(self.cfg, self.run_dir, want_entries=want_entries)
        self.clients.append(bus)
        await bus.start(sink)
        return bus

    async def close(self) -> None:
        for bus in self.clients:
            await bus.close()
        await self.down()
        if self.redis is not None:
            self.redis.close()


@pytest.fixture(params=["local", "redis"])
def bus_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def run_dir() -> Iterator[str]:
    # Short on purpose: a Unix socket path must stay under 108 bytes.
    path = tempfile.mkdtemp(prefix="fo-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def bus_env(bus_backend: str, run_dir: str) -> AsyncIterator[BusEnv]:
    base = default_config()
    redis = None
    bus_cfg = dataclasses.replace(base.bus, backend=bus_backend, shards=4)
    if bus_backend == "redis":
        if not redis_available():
            pytest.skip("redis-server is not installed (`make system-deps` installs it)")
        redis = RedisServer()
        bus_cfg = dataclasses.replace(
            bus_cfg, redis=dataclasses.replace(bus_cfg.redis, url=redis.url)
        )
    cfg = dataclasses.replace(base, bus=bus_cfg, topics=STREAM_RULES)
    env = BusEnv(bus_backend, cfg, run_dir, redis)
    await env.up()
    try:
        yield env
    finally:
        await env.close()


class Stall:
    """Makes the bus of a `BusEnv` stop answering publishes (its link stays up):
    Redis pauses its write commands (CLIENT PAUSE WRITE); the hub drops
    publish requests. `release` ends it."""

    def __init__(self, env: BusEnv) -> None:
        self.env = env
        self._restore: Callable[[], Any] | None = None

    async def start(self) -> None:
        env = self.env
        if env.backend == "redis":
            assert env.redis is not None
            from redis.asyncio import Redis

            client = Redis.from_url(env.redis.url)
            try:
                await client.execute_command("CLIENT", "PAUSE", int(WAIT_S * 1000), "WRITE")
            finally:
                await client.aclose()

            async def unpause() -> None:
                assert env.redis is not None
                c = Redis.from_url(env.redis.url)
                try:
                    await c.execute_command("CLIENT", "UNPAUSE")
                finally:
                    await c.aclose()

            self._restore = unpause
        else:
            hub = env._hub
            assert hub is not None
            receive = hub._receive

            def drop_publishes(conn: Any, msg: Any) -> None:
                if isinstance(msg, tuple) and msg and msg[0] == "p":
                    return
                receive(conn, msg)

            hub._receive = drop_publishes  # type: ignore[method-assign]

            async def restore() -> None:
                del hub._receive  # the class' method again

            self._restore = restore

    async def release(self) -> None:
        if self._restore is not None:
            await self._restore()
            self._restore = None
