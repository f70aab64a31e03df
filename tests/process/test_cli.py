"""The command line as a user meets it: the README's example, publish, watch,
check-config, bad settings and busy ports."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.serve import Served, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]


def fanout(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: Any) -> Iterator[Served]:
    s = Served(
        ["--workers", "1", "--demo"], log_path=str(tmp_path_factory.mktemp("demo") / "serve.log")
    )
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def test_readme_python_example_runs_as_written(demo: Served) -> None:
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S)
    assert code is not None
    source = code.group(1).replace("127.0.0.1:8000", f"127.0.0.1:{demo.port}")
    out = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("snap ") and "keys, EURUSD: {'px':" in lines[0]
    assert any(line.startswith("upd ") for line in lines)


def test_publish_command_and_watch_command(demo: Served) -> None:
    pub = fanout("publish", "cli.t", "k1", '{"px": 1.5}', "--admin", demo.admin_url)
    assert pub.returncode == 0, pub.stderr
    assert re.match(r"published cli.t/k1 at position \d+-\d+", pub.stdout)
    watch = fanout("watch", "cli.t", "--url", demo.ws_url, "--seconds", "1.5")
    assert watch.returncode == 0, watch.stderr
    assert 'cli.t k1 {"px": 1.5}' in watch.stdout
    bad = fanout("publish", "cli.t", "k1", "{not json", "--admin", demo.admin_url)
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr
    bad_topic = fanout("publish", "bad topic", "k1", "1", "--admin", demo.admin_url)
    assert bad_topic.returncode == 1 and "HTTP 400" in bad_topic.stderr


def test_check_config_prints_the_effective_config() -> None:
    out = fanout("check-config", env={"FANOUT_FANOUT_FLUSH_INTERVAL_MS": "7"})
    assert out.returncode == 0, out.stderr
    doc = tomllib.loads(out.stdout)
    assert doc["fanout"]["flush_interval_ms"] == 7
    assert doc["server"]["path"] == "/ws"


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"FANOUT_FANOUT_FLUSH_INTERVAL_MS": "0"}, "fanout.flush_interval_ms"),
        ({"FANOUT_WORKERS_COUNT": "many"}, "workers.count"),
        ({"FANOUT_BUS_BACKEND": "kafka"}, "bus.backend"),
        ({"FANOUT_SERVER_PROT": "1"}, "FANOUT_SERVER_PROT"),
    ],
)
def test_bad_config_stops_before_forking_naming_the_key(env: dict[str, str], key: str) -> None:
    out = fanout("serve", env=env, timeout=20)
    assert out.returncode == 2
    assert key in out.stderr and "config" in out.stderr
    assert "worker" not in out.stderr.lower().split("config")[0]


def test_bad_config_file_value_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[fanout]\nmax_buffer_bytes = -5\n")
    out = fanout("check-config", "--config", str(cfg))
    assert out.returncode == 2 and "fanout.max_buffer_bytes" in out.stderr


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = fanout(
            "serve",
            env={
                "FANOUT_SERVER_HOST": "127.0.0.1",
                "FANOUT_SERVER_PORT": str(port),
                "FANOUT_SERVER_ADMIN_PORT": str(free_port()),
            },
            timeout=20,
        )
    assert out.returncode == 4
    assert "server.port" in out.stderr and str(port) in out.stderr


def test_help_explains_commands() -> None:
    out = fanout("--help")
    assert out.returncode == 0
    for word in ("serve", "publish", "watch", "check-config", "FANOUT_"):
        assert word in out.stdout
    serve = fanout("serve", "--help")
    assert "--demo" in serve.stdout and "--workers" in serve.stdout
