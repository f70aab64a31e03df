"""Every inbound WebSocket byte is accounted for (issue 11, finding 1; issue 15,
the close handshake), against a real one-worker `fanout serve` in JWT mode, so
that every attacker here is an anonymous connection that never authenticated,
and an honest, authenticated subscriber on the same worker must keep
receiving throughout.

What a user sees is asserted: the close code (or close frame) the attacker
gets, and fresh updates at the honest subscriber. No timings.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import psutil
import pytest

from engine import codes
from engine.client.raw import RawConnection, connect
from tests.support.rawws import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, RawWS
from tests.support.serve import Served
from tests.support.tokens import SECRET, hs256

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TOPIC = "watch.me"
RATE = 20  # limits.messages_per_s of the server under test
EMPTY_CONTINUATION = b"\x00\x80\x00\x00\x00\x00"  # fin=0, masked, empty
FIRST_FRAGMENT = b"\x02\x81\x00\x00\x00\x00\x91"  # binary, fin=0, one byte


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("ingress") / "serve.log"
    s = Served(
        ["--workers", "1"],  # one worker: attacker and honest subscriber share it
        env={
            "FANOUT_AUTH_MODE": "jwt",
            "FANOUT_JWT_SECRET": SECRET,
            "FANOUT_AUTH_TIMEOUT_S": "60",  # the attackers never authenticate
            "FANOUT_LIMITS_MESSAGES_PER_S": str(RATE),
            "FANOUT_LIMITS_ABUSE_WINDOW_S": "1.5",
            "FANOUT_LIMITS_FRAGMENT_TIMEOUT_S": "1",
            # under the burst (2 x RATE): the fragment bound closes before the rate limit
            "FANOUT_LIMITS_MAX_MESSAGE_FRAGMENTS": "16",
        },
        log_path=str(log),
    )
    try:
        s.wait_ready()
        yield s
        assert "Traceback" not in s.output(), s.output()
    finally:
        s.stop()


@pytest.fixture
async def honest(served: Served) -> Any:
    conn = await connect(served.ws_url, extra_headers={"Authorization": f"Bearer {hs256()}"})
    assert (await conn.recv())["op"] == "hello"
    conn.subscribe([TOPIC], id=1)
    assert (await conn.recv())["op"] == "ack"
    assert (await conn.recv())["op"] == "snap"
    yield conn
    conn.close()


async def still_served(served: Served, conn: RawConnection) -> None:
    """The honest subscriber receives a value published now."""
    marker = f"v{time.monotonic_ns()}"
    status, body = await asyncio.to_thread(
        served.post, "/publish", {"topic": TOPIC, "key": "k", "data": marker}
    )
    assert status == 200, body
    while True:
        msg = await conn.recv_op("upd")
        if msg["items"].get("k") == marker:
            return


async def served_while(served: Served, conn: RawConnection, attack: Callable[[], Any]) -> Any:
    """Run the blocking `attack` in a thread; the honest subscriber must get
    fresh updates while it runs and after it ended. Returns what it returned."""
    task = asyncio.ensure_future(asyncio.to_thread(attack))
    rounds = 0
    while not task.done() or rounds == 0:
        await still_served(served, conn)
        rounds += 1
    result = await task
    await still_served(served, conn)
    return result


class CloseWatcher:
    """Reads an attacker's socket in a thread until the server's close frame
    (its code, or 1005 when empty) or the end of the connection (1006)."""

    def __init__(self, raw: RawWS) -> None:
        self.raw = raw
        self.code: int | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.code = self.raw.recv_close_code()
        except TimeoutError:
            pass
        finally:
            self.done.set()


def worker_rss(served: Served) -> int:
    (pid,) = served.worker_pids().values()
    return int(psutil.Process(pid).memory_info().rss)


def anonymous(served: Served) -> RawWS:
    raw = RawWS("127.0.0.1", served.port, timeout=20)
    (hello,) = raw.recv_messages()
    assert hello["op"] == "hello" and hello["auth"] is True  # not authenticated
    return raw


# -- finding 1: the fragment flood ------------------------------------------------------


async def test_empty_continuation_flood_before_auth_is_closed_1009(
    served: Served, honest: RawConnection
) -> None:
    rss_before = worker_rss(served)

    def flood() -> int | None:
        raw = anonymous(served)
        watcher = CloseWatcher(raw)
        batch = EMPTY_CONTINUATION * 10_000
        try:
            raw.sock.sendall(FIRST_FRAGMENT)
            for _ in range(300):  # up to 3,000,000 frames (18 MB), or until closed
                if watcher.done.wait(0):
                    break
                raw.sock.sendall(batch)
        except OSError:
            pass  # the server closed the connection
        watcher.done.wait(20)
        raw.close()
        return watcher.code

    code = await served_while(served, honest, flood)
    assert code == codes.CLOSE_MESSAGE_TOO_BIG  # more fragments than limits.max_message_fragments
    # the worker kept nothing of it (was: +180 MB in 15 s, never closed)
    assert worker_rss(served) - rss_before < 16 * 2**20


async def test_unfinished_fragmented_message_is_closed_1008_at_its_deadline(
    served: Served, honest: RawConnection
) -> None:
    def stall() -> int | None:
        raw = anonymous(served)
        watcher = CloseWatcher(raw)
        raw.sock.sendall(FIRST_FRAGMENT)  # then nothing, and pongs to the pings
        watcher.done.wait(20)
        raw.close()
        return watcher.code

    code = await served_while(served, honest, stall)
    assert code == codes.CLOSE_POLICY_VIOLATION  # limits.fragment_timeout_s (1 s here)


async def test_pong_flood_is_throttled_then_closed_4029(
    served: Served, honest: RawConnection
) -> None:
    def flood() -> tuple[list[Any], int | None]:
        raw = anonymous(served)
        replies: list[Any] = []
        code: int | None = None
        try:
            for _ in range(2000):  # ~10x the limit for up to ~20 s
                for _ in range(10):
                    raw.send_frame(OP_PONG, b"unsolicited")
                time.sleep(0.05)  # pacing of the attacker, not synchronisation
                raw.sock.settimeout(0)
                try:
                    while True:
                        replies.extend(raw.recv_messages())
                except BlockingIOError:
                    pass
                finally:
                    raw.sock.settimeout(20)
        except OSError:
            pass
        except Exception as exc:  # Closed
            code = getattr(exc, "code", None)
        if code is None:
            code = raw.recv_close_code()
        raw.close()
        return replies, code

    replies, code = await served_while(served, honest, flood)
    assert any(m.get("op") == "err" and m.get("code") == "rate_limited" for m in replies)
    assert code == codes.CLOSE_RATE_LIMITED


async def test_fragments_with_pings_between_are_one_message(served: Served) -> None:
    """What the limits must not break: a request in three fragments, with a
    WebSocket ping between two of them, is answered once, and the ping too."""

    def fragmented() -> list[tuple[int, bytes]]:
        raw = RawWS("127.0.0.1", served.port, headers={"Authorization": f"Bearer {hs256()}"})
        raw.recv_messages()  # hello
        payload = msgpack.packb({"op": "ping", "id": 7})
        raw.send_frame(OP_BINARY, payload[:3], fin=False)
        raw.send_frame(OP_PING, b"between")
        raw.send_frame(OP_CONT, payload[3:5], fin=False)
        raw.send_frame(OP_CONT, payload[5:], fin=True)
        frames = [raw.recv_frame(), raw.recv_frame()]
        raw.close()
        return frames

    frames = await asyncio.to_thread(fragmented)
    assert (OP_PONG, b"between") in frames
    (binary,) = [p for op, p in frames if op == OP_BINARY]
    reply = msgpack.unpackb(binary)
    assert reply["op"] == "pong" and reply["id"] == 7


# -- framing errors the listener owns (picows passes these frames on) ---------------------


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([b"\xc2\x80\x00\x00\x00\x00"], id="rsv1-without-extension"),
        pytest.param([b"\x92\x80\x00\x00\x00\x00"], id="rsv3"),
        pytest.param([b"\x80\x80\x00\x00\x00\x00"], id="continuation-without-start"),
        pytest.param([FIRST_FRAGMENT, FIRST_FRAGMENT], id="new-message-inside-fragmented"),
    ],
)
async def test_framing_errors_close_1002(
    served: Served, honest: RawConnection, frames: list[bytes]
) -> None:
    def send() -> int | None:
        raw = anonymous(served)
        raw.sock.sendall(b"".join(frames))
        code = raw.recv_close_code()
        raw.close()
        return code

    assert await served_while(served, honest, send) == 1002


# -- the close handshake (issue 15, part 1; RFC 6455 sections 5.5.1 and 7.4) ---------------


def close_reply(served: Served, payload: bytes) -> bytes:
    raw = anonymous(served)
    raw.send_frame(OP_CLOSE, payload)
    while True:
        op, body = raw.recv_frame()
        if op == OP_CLOSE:
            raw.close()
            return body


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1008, 1011, 3000, 3999, 4000, 4999])
async def test_a_valid_close_code_is_echoed(
    served: Served, honest: RawConnection, code: int
) -> None:
    body = await served_while(
        served, honest, lambda: close_reply(served, struct.pack("!H", code) + b"bye")
    )
    assert body[:2] == struct.pack("!H", code)


async def test_an_empty_close_is_answered_with_an_empty_close(
    served: Served, honest: RawConnection
) -> None:
    assert await served_while(served, honest, lambda: close_reply(served, b"")) == b""


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
async def test_an_invalid_close_code_is_answered_1002(
    served: Served, honest: RawConnection, code: int
) -> None:
    body = await served_while(served, honest, lambda: close_reply(served, struct.pack("!H", code)))
    assert body[:2] == struct.pack("!H", 1002)
