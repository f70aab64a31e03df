"""`fanout bench --target`: an engine that is already running, started by the user.

Rules:

1. The bench starts no server and stops none: `stop` and `cleanup_dir` do
   nothing; subscribers connect to `--target` (a ws:// URL), the publisher
   posts to `--admin` (`POST /publish`) with the API key read from the
   environment variable `--api-key-env` (never printed nor written to a report).
2. Server CPU and memory come from the engine's `/metrics` (of `--admin` and
   of every `--metrics` admin URL): the `fanout_process_cpu_seconds_total`
   and `fanout_process_resident_memory_bytes` series, one per process, keyed
   "<admin URL> <process>"; read at the start and the end of the measured
   window (and RSS once a second, for the progress line and the guard).
3. A scrape that fails raises SetupError naming the URL and the status; so
   does a key the admin API refuses (checked before the run with an empty
   publish: 400 once the key is accepted, 401 when not), naming the variable.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any

from loadtest.server import SetupError

CPU_SERIES = "fanout_process_cpu_seconds_total"
RSS_SERIES = "fanout_process_resident_memory_bytes"
_LINE = re.compile(r'^(\w+)\{[^}]*process="([^"]*)"[^}]*\}\s+(\S+)')
SCRAPE_TIMEOUT_S = 10.0


def parse_process_series(text: str) -> dict[str, dict[str, float]]:
    """Prometheus text -> {series name: {process: value}} for the two process series."""
    out: dict[str, dict[str, float]] = {CPU_SERIES: {}, RSS_SERIES: {}}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and m.group(1) in out:
            try:
                out[m.group(1)][m.group(2)] = float(m.group(3))
            except ValueError:
                continue
    return out


class TargetEngine:
    """A running engine seen through its URLs: the `server` of a bench run."""

    def __init__(
        self,
        ws_url: str,
        admin: str,
        api_key: str = "",
        metrics_from: Iterable[str] = (),
        key_env: str = "FANOUT_API_KEY",
    ) -> None:
        self.ws_url = ws_url
        self.admin = admin.rstrip("/")
        self._api_key = api_key
        self.key_env = key_env
        self.metrics_from = list(
            dict.fromkeys([self.admin, *(u.rstrip("/") for u in metrics_from)])
        )

    # -- what a run uses ----------------------------------------------------------------

    @property
    def sub_urls(self) -> list[str]:
        return [self.ws_url]

    @property
    def url(self) -> str:
        return self.ws_url

    def _get(self, url: str, body: bytes | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(url, data=body)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        if self._api_key:
            req.add_header("Authorization", f"Bearer {self._api_key}")
        try:
            with urllib.request.urlopen(req, timeout=SCRAPE_TIMEOUT_S) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as exc:
            with exc:  # an unclosed error response leaks its socket
                return int(exc.code), exc.read()
        except (OSError, ValueError) as exc:
            return 0, str(exc).encode()

    def wait_ready(self, timeout_s: float) -> None:
        """Until `--admin`'s /readyz answers 200 (the engine is up and on its bus)."""
        deadline = time.monotonic() + timeout_s
        status, body = 0, b""
        while time.monotonic() < deadline:
            status, body = self._get(f"{self.admin}/readyz")
            if status == 200:
                return self.check_key()
            time.sleep(0.2)
        raise SetupError(f"--admin {self.admin}/readyz: {status or 'no answer'} {body[:200]!r}")

    def check_key(self) -> None:
        """An empty publish: 401 means the admin API refuses the key (rule 3)."""
        status, _ = self._get(f"{self.admin}/publish", b'{"items": []}')
        if status == 401:
            state = "holds a key it refused" if self._api_key else "is empty or unset"
            raise SetupError(f"--admin {self.admin} answers 401: ${self.key_env} {state}")

    def scrape(self) -> dict[str, dict[str, float]]:
        """The process series of every metrics URL, keyed "<admin URL> <process>"."""
        out: dict[str, dict[str, float]] = {CPU_SERIES: {}, RSS_SERIES: {}}
        for base in self.metrics_from:
            status, body = self._get(f"{base}/metrics")
            if status != 200:
                raise SetupError(f"{base}/metrics: {status or 'no answer'} {body[:200]!r}")
            for name, per in parse_process_series(body.decode("utf-8", "replace")).items():
                out[name].update({f"{base} {proc}": v for proc, v in per.items()})
        return out

    def cpu_seconds(self) -> dict[str, tuple[float, float]]:
        """Like accounting.cpu_seconds (user + system in the first slot)."""
        return {k: (v, 0.0) for k, v in self.scrape()[CPU_SERIES].items()}

    def memory(self) -> dict[str, int]:
        return {"rss": int(sum(self.scrape()[RSS_SERIES].values()))}

    def sources(self) -> list[str]:
        """The admin URLs whose /metrics are read (sorted: the same set, the same list)."""
        return sorted(self.metrics_from)

    def measured_by(self) -> str:
        return (
            "the engine's /metrics (fanout_process_cpu_seconds_total, "
            "fanout_process_resident_memory_bytes) of " + ", ".join(self.sources())
        )

    # -- the interface of the servers a run starts (nothing to start or stop) ------------

    def trees(self) -> dict[str, list[int]]:
        return {}

    def pids(self) -> list[int]:
        return []

    def bus_pid(self) -> None:
        return None

    def board_pids(self) -> dict[str, int]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {
            "bus": None,
            "nodes": [{"name": "target", "url": self.ws_url, "admin": self.admin}],
            "target": True,
        }

    def command(self) -> str:
        return f"already running (started by the user): {self.ws_url}, admin {self.admin}"

    def stop(self) -> None:
        return None

    def log_tail(self) -> str:
        return ""

    def cleanup_dir(self, keep_log_to: str | None) -> None:
        return None


def per_node(
    cpu0: Mapping[str, tuple[float, float]], cpu1: Mapping[str, tuple[float, float]]
) -> dict[str, float]:
    """CPU-seconds between two samples, summed per admin URL (the key's first word)."""
    out: dict[str, float] = {}
    for k in cpu0.keys() & cpu1.keys():
        node = str(k).split(" ", 1)[0]
        out[node] = round(out.get(node, 0.0) + cpu1[k][0] - cpu0[k][0], 3)
    return out


__all__ = ["TargetEngine", "parse_process_series", "per_node"]
