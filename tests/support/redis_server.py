"""Real `redis-server` processes for tests: one server, or a 3-master Redis Cluster.

Nothing of Redis is mocked: tests start their own servers on free loopback
ports in a temporary directory and stop them at teardown. A server can be
killed (SIGKILL) and started again on the same port with the same directory,
so that, with persistence on (`appendonly yes`, `appendfsync always`), it
comes back with its data; `wipe=True` restarts it empty.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from tests.support.serve import TIMEOUT_FACTOR, free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def redis_available() -> bool:
    return os.path.exists(REDIS_SERVER) and os.path.exists(REDIS_CLI)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port P <= 55535 whose cluster bus port P + 10000 is free too."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randint(20000, 55535)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One `redis-server` on 127.0.0.1:`port` (a free port unless given)."""

    def __init__(
        self,
        *,
        persistent: bool = False,
        port: int | None = None,
        extra: list[str] | None = None,
        dir: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.persistent = persistent
        self.extra = list(extra or [])
        self._own_dir = dir is None
        self.dir = dir or tempfile.mkdtemp(prefix="fo-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def args(self) -> list[str]:
        args = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.dir,
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--logfile",
            os.path.join(self.dir, "redis.log"),
        ]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        return args + self.extra

    def start(self, *, wipe: bool = False) -> RedisServer:
        """Start (again) on the same port; `wipe` removes its data files first."""
        assert self.proc is None, "already running"
        if wipe:
            for name in os.listdir(self.dir):
                if name != "redis.log":
                    path = os.path.join(self.dir, name)
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    else:
                        os.remove(path)
        self.proc = subprocess.Popen(
            self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10 * TIMEOUT_FACTOR
        while not _ping(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer: {self.log()}")
            time.sleep(0.01)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown save; what is on disk is what survives."""
        self._stop(signal.SIGKILL)

    def stop(self) -> None:
        self._stop(signal.SIGTERM)

    def _stop(self, sig: int) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [REDIS_CLI, "-p", str(self.port), *args],
            capture_output=True,
            check=True,
            timeout=10 * TIMEOUT_FACTOR,
        )
        return out.stdout.decode()

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log"), encoding="utf-8") as fh:
                return fh.read()[-2000:]
        except OSError:
            return ""


class RedisCluster:
    """A Redis Cluster of `masters` masters (no replicas), created with redis-cli."""

    def __init__(self, masters: int = 3) -> None:
        self.dir = tempfile.mkdtemp(prefix="fo-cluster-")
        self.nodes: list[RedisServer] = []
        for i in range(masters):
            d = os.path.join(self.dir, str(i))
            os.mkdir(d)
            self.nodes.append(
                RedisServer(
                    port=cluster_port(),
                    dir=d,
                    extra=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        os.path.join(d, "nodes.conf"),
                        "--cluster-node-timeout",
                        "2000",
                    ],
                )
            )

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            check=True,
            timeout=30 * TIMEOUT_FACTOR,
        )
        deadline = time.monotonic() + 30 * TIMEOUT_FACTOR
        while any("cluster_state:ok" not in n.cli("cluster", "info") for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        return self

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        shutil.rmtree(self.dir, ignore_errors=True)
