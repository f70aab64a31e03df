"""Metrics: bounded histograms and the Prometheus text rendering. PURE: no I/O.

How metrics travel: each worker keeps plain counters and histograms in its
own memory and writes them into its board status once a second (an
engine.status.WorkerStatus; the file is also its heartbeat); the admin
process reads every status, adds
per-process figures (CPU, RSS, open fds) and its own publish metrics, and
renders them here. This is the "equivalent aggregation across workers" of
the design: no shared memory, no lock, nothing on the hot path but an
integer increment. A worker's counters restart from zero when the worker is
replaced; every series carries its `worker` slot, so Prometheus' `rate()`
treats that as an ordinary counter reset.

Names follow Prometheus conventions: `fanout_` prefix, base units in the
name (`_seconds`, `_bytes`), `_total` for counters.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from engine.protocol.closecodes import close_label
from engine.status import HistogramCounts, WorkerStatus

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# Latency-style buckets in seconds: 0.5 ms .. 10 s.
LATENCY_BUCKETS_S: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Histogram:
    """Cumulative-on-render histogram with fixed buckets (memory: one int per bucket)."""

    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.count += 1
        self.sum += value

    def snapshot(self) -> HistogramCounts:
        """Its figures as of now, for a board status or a Family sample."""
        return HistogramCounts(self.buckets, tuple(self.counts), self.count, self.sum)


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: name, type (counter | gauge | histogram), help, samples
    (labels and a number, or a HistogramCounts for a histogram)."""

    name: str
    kind: str
    help: str
    samples: tuple[tuple[Mapping[str, str], Any], ...]


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    parts = []
    for k, v in labels.items():
        v = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        parts.append(f'{k}="{v}"')
    return "{" + ",".join(parts) + "}"


def _num(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def render(families: Iterable[Family]) -> str:
    """Prometheus text exposition format 0.0.4."""
    out: list[str] = []
    for fam in families:
        if not fam.samples:
            continue
        out.append(f"# HELP {fam.name} {fam.help}")
        out.append(f"# TYPE {fam.name} {fam.kind}")
        for labels, value in fam.samples:
            if fam.kind == "histogram":
                out.extend(_histogram_lines(fam.name, labels, value))
            else:
                out.append(f"{fam.name}{_labels(labels)} {_num(value)}")
    return "\n".join(out) + "\n"


def _histogram_lines(name: str, labels: Mapping[str, str], h: HistogramCounts) -> list[str]:
    lines = []
    cumulative = 0
    for bound, count in zip([*h.bounds, float("inf")], h.counts, strict=False):
        cumulative += count
        le = "+Inf" if bound == float("inf") else _num(bound)
        lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {cumulative}")
    lines.append(f"{name}_sum{_labels(labels)} {_num(h.sum)}")
    lines.append(f"{name}_count{_labels(labels)} {h.count}")
    return lines


# -- what the admin renders from the board -------------------------------------------

# Per-shard series are workers x shards per node: above this many shards
# (bus.shards, 16 by default, up to 1024) only the worst shard is exported
# (fanout_bus_lag_seconds), to keep a node's series count bounded.
SHARD_SERIES_MAX: Final = 64

# (the status figure, metric name, kind, help): per-worker figures written by workers.
WORKER_SERIES: Final[tuple[tuple[Callable[[WorkerStatus], int], str, str, str], ...]] = (
    (lambda st: st.connections, "fanout_connections", "gauge", "Open WebSocket connections."),
    (lambda st: st.subscriptions, "fanout_subscriptions", "gauge", "Topic subscriptions held."),
    (lambda st: st.topics, "fanout_topics", "gauge", "Topics held: subscribed, loading, or in their grace (fanout.topic_grace_s)."),
    (lambda st: st.topics_dropped, "fanout_topics_dropped_total", "counter", "Topics dropped after their last subscriber left and the grace passed."),
    (lambda st: st.topics_loaded, "fanout_topic_loads_total", "counter", "Topics loaded from the bus for a sub."),
    (lambda st: st.topic_load_failures, "fanout_topic_load_failures_total", "counter", "Topic loads that failed (the sub was answered err unavailable)."),
    (lambda st: st.updates_unheld, "fanout_updates_unheld_total", "counter", "Bus entries ignored: their topic is not held by this worker."),
    (lambda st: st.connects, "fanout_connects_total", "counter", "WebSocket connections accepted."),
    (lambda st: st.updates_applied, "fanout_updates_applied_total", "counter", "Bus entries that changed a key's value."),
    (lambda st: st.updates_delivered, "fanout_updates_delivered_total", "counter", "Key values delivered to clients (in upd and snap messages)."),
    (lambda st: st.updates_coalesced, "fanout_updates_coalesced_total", "counter", "Updates replaced by a newer value of the same key before they were sent."),
    (lambda st: st.frames_sent, "fanout_frames_sent_total", "counter", "WebSocket frames sent (updates and replies)."),
    (lambda st: st.bytes_sent, "fanout_bytes_sent_total", "counter", "Bytes of update frames handed to sockets."),
    (lambda st: st.compressed_frames, "fanout_compressed_frames_total", "counter", "Update frames sent compressed (permessage-deflate); counted in fanout_frames_sent_total too."),
    (lambda st: st.compressed_bytes, "fanout_compressed_bytes_total", "counter", "Bytes of the compressed update frames as sent; in fanout_bytes_sent_total too."),
    (lambda st: st.compressed_input_bytes, "fanout_compressed_input_bytes_total", "counter", "Bytes of the compressed update frames before compression."),
    (lambda st: st.frames_refused, "fanout_send_budget_overflows_total", "counter", "Update frames not sent because the connection was over its send budget."),
    (lambda st: st.slow_clients, "fanout_slow_consumers", "gauge", "Connections over their send budget right now."),
    (lambda st: st.slow_events, "fanout_slow_consumer_events_total", "counter", "Times a connection went over its send budget."),
    (lambda st: st.slow_closes, "fanout_slow_consumer_closes_total", "counter", "Connections closed with 4008 (over budget too long)."),
    (lambda st: st.ping_timeouts, "fanout_ping_timeouts_total", "counter", "Connections dropped for not answering WebSocket pings."),
    (lambda st: st.published, "fanout_updates_published_total", "counter", "Updates accepted by the bus from WebSocket `pub`."),
)  # fmt: skip


def worker_families(
    workers: Mapping[int, WorkerStatus], heartbeat_age_s: Mapping[int, float]
) -> list[Family]:
    """Families built from worker statuses (slot -> status): the figures of
    WORKER_SERIES, the counts by label, the bus link's, then the heartbeat and
    the histograms."""
    slots = sorted(workers)
    fams = [
        Family(name, kind, help_, tuple(({"worker": str(s)}, figure(workers[s])) for s in slots))
        for figure, name, kind, help_ in WORKER_SERIES
    ]
    fams += _labelled_families(workers, slots)
    fams += _bus_families(workers, slots)
    fams.append(Family(
        "fanout_worker_heartbeat_age_seconds", "gauge", "Seconds since the worker last wrote its status (its heartbeat).",
        tuple(({"worker": str(s)}, round(heartbeat_age_s[s], 3)) for s in slots if s in heartbeat_age_s),
    ))  # fmt: skip
    fams.append(Family(
        "fanout_flush_duration_seconds", "histogram", "Time one flush tick took (plan and write every frame).",
        tuple(({"worker": str(s)}, h) for s in slots if (h := workers[s].flush_hist) is not None),
    ))  # fmt: skip
    fams.append(Family(
        "fanout_ws_publish_duration_seconds", "histogram", "WebSocket `pub`: time from the request to the bus's acceptance.",
        tuple(({"worker": str(s)}, h) for s in slots if (h := workers[s].publish_hist) is not None),
    ))  # fmt: skip
    fams.append(Family(
        "fanout_gc_pause_seconds", "histogram", "Pauses of the worker's cyclic garbage collector (its loop stalls meanwhile).",
        tuple(({"worker": str(s)}, h) for s in slots if (h := workers[s].gc_hist) is not None),
    ))  # fmt: skip
    fams.append(Family(
        "fanout_gc_collections_total", "counter", "Collections of the worker's cyclic garbage collector, by generation (2: full).",
        tuple(
            ({"worker": str(s), "generation": g}, n)
            for s in slots
            for g, n in sorted(workers[s].gc_collections.items())
        ),
    ))  # fmt: skip
    return fams


def _labelled_families(workers: Mapping[int, WorkerStatus], slots: list[int]) -> list[Family]:
    """Counts by a second label: upgrade refusals by reason, closes by code, `err` by code."""
    fams: list[Family] = []
    closes = []
    errors = []
    refusals = []
    for s in slots:
        for label, n in sorted(_close_labels(workers[s].closes).items()):
            closes.append(({"worker": str(s), "code": label}, n))
        for code, n in sorted(workers[s].errors.items()):
            errors.append(({"worker": str(s), "code": code}, n))
        for reason, n in sorted(workers[s].upgrades_refused_by.items()):
            refusals.append(({"worker": str(s), "reason": reason}, n))
    fams.append(
        Family(
            "fanout_upgrades_refused_total",
            "counter",
            "WebSocket upgrades refused, by reason (the `error` of the JSON body:"
            " busy and too_many_attempts are limits.upgrades_per_s and"
            " limits.upgrades_per_ip_per_s).",
            tuple(refusals),
        )
    )
    fams.append(
        Family(
            "fanout_disconnects_total",
            "counter",
            "Connections ended, by close code (1006: no close handshake; codes chosen by"
            " clients that the engine does not know: 3xxx, 4xxx, other).",
            tuple(closes),
        )
    )
    fams.append(
        Family(
            "fanout_errors_total",
            "counter",
            "`err` replies sent to clients, by code.",
            tuple(errors),
        )
    )
    return fams


def _bus_families(workers: Mapping[int, WorkerStatus], slots: list[int]) -> list[Family]:
    """Each worker's bus link: connected, lag (worst shard, each shard), last entry, events."""
    fams: list[Family] = []
    fams.append(Family(
        "fanout_bus_connected", "gauge", "1 when the worker's bus link is up.",
        tuple(({"worker": str(s)}, 1 if workers[s].bus_connected else 0) for s in slots),
    ))  # fmt: skip
    fams.append(Family(
        "fanout_bus_lag_seconds", "gauge", "How far the worker is behind the bus head (worst shard).",
        tuple(
            ({"worker": str(s)}, lag / 1000.0)
            for s in slots
            if (lag := workers[s].bus_lag_ms) is not None
        ),
    ))  # fmt: skip
    fams.append(Family(
        "fanout_bus_shard_lag_seconds", "gauge",
        "How far the worker is behind each shard's head (label shard; at most"
        f" {SHARD_SERIES_MAX} shards per worker, else only fanout_bus_lag_seconds).",
        tuple(
            ({"worker": str(s), "shard": str(shard)}, float(lag) / 1000.0)
            for s in slots
            for shard, lag in enumerate(_shard_lags(workers[s]))
        ),
    ))  # fmt: skip
    fams.append(Family(
        "fanout_bus_last_entry_age_seconds", "gauge",
        "Seconds since the worker last read an entry from the bus (any shard).",
        tuple(
            ({"worker": str(s)}, age / 1000.0)
            for s in slots
            if (age := workers[s].bus_last_entry_age_ms) is not None
        ),
    ))  # fmt: skip
    fams.append(bus_events_family(
        ({"worker": str(s)}, workers[s].bus_events) for s in slots
    ))  # fmt: skip
    return fams


def _close_labels(closes: Mapping[str, int]) -> dict[str, int]:
    """A worker's close counts by label (engine.protocol.closecodes rule 4): a
    status keyed by raw codes (an older worker) is bucketed here too."""
    out: dict[str, int] = {}
    for code, n in closes.items():
        label = close_label(int(code)) if code.isdigit() else code
        out[label] = out.get(label, 0) + n
    return out


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# What a bus client counts (its `bus_stats()`, engine/bus/tasks.py and the backends).
BUS_EVENTS: Final = (
    "task_restarts",
    "publish_timeouts",
    "oom_refusals",
    "byte_trims",
    "topics_expired",
    "bad_entries",
)


def bus_events_family(
    clients: Iterable[tuple[Mapping[str, str], Any]], name: str = "fanout_bus_events_total"
) -> Family:
    """`fanout_bus_events_total{worker, event}` from (labels, bus_stats dict) per client."""
    samples = tuple(
        ({**labels, "event": event}, counts[event])
        for labels, counts in clients
        if isinstance(counts, Mapping)
        for event in BUS_EVENTS
        if _is_number(counts.get(event))
    )
    return Family(
        name, "counter",
        "Bus client events: background tasks restarted after a failure (task_restarts),"
        " requests without a reply within bus.publish_timeout_s (publish_timeouts),"
        " publishes Redis refused at maxmemory (oom_refusals), stream entries removed"
        " for bus.redis.stream_max_bytes (byte_trims), idle topics removed (topics_expired),"
        " stream entries skipped as unreadable (bad_entries).",
        samples,
    )  # fmt: skip


def _shard_lags(status: WorkerStatus) -> tuple[float, ...]:
    """A worker's per-shard lags in ms (index = shard): none while it is
    disconnected, on a bus without shards to report, or past SHARD_SERIES_MAX."""
    lags = status.bus_shard_lag_ms
    if lags is None or len(lags) > SHARD_SERIES_MAX:
        return ()
    return lags


def process_families(processes: Mapping[str, Mapping[str, float]]) -> list[Family]:
    """Per-process figures (name -> {"cpu_s", "rss_bytes", "fds"}) from psutil."""
    names = sorted(processes)

    def series(field: str) -> tuple[tuple[Mapping[str, str], Any], ...]:
        return tuple(({"process": n}, processes[n][field]) for n in names if field in processes[n])

    return [
        Family("fanout_process_cpu_seconds_total", "counter", "CPU time (user + system) of each fanout process.", series("cpu_s")),
        Family("fanout_process_resident_memory_bytes", "gauge", "Resident memory of each fanout process.", series("rss_bytes")),
        Family("fanout_process_open_fds", "gauge", "Open file descriptors of each fanout process.", series("fds")),
    ]  # fmt: skip
