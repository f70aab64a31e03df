"""The supervisor: forks every fanout process, watches it, respawns it, stops it.

Modelled on gunicorn's arbiter and uvicorn's multiprocess supervisor.

Rules:
1. Synchronous. No event loop, no thread, no listening socket and no redis
   client ever exists in this process: a fork copies only the calling thread,
   and every child builds its own loop and sockets after the fork.
2. Signal handlers only record the signal number; the wakeup fd (a self-pipe)
   wakes the loop, which handles signals by name (`handle_term`, ...).
   Nothing is logged or written from a handler.
3. The arbiter owns every child of its process: it reaps with waitpid(-1).
4. Once stopping has begun (state "draining" or "stopping") nothing is
   respawned.
5. A worker has booted when its board status says `accepting` with its own
   pid; its `ts` is the heartbeat. An aux process with a `ready` check has
   booted when the check passes; without one, as soon as it is forked.
6. A slot is a worker's identity on the board. A crashed worker is respawned
   in its slot; a worker added by SIGTTIN or by a rolling restart (SIGHUP)
   gets a new slot, and counts toward readiness only once it has booted, so a
   roll never makes /readyz fail. A retired worker (SIGTTOU, or the old one of
   a roll) is sent SIGUSR1: it drains with `bye` and close 1012, and is not
   respawned; SIGKILL after `workers.graceful_timeout_s`.
7. A rolling restart replaces one worker at a time: the new worker is
   listening (booted) before the old one is retired, and the next step starts
   when the old one has exited. If a new worker fails to boot, the roll is
   abandoned and the old workers keep serving.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import select
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from engine.backoff import Backoff, FailureStreak
from engine.board import Board, worker_name
from engine.codes import EXIT_BOOT_FAILURE, EXIT_FAILURE, EXIT_OK
from engine.logs import setup_logging
from engine.status import SupervisorStatus, WorkerStatus
from engine.supervisor.preflight import available_cpus, format_address

if TYPE_CHECKING:
    from engine.config import Config

log = logging.getLogger("fanout.supervisor")

TICK_S = 0.25  # longest sleep of the loop: bounds how late a check can run
STATUS_EVERY_S = 1.0  # the supervisor status is rewritten at least this often
STABLE_S = 30.0  # a process that ran this long before exiting starts a new backoff streak
QUICK_STOP_TIMEOUT_S = 2.0  # SIGINT/SIGQUIT: SIGQUIT, then SIGKILL after this
AUX_STOP_TIMEOUT_S = 3.0  # after the workers drained: SIGTERM aux, then SIGKILL after this
KILL_WAIT_S = 5.0  # how long to wait for SIGKILLed children before giving up on reaping

SIGNAL_NAMES: dict[int, str] = {
    signal.SIGTERM: "term",
    signal.SIGINT: "int",
    signal.SIGQUIT: "quit",
    signal.SIGCHLD: "chld",
    signal.SIGHUP: "hup",
    signal.SIGTTIN: "ttin",
    signal.SIGTTOU: "ttou",
}
HANDLED_SIGNALS = tuple(SIGNAL_NAMES)


@dataclass(frozen=True, slots=True)
class AuxSpec:
    """A helper process (hub, admin, demo feed) the arbiter runs besides the workers.

    `start_before_workers`: workers are forked only after this process has
    booted (its `ready()` returned True). `ready` is called from the arbiter's
    loop every tick until it passes: keep it cheap and non-blocking (e.g. a
    file exists, a Unix socket accepts a connect). Its name must not start
    with "worker-".
    """

    name: str
    target: Callable[[], None]
    start_before_workers: bool = False
    ready: Callable[[], bool] | None = None


@dataclass(slots=True)
class Child:
    """One forked process the arbiter is responsible for."""

    key: str  # board name of a worker ("worker-1"), or the aux name
    name: str  # for people: "worker 1", "hub"
    pid: int
    slot: int  # 1..N for workers, 0 for aux processes
    spawned: float  # monotonic
    booted: bool = False
    kill_reason: str | None = None  # set when the arbiter killed it, and why
    beat_ts: float | None = None  # the last `ts` seen in its board status
    beat_at: float = 0.0  # monotonic time `beat_ts` was first seen
    retiring_since: float | None = None  # monotonic time it was told to drain for good


class Arbiter:
    """Runs `workers.count` workers (slots 1..N) and the aux processes until told to stop.

    `run()` returns the process exit code: EXIT_OK after SIGTERM, SIGINT or
    SIGQUIT, EXIT_BOOT_FAILURE after `workers.max_boot_failures` consecutive
    boot failures. It installs signal handlers, so call it from the main
    thread, once. Targets run in forked children; a target's return means
    exit code 0, an exception 1 (logged with its traceback), SystemExit(code)
    that code. The run directory is removed on exit only if
    `remove_run_dir=True`.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: str,
        *,
        worker_target: Callable[[int], None],
        aux: Sequence[AuxSpec] = (),
        remove_run_dir: bool = False,
        reload: Callable[[], Config] | None = None,
    ) -> None:
        for spec in aux:
            if spec.name.startswith("worker-"):
                raise ValueError(f"aux process name {spec.name!r} must not start with 'worker-'")
        if len({spec.name for spec in aux}) != len(aux):
            raise ValueError("aux process names must be unique")
        self.cfg = cfg
        self.run_dir = run_dir
        self.remove_run_dir = remove_run_dir
        self.board = Board(run_dir)
        self.worker_target = worker_target
        self.reload = reload
        self.aux_specs = {spec.name: spec for spec in aux}
        self.worker_count = cfg.resolved_worker_count(available_cpus())
        self.backoff = Backoff(
            cfg.workers.restart_backoff_min_ms, cfg.workers.restart_backoff_max_ms
        )

        self.state = "starting"
        self.slots: set[int] = set()  # slots that should have a worker
        self.pending: set[int] = set()  # slots added while running, not booted yet
        self.last_slot = 0
        self.roll_queue: list[int] = []  # old slots a rolling restart still has to replace
        self.roll_step: tuple[int, int] | None = None  # (old slot, new slot) being replaced
        self.rolling = False
        self.children: dict[int, Child] = {}  # by pid
        self.respawns: dict[str, float] = {}  # child key -> monotonic time it is due
        self.streaks: dict[str, FailureStreak] = {}
        self.boot_failures = 0
        self.workers_started = False
        self.ready_logged = False
        self.exit_code: int | None = None
        self.quick_requested = False

        self.signals: list[int] = []
        self.pipe: tuple[int, int] | None = None
        self.saved_handlers: dict[int, Any] = {}
        self.saved_wakeup_fd = -1
        self.started = time.time()
        self.status_due = 0.0  # monotonic; 0 = write at the next chance

    # -- the loop -------------------------------------------------------------------

    def run(self) -> int:
        self.setup()
        try:
            log.info("supervisor starting (pid %d, %d workers)", os.getpid(), self.worker_count)
            self.write_status()
            self.start()
            while self.exit_code is None:
                self.sleep(self.next_timeout())
                self.dispatch_signals()
                if self.exit_code is None:
                    self.reap()
                if self.exit_code is None:
                    self.tick()
            return self.exit_code
        except BaseException:
            log.exception("supervisor failed; killing every child")
            self.kill_everything()
            self.exit_code = EXIT_FAILURE
            raise
        finally:
            self.teardown()

    def tick(self) -> None:
        statuses = self.board.read_workers() if self.has_workers() else {}
        self.check_boots(statuses)
        self.check_heartbeats(statuses)
        self.check_retiring()
        self.advance_roll()
        self.spawn_due()
        if time.monotonic() >= self.status_due:
            self.write_status()

    def setup(self) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pipe = (r, w)
        self.saved_wakeup_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            self.saved_handlers[sig] = signal.signal(sig, self.on_signal)

    def teardown(self) -> None:
        for sig, handler in self.saved_handlers.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self.saved_wakeup_fd)
        if self.pipe is not None:
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            self.pipe = None
        if self.remove_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs in a signal handler: no logging, no I/O. The wakeup fd wakes the
        # loop; a signal already queued is not queued twice (bounds the list).
        if signum not in self.signals:
            self.signals.append(signum)

    def sleep(self, timeout_s: float) -> None:
        """Wait until a signal arrives or `timeout_s` passes."""
        assert self.pipe is not None
        readable, _, _ = select.select([self.pipe[0]], [], [], max(timeout_s, 0.0))
        if readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(self.pipe[0], 4096):
                    pass

    def next_timeout(self) -> float:
        if not self.respawns:
            return TICK_S
        return min(TICK_S, min(self.respawns.values()) - time.monotonic())

    def dispatch_signals(self) -> None:
        while self.signals and self.exit_code is None:
            sig = self.signals.pop(0)
            handler: Callable[[], None] = getattr(self, f"handle_{SIGNAL_NAMES[sig]}")
            handler()

    # -- signal handlers (called from the loop, never from a signal handler) ---------

    def handle_term(self) -> None:
        """Graceful stop: workers drain and exit, then aux processes stop."""
        graceful_s = self.cfg.workers.graceful_timeout_s
        log.info("SIGTERM: draining %d workers (up to %gs)", len(self.workers()), graceful_s)
        self.set_state("draining")
        self.respawns.clear()
        workers = self.workers()
        self.signal_children(workers, signal.SIGTERM)
        if not self.wait_for(lambda c: c.slot > 0, graceful_s, escalate=True):
            if self.quick_requested:
                self.stop_all()
                self.exit_code = EXIT_OK
                return
            late = self.workers()
            log.warning(
                "%s did not exit within workers.graceful_timeout_s = %gs: killing %s",
                ", ".join(f"{c.name} (pid {c.pid})" for c in late),
                graceful_s,
                "it" if len(late) == 1 else "them",
            )
            self.signal_children(late, signal.SIGKILL)
            self.wait_for(lambda c: c.slot > 0, KILL_WAIT_S)
        self.set_state("stopping")
        aux = self.aux()
        self.signal_children(aux, signal.SIGTERM)
        if not self.wait_for(lambda c: c.slot == 0, AUX_STOP_TIMEOUT_S):
            self.signal_children(self.aux(), signal.SIGKILL)
            self.wait_for(lambda c: c.slot == 0, KILL_WAIT_S)
        log.info("stopped")
        self.exit_code = EXIT_OK

    def handle_int(self) -> None:
        """Quick stop."""
        log.info("SIGINT: stopping")
        self.stop_all()
        self.exit_code = EXIT_OK

    def handle_quit(self) -> None:
        """Quick stop."""
        log.info("SIGQUIT: stopping")
        self.stop_all()
        self.exit_code = EXIT_OK

    def handle_chld(self) -> None:
        self.reap()

    def handle_hup(self) -> None:
        """Rolling restart: re-read the config, then replace workers one at a time."""
        if self.state != "running":
            log.warning("SIGHUP while %s: ignored", self.state)
            return
        if self.rolling:
            log.warning("SIGHUP: a rolling restart is already under way; ignored")
            return
        if self.reload is not None:
            try:
                self.cfg = self.reload()
            except Exception as exc:  # a bad config.toml must not stop a running node
                log.error("SIGHUP: config not reloaded, keeping the running one: %s", exc)
                return
        self.roll_queue = sorted(self.slots - self.pending)
        self.rolling = True
        log.info("SIGHUP: rolling restart of %d workers", len(self.roll_queue))
        self.advance_roll()

    def handle_ttin(self) -> None:
        """One worker more (a new slot; it counts for readiness once booted)."""
        if self.state != "running":
            log.warning("SIGTTIN while %s: ignored", self.state)
            return
        slot = self.add_slot()
        log.info("SIGTTIN: adding worker %d (%d workers)", slot, len(self.slots))

    def handle_ttou(self) -> None:
        """One worker less: the newest is retired (drains with 1012)."""
        serving = sorted(self.slots - self.pending - {s for s in (self.roll_step or ())})
        if self.state != "running" or len(serving) <= 1:
            log.warning("SIGTTOU: keeping the last worker (or not running); ignored")
            return
        slot = serving[-1]
        log.info("SIGTTOU: retiring worker %d (%d workers left)", slot, len(self.slots) - 1)
        self.retire(slot)

    # -- adding, retiring and rolling workers ------------------------------------------

    def add_slot(self) -> int:
        self.last_slot += 1
        slot = self.last_slot
        self.slots.add(slot)
        self.pending.add(slot)
        self.spawn_worker(slot)
        return slot

    def retire(self, slot: int) -> None:
        """Stop keeping a worker in `slot`: SIGUSR1 (drain with 1012), no respawn."""
        self.slots.discard(slot)
        self.pending.discard(slot)
        self.respawns.pop(worker_name(slot), None)
        # Publish the new set of workers before the retired one stops accepting,
        # so /readyz never sees an expected worker that is draining.
        self.write_status()
        now = time.monotonic()
        for child in self.workers():
            if child.slot == slot and child.retiring_since is None:
                child.retiring_since = now
                self.signal_children([child], signal.SIGUSR1)
        self.status_due = 0.0

    def advance_roll(self) -> None:
        if not self.rolling or self.roll_step is not None or self.state != "running":
            return
        while self.roll_queue:
            old = self.roll_queue.pop(0)
            if old in self.slots:
                new = self.add_slot()
                self.roll_step = (old, new)
                log.info("rolling restart: worker %d replaces worker %d", new, old)
                return
        self.rolling = False
        log.info("rolling restart done: %d workers", len(self.slots))

    def abort_roll(self, why: str) -> None:
        if not self.rolling:
            return
        log.error("rolling restart abandoned (%s); the running workers keep serving", why)
        self.rolling = False
        self.roll_step = None
        self.roll_queue.clear()

    def check_retiring(self) -> None:
        """SIGKILL retired workers still draining after `workers.graceful_timeout_s`."""
        timeout_s = self.cfg.workers.graceful_timeout_s
        now = time.monotonic()
        for child in self.workers():
            since = child.retiring_since
            if since is not None and not child.kill_reason and now - since > timeout_s:
                child.kill_reason = (
                    f"still draining after workers.graceful_timeout_s = {timeout_s:g}s"
                )
                log.warning("%s (pid %d) %s: killing it", child.name, child.pid, child.kill_reason)
                self.signal_children([child], signal.SIGKILL)

    # -- starting and respawning ------------------------------------------------------

    def start(self) -> None:
        for spec in self.aux_specs.values():
            if spec.start_before_workers:
                self.spawn_aux(spec)
        self.maybe_start_workers()

    def maybe_start_workers(self) -> None:
        """Fork the workers and the other aux processes once every early aux has booted."""
        if self.workers_started:
            return
        booted = {c.key for c in self.children.values() if c.booted}
        early = [s.name for s in self.aux_specs.values() if s.start_before_workers]
        if not all(name in booted for name in early):
            return
        self.workers_started = True
        for _ in range(self.worker_count):
            self.last_slot += 1
            self.slots.add(self.last_slot)
            self.spawn_worker(self.last_slot)
        for spec in self.aux_specs.values():
            if not spec.start_before_workers:
                self.spawn_aux(spec)

    def spawn_worker(self, slot: int) -> None:
        key = worker_name(slot)
        self.board.remove(key)  # a status left by a previous worker must not count
        target = self.worker_target
        pid = self.fork(f"worker {slot}", lambda: target(slot))
        self.children[pid] = Child(key, f"worker {slot}", pid, slot, time.monotonic())
        log.info("worker %d started (pid %d)", slot, pid)
        self.status_due = 0.0

    def spawn_aux(self, spec: AuxSpec) -> None:
        pid = self.fork(spec.name, spec.target)
        now = time.monotonic()
        child = Child(spec.name, spec.name, pid, 0, now, booted=spec.ready is None)
        self.children[pid] = child
        if child.booted:
            self.streak(spec.name).record_success(now)
        log.info("%s started (pid %d)", spec.name, pid)
        self.status_due = 0.0

    def spawn_due(self) -> None:
        now = time.monotonic()
        for key, due in list(self.respawns.items()):
            if due > now:
                continue
            del self.respawns[key]
            spec = self.aux_specs.get(key)
            if spec is not None:
                self.spawn_aux(spec)
            else:
                slot = int(key.removeprefix("worker-"))
                if slot in self.slots:
                    self.spawn_worker(slot)

    def fork(self, name: str, target: Callable[[], None]) -> int:
        for stream in (sys.stdout, sys.stderr):  # or the child would print it again
            with contextlib.suppress(Exception):
                stream.flush()
        # Block our signals across fork: the child must not run the arbiter's
        # handlers before it has restored the default dispositions.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                self.run_child(name, target, mask)  # never returns
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return pid

    def run_child(self, name: str, target: Callable[[], None], mask: Iterable[int]) -> NoReturn:
        code = EXIT_FAILURE
        try:
            for sig in HANDLED_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            if self.pipe is not None:
                os.close(self.pipe[0])
                os.close(self.pipe[1])
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            # log lines say which process wrote them (the target may refine it)
            setup_logging(self.cfg.log.level, self.cfg.log.format, name)
            target()
            code = EXIT_OK
        except SystemExit as exc:
            code = exit_code_of(exc)
        except BaseException:
            log.exception("%s (pid %d) failed", name, os.getpid())
            code = EXIT_FAILURE
        finally:
            # os._exit skips the interpreter's cleanup: flush what the target printed.
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)

    def streak(self, key: str) -> FailureStreak:
        streak = self.streaks.get(key)
        if streak is None:
            streak = self.streaks[key] = FailureStreak(self.backoff, STABLE_S)
        return streak

    # -- watching ---------------------------------------------------------------------

    def reap(self) -> None:
        """Collect every exited child; schedule respawns unless stopping."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is not None:
                self.on_exit(child, os.waitstatus_to_exitcode(status))

    def on_exit(self, child: Child, code: int) -> None:
        how = describe_exit(code)
        self.status_due = 0.0
        if child.slot:
            self.board.remove(child.key)
        if self.state in ("draining", "stopping"):
            log.info("%s (pid %d) %s", child.name, child.pid, how)
            return
        if child.slot and child.slot not in self.slots:
            # retired (SIGTTOU or the old worker of a roll): not respawned
            log.info("%s (pid %d) retired: %s", child.name, child.pid, how)
            if self.roll_step is not None and self.roll_step[0] == child.slot:
                self.roll_step = None
                self.advance_roll()
            return
        if child.slot in self.pending and not child.booted:
            # a worker added while running (roll or SIGTTIN) that cannot boot
            # (say, a bad reloaded config): give up on it, keep the running ones
            log.error(
                "%s (pid %d) failed to boot: %s", child.name, child.pid, child.kill_reason or how
            )
            self.slots.discard(child.slot)
            self.pending.discard(child.slot)
            if self.roll_step is not None and self.roll_step[1] == child.slot:
                self.abort_roll(f"new {child.name} failed to boot")
            return
        now = time.monotonic()
        streak = self.streak(child.key)
        streak.record_failure(now)
        delay_s = streak.next_delay_ms(random.random()) / 1000.0
        if not child.booted:
            self.boot_failures += 1
            reason = child.kill_reason or how
            log.error(
                "%s (pid %d) failed to boot: %s (%d in a row)",
                child.name,
                child.pid,
                reason,
                self.boot_failures,
            )
            if self.boot_failures >= self.cfg.workers.max_boot_failures:
                self.give_up(child, reason)
                return
        else:
            because = f" ({child.kill_reason})" if child.kill_reason else ""
            log.warning("%s (pid %d) %s%s", child.name, child.pid, how, because)
        log.info("respawning %s in %.2fs", child.name, delay_s)
        self.respawns[child.key] = now + delay_s

    def give_up(self, last: Child, reason: str) -> None:
        what = "workers" if last.slot else last.name
        log.critical(
            "fanout: %s failed to boot %d times in a row (last: %s %s); giving up",
            what,
            self.boot_failures,
            last.name,
            reason,
        )
        self.stop_all()
        self.exit_code = EXIT_BOOT_FAILURE

    def check_boots(self, statuses: dict[int, WorkerStatus]) -> None:
        """Mark booted children; SIGKILL those past `workers.boot_timeout_s`."""
        now = time.monotonic()
        timeout_s = self.cfg.workers.boot_timeout_s
        for child in list(self.children.values()):
            if child.booted or child.kill_reason:
                continue
            if child.slot:
                status = statuses.get(child.slot)
                ok = status is not None and status.pid == child.pid and status.accepting
            else:
                ok = self.aux_ready(self.aux_specs[child.key])
            if ok:
                self.on_booted(child, now)
            elif now - child.spawned > timeout_s:
                child.kill_reason = f"did not boot within workers.boot_timeout_s = {timeout_s:g}s"
                log.error("%s (pid %d) %s: killing it", child.name, child.pid, child.kill_reason)
                self.signal_children([child], signal.SIGKILL)

    def aux_ready(self, spec: AuxSpec) -> bool:
        assert spec.ready is not None
        try:
            return spec.ready()
        except Exception:
            log.debug("%s: ready check failed", spec.name, exc_info=True)
            return False

    def on_booted(self, child: Child, now: float) -> None:
        child.booted = True
        child.beat_at = now
        self.boot_failures = 0
        self.streak(child.key).record_success(now)
        self.status_due = 0.0
        log.info("%s (pid %d) booted", child.name, child.pid)
        if not child.slot:
            self.maybe_start_workers()
            return
        if child.slot in self.pending:
            self.pending.discard(child.slot)
            if self.roll_step is not None and self.roll_step[1] == child.slot:
                # the new worker is listening: now the old one may drain
                self.retire(self.roll_step[0])
        if not self.ready_logged and self.booted_workers() == self.worker_count:
            self.ready_logged = True
            self.set_state("running")
            server = self.cfg.server
            log.info(
                "ready: %d workers accepting on ws://%s%s",
                self.worker_count,
                format_address(server.host, server.port),
                server.path,
            )

    def check_heartbeats(self, statuses: dict[int, WorkerStatus]) -> None:
        """SIGKILL a booted worker whose status `ts` has not changed for `heartbeat_timeout_s`.

        Staleness is measured on the arbiter's monotonic clock from the moment
        `ts` last changed, so a step of the wall clock neither kills healthy
        workers nor hides a hung one.
        """
        timeout_s = self.cfg.workers.heartbeat_timeout_s
        now = time.monotonic()
        for child in self.workers():
            if not child.booted or child.kill_reason:
                continue
            status = statuses.get(child.slot)
            if status is not None and status.pid == child.pid and status.ts != child.beat_ts:
                child.beat_ts, child.beat_at = status.ts, now
            silent_s = now - child.beat_at
            if silent_s <= timeout_s:
                continue
            child.kill_reason = f"no heartbeat within workers.heartbeat_timeout_s = {timeout_s:g}s"
            log.error(
                "%s (pid %d) is hung: no heartbeat for %.1fs; killing it",
                child.name,
                child.pid,
                silent_s,
            )
            self.signal_children([child], signal.SIGKILL)

    # -- stopping ---------------------------------------------------------------------

    def stop_all(self) -> None:
        """Quick stop: SIGQUIT every child, SIGKILL what is left after a short wait."""
        self.set_state("stopping")
        self.respawns.clear()
        self.signal_children(list(self.children.values()), signal.SIGQUIT)
        if not self.wait_for(lambda c: True, QUICK_STOP_TIMEOUT_S):
            late = list(self.children.values())
            log.warning(
                "%s did not exit within %gs: killing",
                ", ".join(f"{c.name} (pid {c.pid})" for c in late),
                QUICK_STOP_TIMEOUT_S,
            )
            self.signal_children(late, signal.SIGKILL)
            self.wait_for(lambda c: True, KILL_WAIT_S)

    def kill_everything(self) -> None:
        """Last resort after a bug in the arbiter: SIGKILL and reap every child."""
        self.state = "stopping"
        self.respawns.clear()
        self.signal_children(list(self.children.values()), signal.SIGKILL)
        deadline = time.monotonic() + KILL_WAIT_S
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)

    def wait_for(
        self, which: Callable[[Child], bool], timeout_s: float, *, escalate: bool = False
    ) -> bool:
        """Reap until no child matching `which` is left (True) or `timeout_s` passes (False).

        With `escalate`, a SIGINT or SIGQUIT received meanwhile ends the wait
        (False) and sets `quick_requested`.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            self.reap()
            if not any(which(c) for c in self.children.values()):
                return True
            for sig in self.signals:
                if escalate and sig in (signal.SIGINT, signal.SIGQUIT):
                    self.quick_requested = True
            self.signals.clear()  # already stopping: other signals change nothing
            if self.quick_requested and escalate:
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if time.monotonic() >= self.status_due:
                self.write_status()
            self.sleep(min(TICK_S, left))

    def signal_children(self, children: Iterable[Child], sig: int) -> None:
        for child in children:
            # The pid cannot have been reused: the child is not reaped yet.
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, sig)

    # -- status -----------------------------------------------------------------------

    def set_state(self, state: str) -> None:
        self.state = state
        self.write_status()

    def write_status(self) -> None:
        """Write the supervisor's board status (on every change, and every second)."""
        server = self.cfg.server
        self.board.write_supervisor(
            SupervisorStatus(
                pid=os.getpid(),
                state=self.state,
                workers_expected=len(self.slots - self.pending),
                workers={
                    c.slot: c.pid
                    for c in self.workers()
                    if c.slot in self.slots and c.slot not in self.pending
                },
                aux={c.name: c.pid for c in self.aux()},
                port=server.port,
                admin_port=server.admin_port,
                started=self.started,
            )
        )
        self.status_due = time.monotonic() + STATUS_EVERY_S

    def workers(self) -> list[Child]:
        return sorted((c for c in self.children.values() if c.slot), key=lambda c: c.slot)

    def aux(self) -> list[Child]:
        return [c for c in self.children.values() if not c.slot]

    def has_workers(self) -> bool:
        return any(c.slot for c in self.children.values())

    def booted_workers(self) -> int:
        return sum(1 for c in self.children.values() if c.slot and c.booted)


def describe_exit(code: int) -> str:
    """`exited with code 4` or `was killed by SIGKILL` (from waitstatus_to_exitcode)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def exit_code_of(exc: SystemExit) -> int:
    """The process exit code `sys.exit(...)` asked for (None: 0; a message: 1, printed)."""
    if exc.code is None:
        return EXIT_OK
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return EXIT_FAILURE
