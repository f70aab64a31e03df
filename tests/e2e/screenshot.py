"""Take the dashboard's screenshot for the docs: `python -m tests.e2e.screenshot [PATH]`.

Runs `fanout serve --demo` on free ports, opens the dashboard in headless
Chromium, waits until every price is shown and a few seconds of live updates
went by, and writes a PNG (default docs/dashboard.png).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tests.e2e.browser import launch, missing
from tests.support.serve import Served

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "docs" / "dashboard.png"
    reason = missing()
    if reason:
        print(f"cannot take the screenshot: {reason}", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    served = Served(["--workers", "1", "--demo"])
    try:
        served.wait_ready()
        with sync_playwright() as p:
            browser = launch(p)
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.goto(served.admin_url + "/")
            page.wait_for_function("() => document.querySelectorAll('tr[data-key]').length === 300")
            time.sleep(3)  # let the rate and the flashes settle into a typical picture
            page.screenshot(path=str(out))
            browser.close()
    finally:
        served.stop()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
