"""What only the local backend does: the hub's overflow policy, its handling of
misbehaving clients, its big dumps, and `run_hub` as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator

import msgpack
import pytest

from engine.board import Board
from engine.bus import hub_socket_path, wire
from engine.bus.base import Update
from engine.bus.hub import Hub
from engine.bus.local import LocalBus
from engine.errors import BusUnavailable
from tests.contract.conftest import WAIT_S, Recorder, until

SMALL_BUFFER = 65_536


def val(x: object) -> bytes:
    return msgpack.packb(x, use_bin_type=True)


@pytest.fixture
async def hub(run_dir: str) -> AsyncIterator[Hub]:
    hub = Hub(hub_socket_path(run_dir), shards=4, max_buffer_bytes=SMALL_BUFFER)
    await hub.start()
    yield hub
    await hub.close()


@pytest.fixture
async def publisher(hub: Hub) -> AsyncIterator[LocalBus]:
    bus = LocalBus(hub.path, want_entries=False)
    await bus.start(None)
    assert bus.connected
    yield bus
    await bus.close()


def raw_client(path: str, first: bytes | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(path)
    if first is not None:
        sock.sendall(first)
    sock.setblocking(False)
    return sock


async def read_all(sock: socket.socket) -> tuple[list[object], bool]:
    """Everything the hub sends until it closes: (messages, ended on a frame boundary).

    The end may be a reset rather than EOF: a Unix socket closed with unread
    input (requests the hub no longer reads) resets its peer after the data.
    """
    loop = asyncio.get_running_loop()
    reader = wire.FrameReader()
    messages: list[object] = []
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), WAIT_S)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return messages, reader.buffered == 0
        messages.extend(reader.feed(chunk))


async def test_epoch_is_fresh_per_hub(run_dir: str) -> None:
    epochs = set()
    for _ in range(3):
        hub = Hub(hub_socket_path(run_dir), shards=2, max_buffer_bytes=SMALL_BUFFER)
        await hub.start()
        epochs.add(hub.epoch)
        await hub.close()
        assert not os.path.exists(hub.path)
    assert len(epochs) == 3
    assert all(len(e) == 12 and int(e, 16) >= 0 for e in epochs)


async def test_a_client_that_does_not_read_is_dropped_not_buffered(
    hub: Hub, publisher: LocalBus
) -> None:
    loop = asyncio.get_running_loop()
    stalled = raw_client(hub.path, wire.handshake(True))
    healthy = Recorder()
    good = LocalBus(hub.path)
    await good.start(healthy)
    try:
        sent = 0
        while hub.overflow_drops == 0:
            await publisher.publish_wait([Update("flood.t", f"k{sent % 10}", val("x" * 16_000))])
            # The stalled client publishes too (it writes, it just does not read).
            with contextlib.suppress(OSError):  # once dropped, the hub may be gone
                await loop.sock_sendall(
                    stalled, wire.encode_frame(("p", sent, [("stalled.t", f"k{sent}", b"\x01")]))
                )
            sent += 1
            assert sent < 2_000, "the stalled client was never dropped"
        assert hub.overflow_drops == 1
        # What the hub had queued still arrives, then a clean close; in particular
        # every publish the hub applied for it is answered (never "applied but lost").
        messages, clean = await read_all(stalled)
        assert clean and messages[0] == ("hello", hub.epoch)
        replied = {m[1] for m in messages if isinstance(m, tuple) and m[0] == "r"}
        applied = {key for key, _, _ in hub.core.snapshot("stalled.t").items}
        assert applied and {f"k{i}" for i in replied} == applied
        # The others are not affected.
        (p,) = await publisher.publish_wait([Update("flood.t", "last", val(1))])
        await until(lambda: ("flood.t", p) in healthy.marks(), "healthy client keeps up")
        assert healthy.links == [True] and hub.overflow_drops == 1
        assert hub.clients == 2
    finally:
        stalled.close()
        await good.close()


async def test_requests_in_flight_when_the_hub_dies_fail(hub: Hub, publisher: LocalBus) -> None:
    answers: list[object] = []
    publisher.publish([Update("dies.t", "k", val(1))], answers.append)
    await hub.close()  # before the hub's loop turn could read the request
    await until(lambda: bool(answers), "publish answered")
    assert len(answers) == 1 and isinstance(answers[0], BusUnavailable)


class _BlockingSink(Recorder):
    """A sink whose loop stops on the first live batch until `gate` opens (a stuck worker)."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate
        self.lock = threading.Lock()

    def on_bus_entries(self, entries: object) -> None:
        if self.links == [True]:
            self.gate.wait(WAIT_S)
        with self.lock:
            super().on_bus_entries(entries)  # type: ignore[arg-type]

    def snapshot(self) -> tuple[list[bool], dict[tuple[str, str], tuple[int, bytes]]]:
        with self.lock:
            return list(self.links), dict(self.state)


async def test_a_dropped_client_reconnects_and_resyncs_from_the_dump(
    hub: Hub, publisher: LocalBus
) -> None:
    gate = threading.Event()
    sink = _BlockingSink(gate)
    stop = threading.Event()
    started = threading.Event()

    async def other_process() -> None:
        bus = LocalBus(hub.path)
        await bus.start(sink)
        started.set()
        while not stop.is_set():
            await asyncio.sleep(0.01)
        await bus.close()

    thread = threading.Thread(target=asyncio.run, args=(other_process(),), daemon=True)
    thread.start()
    try:
        await until(started.is_set, "the other client connected")
        sent = 0
        while hub.overflow_drops == 0:
            await publisher.publish_wait([Update("resync.t", f"k{sent % 10}", val(sent))])
            await publisher.publish_wait([Update("filler.t", "big", val("y" * 16_000))])
            sent += 1
            assert sent < 2_000, "the stuck client was never dropped"
        gate.set()
        await until(lambda: sink.snapshot()[0] == [True, False, True], "reconnected")
        expected = {(t, k): (p, d) for t, k, p, d in hub.core.state_entries()}
        await until(lambda: sink.snapshot()[1] == expected, "resynced to the hub's state")
    finally:
        gate.set()
        stop.set()
        await asyncio.to_thread(thread.join, WAIT_S)
    assert not thread.is_alive()


async def test_garbage_closes_only_that_client(hub: Hub, publisher: LocalBus) -> None:
    for first in (
        b"\x00\x00\x00\x03abc",  # not msgpack
        wire.encode_frame(("p", 1, [])),  # a request before the handshake
        (wire.MAX_FRAME_BYTES + 1).to_bytes(4, "big"),  # a frame over the limit
        wire.encode_frame(["nonsense"]),
    ):
        sock = raw_client(hub.path, first)
        try:
            messages, _ = await read_all(sock)
            assert messages == []
        finally:
            sock.close()
    assert publisher.connected
    assert await publisher.publish_wait([Update("still.ok", "k", val(1))])


async def test_a_bad_request_is_refused_and_the_link_stays(hub: Hub) -> None:
    sock = raw_client(hub.path, wire.handshake(False))
    loop = asyncio.get_running_loop()
    reader = wire.FrameReader()
    got: list[object] = []

    async def next_message() -> object:
        while not got:
            got.extend(reader.feed(await asyncio.wait_for(loop.sock_recv(sock, 65536), WAIT_S)))
        return got.pop(0)

    try:
        assert await next_message() == ("hello", hub.epoch)
        assert await next_message() == ("d",)
        await loop.sock_sendall(sock, wire.encode_frame(("p", 7, [("t", "k", "not bytes")])))
        reply = await next_message()
        assert isinstance(reply, tuple) and reply[:3] == ("x", 7, "bad_request")
        await loop.sock_sendall(sock, wire.encode_frame(("p", 8, [("t", "k", b"\x01")])))
        reply = await next_message()
        assert isinstance(reply, tuple) and reply[:2] == ("r", 8)
        assert hub.core.snapshot("t").items == [("k", wire.positions_of(reply[2])[0], b"\x01")]
    finally:
        sock.close()


async def test_a_big_state_arrives_whole_before_start_returns(
    hub: Hub, publisher: LocalBus
) -> None:
    for i in range(0, 3000, 100):
        await publisher.publish_wait(
            [Update(f"big.{j % 3}", f"k{j}", val("z" * 1000)) for j in range(i, i + 100)]
        )
    sink = Recorder()
    bus = LocalBus(hub.path)
    await bus.start(sink)
    try:
        assert len(sink.state) == 3000
        assert sink.links == [True]
        assert len(wire.entry_frames(hub.core.state_entries())) > 1  # it was cut in frames
    finally:
        await bus.close()


async def test_close_waits_for_outstanding_replies(hub: Hub) -> None:
    bus = LocalBus(hub.path, want_entries=False)
    await bus.start(None)
    answers: list[object] = []
    for i in range(50):
        bus.publish([Update("close.t", f"k{i}", val(i))], answers.append)
    await bus.close()
    assert len(answers) == 50 and all(isinstance(a, list) for a in answers)
    assert len(hub.core.snapshot("close.t").items) == 50


def test_run_hub_serves_until_sigterm(run_dir: str) -> None:
    code = (
        "import sys\n"
        "from engine.bus.hub import run_hub\n"
        "from engine.config import default_config\n"
        "run_hub(default_config(), sys.argv[1])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", code, run_dir], env=env)
    try:
        board = Board(run_dir)
        deadline = time.monotonic() + WAIT_S
        while board.read("hub") is None:
            assert proc.poll() is None, "the hub exited"
            assert time.monotonic() < deadline, "no hub status"
            time.sleep(0.01)
        status = board.read("hub")
        assert status is not None and status["pid"] == proc.pid

        async def use_it() -> str | None:
            bus = LocalBus(hub_socket_path(run_dir), want_entries=False)
            await bus.start(None)
            try:
                await bus.publish_wait([Update("proc.t", "k", val(1))])
                return bus.epoch
            finally:
                await bus.close()

        proc.send_signal(signal.SIGHUP)  # ignored: a hub restart would lose the state
        epoch = asyncio.run(use_it())
        assert epoch == status["epoch"]
        deadline = time.monotonic() + WAIT_S
        while (board.read("hub") or {}).get("entries") != 1:
            assert time.monotonic() < deadline, "status never counted the entry"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT_S) == 0
        assert not os.path.exists(hub_socket_path(run_dir))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class _CountingTransport:
    """The link's transport, counting the writes that reach it."""

    def __init__(self, inner: asyncio.WriteTransport) -> None:
        self.inner = inner
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.inner.write(data)

    def writelines(self, frames: list[bytes]) -> None:
        self.writes += 1
        self.inner.writelines(frames)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


async def test_requests_of_one_loop_iteration_go_in_one_write_in_order(
    hub: Hub, publisher: LocalBus
) -> None:
    """LocalBus rule 5: 50 publishes and a snapshot made in one loop iteration
    reach the hub in one write, in the order they were made: the snapshot sees
    all 50 and their positions follow the calls."""
    link = publisher._link
    assert link is not None and link.transport is not None
    counting = _CountingTransport(link.transport)
    link.transport = counting  # type: ignore[assignment]
    answers: list[object] = []
    for i in range(50):
        publisher.publish([Update("batch.t", f"k{i}", val(i))], answers.append)
    snap = await publisher.snapshot("batch.t")  # sent before this task yields
    assert counting.writes == 1
    assert len(snap.items) == 50 and len(answers) == 50  # replies come in order
    positions = [a[0] for a in answers if isinstance(a, list)]
    assert positions == sorted(positions) and len(set(positions)) == 50
