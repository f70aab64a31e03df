"""What the status board holds: each process' status as a frozen dataclass.

Every worker writes a `WorkerStatus` once a second (the write is also its
heartbeat), the supervisor a `SupervisorStatus` on every change; the
supervisor (boots, heartbeats) and the admin (/readyz, /stats, /metrics) read
them. The admin writes a `RebalanceOrder` for POST /rebalance; the workers it
signals read it. Writer and readers import these classes, so a field renamed here is
renamed for every reader, and mypy names each reader still using the old name.

PURE: no I/O, no clock. engine.board moves the JSON form to and from files.

Rules:
1. The JSON form is converted here and nowhere else: `to_json` on the
   writer's side, `from_json` on the reader's. Readers use attributes, never
   keys.
2. A round trip is exact: `X.from_json(s.to_json()) == s` for every status.
3. `from_json` never raises on a JSON object: a field missing or of the wrong
   type reads as its default (0, False, None, empty), which readiness takes as
   not ready. Numbers are finite (a NaN or an infinity reads as missing);
   booleans are never numbers.
4. JSON keys are the field names, in field order, `ts` last: the files, and so
   /stats and /metrics, keep their shape (pinned byte for byte by the golden
   files of tests/integration/test_admin.py).
5. `ts` is the writer's wall clock at the write, stamped by the board (None
   until written, or when a file has none: its age is infinite). Staleness is
   judged from it, so a reader needs no clock of the writer's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Json = dict[str, Any]


# -- reading JSON values (rule 3) --------------------------------------------------------


def _number(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def _int(v: object, default: int = 0) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def _opt_int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _counts(v: object) -> dict[str, int]:
    """A JSON object of integers (counts, pids); entries of other values are left out."""
    if not isinstance(v, Mapping):
        return {}
    return {str(k): n for k, n in v.items() if isinstance(n, int) and not isinstance(n, bool)}


def _numbers(v: object) -> tuple[float, ...] | None:
    """A JSON array of numbers, or None (missing, or any element not a number)."""
    if not isinstance(v, list):
        return None
    out: list[float] = []
    for x in v:
        n = _number(x)
        if n is None:
            return None
        out.append(n)
    return tuple(out)


# -- a histogram's figures ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HistogramCounts:
    """A histogram's figures (engine.metrics.Histogram.snapshot): bucket upper
    bounds, the count in each bucket and one more for +Inf (not cumulative),
    the number of observations and their sum."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    count: int
    sum: float

    def to_json(self) -> Json:
        return {"b": list(self.bounds), "c": list(self.counts), "n": self.count, "s": self.sum}

    @classmethod
    def from_json(cls, v: object) -> HistogramCounts | None:
        if not isinstance(v, Mapping):
            return None
        bounds = _numbers(v.get("b", []))
        counts = v.get("c", [])
        if bounds is None or not isinstance(counts, list):
            return None
        return cls(
            bounds,
            tuple(_int(c) for c in counts),
            _int(v.get("n")),
            _number(v.get("s")) or 0.0,
        )


# -- a worker ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """One worker's figures (workers/server.py `WorkerServer.status`).

    Counters count since the worker started; gauges are as of `ts`.
    """

    pid: int | None = None
    slot: int = 0
    accepting: bool = False  # listening and not draining: the supervisor's "booted"
    bus_connected: bool = False
    bus_lag_ms: float | None = None  # the worst shard's; None while disconnected
    # index = shard; None while disconnected, or on a bus without shards (the local hub)
    bus_shard_lag_ms: tuple[float, ...] | None = None
    bus_last_entry_age_ms: float | None = None  # None: no entry read yet, or no such figure
    # task restarts, publish timeouts, maxmemory refusals... (engine/bus/tasks.py)
    bus_events: Mapping[str, int] = field(default_factory=dict)
    bus_tasks_down: tuple[str, ...] = ()  # bus tasks that failed and are restarting
    connections: int = 0
    subscriptions: int = 0
    topics: int = 0  # held: subscribed, loading or in their grace
    topics_idle: int = 0
    topics_loading: int = 0
    topics_loaded: int = 0
    topics_dropped: int = 0
    topic_load_failures: int = 0
    updates_unheld: int = 0
    frames_sent: int = 0
    bytes_sent: int = 0
    # permessage-deflate (engine/fanout/core.py rule 10): frames sent compressed,
    # their bytes as sent (in bytes_sent) and before compression
    compressed_frames: int = 0
    compressed_bytes: int = 0
    compressed_input_bytes: int = 0
    updates_applied: int = 0
    updates_delivered: int = 0
    updates_coalesced: int = 0
    published: int = 0
    slow_events: int = 0
    flush_hist: HistogramCounts | None = None
    publish_hist: HistogramCounts | None = None
    frames_refused: int = 0
    slow_clients: int = 0
    slow_closes: int = 0
    connects: int = 0
    closes: Mapping[str, int] = field(default_factory=dict)  # by close code (or its label)
    errors: Mapping[str, int] = field(default_factory=dict)  # `err` replies by code
    ping_timeouts: int = 0
    upgrades_refused: Mapping[str, int] = field(default_factory=dict)  # by HTTP status
    upgrades_refused_by: Mapping[str, int] = field(default_factory=dict)  # by error code
    loop_lag_max_ms: float = 0.0
    gc_hist: HistogramCounts | None = None  # pauses of the cyclic collector
    gc_collections: Mapping[str, int] = field(default_factory=dict)  # by generation
    started: float | None = None  # wall clock
    ts: float | None = None  # rule 5

    def age_s(self, now: float) -> float:
        """Seconds since the status was written as of `now` (infinite: never)."""
        return math.inf if self.ts is None else now - self.ts

    def to_json(self) -> Json:
        def hist(h: HistogramCounts | None) -> Json | None:
            return None if h is None else h.to_json()

        return {
            "pid": self.pid,
            "slot": self.slot,
            "accepting": self.accepting,
            "bus_connected": self.bus_connected,
            "bus_lag_ms": self.bus_lag_ms,
            "bus_shard_lag_ms": None if self.bus_shard_lag_ms is None else list(self.bus_shard_lag_ms),
            "bus_last_entry_age_ms": self.bus_last_entry_age_ms,
            "bus_events": dict(self.bus_events),
            "bus_tasks_down": list(self.bus_tasks_down),
            "connections": self.connections,
            "subscriptions": self.subscriptions,
            "topics": self.topics,
            "topics_idle": self.topics_idle,
            "topics_loading": self.topics_loading,
            "topics_loaded": self.topics_loaded,
            "topics_dropped": self.topics_dropped,
            "topic_load_failures": self.topic_load_failures,
            "updates_unheld": self.updates_unheld,
            "frames_sent": self.frames_sent,
            "bytes_sent": self.bytes_sent,
            "compressed_frames": self.compressed_frames,
            "compressed_bytes": self.compressed_bytes,
            "compressed_input_bytes": self.compressed_input_bytes,
            "updates_applied": self.updates_applied,
            "updates_delivered": self.updates_delivered,
            "updates_coalesced": self.updates_coalesced,
            "published": self.published,
            "slow_events": self.slow_events,
            "flush_hist": hist(self.flush_hist),
            "publish_hist": hist(self.publish_hist),
            "frames_refused": self.frames_refused,
            "slow_clients": self.slow_clients,
            "slow_closes": self.slow_closes,
            "connects": self.connects,
            "closes": dict(self.closes),
            "errors": dict(self.errors),
            "ping_timeouts": self.ping_timeouts,
            "upgrades_refused": dict(self.upgrades_refused),
            "upgrades_refused_by": dict(self.upgrades_refused_by),
            "loop_lag_max_ms": self.loop_lag_max_ms,
            "gc_hist": hist(self.gc_hist),
            "gc_collections": dict(self.gc_collections),
            "started": self.started,
            "ts": self.ts,
        }  # fmt: skip

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> WorkerStatus:
        down = doc.get("bus_tasks_down")
        return cls(
            pid=_opt_int(doc.get("pid")),
            slot=_int(doc.get("slot")),
            accepting=doc.get("accepting") is True,
            bus_connected=doc.get("bus_connected") is True,
            bus_lag_ms=_number(doc.get("bus_lag_ms")),
            bus_shard_lag_ms=_numbers(doc.get("bus_shard_lag_ms")),
            bus_last_entry_age_ms=_number(doc.get("bus_last_entry_age_ms")),
            bus_events=_counts(doc.get("bus_events")),
            bus_tasks_down=tuple(str(d) for d in down) if isinstance(down, list) else (),
            connections=_int(doc.get("connections")),
            subscriptions=_int(doc.get("subscriptions")),
            topics=_int(doc.get("topics")),
            topics_idle=_int(doc.get("topics_idle")),
            topics_loading=_int(doc.get("topics_loading")),
            topics_loaded=_int(doc.get("topics_loaded")),
            topics_dropped=_int(doc.get("topics_dropped")),
            topic_load_failures=_int(doc.get("topic_load_failures")),
            updates_unheld=_int(doc.get("updates_unheld")),
            frames_sent=_int(doc.get("frames_sent")),
            bytes_sent=_int(doc.get("bytes_sent")),
            compressed_frames=_int(doc.get("compressed_frames")),
            compressed_bytes=_int(doc.get("compressed_bytes")),
            compressed_input_bytes=_int(doc.get("compressed_input_bytes")),
            updates_applied=_int(doc.get("updates_applied")),
            updates_delivered=_int(doc.get("updates_delivered")),
            updates_coalesced=_int(doc.get("updates_coalesced")),
            published=_int(doc.get("published")),
            slow_events=_int(doc.get("slow_events")),
            flush_hist=HistogramCounts.from_json(doc.get("flush_hist")),
            publish_hist=HistogramCounts.from_json(doc.get("publish_hist")),
            frames_refused=_int(doc.get("frames_refused")),
            slow_clients=_int(doc.get("slow_clients")),
            slow_closes=_int(doc.get("slow_closes")),
            connects=_int(doc.get("connects")),
            closes=_counts(doc.get("closes")),
            errors=_counts(doc.get("errors")),
            ping_timeouts=_int(doc.get("ping_timeouts")),
            upgrades_refused=_counts(doc.get("upgrades_refused")),
            upgrades_refused_by=_counts(doc.get("upgrades_refused_by")),
            loop_lag_max_ms=_number(doc.get("loop_lag_max_ms")) or 0.0,
            gc_hist=HistogramCounts.from_json(doc.get("gc_hist")),
            gc_collections=_counts(doc.get("gc_collections")),
            started=_number(doc.get("started")),
            ts=_number(doc.get("ts")),
        )


# -- the supervisor ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SupervisorStatus:
    """The supervisor's state and the processes it runs (engine/supervisor/arbiter.py)."""

    pid: int | None = None
    state: str | None = None  # starting | running | draining | stopping
    workers_expected: int | None = None  # worker slots that count toward readiness
    # slot -> pid of the workers it runs (None: a pid the file did not give as an integer)
    workers: Mapping[int, int | None] = field(default_factory=dict)
    aux: Mapping[str, int] = field(default_factory=dict)  # name -> pid (hub, admin, ...)
    port: int | None = None
    admin_port: int | None = None
    started: float | None = None  # wall clock
    ts: float | None = None  # rule 5

    def age_s(self, now: float) -> float:
        """Seconds since the status was written as of `now` (infinite: never)."""
        return math.inf if self.ts is None else now - self.ts

    def to_json(self) -> Json:
        return {
            "pid": self.pid,
            "state": self.state,
            "workers_expected": self.workers_expected,
            "workers": {str(slot): pid for slot, pid in self.workers.items()},
            "aux": dict(self.aux),
            "port": self.port,
            "admin_port": self.admin_port,
            "started": self.started,
            "ts": self.ts,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SupervisorStatus:
        state = doc.get("state")
        return cls(
            pid=_opt_int(doc.get("pid")),
            state=state if isinstance(state, str) else None,
            workers_expected=_opt_int(doc.get("workers_expected")),
            workers=_slots(doc.get("workers")),
            aux=_counts(doc.get("aux")),
            port=_opt_int(doc.get("port")),
            admin_port=_opt_int(doc.get("admin_port")),
            started=_number(doc.get("started")),
            ts=_number(doc.get("ts")),
        )


# -- POST /rebalance -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RebalanceOrder:
    """A shedding request of POST /rebalance, or of automatic rebalancing
    (engine/admin/server.py): how many connections each worker slot closes,
    spread over `pace_s`; with `hold_s`, a worker that sheds also refuses new
    upgrades until `hold_s` after its shedding ends (engine/rebalance.py rule 6).
    Workers read it when the admin sends them SIGUSR2 (workers/main.py)."""

    id: str = ""  # the admin's wall clock when it was made, for the logs
    shed: Mapping[int, int] = field(default_factory=dict)  # slot -> connections to close
    pace_s: float = 0.0
    hold_s: float = 0.0
    ts: float | None = None  # rule 5

    def to_json(self) -> Json:
        return {
            "id": self.id,
            "shed": {str(slot): n for slot, n in self.shed.items()},
            "pace_s": self.pace_s,
            "hold_s": self.hold_s,
            "ts": self.ts,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RebalanceOrder:
        order = doc.get("id")
        return cls(
            id=order if isinstance(order, str) else "",
            shed={slot: n for slot, n in _slots(doc.get("shed")).items() if n is not None},
            pace_s=_number(doc.get("pace_s")) or 0.0,
            hold_s=_number(doc.get("hold_s")) or 0.0,
            ts=_number(doc.get("ts")),
        )


def _slots(v: object) -> dict[int, int | None]:
    """{"1": pid} -> {1: pid}: keys that are not slot numbers are left out."""
    out: dict[int, int | None] = {}
    if not isinstance(v, Mapping):
        return out
    for slot, pid in v.items():
        try:
            n = int(slot)
        except (TypeError, ValueError):
            continue
        out[n] = _opt_int(pid)
    return out
