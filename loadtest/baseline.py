"""The baseline for `fanout bench --baseline`: the simplest correct picows broadcaster.

    python -m loadtest.baseline --port 9000 --http-port 9001

One process, one uvloop loop. Every published update is encoded once as its own
`upd` frame and sent to every subscriber of its topic with one `send` each: no
coalescing, no budgets, no bounded buffers (a client that stops reading makes
the server's memory grow without limit: that is what the baseline shows).

It speaks the part of docs/protocol.md the load generator uses:

- WebSocket at any path; `hello` on connect; `sub {topics, id}` -> `ack`, then
  one `snap` per topic with `full: true` and the topic's whole state (`since`
  and `max_hz` are accepted and ignored: a full snapshot is always correct);
  `ping` -> `pong`; then one `upd {topic, pos, items: {key: data}}` per update.
- HTTP on its own port: `POST /publish` with the same bodies as fanout's admin
  API (`{"topic","key","data"}` or `{"items": [...]}`, JSON or msgpack), and
  `GET /readyz`, `/healthz`, `/stats`.

Positions are one counter for the process (`pos` as a decimal string), the
epoch is random per start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import Sequence
from typing import Any

import msgpack

from loadtest.children import raise_nofile

MAX_BODY = 16 * 1024 * 1024  # larger POST bodies are refused (413)
MAX_HEADER_BYTES = 64 * 1024


class Broadcaster:
    """State {topic: {key: data}}, subscribers per topic, and the naive send loop."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}
        self.subs: dict[str, set[Any]] = {}
        self.connections = 0
        self.pos = 0
        self.epoch = secrets.token_hex(4)
        self.frames_sent = 0

    def publish(self, items: Sequence[Any]) -> list[str]:
        from picows import WSMsgType

        binary = WSMsgType.BINARY
        out = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("topic"), str):
                raise ValueError("each item needs a topic")
            topic, key, data = item["topic"], str(item.get("key")), item.get("data")
            self.pos += 1
            pos = str(self.pos)
            view = self.state.setdefault(topic, {})
            if data is None:
                view.pop(key, None)
            else:
                view[key] = data
            frame = msgpack.packb({"op": "upd", "topic": topic, "pos": pos, "items": {key: data}})
            subs = self.subs.get(topic)
            if subs:
                for conn in tuple(subs):  # a send may close a connection
                    conn.transport.send(binary, frame)
                self.frames_sent += len(subs)
            out.append(pos)
        return out


def make_listener_class(hub: Broadcaster) -> type:
    from picows import WSListener, WSMsgType

    binary = WSMsgType.BINARY

    class Conn(WSListener):
        __slots__ = ("topics", "transport")

        def __init__(self) -> None:
            self.transport: Any = None
            self.topics: set[str] = set()

        def on_ws_connected(self, transport: Any) -> None:
            self.transport = transport
            hub.connections += 1
            self.send({"op": "hello", "v": 1, "conn": str(id(self)), "node": "baseline"})

        def send(self, msg: dict[str, Any]) -> None:
            self.transport.send(binary, msgpack.packb(msg))

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            if frame.msg_type == WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()
                return
            if frame.msg_type != binary or not frame.fin:
                return  # text frames and fragments: not used by the load generator
            try:
                msg = msgpack.unpackb(frame.get_payload_as_bytes(), raw=False)
            except (ValueError, msgpack.UnpackException):
                self.send({"op": "err", "code": "bad_request", "msg": "not msgpack"})
                return
            if not isinstance(msg, dict):
                self.send({"op": "err", "code": "bad_request", "msg": "not a map"})
                return
            op, mid = msg.get("op"), msg.get("id")
            if op == "sub":
                topics = [t for t in msg.get("topics") or [] if isinstance(t, str)]
                self.send({"op": "ack", "id": mid})
                for t in topics:
                    self.topics.add(t)
                    hub.subs.setdefault(t, set()).add(self)
                    self.send(
                        {
                            "op": "snap",
                            "topic": t,
                            "epoch": hub.epoch,
                            "pos": str(hub.pos),
                            "full": True,
                            "items": hub.state.get(t, {}),
                        }
                    )
            elif op == "unsub":
                for t in msg.get("topics") or []:
                    self.topics.discard(t)
                    hub.subs.get(t, set()).discard(self)
                self.send({"op": "ack", "id": mid})
            elif op == "ping":
                self.send({"op": "pong", "id": mid, "ts": 0})
            else:
                self.send({"op": "err", "id": mid, "code": "unknown_op", "msg": str(op)})

        def on_ws_disconnected(self, transport: Any) -> None:
            hub.connections -= 1
            for t in self.topics:
                hub.subs.get(t, set()).discard(self)
            self.topics.clear()

    return Conn


async def _http(
    hub: Broadcaster, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Keep-alive HTTP/1.1: POST /publish, GET /readyz /healthz /stats."""
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = ([*lines[0].split(" "), "", ""])[:3]
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name:
                    headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length") or 0)
            if length > MAX_BODY:
                status, answer = 413, {"error": "body too large"}
                writer.write(_response(status, answer, close=True))
                return
            body = await reader.readexactly(length) if length else b""
            status, answer = _route(hub, method, path, headers, body)
            writer.write(_response(status, answer))
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


def _route(
    hub: Broadcaster, method: str, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, Any]:
    path = path.split("?", 1)[0]
    if method == "GET" and path in ("/readyz", "/healthz"):
        return 200, {"ok": True}
    if method == "GET" and path == "/stats":
        return 200, {
            "server": "baseline",
            "pid": os.getpid(),
            "connections": hub.connections,
            "frames_sent": hub.frames_sent,
            "pos": hub.pos,
            "workers": [],
        }
    if method == "POST" and path == "/publish":
        try:
            if "msgpack" in headers.get("content-type", ""):
                doc = msgpack.unpackb(body, raw=False)
            else:
                doc = json.loads(body)
            items = doc["items"] if isinstance(doc, dict) and "items" in doc else [doc]
            positions = hub.publish(items)
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            return 400, {"error": str(exc)[:200]}
        return 200, {"pos": positions if len(positions) != 1 else positions[0]}
    return 404, {"error": "not found"}


def _response(status: int, answer: Any, close: bool = False) -> bytes:
    body = json.dumps(answer).encode()
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 413: "Too Large"}.get(status, "")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
    )
    return head.encode() + body


async def serve(host: str, port: int, http_port: int) -> None:
    from picows import WSUpgradeResponse, WSUpgradeResponseWithListener, ws_create_server

    hub = Broadcaster()
    conn_cls = make_listener_class(hub)

    def factory(request: Any) -> Any:
        offered = request.headers.get("Sec-WebSocket-Protocol") or ""
        extra = {"Sec-WebSocket-Protocol": "fanout.v1"} if "fanout.v1" in offered else {}
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_101_response(extra), conn_cls()
        )

    ws = await ws_create_server(factory, host, port, backlog=4096)
    http = await asyncio.start_server(
        lambda r, w: _http(hub, r, w), host, http_port, limit=MAX_HEADER_BYTES
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"baseline: ws://{host}:{port}/ws, http://{host}:{http_port}", flush=True)
    await stop.wait()
    http.close()
    ws.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.baseline",
        description="The naive picows broadcaster the benchmarks compare fanout with.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="WebSocket port")
    p.add_argument("--http-port", type=int, required=True, help="POST /publish port")
    a = p.parse_args(argv)
    raise_nofile()
    logging.getLogger("picows").setLevel(logging.WARNING)
    import uvloop

    uvloop.run(serve(a.host, a.port, a.http_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
