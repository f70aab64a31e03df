"""Real `redis-server` processes for tests: one server, or a 3-master Redis Cluster.

Nothing of Redis is mocked: tests start their own servers on free loopback
ports in a temporary directory and stop them at teardown. A server can be
killed (SIGKILL) and started again on the same port with the same directory,
so that, with persistence on (`appendonly yes`, `appendfsync always`), it
comes back with its data; `wipe=True` restarts it empty. The server itself is
`loadtest.redis_server.RedisServer` (the load tools start theirs with it too).

`requirepass` turns on AUTH (every client must send the password); `tls`
(`tests.support.tls.TlsFiles`) adds a TLS port, `tls_port`, next to the plain
one (which readiness checks and `cli` keep using), reached by `tls_url`.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

from loadtest import redis_server
from loadtest.ports import free_port
from loadtest.redis_server import REDIS_CLI, REDIS_SERVER, redis_available
from tests.support.serve import TIMEOUT_FACTOR
from tests.support.tls import TlsFiles

__all__ = ["REDIS_CLI", "REDIS_SERVER", "RedisCluster", "RedisServer", "redis_available"]


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


class RedisServer(redis_server.RedisServer):
    """`loadtest.redis_server.RedisServer` with its waits scaled by
    FANOUT_TEST_TIMEOUT_FACTOR, and optionally AUTH (`requirepass`) and TLS (`tls`)."""

    timeout_s = 10 * TIMEOUT_FACTOR

    def __init__(
        self,
        *,
        requirepass: str | None = None,
        tls: TlsFiles | None = None,
        extra: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.requirepass = requirepass
        self.tls = tls
        self.tls_port = free_port() if tls is not None else 0
        more = list(extra or [])
        if requirepass is not None:
            more += ["--requirepass", requirepass]
        if tls is not None:
            more += [
                "--tls-port", str(self.tls_port),
                "--tls-cert-file", tls.cert_file,
                "--tls-key-file", tls.key_file,
                "--tls-ca-cert-file", tls.ca_file,
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        super().__init__(extra=more, **kwargs)

    @property
    def tls_url(self) -> str:
        assert self.tls is not None, "started without tls"
        return f"rediss://127.0.0.1:{self.tls_port}/0"

    def cli(self, *args: str) -> str:
        if self.requirepass is None:
            return super().cli(*args)
        return super().cli("--no-auth-warning", "-a", self.requirepass, *args)


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
