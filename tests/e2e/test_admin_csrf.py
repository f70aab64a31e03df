"""Issue 11, finding 5, in a real browser: a web page cannot publish to, or
read, the admin API of an engine on the visitor's machine.

A page on another origin (another port of 127.0.0.1) sends what a page can
send without a CORS preflight: `fetch(..., {mode: "no-cors"})` with a string,
a JSON-typed Blob and an ArrayBuffer body (the last two arrive without
`Content-Type`), and a `text/plain` form crafted to be valid JSON. Every one
is refused with 415 and nothing is published. DNS rebinding is played by
Chromium's host resolver mapping `rebound.test` to 127.0.0.1: a page of that
name gets 421 from the admin port. An honest subscriber on the node's worker
receives only the honest publisher's update.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest.ports import free_port
from tests.e2e.browser import CHROMIUM, CHROMIUM_ARGS, missing
from tests.support.rawws import RawWS
from tests.support.serve import TIMEOUT_FACTOR, Served

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MS = TIMEOUT_FACTOR * 10_000

ATTACK_PAGE = """<!doctype html>
<title>a page on another origin</title>
<iframe name="sink" id="sink"></iframe>
<form id="form" method="POST" action="ADMIN/publish" enctype="text/plain" target="sink">
  <input name='{"topic": "news", "key": "form", "data": 1, "x": "' value='"}'>
</form>
<script>
  const url = "ADMIN/publish";
  const forged = (key) => JSON.stringify({topic: "news", key, data: 1});
  window.done = Promise.allSettled([
    fetch(url, {method: "POST", mode: "no-cors", body: forged("string")}),
    fetch(url, {method: "POST", mode: "no-cors",
                body: new Blob([forged("blob")], {type: "application/json"})}),
    fetch(url, {method: "POST", mode: "no-cors",
                body: new TextEncoder().encode(forged("buffer")).buffer}),
    fetch(url, {method: "POST", mode: "no-cors",
                headers: {"Content-Type": "application/json"}, body: forged("header")}),
  ]).then(() => new Promise((resolve) => {
    document.getElementById("sink").onload = () => resolve(true);
    document.getElementById("form").submit();
  }));
</script>
"""


class _Page(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Served]:
    """A developer's engine: admin on loopback, no API key."""
    s = Served(["--workers", "1"], log_path=str(tmp_path / "serve.log"))
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture
def attacker(node: Served) -> Iterator[str]:
    """The attacker's page, served from another origin (another port)."""
    handler = type(
        "Page", (_Page,), {"body": ATTACK_PAGE.replace("ADMIN", node.admin_url).encode()}
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def metric(node: Served, name: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(node.admin_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith(name)
    }


def test_a_web_page_can_neither_publish_nor_read(node: Served, attacker: str) -> None:
    reason = missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    subscriber = RawWS("127.0.0.1", node.port, timeout=TIMEOUT_FACTOR * 10)
    try:
        assert subscriber.recv_messages()[0]["op"] == "hello"
        subscriber.send_msg({"op": "sub", "topics": ["news"], "id": 1})
        while not any(m["op"] == "snap" for m in subscriber.recv_messages()):
            pass

        args = [*CHROMIUM_ARGS, "--host-resolver-rules=MAP rebound.test 127.0.0.1"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
            try:
                page = browser.new_page()
                page.set_default_timeout(MS)
                page.goto(attacker)
                assert page.evaluate("window.done") is True  # every attempt settled
                # DNS rebinding: the page's own name now points at the engine.
                for path in ("/", "/stats", "/metrics"):
                    response = page.goto(f"http://rebound.test:{node.admin_port}{path}")
                    assert response is not None and response.status == 421, path
                    assert json.loads(response.body())["error"] == "bad_host"
            finally:
                browser.close()

        refused = metric(node, "fanout_admin_refused_total")
        assert refused.get('fanout_admin_refused_total{reason="unsupported_media_type"}') == 5
        assert refused.get('fanout_admin_refused_total{reason="bad_host"}', 0) >= 3
        # Nothing forged was published: the honest update is the first to arrive.
        status, _ = node.post("/publish", {"topic": "news", "key": "honest", "data": 2})
        assert status == 200
        deadline = time.monotonic() + TIMEOUT_FACTOR * 10
        received: dict[str, Any] = {}
        while "honest" not in received and time.monotonic() < deadline:
            for m in subscriber.recv_messages():
                assert m["op"] == "upd", m
                received.update(m["items"])
        assert received == {"honest": 2}
    finally:
        subscriber.close()
