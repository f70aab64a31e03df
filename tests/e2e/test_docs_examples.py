"""docs/clients.md's examples run as written: every `python` block as a
script, and the `html` block in headless Chromium, against a real
`fanout serve --demo` (ports substituted for the documented 8000/8001)."""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.serve import TIMEOUT_FACTOR, Served

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "clients.md").read_text()
PYTHON = re.findall(r"```python\n(.*?)```", DOC, re.S)
HTML = re.findall(r"```html\n(.*?)```", DOC, re.S)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: Any) -> Iterator[Served]:
    s = Served(
        ["--workers", "1", "--demo"], log_path=str(tmp_path_factory.mktemp("docs") / "serve.log")
    )
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def localize(source: str, served: Served) -> str:
    return source.replace("127.0.0.1:8000", f"127.0.0.1:{served.port}").replace(
        "127.0.0.1:8001", f"127.0.0.1:{served.admin_port}"
    )


def test_the_doc_has_the_examples_this_test_runs() -> None:
    assert len(PYTHON) == 3 and len(HTML) == 1


@pytest.mark.parametrize("index", range(3))
def test_python_example_runs_as_written(demo: Served, index: int) -> None:
    out = subprocess.run(
        [sys.executable, "-c", localize(PYTHON[index], demo)],
        capture_output=True,
        text=True,
        timeout=60 * TIMEOUT_FACTOR,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    if index == 0:
        assert re.fullmatch(r"24 keys; EURUSD is [0-9.]+", lines[0])
        assert len(lines) >= 6 and lines[-1].startswith("connection: connected - updates received:")
    elif index == 1:
        # on_state was registered once connected: it reports the close at the end
        assert re.fullmatch(r"\d+ crypto keys changed; 1 connection\(s\)", lines[0])
        assert lines[1:] == ["connection: closed"]
    else:
        assert re.fullmatch(r"published at \d+-\d+", lines[0])
        assert re.fullmatch(r"batch at \['\d+-\d+', '\d+-\d+'\]", lines[1])


def test_browser_example_runs_as_written(page: Any, demo: Served, tmp_path: Path) -> None:
    # as the doc says: the page with a copy of fanout.js next to it, on a web server of its own
    (tmp_path / "example.html").write_text(localize(HTML[0], demo))
    shutil.copy(ROOT / "engine" / "static" / "fanout.js", tmp_path / "fanout.js")
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/example.html")
        page.wait_for_function(
            "() => document.getElementById('out').textContent.includes('EURUSD is ')"
            " && document.title === 'connected'",
            timeout=10_000 * TIMEOUT_FACTOR,
        )
        text = page.inner_text("#out")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert re.search(r'^snap prices\.fx EURUSD \{"px":[0-9.]+,"ts":\d+\}$', text, re.M)
    assert re.search(r"^EURUSD is [0-9.]+$", text, re.M)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_readme_clients_example_runs_as_written(demo: Served) -> None:
    readme = (ROOT / "README.md").read_text()
    (source,) = [
        b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "engine.client" in b
    ]
    out = subprocess.run(
        [sys.executable, "-c", localize(source, demo)],
        capture_output=True,
        text=True,
        timeout=60 * TIMEOUT_FACTOR,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"EURUSD \{'px': [0-9.]+, 'ts': \d+\}\n", out.stdout)
