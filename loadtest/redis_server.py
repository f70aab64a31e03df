"""A throwaway `redis-server` on a free loopback port: the Redis bus of bench, drill
and redis_bus (the tests' servers build on it)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from loadtest.children import tied_preexec
from loadtest.ports import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def redis_available() -> bool:
    return os.path.exists(REDIS_SERVER) and os.path.exists(REDIS_CLI)


def redis_ping(port: int) -> bool:
    """Whether a redis-server answers on `port` (one with requirepass answers NOAUTH)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """One `redis-server` on 127.0.0.1:`port` (a free port unless given), its files in
    a temporary directory (`dir` to choose; removed by `close` unless given).

    No persistence unless `persistent` (then `appendonly yes`, `appendfsync
    always`: a SIGKILL loses nothing acknowledged). It can be killed and
    started again on the same port with the same directory; `wipe=True`
    restarts it empty. `tied=True` (the load tools): its own session, so that a
    Ctrl-C reaches it only through `close`, and SIGINT from the kernel if this
    process dies, so that nothing is left running; `cpus` pins it. Waits are
    bounded by `timeout_s` (the tests scale it)."""

    timeout_s = 10.0

    def __init__(
        self,
        *,
        persistent: bool = False,
        port: int | None = None,
        extra: list[str] | None = None,
        dir: str | None = None,
        tied: bool = False,
        cpus: tuple[int, ...] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.persistent = persistent
        self.extra = list(extra or [])
        self.tied = tied
        self.cpus = cpus
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

    def command(self) -> str:
        """The command line, as a person would type it (the temporary paths shown)."""
        return shlex.join([os.path.basename(REDIS_SERVER), *self.args()[1:]])

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
        cpus = self.cpus
        self.proc = subprocess.Popen(
            self.args(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=self.tied,
            preexec_fn=(lambda: tied_preexec(cpus)) if self.tied else None,
        )
        deadline = time.monotonic() + self.timeout_s
        while not redis_ping(self.port):
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"redis-server exited: {self.log()}")
            if time.monotonic() > deadline:
                self.kill()  # not left running behind the error
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
            proc.wait(self.timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Kill it and remove its directory (if this object made it); idempotent."""
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [REDIS_CLI, "-p", str(self.port), *args],
            capture_output=True,
            check=True,
            timeout=self.timeout_s,
        )
        return out.stdout.decode()

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log"), encoding="utf-8") as fh:
                return fh.read()[-2000:]
        except OSError:
            return ""
