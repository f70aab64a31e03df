"""Issue 11, finding 8: secrets stay secret, and Redis AUTH and TLS work.

Against real redis-servers (tests/support/redis_server.py) with `requirepass`
and a TLS port (certificates made by tests/support/tls.py):
- `fanout check-config`, the bus' log lines, a config error and the config's
  repr never show a password given in `bus.redis.url` (`***` instead);
- a node whose password comes from FANOUT_REDIS_PASSWORD (the URL holds none)
  publishes through its admin process and its worker reads: a subscriber gets
  the update; the same over TLS (rediss:// with bus.redis.tls_ca_file);
- a client without the password, or one that cannot verify the server's
  certificate, stays disconnected (and says so without the password).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from engine.bus import Bus, Update, create_bus
from engine.client.raw import connect
from engine.config import Config, default_config, load_config, parse_config
from engine.errors import ConfigError
from tests.contract.conftest import Recorder, until
from tests.support.redis_server import RedisServer, redis_available
from tests.support.serve import TIMEOUT_FACTOR, Served
from tests.support.tls import TlsFiles, make_tls_files

pytestmark = [
    pytest.mark.skipif(not redis_available(), reason="redis-server is not installed"),
    pytest.mark.timeout(120),
]

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-redis-pw-0f9e8d"
TIMEOUT_S = 10.0 * TIMEOUT_FACTOR


@pytest.fixture(scope="module")
def tls_files() -> Iterator[TlsFiles]:
    directory = tempfile.mkdtemp(prefix="fo-tls-")
    yield make_tls_files(directory)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def redis(tls_files: TlsFiles) -> Iterator[RedisServer]:
    """A redis-server that requires PASSWORD, on a plain port and a TLS port."""
    server = RedisServer(requirepass=PASSWORD, tls=tls_files).start()
    yield server
    server.close()


@pytest.fixture
def run_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="fo-ra-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def redis_cfg(url: str, **redis: object) -> Config:
    cfg = default_config()
    return dataclasses.replace(
        cfg,
        bus=dataclasses.replace(
            cfg.bus,
            backend="redis",
            shards=2,
            redis=dataclasses.replace(cfg.bus.redis, url=url, prefix="ra", **redis),
        ),
    )


@pytest.fixture
async def reader(
    redis: RedisServer, run_dir: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Bus, Recorder]]:
    """A worker's bus client (it reads entries), authenticated from the environment."""
    monkeypatch.setenv("FANOUT_REDIS_PASSWORD", PASSWORD)
    sink = Recorder()
    bus = create_bus(redis_cfg(redis.url), run_dir)
    await bus.start(sink)
    yield bus, sink
    await bus.close()


# -- passwords are never printed ---------------------------------------------------------


def check_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "check-config"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def test_check_config_prints_the_redis_url_without_its_password() -> None:
    out = check_config({"FANOUT_BUS_REDIS_URL": f"rediss://app:{PASSWORD}@redis.example:6380/0"})
    assert out.returncode == 0, out.stderr
    assert PASSWORD not in out.stdout + out.stderr
    assert 'url = "rediss://app:***@redis.example:6380/0"' in out.stdout
    assert "move it to the environment variable FANOUT_REDIS_PASSWORD" in out.stderr
    out = check_config({"FANOUT_BUS_REDIS_URL": f"redis://h/0?password={PASSWORD}"})
    assert out.returncode == 0 and PASSWORD not in out.stdout + out.stderr


def test_a_bad_redis_url_is_refused_without_printing_its_password() -> None:
    out = check_config({"FANOUT_BUS_REDIS_URL": f"http://:{PASSWORD}@h:6379/0"})
    assert out.returncode == 2
    assert "bus.redis.url" in out.stderr and "***" in out.stderr
    assert PASSWORD not in out.stdout + out.stderr


def test_config_repr_and_errors_hide_the_password() -> None:
    cfg = redis_cfg(f"redis://:{PASSWORD}@h:6379/0")
    assert PASSWORD not in repr(cfg) and PASSWORD not in str(cfg)
    assert "redis://:***@h:6379/0" in repr(cfg.bus.redis)
    with pytest.raises(ConfigError) as info:
        parse_config(
            {"bus": {"redis": {"url": f"redis://:{PASSWORD}@h/0"}}},
            {"FANOUT_REDIS_PASSWORD": "other"},
        )
    assert info.value.key == "bus.redis.url" and PASSWORD not in str(info.value)
    assert "FANOUT_REDIS_PASSWORD" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, {"FANOUT_BUS_REDIS_TLS_CA_FILE": "/ca.pem"})
    assert info.value.key == "bus.redis.tls_ca_file" and "rediss://" in str(info.value)


async def test_the_bus_never_logs_the_password_of_its_url(
    redis: RedisServer, run_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ok = create_bus(redis_cfg(f"redis://:{PASSWORD}@127.0.0.1:{redis.port}/0"), run_dir)
    wrong = create_bus(redis_cfg(f"redis://:wrong-{PASSWORD}@127.0.0.1:{redis.port}/0"), run_dir)
    try:
        await ok.start(Recorder())
        await wrong.start(Recorder())
        assert ok.connected and not wrong.connected
        assert f"redis://:***@127.0.0.1:{redis.port}/0" in caplog.text
        assert "unavailable" in caplog.text
        assert PASSWORD not in caplog.text
        tasks = [t.get_name() for t in asyncio.all_tasks()]
        assert not [name for name in tasks if PASSWORD in name]
    finally:
        await ok.close()
        await wrong.close()
    assert PASSWORD not in caplog.text


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        (f"redis://:{PASSWORD}@h:6379/0 down", "redis://:***@h:6379/0 down"),
        (f"at rediss://user:{PASSWORD}@h/0", "at rediss://user:***@h/0"),
        (f"x redis://u:p@{PASSWORD}@h/0 y", "x redis://u:***@h/0 y"),  # a raw "@" in it
        (f"unix:///s.sock?db=0&password={PASSWORD}", "unix:///s.sock?db=0&password=***"),
        ("redis://h:6379/0 and http://user@h/", "redis://h:6379/0 and http://user@h/"),
    ],
)
def test_no_log_record_carries_a_url_password(message: str, shown: str) -> None:
    from engine.logs import RedactFilter

    record = logging.LogRecord("fanout.x", logging.ERROR, __file__, 1, "%s", (message,), None)
    assert RedactFilter().filter(record)
    assert record.getMessage() == shown and PASSWORD not in record.getMessage()


# -- AUTH and TLS --------------------------------------------------------------------------


async def test_a_client_without_the_password_is_refused(
    redis: RedisServer, run_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FANOUT_REDIS_PASSWORD", raising=False)
    bus = create_bus(redis_cfg(redis.url), run_dir)
    try:
        await bus.start(Recorder())
        assert not bus.connected
        # The server holds nothing of ours: it refused every command.
        assert redis.cli("dbsize").strip() == "0"
    finally:
        await bus.close()


async def test_publisher_and_reader_authenticate_from_the_environment(
    redis: RedisServer,
    run_dir: str,
    reader: tuple[Bus, Recorder],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bus, sink = reader
    assert bus.connected
    monkeypatch.setenv("FANOUT_REDIS_USERNAME", "default")  # the ACL user of requirepass
    publisher = create_bus(redis_cfg(redis.url), run_dir, want_entries=False)
    await publisher.start(None)
    try:
        assert publisher.connected
        [pos] = await publisher.publish_wait([Update("t", "k", b"\x01")])
        await until(lambda: any(e[2] == pos for e in sink.entries), "the reader gets the entry")
    finally:
        await publisher.close()


async def test_tls_with_the_ca_file_connects_and_without_it_is_refused(
    redis: RedisServer,
    run_dir: str,
    tls_files: TlsFiles,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FANOUT_REDIS_PASSWORD", PASSWORD)
    trusted = create_bus(redis_cfg(redis.tls_url, tls_ca_file=tls_files.ca_file), run_dir)
    untrusted = create_bus(redis_cfg(redis.tls_url), run_dir)  # the system CAs: not ours
    sink = Recorder()
    try:
        await trusted.start(sink)
        await untrusted.start(Recorder())
        assert trusted.connected and not untrusted.connected
        [pos] = await trusted.publish_wait([Update("tls", "k", b"\x02")])
        await until(lambda: any(e[2] == pos for e in sink.entries), "the entry read over TLS")
    finally:
        await trusted.close()
        await untrusted.close()


# -- a whole node ------------------------------------------------------------------------------


@pytest.fixture
def node_env(redis: RedisServer, tls_files: TlsFiles) -> dict[str, str]:
    """A node on the TLS port, its password from the environment only."""
    return {
        "FANOUT_BUS_BACKEND": "redis",
        "FANOUT_BUS_REDIS_URL": redis.tls_url,
        "FANOUT_BUS_REDIS_TLS_CA_FILE": tls_files.ca_file,
        "FANOUT_REDIS_PASSWORD": PASSWORD,
    }


@pytest.mark.slow
async def test_a_node_publishes_and_its_worker_reads_over_tls_with_auth(
    node_env: dict[str, str], tmp_path: Path
) -> None:
    served = Served(["--workers", "1"], env=node_env, log_path=str(tmp_path / "serve.log"))
    try:
        await asyncio.to_thread(served.wait_ready)
        conn = await connect(served.ws_url)
        try:
            assert (await conn.recv())["op"] == "hello"
            conn.subscribe(["auth.t"], id=1)
            while (await conn.recv())["op"] != "snap":
                pass
            status, answer = served.post("/publish", {"topic": "auth.t", "key": "k", "data": 7})
            assert status == 200, answer
            msg = await conn.recv(timeout=TIMEOUT_S)
            assert msg["op"] == "upd" and msg["items"] == {"k": 7}
        finally:
            conn.close()
        log = served.output()
        assert "connected to Redis at rediss://127.0.0.1" in log
        assert PASSWORD not in log
    finally:
        served.stop()
