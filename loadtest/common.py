"""Pieces shared by the load-testing tools (firstbench, bench, baseline, locust).

- the latency histogram (integer buckets, bounded memory) and its percentiles;
- `Server`: a `fanout serve` started on free ports in its own process group,
  killed with its whole group on stop;
- `RedisServer`: a throwaway `redis-server` on a free loopback port (the
  Redis bus of bench, drill and redis_bus; the tests' servers build on it);
- `Children`: forked helper processes, each with a pipe of (kind, payload)
  messages, stopped (exit, terminate, kill) with bounded waits;
- CPU and memory accounting of a process tree from /proc (through psutil);
- `raise_nofile`: the soft fd limit raised to the hard one (every process that
  opens many sockets calls it).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from multiprocessing.connection import Connection as Pipe
from typing import Any

import psutil

# -- the latency histogram ---------------------------------------------------------------
#
# Buckets are integers so that a subscriber adds a sample with one shift and one
# dict update. Fine buckets are 2**16 ns (65.5 us) wide up to 2**32 ns (4.3 s);
# beyond that, coarse buckets of 2**26 ns (67 ms). Negative differences (a clock
# step) go to bucket 0 and are counted apart.

_FINE_SHIFT = 16
_FINE_BUCKETS = 1 << 16
_COARSE_SHIFT = 26


def bucket_of(d_ns: int) -> int:
    """The histogram bucket of a latency in nanoseconds."""
    if d_ns < 0:
        return 0
    b = d_ns >> _FINE_SHIFT
    if b < _FINE_BUCKETS:
        return b
    return _FINE_BUCKETS + (d_ns >> _COARSE_SHIFT)


def bucket_mid_ns(b: int) -> float:
    """The middle of a bucket, in nanoseconds."""
    if b < _FINE_BUCKETS:
        return (b + 0.5) * (1 << _FINE_SHIFT)
    return (b - _FINE_BUCKETS + 0.5) * (1 << _COARSE_SHIFT)


class LatencyRecorder:
    """One process's latency histogram and its counts, fed with the
    ((stamp_ns, count), ...) of each received message (`record`)."""

    def __init__(self) -> None:
        self.hist: dict[int, int] = {}
        self.samples = 0
        self.negative = 0  # clock steps: the receive time before the stamp
        self.max_ns = 0

    def record(self, stamps: Iterable[tuple[int, int]], now: int) -> None:
        hist = self.hist
        for t, c in stamps:
            d = now - t
            b = d >> _FINE_SHIFT
            if b >= _FINE_BUCKETS or d < 0:
                b = bucket_of(d)
                if d < 0:
                    self.negative += c
            hist[b] = hist.get(b, 0) + c
            self.samples += c
            if d > self.max_ns:
                self.max_ns = d


def merge_hist(into: dict[int, int], other: Mapping[int, int]) -> None:
    for b, c in other.items():
        into[b] = into.get(b, 0) + c


def percentiles_ms(hist: Mapping[int, int], qs: Sequence[float]) -> dict[str, float | None]:
    """Percentiles (0 < q <= 1) of a histogram, in milliseconds (bucket middles)."""
    total = sum(hist.values())
    out: dict[str, float | None] = {}
    if not total:
        return {qname(q): None for q in qs}
    ordered = sorted(hist.items())
    for q in qs:
        rank = max(1, math.ceil(q * total))
        seen = 0
        value = ordered[-1][0]
        for b, c in ordered:
            seen += c
            if seen >= rank:
                value = b
                break
        out[qname(q)] = round(bucket_mid_ns(value) / 1e6, 3)
    return out


def qname(q: float) -> str:
    return "p" + f"{q * 100:g}".replace(".", "")


# -- limits --------------------------------------------------------------------------------


def raise_nofile() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns (soft, hard).

    Client and server sockets share the hard limit when both run on one machine:
    10,000 connections need ~10,000 fds in the load generator and ~10,000 in
    the server, plus a few hundred for everything else."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft, hard


# -- the server under test -------------------------------------------------------------------


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port *below* the kernel's ephemeral range: a port from
    that range (what binding port 0 gives) can be taken as the local port of
    some client connection between this probe and the server's bind, which
    then fails with EADDRINUSE (seen when load tests ran alongside)."""
    low = _ephemeral_low()
    if low > 12000:
        for _ in range(100):
            port = random.randint(10000, low - 1)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def set_parent_death_signal(signum: int = signal.SIGINT) -> None:
    """Have the kernel send `signum` to this process when its parent dies (Linux only),
    so that a `kill -9` of the benchmark does not leave anything running. SIGINT
    for the server (its quick stop), SIGKILL for this script's own children."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signum)  # PR_SET_PDEATHSIG


def child_entry(parent_pid: int, inherited: list[Pipe], target: Any, *args: Any) -> None:
    """Start of every forked child: close the parent's ends of the pipes inherited
    from the fork (while any copy is open, a pipe never reports EOF, and a child
    would not notice that the parent is gone), then run `target`."""
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    for pipe in inherited:
        with contextlib.suppress(OSError):
            pipe.close()
    target(*args)


def _server_preexec(cpus: tuple[int, ...] | None) -> None:
    set_parent_death_signal()
    raise_nofile()
    if cpus:
        os.sched_setaffinity(0, cpus)  # inherited by every process the supervisor forks


class Server:
    """A `fanout serve` started by this script: own process group, free ports, own run dir."""

    def __init__(
        self,
        workers: int,
        flush_ms: int,
        config: str | None,
        log_level: str,
        cpus: tuple[int, ...] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.base = tempfile.mkdtemp(
            prefix="fb-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
        self.log_path = os.path.join(self.base, "serve.log")
        self.port = free_port()
        self.admin_port = free_port()
        env = dict(os.environ)
        env.update(
            {
                "FANOUT_FANOUT_FLUSH_INTERVAL_MS": str(flush_ms),
                "FANOUT_RUN_DIR": self.base,
                "PYTHONUNBUFFERED": "1",
                # the generators connect thousands of clients at once and do not
                # retry a refused upgrade: admission is not what a benchmark measures
                "FANOUT_LIMITS_UPGRADES_PER_S": "0",
            }
        )
        self.args = [
            sys.executable,
            "-m",
            "engine.cli",
            "serve",
            "--workers",
            str(workers),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--admin-port",
            str(self.admin_port),
            "--log-level",
            log_level,
        ]
        if config:
            self.args += ["--config", config]
        env.update(extra_env or {})
        self.env_shown = {"FANOUT_FANOUT_FLUSH_INTERVAL_MS": str(flush_ms), **(extra_env or {})}
        self.env_shown.update(
            {
                k: v
                for k, v in os.environ.items()
                if k.startswith("FANOUT_") and k != "FANOUT_API_KEY"
            }
        )
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        # cwd: the run dir, so that no ./config.toml of the caller's directory is read
        # unless --config names one.
        self.proc = subprocess.Popen(
            self.args,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.base,
            preexec_fn=lambda: _server_preexec(cpus),
        )

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def command(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env_shown.items()))
        return f"{env} fanout {shlex.join(self.args[3:])}"

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SetupError(
                    f"fanout serve exited with code {self.proc.returncode}:\n" + self.log_tail()
                )
            status, _ = http_get(self.admin, "/readyz")
            if status == 200:
                return
            time.sleep(0.1)
        raise SetupError(f"fanout serve not ready after {timeout_s:.0f} s:\n" + self.log_tail())

    def board_pids(self) -> dict[str, int]:
        """Names of the server's processes from the supervisor's status file."""
        names: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for entry in os.listdir(self.base):
                path = os.path.join(self.base, entry, "supervisor.json")
                try:
                    with open(path, encoding="utf-8") as fh:
                        sup = json.load(fh)
                except (OSError, ValueError):
                    continue
                names["supervisor"] = int(sup.get("pid", self.proc.pid))
                for slot, pid in (sup.get("workers") or {}).items():
                    names[f"worker-{slot}"] = int(pid)
                for name, pid in (sup.get("aux") or {}).items():
                    names[str(name)] = int(pid)
        return names

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGINT the group (a quick stop), SIGKILL what is left after 10 s."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log.close()

    def cleanup_dir(self, keep_log_to: str | None) -> None:
        if keep_log_to:
            with contextlib.suppress(OSError):
                shutil.copyfile(self.log_path, keep_log_to)
        shutil.rmtree(self.base, ignore_errors=True)


class SetupError(Exception):
    """The benchmark could not set up (server, subscribers); nothing was measured."""


def http_get(base: str, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(base.rstrip("/") + path, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (OSError, ValueError):
        return 0, None


# -- the Redis of a multi-node run -------------------------------------------------------------

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
            preexec_fn=(lambda: _server_preexec(cpus)) if self.tied else None,
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


# -- CPU accounting ------------------------------------------------------------------------


def server_pids(supervisor_pid: int) -> list[int]:
    """The supervisor and all its descendants."""
    try:
        sup = psutil.Process(supervisor_pid)
        return [supervisor_pid, *(p.pid for p in sup.children(recursive=True))]
    except psutil.Error:
        return []


def cpu_seconds(pids: Iterable[int]) -> dict[int, tuple[float, float]]:
    """(utime, stime) of each process that still exists (psutil reads /proc/<pid>/stat)."""
    out: dict[int, tuple[float, float]] = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[pid] = (t.user, t.system)
    return out


def used(
    before: Mapping[int, tuple[float, float]],
    after: Mapping[int, tuple[float, float]],
    pid: int,
    part: int | None = None,
) -> float:
    """CPU-seconds `pid` used between two `cpu_seconds` samples (user+system, or one part)."""
    a, b = before[pid], after[pid]
    if part is None:
        return (b[0] + b[1]) - (a[0] + a[1])
    return b[part] - a[part]


def machine_busy_seconds() -> float:
    """CPU-seconds the whole machine spent not idle, all cores together (from /proc/stat)."""
    t = psutil.cpu_times()
    return float(
        sum(t)
        - t.idle
        - getattr(t, "iowait", 0.0)
        - getattr(t, "guest", 0.0)
        - getattr(t, "guest_nice", 0.0)
    )


class Child:
    """A child process of this script and its pipe; messages are sorted by kind."""

    def __init__(self, name: str, proc: multiprocessing.process.BaseProcess, pipe: Pipe) -> None:
        self.name = name
        self.proc = proc
        self.pipe = pipe
        self.inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self.progress: dict[str, Any] = {}
        self.gone = False

    def send(self, *msg: Any) -> None:
        with contextlib.suppress(OSError, ValueError, BrokenPipeError):
            self.pipe.send(msg)


class Children:
    """The forked helper processes of one run, and their messages.

    A child sends `(kind, payload)` tuples: "progress" replaces its latest
    progress, "error" raises RuntimeError in the parent, anything else goes to
    its inbox for `expect`. Every wait is bounded."""

    def __init__(self) -> None:
        self.ctx = multiprocessing.get_context("fork")
        self.children: list[Child] = []

    def spawn(self, name: str, target: Any, *args: Any) -> Child:
        parent, child = self.ctx.Pipe(duplex=True)
        inherited = [parent, *(c.pipe for c in self.children)]
        proc = self.ctx.Process(
            target=child_entry,
            args=(os.getpid(), inherited, target, child, *args),
            name=name,
            daemon=True,
        )
        proc.start()
        child.close()
        c = Child(name, proc, parent)
        self.children.append(c)
        return c

    def pump(self, timeout: float) -> None:
        """Read every message that arrives within `timeout` seconds."""
        live = {c.pipe: c for c in self.children if not c.gone}
        if not live:
            time.sleep(timeout)
            return
        for pipe in multiprocessing.connection.wait(list(live), timeout):
            c = live[pipe]  # type: ignore[index]
            try:
                while c.pipe.poll():
                    kind, payload = c.pipe.recv()
                    if kind == "progress":
                        c.progress = payload
                    elif kind == "error":
                        raise RuntimeError(payload)
                    else:
                        c.inbox.append((kind, payload))
            except (EOFError, OSError):
                c.gone = True

    def take(self, child: Child, kind: str) -> tuple[bool, Any]:
        """(True, payload) if a `kind` message is waiting, else (False, None); no wait."""
        for i, (k, payload) in enumerate(child.inbox):
            if k == kind:
                del child.inbox[i]
                return True, payload
        return False, None

    def expect(self, child: Child, kind: str, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            found, payload = self.take(child, kind)
            if found:
                return payload
            if child.gone or not child.proc.is_alive():
                self.pump(0)
                if not any(k == kind for k, _ in child.inbox):
                    raise RuntimeError(
                        f"{child.name} exited (code {child.proc.exitcode}) before sending {kind!r}"
                    )
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{child.name} sent no {kind!r} within {timeout_s:.0f} s")
            self.pump(min(left, 0.5))

    def stop_all(self) -> None:
        """Stop every child (exit, then terminate, then kill); bounded."""
        for c in self.children:
            c.send("exit")
        deadline = time.monotonic() + 5.0
        for c in self.children:
            c.proc.join(max(0.0, deadline - time.monotonic()))
        for c in self.children:
            if c.proc.is_alive():
                c.proc.terminate()
                c.proc.join(2.0)
            if c.proc.is_alive():
                c.proc.kill()
                c.proc.join(2.0)
            with contextlib.suppress(OSError):
                c.pipe.close()


# -- memory ----------------------------------------------------------------------------------


def rss_bytes(pids: Iterable[int]) -> dict[int, int]:
    """Resident set size of each process that still exists (summing them counts pages
    shared between forked processes more than once: an upper bound)."""
    out: dict[int, int] = {}
    for pid in pids:
        try:
            out[pid] = int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            continue
    return out


MEMORY_KINDS = ("rss", "pss", "anon", "file", "shmem")


def memory_bytes(pid: int) -> dict[str, int] | None:
    """One process's memory by kind, from Linux's /proc/PID/smaps_rollup and status:

    - rss: resident pages (a page shared with other processes counts in full);
    - pss: proportional set size (a page shared by k processes counts 1/k in
      each), so a tree's sum counts each of its pages once, copy-on-write
      copies included;
    - anon / file / shmem: rss split into anonymous memory (the heap: what
      connections allocate), file pages (shared libraries' code, already in
      memory for the processes that mapped them before) and shared memory.

    None when the process is gone; only rss (psutil's) without /proc."""
    try:
        kinds = dict.fromkeys(MEMORY_KINDS, 0)
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in ("Rss", "Pss"):
                    kinds[name.lower()] = int(rest.split()[0]) * 1024
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in ("RssAnon", "RssFile", "RssShmem"):
                    kinds[name[3:].lower()] = int(rest.split()[0]) * 1024
        return kinds
    except (OSError, ValueError, IndexError):
        pass
    try:
        return {"rss": int(psutil.Process(pid).memory_info().rss)}
    except psutil.Error:
        return None


def tree_memory_bytes(pids: Iterable[int]) -> dict[str, int]:
    """`memory_bytes` summed over the processes that still exist (kinds that some
    process could not give are left out)."""
    total = dict.fromkeys(MEMORY_KINDS, 0)
    missing: set[str] = set()
    for pid in pids:
        kinds = memory_bytes(pid)
        if kinds is None:
            continue
        for k in MEMORY_KINDS:
            if k in kinds:
                total[k] += kinds[k]
            else:
                missing.add(k)
    return {k: v for k, v in total.items() if k not in missing}
