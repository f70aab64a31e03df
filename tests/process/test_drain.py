"""SIGTERM under load, as Kubernetes sends it: /readyz turns 503 before the
first close, closes are spread over workers.drain_s, and the node exits 0
within workers.graceful_timeout_s."""

from __future__ import annotations

import asyncio
import http.client
import signal
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from engine.client.raw import connect
from tests.support.serve import Served

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


async def test_sigterm_readyz_first_then_paced_closes_then_exit_0(tmp_path: Any) -> None:
    served = Served(
        ["--workers", "2"],
        env={"FANOUT_WORKERS_DRAIN_S": "2", "FANOUT_WORKERS_GRACEFUL_TIMEOUT_S": "10"},
        log_path=str(tmp_path / "serve.log"),
    )
    try:
        served.wait_ready()
        conns = []
        for _ in range(40):
            c = await connect(served.ws_url)
            await c.recv()
            c.subscribe(["drain.t"], id=1)
            conns.append(c)
        closed_at: list[float] = []
        for c in conns:
            c.closed.add_done_callback(lambda _f: closed_at.append(time.monotonic()))

        not_ready_at: list[float] = []
        stop = threading.Event()

        def poll_readyz() -> None:
            while not stop.is_set():
                try:
                    urllib.request.urlopen(served.admin_url + "/readyz", timeout=1).close()
                except urllib.error.HTTPError as exc:
                    exc.close()  # its socket, or a ResourceWarning at a later GC
                    if exc.code == 503:
                        not_ready_at.append(time.monotonic())
                        return
                except OSError:
                    return
                time.sleep(0.005)

        poller = threading.Thread(target=poll_readyz)
        poller.start()
        t0 = time.monotonic()
        served.signal(signal.SIGTERM)
        code = await asyncio.to_thread(served.wait, 15)
        stop.set()
        poller.join()
        await asyncio.sleep(0.1)

        assert code == 0
        assert time.monotonic() - t0 < 10  # within workers.graceful_timeout_s
        assert len(closed_at) == 40
        assert all(c.closed.result() == 1001 for c in conns)
        assert not_ready_at and not_ready_at[0] < min(closed_at)
        # spread over drain_s (2 s) per worker, not all at one instant
        assert max(closed_at) - min(closed_at) > 1.0
    finally:
        served.stop()


def test_sigterm_with_no_clients_exits_cleanly(tmp_path: Any) -> None:
    """A worker with nothing to drain (an idle node, a retired idle worker)
    exits 0 without an error in the log, also with an admin HTTP connection
    kept alive across the stop (a scraper's, a publisher's)."""
    served = Served(
        ["--workers", "2"],
        env={"FANOUT_WORKERS_DRAIN_S": "2", "FANOUT_WORKERS_GRACEFUL_TIMEOUT_S": "10"},
        log_path=str(tmp_path / "serve.log"),
    )
    keep_alive = http.client.HTTPConnection("127.0.0.1", served.admin_port, timeout=5)
    try:
        served.wait_ready()
        keep_alive.request("GET", "/healthz")
        response = keep_alive.getresponse()
        response.read()
        assert response.status == 200 and not response.will_close
        served.signal(signal.SIGTERM)
        assert served.wait(20) == 0
        out = served.output()
        assert "Traceback" not in out, out
        assert "exited with code 1" not in out and "ERROR" not in out, out
    finally:
        keep_alive.close()
        served.stop()
