"""loadtest/bench/connections.py: what a run's connections need (source addresses,
fd limits, the server's limits.max_connections) and the connect time."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from loadtest.bench import connections as conns
from loadtest.server import SetupError


def settings(**kw: Any) -> Any:
    base = {"subscribers": 50_000, "warmup": 5_000, "source_addrs": 0, "workers": 2,
            "nodes": 1, "sub_procs": 8}  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def test_fifty_thousand_connections_use_three_source_addresses_warmup_included() -> None:
    assert conns.source_addr_count(settings()) == 3
    assert conns.source_addr_count(settings(subscribers=100, warmup=10)) == 1
    assert conns.source_addr_count(settings(source_addrs=5)) == 5


def test_a_worker_share_above_the_default_passes_max_connections_to_the_server() -> None:
    two = settings()
    assert conns.per_worker(two) > 27_500  # half of 55,000 and a margin for the hash
    assert conns.server_env(two) == {"FANOUT_LIMITS_MAX_CONNECTIONS": str(conns.per_worker(two))}
    assert conns.server_env(settings(workers=3)) == {}  # 18,334 and a margin: the default fits


def test_a_run_that_cannot_get_its_file_descriptors_stops_naming_the_fix() -> None:
    # more than any kernel's fs.nr_open: no process can get that many fds
    with pytest.raises(SetupError, match=r"open files.*ulimit -Hn.*--workers"):
        conns.fit_connections(settings(subscribers=5_000_000, warmup=0, workers=1))


def test_connect_time_runs_from_the_first_attempt_to_the_last_connection_up() -> None:
    setups = [
        {"connected": 10, "first_connect_t": 100.0, "last_connected_t": 104.0, "ready_t": 105.0,
         "connect_retries": 1},
        {"connected": 10, "first_connect_t": 101.0, "last_connected_t": 102.0, "ready_t": 103.0},
    ]  # fmt: skip
    assert conns.connect_times(setups) == {
        "connect_s": 4.0,
        "subscribed_s": 5.0,
        "connects_per_s": 5,
        "connect_retries": 1,
    }
    assert conns.connect_times([{"connected": 0}])["connect_s"] is None


def test_connect_cpu_is_the_server_difference_and_the_generator_total_per_connection() -> None:
    out = conns.connect_cpu({1: (1.0, 0.5), 2: (2.0, 0.0)}, {1: (2.0, 1.5), 2: (2.5, 0.5)},
                            {7: (1.5, 0.5)}, 1_000)  # fmt: skip
    assert out == {
        "connect_server_cpu_s": 3.0,
        "connect_server_us_per_connection": 3000.0,
        "connect_generator_cpu_s": 2.0,
        "connect_generator_us_per_connection": 2000.0,
    }
