"""A scaled-down flood (loadtest/flood.py) as a behaviour test: abusive clients
against a real 2-worker `fanout serve` while honest subscribers receive a feed.

Asserts behaviour only (no timings, no latency or memory thresholds: those are
the measurement's job, reported by `python -m loadtest.flood`): every abuser is
throttled and then closed with 4029, no honest subscriber is closed, and the
honest subscribers keep receiving updates during the flood.
"""

from __future__ import annotations

from typing import Any

import pytest

from loadtest import flood

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_abusers_are_throttled_then_closed_4029_and_honest_clients_are_served(
    tmp_path: Any,
) -> None:
    args = flood.main_args(
        [
            "--abusers", "50",
            "--procs", "2",
            "--duration", "4",
            "--abuse-window", "1.5",
            "--rate-limit", "5",
            "--honest", "5",
            "--feed-rate", "200",
            "--warmup", "1.5",
            "--settle", "1",
            "--server-log", str(tmp_path / "serve.log"),
        ]
    )  # fmt: skip
    result = flood.run(args)
    abusers, honest, server = result["abusers"], result["honest"], result["server"]
    assert abusers["connected"] == 50
    assert abusers["throttled"] == 50  # every one saw `err rate_limited` first ...
    assert abusers["closed_4029_after_throttle"] == 50  # ... then the 4029 close
    assert abusers["close_codes"] == {"4029": 50}
    assert server["closes"].get("4029") == 50
    assert honest["closed_during_run"] == 0
    assert honest["samples_flood"] > 0  # updates published during the flood arrived
    assert server["connections_after"] == 5  # the honest ones; the abusers are gone


def test_stalled_handshakes_are_dropped_while_normal_clients_connect(tmp_path: Any) -> None:
    """A scaled-down slowloris (loadtest/slowloris.py): TCP connections that
    never finish the upgrade are all dropped by the server, and every normal
    client that connects meanwhile is served."""
    import argparse

    from loadtest import slowloris

    args = argparse.Namespace(
        connections=300,
        honest=5,
        workers=2,
        handshake_timeout=1.0,
        json=None,
        server_log=str(tmp_path / "serve.log"),
    )
    result = slowloris.run(args)
    assert result["dropped_by_server"] == 300
    assert result["still_open_after_60s"] == 0 and result["server_sent_data"] == 0
    assert result["honest"]["served"] == 5
