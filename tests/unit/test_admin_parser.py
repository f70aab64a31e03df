"""engine/admin/parser.py: the admin's request reader, fed without a socket."""

from __future__ import annotations

import pytest

from engine.admin.parser import RequestReader

POST = (
    b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/msgpack\r\n"
    b"Content-Length: 5\r\n\r\nhello"
)


def _reader(head: int = 1024, body: int = 100) -> RequestReader:
    return RequestReader(head, body)


@pytest.mark.parametrize("step", [None, 1, 7])
def test_a_request_fed_whole_or_in_pieces(step: int | None) -> None:
    r = _reader()
    pieces = [POST] if step is None else [POST[i : i + step] for i in range(0, len(POST), step)]
    for piece in pieces:
        r.feed(piece)
    (req,) = r.requests
    assert (req.method, req.target, req.complete, req.keep_alive) == (
        "POST",
        "/publish",
        True,
        True,
    )
    assert req.headers["content-type"] == "application/msgpack"  # lower-case names
    assert req.body() == b"hello" and r.error is None


def test_pipelined_requests_are_served_in_order_then_the_error() -> None:
    """Rule 3: what completed before a framing error is served first."""
    r = _reader()
    r.feed(POST + POST.replace(b"hello", b"world") + b"GARBAGE\r\n\r\n")
    assert [q.body() for q in r.requests] == [b"hello", b"world"]
    assert r.error is not None and r.error.status == 400


@pytest.mark.parametrize("whole", [True, False])
def test_a_head_over_the_limit_is_431_whole_or_arriving(whole: bool) -> None:
    """Rule 1: an unfinished header line is counted too."""
    r = _reader(head=1024)
    head = b"GET /stats HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000
    r.feed(head + b"\r\n\r\n" if whole else head)
    assert r.error is not None and r.error.status == 431
    assert not r.requests


def test_a_body_over_the_limit_is_marked_and_dropped() -> None:
    r = _reader(body=10)
    r.feed(b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n" + b"x" * 20)
    (req,) = r.requests
    assert req.over and req.chunks == [] and req.size == 20


def test_chunked_body_with_trailers_drops_the_trailers() -> None:
    r = _reader()
    r.feed(
        b"POST /publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    (req,) = r.requests
    assert req.body() == b"abcde" and "x-trailer" not in req.headers


@pytest.mark.parametrize(
    "head",
    [
        b"POST /publish HTTP/1.1\r\nContent-Length: 1\r\n\r\nx",  # no Host in 1.1
        b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # both framings: smuggling
        b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
)
def test_bad_framing_is_400_and_nothing_is_served(head: bytes) -> None:
    r = _reader()
    r.feed(head)
    assert r.error is not None and r.error.status == 400
    assert not [q for q in r.requests if q.complete]


def test_http_1_0_closes_and_needs_no_host() -> None:
    r = _reader()
    r.feed(b"GET /healthz HTTP/1.0\r\n\r\n")
    (req,) = r.requests
    assert req.complete and not req.keep_alive and r.error is None


def test_connection_close_and_expect_continue() -> None:
    r = _reader()
    r.feed(
        b"POST /publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    (req,) = r.requests
    assert req.head_done and not req.complete and req.expect_continue and not req.keep_alive
