"""Chromium's own WebSocket (`new WebSocket(url, "fanout.v1")`, headless Debian
chromium driven by Playwright, as in tests/e2e) runs the user's scenario
(scenario.mjs) from a page on the admin port's origin, with the browser
client's msgpack codec (/static/fanout.js) and `fetch` for POST /publish.

Issue 15: on the engine before the fix, `ws.close()` (an empty close frame) was
answered with status code 0; Chromium fails such a connection: close event
1006, `wasClean` false, instead of 1005.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.browser import launch, missing
from tests.interop.conftest import HERE, TIMEOUT_MS, check_report, require
from tests.support.serve import Served

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

# A connection through the browser's WebSocket: its own events only.
RUN_JS = """async ([wsUrl, adminUrl, prefix, timeoutMs]) => {
  const { decodeAll, encode } = await import("/static/fanout.js");
  const { Inbox, publisher, runScenario } = await import("/interop/scenario.mjs");
  const open = () => new Promise((resolve, reject) => {
    const ws = new WebSocket(wsUrl, ["fanout.v1"]);
    ws.binaryType = "arraybuffer";
    const inbox = new Inbox(timeoutMs);
    const errors = [];
    let wasOpen = false;
    ws.addEventListener("message", (e) => {
      if (e.data instanceof ArrayBuffer) inbox.push(decodeAll(new Uint8Array(e.data)));
    });
    ws.addEventListener("error", () => {
      errors.push("error event");
      if (!wasOpen) reject(new Error("the WebSocket did not open"));
    });
    const closed = new Promise((done) => ws.addEventListener("close", (e) => {
      inbox.end(`close ${e.code}`);
      done({ code: e.code, clean: e.wasClean && errors.length === 0, errors });
    }));
    ws.addEventListener("open", () => {
      wasOpen = true;
      resolve({
        protocol: ws.protocol,
        send: (bytes) => ws.send(bytes),
        close: (code, reason) => (code === undefined ? ws.close() : ws.close(code, reason)),
        next: (predicate, what) => inbox.next(predicate, what),
        closed,
      });
    });
  });
  return await runScenario({ open, publish: publisher(adminUrl), encode, prefix });
}"""


def test_chromium_websocket_subscribes_receives_closes_cleanly_and_recovers_with_since(
    interop_served: Served,
) -> None:
    reason = missing()
    if reason:
        require("chromium", reason)
    from playwright.sync_api import sync_playwright

    s = interop_served
    scenario = (HERE / "scenario.mjs").read_text()
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            # the scenario module, served on the admin origin for this page only
            def serve_scenario(route: Any) -> None:
                route.fulfill(status=200, content_type="text/javascript", body=scenario)

            page.route("**/interop/scenario.mjs", serve_scenario)
            page.goto(s.admin_url + "/config.json", wait_until="domcontentloaded")
            report = page.evaluate(RUN_JS, [s.ws_url, s.admin_url, "interop.chromium", TIMEOUT_MS])
        finally:
            browser.close()
    assert not errors, errors
    check_report(report)
