"""A subscriber process of `fanout bench`: one uvloop loop of picows clients.

Each client keeps, per subscribed topic, a view {key: data} and its position
(epoch, pos) so that it can come back with `since`. The process reports its
counters once a second and obeys commands from the orchestrator:

- `mark_start` / `mark_end`: the measured window (latency histogram, counts);
- `slow`: the clients flagged slow stop reading (their socket fills up);
- `storm`: every other client drops its connection at once and reconnects
  with `since`; the answer `stormed` says how long until all had their snap;
- `churn R`: close and reopen (with `since`) R connections per second;
- `converge finals settle_s`: wait until every reading client holds the final
  value of every key of its topics, then answer.

Bounds: a decode cache of at most 4,096 messages (each distinct message is
decoded once), one histogram, one view per client; every wait is bounded in time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import signal
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection as Pipe
from typing import Any

import msgpack

from loadtest.children import raise_nofile
from loadtest.latency import LatencyRecorder, percentiles_ms
from loadtest.workload import STREAM_KEY

# One decoded message: (topic or None, clear the view, items for the view, epoch
# (snap only), pos, is_snap, key values in it, ((stamp, count), ...), control
# item or None). Messages with a topic update that topic's view.
_Msg = tuple[
    str | None,
    bool,
    dict[str, Any],
    Any,
    Any,
    bool,
    int,
    tuple[tuple[int, int], ...],
    tuple[str, Any] | None,
]


class ProcState(LatencyRecorder):
    """Everything one subscriber process counts, and its decode cache."""

    _CACHE_MAX = 4096  # messages; cleared when full (bounded memory)

    def __init__(self) -> None:
        # message bytes -> decoded message. The engine sends the same `upd` bytes
        # to every subscriber of a topic (a whole frame on a one-topic workload,
        # part of frames that differ per client on the market workload), so each
        # distinct message is decoded once per process.
        self.mcache: dict[bytes, _Msg] = {}
        self.unpacker = msgpack.Unpacker(raw=False)
        self.clients: list[Any] = []
        self.frames = 0
        self.updates = 0
        self.measuring = False
        LatencyRecorder.__init__(self)
        self.errors: collections.Counter[str] = collections.Counter()
        self.close_codes: collections.Counter[int] = collections.Counter()
        self.slow_close_codes: collections.Counter[int] = collections.Counter()
        self.byes = 0
        self.closed = 0
        self.local_addrs: set[str] = set()

    def feed(self, client: Any, payload: bytes) -> None:
        now = time.time_ns()
        self.frames += 1
        m = self.mcache.get(payload)
        # a frame of one message seen before (the common case), or split it
        msgs = (m,) if m is not None else self._split(payload)
        views = client.views
        for topic, clear, items, epoch, pos, is_snap, n, stamps, control in msgs:
            if topic is not None:
                view = views.get(topic)
                if view is not None:
                    if clear:
                        view.clear()
                    view.update(items)
                    if is_snap:
                        client.epochs[topic] = epoch
                        client.snapped.add(topic)
                        if len(client.snapped) == len(views):
                            client.ready = True
                    client.positions[topic] = pos
            self.updates += n
            if control is not None:
                self._control((control,))
            if stamps and self.measuring:
                self.record(stamps, now)

    def _split(self, payload: bytes) -> list[_Msg]:
        """The frame's messages (msgpack `skip` finds their ends, building no
        objects), each decoded once per process (`_decode`)."""
        msgs: list[_Msg] = []
        unpacker = self.unpacker
        mcache = self.mcache
        try:
            unpacker.feed(payload)
            base = at = unpacker.tell()
            end = base + len(payload)
            while at < end:
                unpacker.skip()
                nxt = unpacker.tell()
                raw = payload if nxt - at == len(payload) else payload[at - base : nxt - base]
                at = nxt
                m = mcache.get(raw)
                msgs.append(self._decode(raw) if m is None else m)
        except (ValueError, msgpack.UnpackException) as exc:
            msgs.append((None, False, {}, None, None, False, 0, (), ("bad", str(exc)[:80])))
            self.unpacker = msgpack.Unpacker(raw=False)  # its buffer is not trusted now
        return msgs

    def _decode(self, raw: bytes) -> _Msg:
        m = _decode_msg(msgpack.unpackb(raw, raw=False))
        if m[8] is None and not m[5]:  # snaps and control messages are rare: not kept
            mcache = self.mcache
            if len(mcache) >= self._CACHE_MAX:
                mcache.clear()
            mcache[raw] = m
        return m

    def _control(self, control: Sequence[tuple[str, Any]]) -> None:
        for op, msg in control:
            if op == "err":
                self.errors[f"err:{msg.get('code')}"] += 1
            elif op == "bye":
                self.byes += 1
            elif op == "bad":
                self.errors["undecodable"] += 1
            elif op == "gap":
                self.errors["gap"] += 1

    def counters(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "updates": self.updates,
            "closed": self.closed,
            "clients": len(self.clients),
        }


def _stamps(values: Any) -> tuple[tuple[int, int], ...]:
    """((stamp, count), ...) of the `[seq, stamp]` values among `values`."""
    counts: dict[int, int] = {}
    for v in values:
        if type(v) is list and len(v) == 2 and type(v[1]) is int:
            t = v[1]
            counts[t] = counts.get(t, 0) + 1
    return tuple(counts.items())


def _decode_msg(msg: Any) -> _Msg:
    if not isinstance(msg, dict):
        return None, False, {}, None, None, False, 0, (), ("bad", repr(msg)[:80])
    op = msg.get("op")
    if op == "upd":
        its = msg.get("items") or {}
        topic = str(msg.get("topic"))
        return topic, False, its, None, msg.get("pos"), False, len(its), _stamps(its.values()), None
    if op == "evt":
        events = msg.get("items") or []
        values = [ev[1] for ev in events if isinstance(ev, list) and len(ev) == 2]
        last = {STREAM_KEY: events[-1][1]} if events else {}
        pos = events[-1][0] if events else None
        topic = str(msg.get("topic"))
        return topic, False, last, None, pos, False, len(events), _stamps(values), None
    if op == "snap":
        its = msg.get("items") or {}
        if isinstance(its, list):  # a stream topic: [[pos, data], ...]
            its = {STREAM_KEY: its[-1][1]} if its else {}
        topic = str(msg.get("topic"))
        full = bool(msg.get("full"))
        return topic, full, its, msg.get("epoch"), msg.get("pos"), True, 0, (), None
    return None, False, {}, None, None, False, 0, (), (str(op), msg)


def make_client_class() -> type:
    """The picows listener class (built lazily: picows is imported in children only)."""
    from picows import WSListener, WSMsgType

    binary = WSMsgType.BINARY
    close = WSMsgType.CLOSE
    continuation = WSMsgType.CONTINUATION

    class Client(WSListener):
        """One subscriber connection: views {topic: {key: data}} and positions."""

        __slots__ = (
            "close_code",
            "closed",
            "dropping",
            "epochs",
            "fragments",
            "index",
            "positions",
            "ready",
            "slow",
            "snapped",
            "st",
            "sub_message",
            "transport",
            "views",
        )

        def __init__(
            self,
            st: ProcState,
            index: int,
            topics: Sequence[str],
            slow: bool,
            max_hz: float | None,
            since: Mapping[str, Any] | None = None,
            views: dict[str, dict[str, Any]] | None = None,
        ) -> None:
            self.st = st
            self.index = index
            self.views = views if views is not None else {t: {} for t in topics}
            self.epochs: dict[str, Any] = {}
            self.positions: dict[str, Any] = {}
            self.snapped: set[str] = set()
            self.transport: Any = None
            self.ready = False
            self.closed = False
            self.dropping = False
            self.slow = slow
            self.close_code: int | None = None
            self.fragments: bytearray | None = None
            sub: dict[str, Any] = {"op": "sub", "topics": list(topics), "id": 1}
            if max_hz:
                sub["max_hz"] = max_hz
            if since:
                sub["since"] = dict(since)
            self.sub_message = msgpack.packb(sub)

        def since(self) -> dict[str, list[Any]]:
            return {
                t: [self.epochs[t], self.positions[t]]
                for t in self.views
                if t in self.epochs and self.positions.get(t) is not None
            }

        def on_ws_connected(self, transport: Any) -> None:
            self.transport = transport
            with contextlib.suppress(Exception):
                name = transport.underlying_transport.get_extra_info("sockname")
                self.st.local_addrs.add(str(name[0]))
            transport.send(binary, self.sub_message)

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            mtype = frame.msg_type
            if mtype == binary and frame.fin and self.fragments is None:
                self.st.feed(self, frame.get_payload_as_bytes())
            elif mtype in (binary, continuation):
                if self.fragments is None:
                    self.fragments = bytearray()
                self.fragments += frame.get_payload_as_bytes()
                if frame.fin:
                    payload, self.fragments = bytes(self.fragments), None
                    self.st.feed(self, payload)
            elif mtype == close:
                self.close_code = int(frame.get_close_code())
                transport.send_close(frame.get_close_code())
                transport.disconnect()
            else:
                self.st.errors[f"frame:{mtype.name}"] += 1

        def on_ws_disconnected(self, transport: Any) -> None:
            if self.closed:
                return
            self.closed = True
            if self.dropping:
                return  # closed on purpose (storm, churn)
            self.st.closed += 1
            code = self.close_code if self.close_code is not None else 1006
            if self.slow:
                self.st.slow_close_codes[code] += 1
            else:
                self.st.close_codes[code] += 1

    return Client


def subscriber_process(pipe: Pipe, index: int, spec: dict[str, Any]) -> None:
    """Entry point of one subscriber process (forked; builds its own loop)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise_nofile()
    logging.getLogger("picows").setLevel(logging.WARNING)
    logging.getLogger("fanout-bench").setLevel(logging.CRITICAL)
    import uvloop

    try:
        uvloop.run(_main(pipe, index, spec))
    except BaseException as exc:
        with contextlib.suppress(OSError, ValueError):
            pipe.send(("error", f"subscriber {index}: {type(exc).__name__}: {exc}"))
        raise


async def _main(pipe: Pipe, index: int, spec: dict[str, Any]) -> None:
    from picows import ws_connect

    loop = asyncio.get_running_loop()
    st = ProcState()
    client_cls = make_client_class()
    done: asyncio.Future[str] = loop.create_future()
    url: str = spec["url"]
    max_hz: float | None = spec.get("max_hz")
    sem = asyncio.Semaphore(int(spec["concurrency"]))
    connect_errors: collections.Counter[str] = collections.Counter()
    rng = random.Random(index)

    def finish(reason: str) -> None:
        if not done.done():
            done.set_result(reason)

    loop.call_later(float(spec["budget_s"]), finish, "time budget exhausted")
    commands: collections.deque[tuple[Any, ...]] = collections.deque()
    wake = asyncio.Event()

    def on_pipe() -> None:
        try:
            while pipe.poll():
                commands.append(pipe.recv())
        except (EOFError, OSError):
            finish("parent gone")
        wake.set()

    loop.add_reader(pipe.fileno(), on_pipe)
    # the loop made the pipe non-blocking; a large message (a latency histogram spread
    # over seconds is hundreds of KB) to a parent busy elsewhere would then fail with
    # EAGAIN: sends block instead (the parent is always reading while it waits on us)
    os.set_blocking(pipe.fileno(), True)

    async def connect(
        i: int,
        topics: Sequence[str],
        addr: str,
        slow: bool,
        since: Mapping[str, Any] | None = None,
        views: dict[str, dict[str, Any]] | None = None,
    ) -> Any:
        async with sem:
            if done.done():
                return None
            client = client_cls(st, i, topics, slow, max_hz, since, views)
            try:
                await ws_connect(
                    lambda: client,
                    url,
                    extra_headers={"Sec-WebSocket-Protocol": "fanout.v1"},
                    websocket_handshake_timeout=15,
                    max_frame_size=64 * 1024 * 1024,
                    logger_name="fanout-bench",
                    local_addr=(addr, 0),
                )
            except Exception as exc:
                connect_errors[f"{type(exc).__name__}: {str(exc)[:100]}"] += 1
                return None
            return client

    async def wait_ready(clients: Sequence[Any], timeout_s: float) -> float:
        t0 = time.monotonic()
        while not done.done() and time.monotonic() - t0 < timeout_s:
            if all(c.ready or c.closed for c in clients):
                break
            await asyncio.sleep(0.01)
        return time.monotonic() - t0

    # -- connect and subscribe every client ---------------------------------------------
    t0 = time.monotonic()
    plan: list[tuple[int, tuple[str, ...], str, bool]] = spec["clients"]
    made = await asyncio.gather(*(connect(*p) for p in plan))
    st.clients = [c for c in made if c is not None]
    await wait_ready(st.clients, 20.0)
    pipe.send(
        (
            "ready",
            {
                "connected": len(st.clients),
                "ready": sum(1 for c in st.clients if c.ready and not c.closed),
                "connect_errors": dict(connect_errors),
                "setup_s": round(time.monotonic() - t0, 3),
                "local_addrs": sorted(st.local_addrs),
            },
        )
    )
    addr_of = {p[0]: p[2] for p in plan}
    slot_of = {c.index: i for i, c in enumerate(st.clients)}

    async def replace(old: Any) -> Any:
        """Drop `old` and reconnect in its place with `since`; keeps its views."""
        old.dropping = True
        if old.transport is not None and not old.closed:
            old.transport.disconnect(graceful=False)
        new = await connect(
            old.index, list(old.views), addr_of[old.index], old.slow, old.since(), old.views
        )
        if new is not None:
            st.clients[slot_of[old.index]] = new
        return new

    async def storm() -> None:
        targets = [c for c in st.clients if not c.slow and not c.closed]
        t_start = time.monotonic()
        news = await asyncio.gather(*(replace(c) for c in targets))
        connected_s = time.monotonic() - t_start
        alive = [c for c in news if c is not None]
        await wait_ready(alive, 30.0)
        pipe.send(
            (
                "stormed",
                {
                    "dropped": len(targets),
                    "reconnected": len(alive),
                    "resubscribed": sum(1 for c in alive if c.ready and not c.closed),
                    "connected_s": round(connected_s, 3),
                    "recover_s": round(time.monotonic() - t_start, 3),
                    "connect_errors": dict(connect_errors),
                },
            )
        )

    churn_stats = {"churned": 0, "failed": 0}
    churn_task: asyncio.Task[None] | None = None
    churn_stop = asyncio.Event()

    async def churn(rate: float) -> None:
        interval = 1.0 / rate
        next_t = time.monotonic()
        while not done.done() and not churn_stop.is_set():
            candidates = [c for c in st.clients if not c.slow and c.ready and not c.closed]
            if candidates:
                new = await replace(rng.choice(candidates))
                churn_stats["churned" if new is not None else "failed"] += 1
            next_t += interval
            with contextlib.suppress(TimeoutError):
                # stop between two replacements, never in the middle of one (a client
                # dropped and not yet replaced would be lost)
                await asyncio.wait_for(churn_stop.wait(), max(0.0, next_t - time.monotonic()))

    def progress() -> None:
        if done.done():
            return
        p99 = percentiles_ms(st.hist, (0.99,))["p99"] if st.measuring else None
        with contextlib.suppress(OSError, ValueError):
            pipe.send(("progress", {**st.counters(), "p99_ms": p99, **churn_stats}))
        loop.call_later(1.0, progress)

    loop.call_later(1.0, progress)
    tasks: set[asyncio.Task[Any]] = set()

    while not done.done():
        wake.clear()
        while commands:
            cmd = commands.popleft()
            kind = cmd[0]
            if kind == "mark_start":
                st.hist, st.samples, st.negative, st.max_ns = {}, 0, 0, 0
                st.measuring = True
                pipe.send(("marked_start", st.counters()))
            elif kind == "mark_end":
                st.measuring = False
                pipe.send(
                    (
                        "marked_end",
                        {
                            **st.counters(),
                            "hist": st.hist,
                            "samples": st.samples,
                            "negative": st.negative,
                            "max_ns": st.max_ns,
                        },
                    )
                )
            elif kind == "slow":
                n = 0
                for c in st.clients:
                    if c.slow and c.transport is not None and not c.closed:
                        c.transport.underlying_transport.pause_reading()
                        n += 1
                pipe.send(("slowed", n))
            elif kind == "storm":
                task = loop.create_task(storm())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif kind == "churn":
                churn_task = loop.create_task(churn(float(cmd[1])))
            elif kind == "churn_stop":
                if churn_task is not None:
                    churn_stop.set()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(churn_task), 30.0)
                    churn_task = None
                pipe.send(("churned", dict(churn_stats)))
            elif kind == "converge":
                result = await _converge(st, cmd[1], float(cmd[2]), done)
                result["connect_errors"] = dict(connect_errors)
                pipe.send(("converged", result))
            elif kind == "exit":
                finish("exit")
        if not done.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), 0.5)
    loop.remove_reader(pipe.fileno())
    for t in (*tasks, churn_task):
        if t is not None:
            t.cancel()
    for c in st.clients:
        if c.transport is not None and not c.closed:
            c.dropping = True
            c.transport.disconnect(graceful=False)
    await asyncio.sleep(0)


def converged(client: Any, finals: Mapping[str, Mapping[str, int]]) -> bool:
    """True when the client holds the final seq of every key of every topic it reads."""
    for topic, view in client.views.items():
        for key, seq in finals.get(topic, {}).items():
            v = view.get(key)
            if not isinstance(v, list) or not v or v[0] != seq:
                return False
    return True


async def _converge(
    st: ProcState,
    finals: Mapping[str, Mapping[str, int]],
    settle_s: float,
    done: asyncio.Future[str],
) -> dict[str, Any]:
    """Wait (at most `settle_s`) until every reading client holds `finals`; check all."""
    t0 = time.monotonic()
    readers = [c for c in st.clients if not c.slow]
    pending = [c for c in readers if not c.closed]
    while pending and not done.done() and time.monotonic() - t0 < settle_s:
        pending = [c for c in pending if not c.closed and not converged(c, finals)]
        if pending:
            await asyncio.sleep(0.02)
    settle = time.monotonic() - t0
    ok = [c for c in readers if not c.closed and converged(c, finals)]
    ok_ids = {id(c) for c in ok}
    examples: list[dict[str, Any]] = []
    for c in readers:
        if id(c) in ok_ids or len(examples) >= 3:
            continue
        wrong = {
            f"{t}/{k}": (c.views[t].get(k) or [None])[0]
            for t in c.views
            for k, s in finals.get(t, {}).items()
            if (c.views[t].get(k) or [None])[0] != s
        }
        examples.append(
            {
                "closed": c.closed,
                "close_code": c.close_code,
                "keys_wrong": len(wrong),
                "sample": dict(list(wrong.items())[:3]),
            }
        )
    slow = [c for c in st.clients if c.slow]
    return {
        "clients": len(readers),
        "converged": len(ok),
        "settle_s": round(settle, 3),
        "examples": examples,
        "slow_clients": len(slow),
        "slow_closed": sum(1 for c in slow if c.closed),
        "slow_close_codes": {str(k): v for k, v in st.slow_close_codes.items()},
        "errors": dict(st.errors),
        "close_codes": {str(k): v for k, v in st.close_codes.items()},
        "byes": st.byes,
        "local_addrs": sorted(st.local_addrs),
    }
