"""What a worker counts: one object, one owner. PURE: no I/O, no clock.

The worker (workers/server.py) owns one `WorkerCounters`; its connections
(engine.connection, workers/listener.py) count through it, and the worker's
status reads it. Nothing else keeps a copy of these figures.

Rules:
1. Counters only grow, from zero at the worker's start (the status board and
   /metrics export them as Prometheus counters).
2. Labelled counters (`closes`, `errors`, `refused`, `refused_by`,
   `gc_collections`) have a bounded set of keys: close labels
   (engine/protocol/closecodes.py rule 4), `err` codes (engine.codes.ErrorCode),
   HTTP statuses, the `error` of the upgrade refusal bodies, and the
   collector's generations ("0", "1", "2").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from engine.metrics import Histogram


@dataclass(slots=True, eq=False)
class WorkerCounters:
    """One worker's counters (see the module's rules)."""

    connects: int = 0
    # by close label (engine/protocol/closecodes.py rule 4)
    closes: Counter[str] = field(default_factory=Counter)
    # `err` replies by code
    errors: Counter[str] = field(default_factory=Counter)
    ping_timeouts: int = 0
    published: int = 0  # updates the bus accepted from WebSocket `pub`
    slow_events: int = 0  # times a connection went over its send budget
    control_frames: int = 0  # replies (hello, ack, err, snap, pong) sent outside the budget
    topic_load_failures: int = 0
    refused: Counter[int] = field(default_factory=Counter)  # HTTP status -> upgrades refused
    refused_by: Counter[str] = field(default_factory=Counter)  # the body's `error` -> refused
    flush_hist: Histogram = field(default_factory=Histogram)
    publish_hist: Histogram = field(default_factory=Histogram)
    # the cyclic collector (workers/gcpolicy.py): pauses, and collections by generation
    gc_hist: Histogram = field(default_factory=Histogram)
    gc_collections: Counter[str] = field(default_factory=Counter)
