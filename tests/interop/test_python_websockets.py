"""Python's `websockets` (PyPI, a dev extra) runs the user's scenario of
scenario.mjs, step for step, against a real worker.

Closing without a status code is what `websockets` does through its sans-I/O
layer (`protocol.send_close()` with no code, RFC 6455 section 5.5.1). Issue 15:
on the engine before the fix that close was answered with status code 0,
which `websockets` refuses as a protocol error (1006, not the clean 1005).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest

from tests.interop.conftest import TIMEOUT_MS, check_report, publish, require
from tests.support.serve import Served

pytestmark = [pytest.mark.slow]

try:
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.exceptions import ConnectionClosed
except ImportError:  # pragma: no cover - a dev extra
    connect = None  # type: ignore[assignment]


class Conn:
    """One `websockets` connection and the messages it received."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.inbox: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())
        self.errors: list[str] = []

    async def _read(self) -> None:
        unpacker = msgpack.Unpacker(raw=False)
        try:
            async for data in self.ws:
                assert isinstance(data, bytes), "a text frame from the engine"
                unpacker.feed(data)
                self.inbox.extend(unpacker)
        except ConnectionClosed:
            pass
        except Exception as exc:  # reported as the stack would
            self.errors.append(repr(exc))

    async def next(self, pred: Any) -> dict[str, Any]:
        async with asyncio.timeout(TIMEOUT_MS / 1000):
            while True:
                for i, m in enumerate(self.inbox):
                    if pred(m):
                        return self.inbox.pop(i)
                assert not self.reader.done(), "the connection ended"
                await asyncio.sleep(0.005)

    async def close(self, code: int | None) -> dict[str, Any]:
        if code is None:
            # an empty close frame: what `close()` does with the sans-I/O layer
            async with self.ws.send_context():
                self.ws.protocol.send_close()
            await self.ws.wait_closed()
        else:
            await self.ws.close(code, "done")
        await self.reader
        protocol = self.ws.protocol
        if protocol.parser_exc is not None:  # the peer broke the protocol: failed, not closed
            self.errors.append(repr(protocol.parser_exc))
        clean = protocol.close_rcvd is not None and not self.errors
        code = self.ws.close_code
        return {"code": None if code is None else int(code), "clean": clean, "errors": self.errors}


async def test_python_websockets_subscribes_receives_closes_cleanly_and_recovers_with_since(
    interop_served: Served,
) -> None:
    if connect is None:
        require("websockets", "the websockets package is not installed (pip install -e '.[dev]')")
    s = interop_served
    S, EV = "interop.py.s", "interop.py.ev"

    async def pub(items: list[dict[str, Any]]) -> list[str]:
        return await asyncio.to_thread(publish, s, items)

    async def open_conn() -> Conn:
        ws = await connect(s.ws_url, subprotocols=["fanout.v1"])  # type: ignore[list-item]
        return Conn(ws)

    def state(m: dict[str, Any]) -> dict[str, Any]:
        return {k: m[k] for k in ("full", "items", "pos", "epoch")}

    r: dict[str, Any] = {"published": {}}
    r["published"]["initial"] = await pub(
        [
            {"topic": S, "key": "a", "data": 1},
            {"topic": S, "key": "b", "data": 1},
            {"topic": EV, "data": "e1"},
            {"topic": EV, "data": "e2"},
        ]
    )
    conn = await open_conn()
    r["protocol"] = conn.ws.subprotocol
    hello = await conn.next(lambda m: m["op"] == "hello")
    r["hello"] = {"op": hello["op"], "v": hello["v"]}
    await conn.ws.send(msgpack.packb({"op": "sub", "topics": [S, EV], "id": 1}))
    r["ack"] = (await conn.next(lambda m: m["op"] == "ack" and m.get("id") == 1))["op"]
    r["snap_state"] = state(await conn.next(lambda m: m["op"] == "snap" and m["topic"] == S))
    r["snap_stream"] = state(await conn.next(lambda m: m["op"] == "snap" and m["topic"] == EV))
    r["published"]["live"] = await pub(
        [{"topic": S, "key": "a", "data": 2}, {"topic": EV, "data": "e3"}]
    )
    upd = await conn.next(lambda m: m["op"] == "upd" and m["topic"] == S)
    r["upd"] = {"items": upd["items"], "pos": upd["pos"]}
    evt = await conn.next(lambda m: m["op"] == "evt" and m["topic"] == EV)
    r["evt"] = {"items": evt["items"]}
    r["close_empty"] = await conn.close(None)

    r["published"]["missed"] = await pub(
        [
            {"topic": S, "key": "a", "data": 3},
            {"topic": S, "key": "c", "data": 1},
            {"topic": EV, "data": "e4"},
            {"topic": EV, "data": "e5"},
        ]
    )
    conn = await open_conn()
    await conn.next(lambda m: m["op"] == "hello")
    since = {
        S: [r["snap_state"]["epoch"], upd["pos"]],
        EV: [r["snap_stream"]["epoch"], evt["items"][-1][0]],
    }
    await conn.ws.send(msgpack.packb({"op": "sub", "topics": [S, EV], "id": 2, "since": since}))
    r["resnap_state"] = state(await conn.next(lambda m: m["op"] == "snap" and m["topic"] == S))
    r["resnap_stream"] = state(await conn.next(lambda m: m["op"] == "snap" and m["topic"] == EV))
    r["close_1000"] = await conn.close(1000)

    conn = await open_conn()
    await conn.next(lambda m: m["op"] == "hello")
    r["close_4000"] = await conn.close(4000)
    check_report(r)


async def test_python_websockets_negotiates_permessage_deflate_and_reads_compressed_frames(
    interop_served: Served,
) -> None:
    """`websockets` offers permessage-deflate by default: the engine accepts it
    with no context takeover, and frames big enough to be compressed (a snap,
    then an `upd` of two topics in one frame: two pieces joined) read back
    as the same values a client without the extension gets."""
    if connect is None:
        require("websockets", "the websockets package is not installed (pip install -e '.[dev]')")
    s = interop_served
    topics = ["interop.pmd.a", "interop.pmd.b"]
    big = {"text": "the same words again " * 40, "n": list(range(50))}
    await asyncio.to_thread(publish, s, [{"topic": t, "key": "k", "data": big} for t in topics])
    zws = await connect(s.ws_url, subprotocols=["fanout.v1"])  # type: ignore[list-item]
    raw = await connect(s.ws_url, subprotocols=["fanout.v1"], compression=None)  # type: ignore[list-item]
    assert zws.response.headers["Sec-WebSocket-Extensions"] == (
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    )
    assert "Sec-WebSocket-Extensions" not in raw.response.headers
    z, r = Conn(zws), Conn(raw)
    for c in (z, r):
        await c.ws.send(msgpack.packb({"op": "sub", "topics": topics, "id": 1}))
    for t in topics:
        zsnap = await z.next(lambda m, t=t: m["op"] == "snap" and m["topic"] == t)
        rsnap = await r.next(lambda m, t=t: m["op"] == "snap" and m["topic"] == t)
        assert zsnap["items"] == rsnap["items"] == {"k": big}
    big2 = dict(big, n=list(range(60)))
    await asyncio.to_thread(publish, s, [{"topic": t, "key": "k", "data": big2} for t in topics])
    for t in topics:
        zupd = await z.next(lambda m, t=t: m["op"] == "upd" and m["topic"] == t)
        rupd = await r.next(lambda m, t=t: m["op"] == "upd" and m["topic"] == t)
        assert zupd["items"] == rupd["items"] == {"k": big2}
    for c in (z, r):
        report = await c.close(1000)
        assert report["clean"] and not report["errors"], report
