"""The processes a load tool starts, and what each of them inherits.

- `Children`: forked helper processes, each with a pipe of (kind, payload)
  messages, stopped (exit, terminate, kill) with bounded waits;
- `tied_preexec`: what a server started by a load tool runs before exec (dies
  with its parent, fd limit raised, pinned to CPUs);
- `raise_nofile`: the soft fd limit raised to the hard one (every process that
  opens many sockets calls it), and the hard one raised first when a run needs
  more and this process may (root).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import time
from multiprocessing.connection import Connection as Pipe
from typing import Any


def raise_nofile(want: int = 0) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns (soft, hard).

    Client and server sockets share the hard limit when both run on one machine:
    10,000 connections need ~10,000 fds in the load generator and ~10,000 in
    the server, plus a few hundred for everything else. When `want` is above the
    hard limit, the hard limit is raised to it first (capped by the kernel's
    fs.nr_open); only root (CAP_SYS_RESOURCE) may, anyone else keeps the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want > hard != resource.RLIM_INFINITY:
        target = min(want, _nr_open())
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            soft = hard = target
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft, hard


def _nr_open() -> int:
    """The kernel's ceiling on any process's fd limit (fs.nr_open)."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1_048_576


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


def tied_preexec(cpus: tuple[int, ...] | None) -> None:
    set_parent_death_signal()
    raise_nofile()
    if cpus:
        os.sched_setaffinity(0, cpus)  # inherited by every process the supervisor forks


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
