"""A WebSocket-level fuzzer (issue 11): arbitrary sequences of frames over raw
TCP to a real one-worker `fanout serve`.

Each example opens a connection, upgrades, writes a sequence of frames drawn
by hypothesis (any opcode, reserved ones included; fin and the three rsv bits;
7-bit, 16-bit and 64-bit lengths, minimal or not, and lengths that promise
more than is sent; masked and unmasked; payloads of random bytes or of fanout
requests, empty or past the limits; control frames over 125 bytes; fragments
with control frames between them; runs of one frame repeated up to 300 times),
then a close frame, then ends its side of the TCP connection and reads what the
worker sent until the end. Half the examples offer permessage-deflate at the
upgrade; their payloads may also be compressed requests, broken deflate
streams and zip bombs (RSV1 set or not). It checks:

1. The worker's frames parse, unmasked, without rsv bits, except RSV1 on a
   binary frame of a connection that negotiated permessage-deflate, which
   then inflates (engine/protocol/deflate.py).
2. Every close the worker sends carries a documented code: one of
   engine/codes.py (1011, an exception escaping the listener, excluded), one
   RFC 6455 names for what picows refuses (1002 protocol error, 1007 invalid
   UTF-8), or the client's own sendable code echoed; an empty close only
   answers an empty close.
3. No exception escapes: no "Traceback" in the worker's log, the same worker
   process throughout, still answering a `ping` at the end.
4. Memory: the worker's RSS, sampled after every example, stays below its
   warmed-up baseline plus `RSS_BOUND_BYTES`. The stated bound per connection
   is the configuration's (`per_connection_bound`: the read buffer and the
   fragments of one message, each at most `limits.max_message_bytes`, the
   write buffer up to the hard cap of 4 x `fanout.max_buffer_bytes` + 4 x
   `limits.max_message_bytes`, and ~16 KiB of fixed state); one connection is
   open at a time, so anything past that plus allocator slack is a leak.

`make test`: a handful of examples. `make fuzz` (HYPOTHESIS_PROFILE=fuzz):
the profile's count (20,000).
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import codes
from engine.protocol.deflate import CLIENT_OFFER, Deflater, inflate
from tests.support.serve import Served

pytestmark = pytest.mark.slow

MAX_MESSAGE_BYTES = 4096
MAX_BUFFER_BYTES = 4096
FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
EXAMPLES = settings().max_examples if FUZZ else 25


def per_connection_bound() -> int:
    """What one connection may hold, by configuration (rule 4)."""
    read_buffer = MAX_MESSAGE_BYTES + 14
    fragments = MAX_MESSAGE_BYTES + 64 * 64  # bytes, and per-fragment object overhead
    write_buffer = 4 * MAX_BUFFER_BYTES + 4 * MAX_MESSAGE_BYTES
    return read_buffer + fragments + write_buffer + 16 * 1024


# allocator slack: arenas and free lists a few thousand connections leave behind
RSS_BOUND_BYTES = 12 * 2**20 + per_connection_bound()

# What a close from the worker may carry (rule 2), besides an echo.
DOCUMENTED = frozenset(
    {v for k, v in vars(codes).items() if k.startswith("CLOSE_") and isinstance(v, int)}
    - {codes.CLOSE_INTERNAL_ERROR}
) | {1002, 1007}

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


@dataclass(frozen=True)
class Frame:
    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0
    masked: bool = True
    length: str = "minimal"  # "minimal", "16", "64", or "short" (promises more than sent)
    repeat: int = 1

    def encode(self) -> bytes:
        n = len(self.payload)
        declared = n + 7 if self.length == "short" else n
        b0 = (0x80 if self.fin else 0) | (self.rsv << 4) | self.opcode
        mask_bit = 0x80 if self.masked else 0
        if self.length == "64" or declared > 0xFFFF:
            head = struct.pack("!BBQ", b0, mask_bit | 127, declared)
        elif self.length == "16" or declared > 125:
            head = struct.pack("!BBH", b0, mask_bit | 126, declared)
        else:
            head = struct.pack("!BB", b0, mask_bit | declared)
        if not self.masked:
            return head + self.payload
        mask = b"\x5a\x17\xc3\x01"
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(self.payload))
        return head + mask + body


requests = st.one_of(
    st.fixed_dictionaries({"op": st.just("ping"), "id": st.integers(0, 9)}),
    st.fixed_dictionaries(
        {
            "op": st.just("sub"),
            "topics": st.lists(st.sampled_from(["a", "b.c", "fz.t"]), max_size=3),
        }
    ),
    st.fixed_dictionaries({"op": st.just("unsub"), "topics": st.just(["a"])}),
    st.fixed_dictionaries(
        {"op": st.sampled_from(["pub", "auth", "nope"]), "topic": st.text(max_size=5)}
    ),
)
_bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
ZIP_BOMB = (_bomb.compress(bytes(10_000_000)) + _bomb.flush(zlib.Z_SYNC_FLUSH))[:-4]
payloads = st.one_of(
    st.binary(max_size=40),
    requests.map(lambda r: msgpack.packb(r)),
    requests.map(lambda r: Deflater(stored_under=0).frame(msgpack.packb(r))),  # compressed
    st.just(ZIP_BOMB),  # ~10 KB inflating to 10 MB, past MAX_MESSAGE_BYTES
    st.just(b""),
    st.integers(126, 300).map(lambda n: b"p" * n),  # a control frame over 125 bytes
    st.sampled_from([MAX_MESSAGE_BYTES - 10, MAX_MESSAGE_BYTES + 1, 70_000]).map(
        lambda n: b"\x00" * n
    ),
)
close_payloads = st.one_of(
    st.just(b""),
    st.integers(0, 65535).map(lambda c: struct.pack("!H", c)),
    st.sampled_from([1000, 1001, 3000, 4000, 4999, 5000, 1005]).map(lambda c: struct.pack("!H", c)),
    st.tuples(st.sampled_from([1000, 4001]), st.binary(max_size=8)).map(
        lambda t: struct.pack("!H", t[0]) + t[1]  # reasons, UTF-8 or not
    ),
    st.binary(min_size=1, max_size=1),  # half a code
)


@st.composite
def frames(draw: Any) -> Frame:
    opcode = draw(
        st.one_of(
            st.sampled_from([OP_CONT, OP_BINARY, OP_PING, OP_PONG, OP_CONT, OP_BINARY]),
            st.integers(0, 15),  # TEXT, CLOSE and the reserved ones too
        )
    )
    payload = draw(close_payloads if opcode == OP_CLOSE else payloads)
    return Frame(
        opcode=opcode,
        payload=payload,
        fin=draw(st.booleans())
        if opcode in (OP_CONT, OP_BINARY)
        else draw(st.sampled_from([True] * 9 + [False])),
        rsv=draw(st.sampled_from([0] * 12 + [1, 2, 4, 7])),
        masked=draw(st.sampled_from([True] * 15 + [False])),
        length=draw(st.sampled_from(["minimal"] * 12 + ["16", "64", "short"])),
        repeat=draw(st.sampled_from([1] * 10 + [2, 70, 300])),
    )


sequences = st.lists(frames(), min_size=1, max_size=12)
compressed_first = st.builds(  # a compressed message, RSV1 on its first frame
    lambda r: Frame(OP_BINARY, Deflater(stored_under=0).frame(msgpack.packb(r)), rsv=4),
    requests,
)


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Served, str, psutil.Process]]:
    log = str(tmp_path_factory.mktemp("wsfuzz") / "serve.log")
    s = Served(
        ["--workers", "1"],
        env={
            "FANOUT_LIMITS_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES),
            "FANOUT_FANOUT_MAX_BUFFER_BYTES": str(MAX_BUFFER_BYTES),
            "FANOUT_LIMITS_UPGRADES_PER_S": "0",  # the fuzzer connects as fast as it can
            "FANOUT_LOG_LEVEL": "warning",
        },
        log_path=log,
    )
    try:
        s.wait_ready()
        (pid,) = s.worker_pids().values()
        yield s, log, psutil.Process(pid)
    finally:
        s.stop()


def upgrade(port: int, deflate: bool = False) -> tuple[socket.socket, bytes]:
    """A connection past the upgrade (offering permessage-deflate if `deflate`),
    and what the worker sent after its head."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    # closed with a reset: 20,000 examples leave no TIME_WAIT ports behind
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            + (f"Sec-WebSocket-Extensions: {CLIENT_OFFER}\r\n" if deflate else "")
            + "\r\n"
        ).encode()
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        assert chunk, "closed during the upgrade"
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    assert (b"permessage-deflate" in head) is deflate, head
    return sock, rest


def exchange(port: int, sequence: list[Frame], deflate: bool = False) -> bytes:
    """Send the sequence, a close, end our side; everything the worker sent."""
    sock, received = upgrade(port, deflate)
    data = b"".join(f.encode() * f.repeat for f in sequence)
    data += Frame(OP_CLOSE, struct.pack("!H", 1000)).encode()
    try:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the worker already failed the connection
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    finally:
        sock.close()
    return received


def parse(data: bytes, deflate: bool = False) -> list[tuple[int, bytes]]:
    """The worker's frames (rule 1), compressed ones inflated; a frame cut short
    at the end is dropped."""
    out: list[tuple[int, bytes]] = []
    i = 0
    while len(data) - i >= 2:
        b0, b1 = data[i], data[i + 1]
        compressed = deflate and b0 & 0x70 == 0x40 and b0 & 0x0F == OP_BINARY
        assert b0 & 0x70 == 0 or compressed, f"rsv bits from the worker: {b0:#x}"
        assert b1 & 0x80 == 0, "a masked frame from the worker"
        n, j = b1 & 0x7F, i + 2
        if n == 126:
            if len(data) - j < 2:
                break
            (n,) = struct.unpack_from("!H", data, j)
            j += 2
        elif n == 127:
            if len(data) - j < 8:
                break
            (n,) = struct.unpack_from("!Q", data, j)
            j += 8
        if len(data) - j < n:
            break
        payload = data[j : j + n]
        out.append((b0 & 0x0F, inflate(payload, 1 << 24) if compressed else payload))
        i = j + n
    return out


def check_closes(sequence: list[Frame], replies: list[tuple[int, bytes]]) -> None:
    """Rule 2."""
    sent = {
        struct.unpack("!H", f.payload[:2])[0]
        for f in sequence
        if f.opcode == OP_CLOSE and len(f.payload) >= 2
    } | {1000}
    sent_empty = any(f.opcode == OP_CLOSE and not f.payload for f in sequence)
    for op, payload in replies:
        if op != OP_CLOSE:
            continue
        if not payload:
            assert sent_empty, "an empty close the client did not ask for"
            continue
        assert len(payload) >= 2, payload
        (code,) = struct.unpack("!H", payload[:2])
        assert code in DOCUMENTED or (
            code in sent and (1000 <= code <= 1003 or 3000 <= code <= 4999)
        ), (
            code,
            sequence,
        )


def log_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def still_answers(port: int) -> None:
    reply = parse(exchange(port, [Frame(OP_BINARY, msgpack.packb({"op": "ping", "id": 1}))]))
    messages = [msgpack.unpackb(p) for op, p in reply if op == OP_BINARY]
    assert any(m.get("op") == "pong" for m in messages), messages


def test_arbitrary_frame_sequences(worker: tuple[Served, str, psutil.Process]) -> None:
    served, log, proc = worker
    for _ in range(30):  # warm up: first-use allocations are not a leak
        still_answers(served.port)
    baseline = proc.memory_info().rss
    peak = [baseline]
    ran = [0]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        sequence=sequences,
        deflate=st.booleans(),
        first=st.one_of(st.none(), compressed_first),
    )
    def one(sequence: list[Frame], deflate: bool, first: Frame | None) -> None:
        ran[0] += 1
        if first is not None:
            sequence = [first, *sequence]
        replies = parse(exchange(served.port, sequence, deflate), deflate)
        check_closes(sequence, replies)
        rss = proc.memory_info().rss
        peak[0] = max(peak[0], rss)
        assert rss - baseline < RSS_BOUND_BYTES, (rss, baseline)

    one()
    assert proc.is_running() and served.worker_pids() == {1: proc.pid}  # never replaced
    still_answers(served.port)
    text = log_text(log)
    assert "Traceback" not in text, text[-4000:]
    print(
        f"{ran[0]} examples: worker RSS {baseline / 2**20:.1f} MiB at start,"
        f" peak {peak[0] / 2**20:.1f} MiB (bound +{RSS_BOUND_BYTES / 2**20:.1f} MiB)"
    )
