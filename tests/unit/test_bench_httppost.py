"""The bench publisher's HTTP client (loadtest/bench/httppost.py): the response head
parsed by the rules, and a real loopback server's answers: keep-alive, a close, a
bounded head, a server that says nothing."""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import pytest

from loadtest.bench.httppost import MAX_HEAD_BYTES, KeepAlivePost, ResponseError, parse_head


def test_the_head_gives_the_status_the_length_and_whether_the_connection_closes() -> None:
    assert parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12") == (200, 12, False)
    assert parse_head(b"HTTP/1.1 401 Unauthorized\r\ncontent-length:0\r\nConnection: close") == (
        401,
        0,
        True,
    )
    assert parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 1") == (200, 1, True)


@pytest.mark.parametrize(
    ("head", "says"),
    [
        (b"HTTP/1.1 200 OK", "no content-length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", "transfer-encoding"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1", "bad content-length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999", "over"),
        (b"SPDY 200 OK\r\nContent-Length: 1", "bad status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here", "bad header line"),
    ],
)
def test_a_response_it_does_not_accept_is_refused_by_name(head: bytes, says: str) -> None:
    with pytest.raises(ResponseError, match=says):
        parse_head(head)


@contextmanager
def server(answer: Callable[[socket.socket, bytes], bool]) -> Iterator[tuple[int, list[bytes]]]:
    """A loopback server for one connection at a time: `answer(conn, request)` writes the
    response and says whether to keep the connection. Yields (port, requests seen)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(10)
    seen: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                buf = b""
                while True:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        break
                    if not data:
                        break
                    buf += data
                    head, sep, rest = buf.partition(b"\r\n\r\n")
                    if not sep:
                        continue
                    n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    if len(rest) < n:
                        continue
                    seen.append(head + sep + rest[:n])
                    buf = rest[n:]
                    if not answer(conn, rest[:n]):
                        break

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield lsock.getsockname()[1], seen
    finally:
        with suppress(OSError):
            lsock.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        lsock.close()
        t.join(10)


def echo(conn: socket.socket, body: bytes) -> bool:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return True


def test_posts_share_one_connection_and_each_gets_its_whole_answer() -> None:
    with server(echo) as (port, seen):
        client = KeepAlivePost("127.0.0.1", port, timeout_s=5)
        big = bytes(range(256)) * 1000  # several reads
        assert client.post("/publish", b"one", {"Content-Type": "application/msgpack"}) == (
            200,
            b"one",
        )
        first = client.sock
        assert client.post("/publish", big, {}) == (200, big)
        assert client.sock is first  # kept alive
        client.close()
    assert seen[0].startswith(b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nContent-Type: application/msgpack\r\nContent-Length: 3\r\n\r\none" in seen[0]


def test_a_connection_close_is_obeyed_and_the_next_post_reconnects() -> None:
    def once(conn: socket.socket, body: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy")
        return False

    with server(once) as (port, seen):
        client = KeepAlivePost("127.0.0.1", port, timeout_s=5)
        assert client.post("/p", b"a", {}) == (503, b"busy")
        assert client.sock is None
        assert client.post("/p", b"b", {}) == (503, b"busy")
        client.close()
    assert len(seen) == 2


def test_a_head_that_never_ends_is_refused_at_the_bound() -> None:
    def endless(conn: socket.socket, body: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * (2 * MAX_HEAD_BYTES))
        return True

    with server(endless) as (port, _):
        client = KeepAlivePost("127.0.0.1", port, timeout_s=5)
        with pytest.raises(ResponseError, match="head over"):
            client.post("/p", b"x", {})
        assert client.sock is None  # closed after the error


def test_a_server_that_closes_or_says_nothing_raises_what_http_client_would() -> None:
    with server(lambda conn, body: False) as (port, _):
        client = KeepAlivePost("127.0.0.1", port, timeout_s=5)
        with pytest.raises(http.client.RemoteDisconnected):
            client.post("/p", b"x", {})
    with server(lambda conn, body: True) as (port, _):  # reads, never answers
        client = KeepAlivePost("127.0.0.1", port, timeout_s=0.2)
        with pytest.raises(TimeoutError):
            client.post("/p", b"x", {})
        assert client.sock is None
