"""The Prometheus rendering and the histograms behind /metrics, and the
coalescing counter of the fan-out core."""

from __future__ import annotations

import re

from engine.fanout.core import Fanout, Session
from engine.metrics import (
    SHARD_SERIES_MAX,
    Family,
    Histogram,
    process_families,
    render,
    worker_families,
)
from engine.protocol.codec import make_pos
from engine.status import WorkerStatus


def board(statuses: dict[int, dict[str, object]]) -> dict[int, WorkerStatus]:
    """Worker statuses as the admin reads them from the board's JSON."""
    return {slot: WorkerStatus.from_json(doc) for slot, doc in statuses.items()}


def test_histogram_buckets_are_cumulative_in_the_text() -> None:
    h = Histogram((0.01, 0.1, 1.0))
    for v in (0.005, 0.01, 0.05, 0.5, 5.0):
        h.observe(v)
    text = render([Family("x_seconds", "histogram", "help", (({"worker": "1"}, h.snapshot()),))])
    assert 'x_seconds_bucket{worker="1",le="0.01"} 2' in text
    assert 'x_seconds_bucket{worker="1",le="0.1"} 3' in text
    assert 'x_seconds_bucket{worker="1",le="1"} 4' in text
    assert 'x_seconds_bucket{worker="1",le="+Inf"} 5' in text
    assert 'x_seconds_count{worker="1"} 5' in text
    assert re.search(r"x_seconds_sum\{worker=\"1\"\} 5\.56\d*", text)
    assert "# TYPE x_seconds histogram" in text


def test_worker_families_from_board_statuses() -> None:
    workers = {
        1: {"connections": 3, "frames_sent": 10, "closes": {"1000": 2, "4008": 1}, "errors": {"bad_topic": 4},
            "bus_connected": True, "bus_lag_ms": 12.0, "flush_hist": Histogram().snapshot().to_json()},
        2: {"connections": 5, "frames_sent": 7, "closes": {}, "bus_connected": False},
    }  # fmt: skip
    text = render(worker_families(board(workers), {1: 0.5, 2: 0.25}))
    assert 'fanout_connections{worker="1"} 3' in text
    assert 'fanout_connections{worker="2"} 5' in text
    assert 'fanout_frames_sent_total{worker="2"} 7' in text
    assert 'fanout_disconnects_total{worker="1",code="4008"} 1' in text
    assert 'fanout_errors_total{worker="1",code="bad_topic"} 4' in text
    assert 'fanout_bus_connected{worker="2"} 0' in text
    assert 'fanout_bus_lag_seconds{worker="1"} 0.012' in text
    assert 'fanout_worker_heartbeat_age_seconds{worker="2"} 0.25' in text
    assert "# TYPE fanout_frames_sent_total counter" in text
    # a family with no samples is left out entirely
    assert "fanout_ws_publish_duration_seconds" not in text
    # every sample line parses as `name{labels} number`
    for line in text.splitlines():
        if not line.startswith("#"):
            assert re.fullmatch(
                r'[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[0-9.e+-]+|.*\+Inf"\} \d+',
                line,
            ), line


def test_each_shards_lag_is_a_gauge_per_worker_and_shard() -> None:
    workers = {
        1: {"bus_lag_ms": 1500.0, "bus_shard_lag_ms": [0.0, 1500.0, 2.5], "bus_last_entry_age_ms": 250.0},
        2: {"bus_lag_ms": 0.0, "bus_shard_lag_ms": [0.0, 0.0, 0.0], "bus_last_entry_age_ms": 0},
        3: {"bus_shard_lag_ms": None, "bus_last_entry_age_ms": None},  # disconnected
        4: {"connections": 1},  # the local bus reports neither
    }  # fmt: skip
    text = render(worker_families(board(workers), {}))
    lines = [ln for ln in text.splitlines() if ln.startswith("fanout_bus_shard_lag_seconds{")]
    assert lines == [
        'fanout_bus_shard_lag_seconds{worker="1",shard="0"} 0',
        'fanout_bus_shard_lag_seconds{worker="1",shard="1"} 1.5',
        'fanout_bus_shard_lag_seconds{worker="1",shard="2"} 0.0025',
        'fanout_bus_shard_lag_seconds{worker="2",shard="0"} 0',
        'fanout_bus_shard_lag_seconds{worker="2",shard="1"} 0',
        'fanout_bus_shard_lag_seconds{worker="2",shard="2"} 0',
    ]
    assert "# TYPE fanout_bus_shard_lag_seconds gauge" in text
    ages = [ln for ln in text.splitlines() if ln.startswith("fanout_bus_last_entry_age_seconds{")]
    assert ages == [
        'fanout_bus_last_entry_age_seconds{worker="1"} 0.25',
        'fanout_bus_last_entry_age_seconds{worker="2"} 0',
    ]
    assert "# TYPE fanout_bus_last_entry_age_seconds gauge" in text
    # the worst shard stays the per-worker figure
    assert 'fanout_bus_lag_seconds{worker="1"} 1.5' in text


def test_per_shard_series_are_bounded_and_bad_values_dropped() -> None:
    many = {1: {"bus_lag_ms": 7.0, "bus_shard_lag_ms": [7.0] * (SHARD_SERIES_MAX + 1)}}
    text = render(worker_families(board(many), {}))
    assert "fanout_bus_shard_lag_seconds" not in text
    assert 'fanout_bus_lag_seconds{worker="1"} 0.007' in text
    at_cap = render(worker_families(board({1: {"bus_shard_lag_ms": [1.0] * SHARD_SERIES_MAX}}), {}))
    assert at_cap.count("fanout_bus_shard_lag_seconds{") == SHARD_SERIES_MAX
    # a malformed status (not a list of numbers) is not rendered at all
    for bad in ("12", [1.0, "x"], [True], {"0": 1.0}):
        text = render(
            worker_families(
                board({1: {"bus_shard_lag_ms": bad, "bus_last_entry_age_ms": True}}), {}
            )
        )
        assert "fanout_bus_shard_lag_seconds" not in text
        assert "fanout_bus_last_entry_age_seconds" not in text


def test_process_families_and_label_escaping() -> None:
    text = render(process_families({"worker 1": {"cpu_s": 1.5, "rss_bytes": 1024, "fds": 12}}))
    assert 'fanout_process_cpu_seconds_total{process="worker 1"} 1.5' in text
    assert 'fanout_process_resident_memory_bytes{process="worker 1"} 1024' in text
    escaped = render([Family("a", "gauge", "h", (({"l": 'q"\\\n'}, 1),))])
    assert 'a{l="q\\"\\\\\\n"} 1' in escaped


class _Sink:
    def write(self, frame: bytes) -> bool:
        return True


def test_updates_replaced_before_a_flush_count_as_coalesced() -> None:
    fo = Fanout("e")
    s = Session(_Sink())
    fo.subscribe(s, "t", None, 1)
    fo.apply("t", "a", make_pos(1, 0), b"\x01")
    fo.apply("t", "a", make_pos(1, 1), b"\x02")  # replaces an unsent value
    fo.apply("t", "a", make_pos(1, 2), b"\x03")  # again
    fo.apply("t", "b", make_pos(1, 3), b"\x01")  # a new key: nothing replaced
    for sess, d in fo.collect().items():
        fo.deliver(sess, d)
    assert fo.stats.updates_coalesced == 2
    fo.apply("t", "a", make_pos(2, 0), b"\x04")  # the sent value is replaced: not coalesced
    assert fo.stats.updates_coalesced == 2
    assert fo.stats.updates_applied == 5
