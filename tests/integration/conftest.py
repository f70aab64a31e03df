"""Integration fixtures: a real hub and a real worker in the test's event loop,
real picows clients over 127.0.0.1. Every async test here runs twice: on uvloop
and on plain asyncio."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import pytest
import uvloop

from engine.bus.hub import serve_hub
from engine.client.raw import RawConnection, connect
from engine.config import Config, default_config
from workers.main import serve_worker
from workers.server import WorkerServer

# One factor scales every timeout in the tests (slow CI machines: FANOUT_TEST_TIMEOUT_FACTOR=3).
TIMEOUT_FACTOR = float(os.environ.get("FANOUT_TEST_TIMEOUT_FACTOR", "1"))


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Mapping[str, Any]:
    # this conftest's hooks only reach the items of tests/integration
    return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


def make_config(**sections: Any) -> Config:
    """default_config() on 127.0.0.1, a free port, with section overrides:
    make_config(fanout={"flush_interval_ms": 5}), and `topics=[TopicRule, ...]`."""
    cfg = default_config()
    cfg = dataclasses.replace(
        cfg, server=dataclasses.replace(cfg.server, host="127.0.0.1", port=0, admin_port=0)
    )
    for name, values in sections.items():
        if name == "topics":  # a tuple of TopicRule, not a section
            cfg = dataclasses.replace(cfg, topics=tuple(values))
            continue
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)})
    return cfg


class Engine:
    """A hub and one worker, and a way to open clients and publish."""

    def __init__(self, cfg: Config, run_dir: str) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.worker: WorkerServer | None = None
        self.hub: Any = None
        self.clients: list[RawConnection] = []

    @property
    def url(self) -> str:
        assert self.worker is not None
        return f"ws://127.0.0.1:{self.worker.port}{self.cfg.server.path}"

    async def start(self) -> Engine:
        self.hub = await serve_hub(self.cfg, self.run_dir)
        self.worker = await serve_worker(self.cfg, self.run_dir)
        return self

    async def client(self, **kw: Any) -> RawConnection:
        conn = await connect(self.url, **kw)
        self.clients.append(conn)
        hello = await conn.recv()
        assert hello["op"] == "hello"
        return conn

    async def subscriber(
        self, topics: list[str], **kw: Any
    ) -> tuple[RawConnection, list[dict[str, Any]]]:
        """A client subscribed to `topics`; returns it and its ack + snaps."""
        conn = await self.client()
        conn.subscribe(topics, id=1, **kw)
        msgs = [await conn.recv()]
        for _ in topics:
            msgs.append(await conn.recv())
        return conn, msgs

    async def publish(self, topic: str, key: str, data: Any) -> int:
        import msgpack

        from engine.bus.base import Update

        assert self.worker is not None
        positions = await self.worker.bus.publish_wait(
            [Update(topic, key, msgpack.packb(data, use_bin_type=True))]
        )
        return positions[0]

    async def close(self) -> None:
        for c in self.clients:
            c.close()
        if self.worker is not None:
            await self.worker.close()
            await self.worker.bus.close()
        if self.hub is not None:
            await self.hub.close()


@pytest.fixture
def run_dir(tmp_path: Any) -> str:
    return str(tmp_path)


@pytest.fixture
async def engine_factory(run_dir: str) -> AsyncIterator[Callable[..., Awaitable[Engine]]]:
    engines: list[Engine] = []

    async def make(**sections: Any) -> Engine:
        e = Engine(make_config(**sections), run_dir)
        engines.append(e)
        return await e.start()

    yield make
    for e in engines:
        await e.close()


@pytest.fixture
async def engine(engine_factory: Callable[..., Awaitable[Engine]]) -> Engine:
    return await engine_factory(fanout={"flush_interval_ms": 5})


async def eventually(
    check: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01
) -> None:
    """Wait until `check()` is true (timeouts scaled by FANOUT_TEST_TIMEOUT_FACTOR)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout * TIMEOUT_FACTOR
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


class View:
    """A client's view of state topics, built from snap and upd messages."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}
        self.pos: dict[str, str] = {}
        self.epoch = ""

    def apply(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "snap":
            topic = msg["topic"]
            self.epoch = msg["epoch"]
            if msg["full"]:
                self.state[topic] = {}
            t = self.state.setdefault(topic, {})
            for k, v in msg["items"].items():
                if v is None:
                    t.pop(k, None)
                else:
                    t[k] = v
            self.pos[topic] = msg["pos"]
        elif op == "upd":
            t = self.state.setdefault(msg["topic"], {})
            for k, v in msg["items"].items():
                if v is None:
                    t.pop(k, None)
                else:
                    t[k] = v
            self.pos[msg["topic"]] = msg["pos"]

    def drain(self, conn: RawConnection) -> None:
        for m in conn.take_nowait():
            self.apply(m)
