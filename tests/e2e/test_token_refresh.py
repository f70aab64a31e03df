"""fanout.js keeps its token fresh on a live connection, in headless Chromium,
against a real `fanout serve` with JWT auth and no clock leeway
(`auth.leeway_s = 0`: the engine closes a connection 4003 the moment its
token's `exp` passes).

The page is served by the test's own web server, which also mints the tokens
(`GET /token`: an HS256 JWT expiring in 3 seconds), as an application's
back end would; the page's `tokenProvider` fetches it.

- For 30 seconds with 3-second tokens and updates published all along: one
  connection (no reconnect, no close), a new token sent in `auth` about every
  2 seconds, the final view equal to what was published last; a client on
  the same page holding a static token is closed 4003.
- The token endpoint fails three times: three "error" events (code
  "token_provider"), retried with backoff, and the connection outlives the
  first token's `exp`.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.serve import TIMEOUT_FACTOR, Served
from tests.support.tokens import SECRET, hs256

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
TTL_S = 3.0

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>token refresh</title>
<script type="module">
  import { FanoutClient } from "./fanout.js";

  const params = new URLSearchParams(location.search);
  const url = params.get("ws");
  const provider = async () => {
    const resp = await fetch("/token");
    if (!resp.ok) throw new Error(`the token endpoint answered ${resp.status}`);
    return await resp.text();
  };
  const tokenRefresh = { minMarginMs: Number(params.get("margin") ?? 1000) };
  const backoff = { baseMs: 100, maxMs: 2000 };
  const client = new FanoutClient(url, { tokenProvider: provider, tokenRefresh, backoff });
  window.states = [];
  window.errors = [];
  window.seen = {};
  client.addEventListener("state", (e) => window.states.push(e.detail.state));
  client.addEventListener("error", (e) => window.errors.push({ code: e.detail.code, msg: e.detail.msg }));
  client.addEventListener("change", (e) => {
    for (const [k, v] of Object.entries(e.detail.items)) (window.seen[k] ??= []).push(v);
  });
  window.client = client;
  client.connect();
  await client.subscribe(["live.t"]);
  if (params.get("static")) {  // a second client, holding one token for good
    const fixed = new FanoutClient(url, { token: await provider(), backoff: { baseMs: 100, maxMs: 2000 } });
    window.fixed = fixed;
    fixed.connect();
    await fixed.subscribe(["live.t"]);
  }
  window.ready = true;
</script>
"""


class _Site:
    """The page, fanout.js and a token endpoint, on 127.0.0.1 in a thread."""

    def __init__(self, directory: Path) -> None:
        self.issued = 0
        self.fail: set[int] = set()  # request numbers (1-based) answered 503
        site = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/token":
                    return super().do_GET()
                site.issued += 1
                if site.issued in site.fail:
                    body, status = b"issuer down", 503
                else:
                    body, status = hs256(ttl_s=TTL_S).encode(), 200
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        handler = functools.partial(Handler, directory=str(directory))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def served(tmp_path_factory: Any) -> Iterator[Served]:
    s = Served(
        ["--workers", "1"],
        env={
            "FANOUT_AUTH_MODE": "jwt",
            "FANOUT_AUTH_LEEWAY_S": "0",
            "FANOUT_JWT_SECRET": SECRET,
            "FANOUT_FANOUT_FLUSH_INTERVAL_MS": "10",
        },
        log_path=str(tmp_path_factory.mktemp("tokens") / "serve.log"),
    )
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[_Site]:
    (tmp_path / "page.html").write_text(PAGE)
    shutil.copy(ROOT / "engine" / "static" / "fanout.js", tmp_path / "fanout.js")
    s = _Site(tmp_path)
    try:
        yield s
    finally:
        s.close()


def publish(served: Served, key: str, value: int) -> None:
    status, body = served.post("/publish", {"topic": "live.t", "key": key, "data": value})
    assert status == 200, body


def wait_ready(page: Any) -> None:
    page.wait_for_function("() => window.ready === true", timeout=15_000 * TIMEOUT_FACTOR)


def test_3_second_tokens_for_30_seconds_in_chromium_no_reconnect_no_missed_update(
    page: Any, served: Served, site: _Site
) -> None:
    publish(served, "k0", 0)
    page.goto(f"{site.url}/page.html?ws={served.ws_url}&static=1")
    wait_ready(page)
    last: dict[str, int] = {"k0": 0}
    n = 0
    end = time.monotonic() + 30.0
    while time.monotonic() < end:
        n += 1
        key = f"k{n % 5}"
        publish(served, key, n)
        last[key] = n
        time.sleep(0.05)  # the feed's pace, not a synchronisation
    page.wait_for_function(
        "(last) => JSON.stringify(Object.fromEntries([...window.client.topic('live.t')]"
        ".sort())) === JSON.stringify(last)",
        arg=dict(sorted(last.items())),
        timeout=5_000 * TIMEOUT_FACTOR,
    )
    got = page.evaluate(
        "() => ({counters: window.client.counters, states: window.states, errors: window.errors,"
        " seen: window.seen, fixed: {state: window.fixed.state,"
        " code: window.fixed.counters.lastCloseCode}})"
    )
    c = got["counters"]
    assert got["states"] == ["waiting", "connecting", "connected"], got["states"]
    assert (c["connects"], c["disconnects"], c["connectFailures"]) == (1, 0, 0)
    assert c["lastCloseCode"] is None and c["lastRetryMs"] is None
    assert (c["snapsFull"], c["snapsPartial"]) == (1, 0)
    assert got["errors"] == [] and c["tokenFailures"] == 0
    assert c["tokenAuths"] >= 30 / 2 - 3 and c["tokenRefreshes"] == c["tokenAuths"] + 1
    for key, values in got["seen"].items():
        assert values == sorted(values) and values[-1] == last[key], key
    # the same engine closed the client that kept its first token
    assert got["fixed"] == {"state": "unauthorized", "code": 4003}
    assert site.issued == c["tokenRefreshes"] + 1  # + the static client's token


def test_a_failing_token_endpoint_is_retried_with_backoff_in_chromium(
    page: Any, served: Served, site: _Site
) -> None:
    site.fail = {2, 3, 4}  # the first refresh fails three times, then works
    publish(served, "k1", 1)
    # refreshed 2 s before exp (at 1.5 s): time for three retries on a busy machine
    page.goto(f"{site.url}/page.html?ws={served.ws_url}&margin=2000")
    wait_ready(page)
    started = time.time()
    page.wait_for_function(
        "() => window.client.counters.tokenAuths >= 1", timeout=10_000 * TIMEOUT_FACTOR
    )
    errors = page.evaluate("() => window.errors")
    assert [e["code"] for e in errors] == ["token_provider"] * 3, errors
    assert all("answered 503" in e["msg"] for e in errors)
    # past the first token's exp (the engine has no leeway): still the same connection
    time.sleep(max(0.0, started + TTL_S + 0.5 - time.time()))
    publish(served, "k1", 2)
    page.wait_for_function(
        "() => window.client.topic('live.t').get('k1') === 2", timeout=5_000 * TIMEOUT_FACTOR
    )
    c = page.evaluate("() => window.client.counters")
    assert (c["connects"], c["disconnects"], c["tokenFailures"]) == (1, 0, 3)
    assert page.evaluate("() => window.client.state") == "connected"
    assert page.evaluate("() => window.states") == ["waiting", "connecting", "connected"]
