"""The live dashboard in a real headless Chromium, against a real `fanout serve --demo`.

- it loads from the admin port and shows live prices within 2 s;
- at a quiet moment (the demo feed stopped with SIGSTOP) every price shown
  equals the server's latest state, read over a separate WebSocket;
- after a SIGHUP rolling restart (every worker replaced: `bye`, close 1012),
  after `kill -9` of the worker, and after a full stop (SIGTERM: `bye`, then
  close 1001) and start on the same ports, the page reconnects by itself and
  shows updates again, recovering with `since` when the epoch is the same.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import websocket

from tests.support.serve import TIMEOUT_FACTOR, Served

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

DEMO_TOPICS = ("prices.fx", "prices.crypto", "prices.equities")
MS = TIMEOUT_FACTOR * 1000


@pytest.fixture(scope="module")
def demo(tmp_path_factory: Any) -> Iterator[Served]:
    s = Served(
        ["--workers", "1", "--demo"], log_path=str(tmp_path_factory.mktemp("e2e") / "serve.log")
    )
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout * TIMEOUT_FACTOR
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def server_state(ws_url: str) -> dict[str, dict[str, float]]:
    """Every demo price, from a full snapshot over a plain WebSocket."""
    ws = websocket.create_connection(ws_url, subprotocols=["fanout.v1"], timeout=10)
    try:
        ws.send_binary(msgpack.packb({"op": "sub", "topics": list(DEMO_TOPICS), "id": 1}))
        unpacker = msgpack.Unpacker(raw=False)
        state: dict[str, dict[str, float]] = {}
        while len(state) < len(DEMO_TOPICS):
            unpacker.feed(ws.recv())
            for msg in unpacker:
                if msg["op"] == "snap":
                    state[msg["topic"]] = {k: v["px"] for k, v in msg["items"].items()}
        return state
    finally:
        ws.close()


SHOWN_JS = """() => Object.fromEntries([...document.querySelectorAll('section.topic')].map(
    (s) => [s.dataset.topic, Object.fromEntries([...s.querySelectorAll('tr[data-key]')].map(
        (tr) => [tr.dataset.key, tr.querySelector('.px').dataset.px]))]))"""


def shown(page: Any) -> dict[str, dict[str, float]]:
    table = page.evaluate(SHOWN_JS)
    return {t: {k: float(px) for k, px in rows.items()} for t, rows in table.items()}


def open_dashboard(page: Any, served: Served) -> None:
    page.goto(served.admin_url + "/", wait_until="domcontentloaded")


def test_dashboard_loads_and_shows_live_prices_within_2_s(page: Any, demo: Served) -> None:
    open_dashboard(page, demo)
    page.wait_for_function(
        "() => window.dashboard && window.dashboard.stats.received > 0"
        " && document.querySelectorAll('tr[data-key]').length === 300",
        timeout=2 * MS,
    )
    assert page.inner_text("#conn-state") == "connected"
    assert int(page.inner_text("#keys")) == 300
    page.wait_for_function(
        "() => Number(document.getElementById('rate').textContent) > 0", timeout=2 * MS
    )
    assert page.inner_text("#latency").endswith(" ms")
    # the client is served with the right type, and the page names where it connects
    assert page.inner_text("#ws-url") == demo.ws_url
    # a changed price flashes (green up, red down)
    page.wait_for_function(
        "() => document.querySelectorAll('tr.up, tr.down').length > 0", timeout=2 * MS
    )


def test_displayed_prices_equal_the_server_state_at_a_quiet_moment(page: Any, demo: Served) -> None:
    open_dashboard(page, demo)
    page.wait_for_function(
        "() => document.querySelectorAll('tr[data-key]').length === 300", timeout=5 * MS
    )
    # Chromium offers permessage-deflate by itself: the page's snaps and updates
    # come compressed (once per group), the truth below over a socket without it
    assert page.evaluate("() => window.dashboard.client._ws.extensions") == (
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    )
    feed = demo.supervisor_status().aux["demo"]
    os.kill(feed, signal.SIGSTOP)  # a quiet moment: nothing is published until SIGCONT
    try:
        last: list[Any] = []

        def converged() -> bool:
            truth, seen = server_state(demo.ws_url), shown(page)
            last[:] = [truth, seen]
            return truth == seen

        eventually(converged)
        seen = last[1]
        assert sum(len(v) for v in seen.values()) == 300
    finally:
        os.kill(feed, signal.SIGCONT)


def wait_for_new_updates(page: Any, timeout_ms: float) -> None:
    before = page.evaluate("() => window.dashboard.stats.received")
    page.wait_for_function(f"() => window.dashboard.stats.received > {before}", timeout=timeout_ms)


def test_page_reconnects_and_recovers_after_the_worker_is_killed(page: Any, demo: Served) -> None:
    open_dashboard(page, demo)
    page.wait_for_function(
        "() => window.dashboard && window.dashboard.stats.received > 0", timeout=5 * MS
    )
    (pid,) = demo.worker_pids().values()
    os.kill(pid, signal.SIGKILL)
    page.wait_for_function(
        "() => window.dashboard.client.counters.disconnects >= 1", timeout=10 * MS
    )
    page.wait_for_function(
        "() => window.dashboard.client.state === 'connected' && window.dashboard.client.counters.connects >= 2",
        timeout=20 * MS,
    )
    # resubscribed with `since`: the same epoch, so each topic got a partial snapshot
    counters = "window.dashboard.client.counters"
    page.wait_for_function(
        f"() => {counters}.snapsFull + {counters}.snapsPartial >= 6", timeout=5 * MS
    )
    assert page.evaluate(f"() => [{counters}.snapsFull, {counters}.snapsPartial]") == [3, 3]
    wait_for_new_updates(page, 5 * MS)
    assert page.inner_text("#conn-state") == "connected"
    assert page.inner_text("#reconnects") == "1"


def test_page_reconnects_after_a_full_stop_and_start_on_the_same_ports(
    page: Any, tmp_path: Any
) -> None:
    first = Served(["--workers", "1", "--demo"], log_path=str(tmp_path / "first.log"))
    second: Served | None = None
    try:
        first.wait_ready()
        open_dashboard(page, first)
        page.wait_for_function(
            "() => window.dashboard && window.dashboard.stats.received > 0", timeout=5 * MS
        )
        first.signal(signal.SIGTERM)  # graceful: bye with retry_ms, close 1001
        assert first.wait() == 0
        page.wait_for_function("() => window.dashboard.client.counters.byes >= 1", timeout=10 * MS)
        ports = {
            "FANOUT_SERVER_PORT": str(first.port),
            "FANOUT_SERVER_ADMIN_PORT": str(first.admin_port),
        }
        second = Served(
            ["--workers", "1", "--demo"], env=ports, log_path=str(tmp_path / "second.log")
        )
        second.port, second.admin_port = first.port, first.admin_port
        second.wait_ready()
        page.wait_for_function(
            "() => window.dashboard.client.state === 'connected' && window.dashboard.client.counters.connects >= 2",
            timeout=30 * MS,
        )
        # a new engine is a new epoch: the page was sent full snapshots and shows all keys again
        wait_for_new_updates(page, 5 * MS)
        page.wait_for_function(
            "() => document.querySelectorAll('tr[data-key]').length === 300", timeout=5 * MS
        )
        assert page.evaluate("() => window.dashboard.client.counters.snapsFull") >= 6
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_page_reconnects_by_itself_through_a_sighup_rolling_restart(
    page: Any, tmp_path: Any
) -> None:
    served = Served(
        ["--workers", "2", "--demo"],
        env={"FANOUT_WORKERS_RETRY_MIN_MS": "100", "FANOUT_WORKERS_RETRY_MAX_MS": "500"},
        log_path=str(tmp_path / "serve.log"),
    )
    try:
        served.wait_ready()
        before = set(served.worker_pids().values())
        open_dashboard(page, served)
        page.wait_for_function(
            "() => window.dashboard && window.dashboard.stats.received > 0", timeout=5 * MS
        )
        served.signal(signal.SIGHUP)  # every worker replaced, one at a time: bye, close 1012
        page.wait_for_function("() => window.dashboard.client.counters.byes >= 1", timeout=20 * MS)
        eventually(lambda: not before & set(served.worker_pids().values()), timeout=30)
        served.wait_ready()
        page.wait_for_function(
            "() => window.dashboard.client.state === 'connected'"
            " && window.dashboard.client.counters.connects >= 2",
            timeout=20 * MS,
        )
        assert page.evaluate("() => window.dashboard.client.counters.lastCloseCode") == 1012
        wait_for_new_updates(page, 5 * MS)
        # the same epoch: recovered with `since`, partial snapshots only
        assert page.evaluate("() => window.dashboard.client.counters.snapsFull") == 3
        page.wait_for_function(
            "() => document.querySelectorAll('tr[data-key]').length === 300", timeout=5 * MS
        )
    finally:
        served.stop()
