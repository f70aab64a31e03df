"""The fragment flood of issue 11 finding 1, measured: worker RSS while one
anonymous connection sends a binary frame with fin=0, then empty continuation
frames as fast as it can, before any `auth`.

    .venv/bin/python -m loadtest.fragflood                 # 15 s, one worker
    .venv/bin/python -m loadtest.fragflood --duration 5 --json out.json

Starts `fanout serve --workers 1` (local bus), waits until it is ready, then
floods from one raw TCP connection. Prints the worker's RSS once a second, and
at the end: RSS before, at its peak and after, how many continuation frames
were sent, and the close code the attacker saw (none = never closed).
Exit code 0 when the run completed, 1 on error.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import psutil

from loadtest.flood import free_port, wait_ready

CLOSE_GRACE_S = 10.0  # after the flood, how long the server's close is waited for
# masked, empty continuation frame (fin=0, opcode 0, mask bit, length 0, mask 0)
EMPTY_CONTINUATION = b"\x00\x80\x00\x00\x00\x00"
# masked binary frame, fin=0, one byte of payload
FIRST_FRAGMENT = b"\x02\x81\x00\x00\x00\x00\x91"


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the upgrade")
        buf += chunk
    return sock


def _close_code(sock: socket.socket, stop: threading.Event, out: list[int]) -> None:
    """Read what the server sends until its close frame (or EOF): record the code."""
    buf = b""
    sock.settimeout(0.5)
    while not stop.is_set():
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            out.append(1006)
            return
        if not chunk:
            out.append(1006)
            return
        buf += chunk
        while len(buf) >= 2:
            op, n = buf[0] & 0x0F, buf[1] & 0x7F
            head = 2 + (2 if n == 126 else 8 if n == 127 else 0)
            if len(buf) < head:
                break
            if n == 126:
                n = struct.unpack("!H", buf[2:4])[0]
            elif n == 127:
                n = struct.unpack("!Q", buf[2:10])[0]
            if len(buf) < head + n:
                break
            payload, buf = buf[head : head + n], buf[head + n :]
            if op == 0x8:
                out.append(struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005)
                return


def run(args: argparse.Namespace) -> dict[str, Any]:
    port, admin_port = free_port(), free_port()
    run_dir = tempfile.mkdtemp(prefix="fanout-fragflood-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    env.update(
        {
            "FANOUT_SERVER_HOST": "127.0.0.1",
            "FANOUT_SERVER_PORT": str(port),
            "FANOUT_SERVER_ADMIN_PORT": str(admin_port),
            "FANOUT_RUN_DIR": run_dir,
            "FANOUT_LOG_LEVEL": "warning",
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "serve", "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_ready(admin_port, proc)
        with urllib_get(f"http://127.0.0.1:{admin_port}/stats") as stats:
            (worker_pid,) = [w["pid"] for w in stats["workers"]]
        worker = psutil.Process(worker_pid)
        time.sleep(1.0)
        rss_before = worker.memory_info().rss
        sock = _connect(port)
        stop = threading.Event()
        code: list[int] = []
        reader = threading.Thread(target=_close_code, args=(sock, stop, code), daemon=True)
        reader.start()
        batch = EMPTY_CONTINUATION * 10_000
        sent = 0
        samples: list[tuple[float, int]] = []
        t0 = time.monotonic()
        next_sample = t0 + 1.0
        sock.settimeout(0.2)
        sock.sendall(FIRST_FRAGMENT)
        while time.monotonic() - t0 < args.duration and not code:
            try:
                sock.sendall(batch)
                sent += 10_000
            except TimeoutError:
                pass  # the server stopped reading: keep trying until the end
            except OSError:
                break
            now = time.monotonic()
            if now >= next_sample:
                rss = worker.memory_info().rss
                samples.append((round(now - t0, 1), rss))
                print(f"t={now - t0:5.1f}s worker RSS {rss / 2**20:7.1f} MiB", flush=True)
                next_sample += 1.0
        # the server may still be reading what was sent (it paused this connection, or
        # the machine is busy): its close comes once it reaches the limit, so wait for it
        grace_end = time.monotonic() + CLOSE_GRACE_S
        while not code and reader.is_alive() and time.monotonic() < grace_end:
            time.sleep(0.05)
        closed_after = round(time.monotonic() - t0, 2) if code else None
        peak = max([rss_before, *(r for _, r in samples)])
        stop.set()
        reader.join(2)
        with contextlib.suppress(OSError):
            sock.close()
        time.sleep(2.0)
        rss_after = worker.memory_info().rss
        return {
            "duration_s": args.duration,
            "continuations_sent": sent,
            "rss_before_mib": round(rss_before / 2**20, 1),
            "rss_peak_mib": round(peak / 2**20, 1),
            "rss_after_mib": round(rss_after / 2**20, 1),
            "close_code": code[0] if code else None,
            "closed_after_s": closed_after,
            "samples": [(t, round(r / 2**20, 1)) for t, r in samples],
        }
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(10)


@contextlib.contextmanager
def urllib_get(url: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        yield json.loads(resp.read())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.fragflood", description=__doc__)
    p.add_argument("--duration", type=float, default=15.0, help="seconds of flood (15)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    try:
        result = run(args)
    except (OSError, RuntimeError) as exc:
        print(f"fragflood: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
