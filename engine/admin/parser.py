"""The admin API's HTTP/1.1 request reader: bytes in, requests out. No I/O.

`RequestReader` feeds what the socket gave to httptools (llhttp, the parser
under uvicorn, in C) and hands back the requests it found, head first, body
as it arrives; `engine.admin.server` does the reading and the writing.

Rules:

1. Bounded: a head (request line and headers) over `max_head_bytes` is
   refused with 431, whether it arrived whole or is still arriving (bytes fed
   while a head is incomplete are counted, so llhttp's own buffer of a
   half-received header is bounded too). A body is kept up to `body_limit`
   bytes; past it the request is marked `over` and its bytes are dropped.
2. Strict framing, as llhttp enforces it by default: Content-Length with
   Transfer-Encoding, conflicting lengths, bad chunk sizes and bad header
   bytes are 400; an HTTP/1.1 request without `Host` is 400 (RFC 9112
   section 3.2). Trailer fields of a chunked body are parsed and dropped.
3. Pipelined requests are parsed in order and served in order; after a
   framing error, the requests completed before it are still served, then the
   error is answered and the connection closed.
4. Copies of a body's bytes: llhttp hands each body span as a new `bytes`
   (one copy out of the read buffer); `Request.body()` joins them (no copy
   when the body came in one span, the common case for a keep-alive publisher).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import httptools

from engine.admin.http import HttpError


@dataclass(slots=True)
class Request:
    """One request: its head (once complete) and its body so far."""

    method: str = ""
    target: str = ""
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    head_done: bool = False
    keep_alive: bool = True
    expect_continue: bool = False
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0  # body bytes received, kept or not
    over: bool = False  # body past the limit (rule 1): chunks dropped
    complete: bool = False
    head_bytes: int = 0

    def body(self) -> bytes:
        chunks = self.chunks
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)


class RequestReader:
    """httptools callbacks to `Request`s (the rules above)."""

    def __init__(self, max_head_bytes: int, body_limit: int) -> None:
        self.max_head_bytes = max_head_bytes
        self.body_limit = body_limit
        self.requests: deque[Request] = deque()  # oldest first; the first is being served
        self.error: HttpError | None = None  # framing error, after `requests`
        self._parser = httptools.HttpRequestParser(self)
        self._url = bytearray()
        self._pending_head = 0  # bytes fed while a head is incomplete

    # -- fed by the server --------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Parse `data`; requests found are appended, a framing error is kept in `error`."""
        if self.error is not None:
            return
        current = self.requests[-1] if self.requests else None
        if current is None or current.complete or not current.head_done:
            self._pending_head += len(data)
        try:
            self._parser.feed_data(data)
        except _Stop:
            pass  # `error` says why
        except httptools.HttpParserUpgrade:
            # A request asking to switch protocols is served as a plain one,
            # then the connection closes (the rest is not HTTP we read).
            if self.requests and self.requests[-1].complete:
                self.requests[-1].keep_alive = False
            else:
                self._fail(400, "protocol upgrades are not served here")
        except httptools.HttpParserError as exc:
            if self.error is None:
                self._fail(400, f"malformed HTTP request: {exc}")
        last = self.requests[-1] if self.requests else None
        in_head = last is None or last.complete or not last.head_done
        if self.error is None and in_head and self._pending_head > self.max_head_bytes:
            self._fail(431, f"request head over the limit of {self.max_head_bytes} bytes")

    def pop(self) -> None:
        """The first request was answered: forget it."""
        self.requests.popleft()

    def _fail(self, status: int, message: str) -> None:
        """Keep the error; an unfinished request is dropped (never served)."""
        self.error = HttpError(status, "bad_request", message)
        if self.requests and not self.requests[-1].complete:
            self.requests.pop()

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.requests.append(Request())
        self._url.clear()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self.requests[-1].head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.requests[-1]
        if request.head_done:
            return  # a trailer field of a chunked body: dropped (rule 2)
        request.head_bytes += len(name) + len(value) + 4
        request.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        request = self.requests[-1]
        parser = self._parser
        request.head_done = True
        self._pending_head = 0
        request.method = parser.get_method().decode("ascii", "replace")
        request.target = self._url.decode("latin-1")
        request.keep_alive = parser.should_keep_alive()
        version = parser.get_http_version()
        request.expect_continue = (
            version == "1.1" and request.headers.get("expect", "").lower() == "100-continue"
        )
        if request.head_bytes > self.max_head_bytes:
            self._fail(431, f"request head over the limit of {self.max_head_bytes} bytes")
        elif version == "1.1" and "host" not in request.headers:
            self._fail(400, "malformed HTTP request: missing mandatory Host header")
        if self.error is not None:  # stop here: no body is parsed for this request
            raise _Stop

    def on_body(self, body: bytes) -> None:
        request = self.requests[-1]
        request.size += len(body)
        if request.over:
            return
        if request.size > self.body_limit:
            request.over = True
            request.chunks.clear()
            return
        request.chunks.append(body)

    def on_message_complete(self) -> None:
        self.requests[-1].complete = True


class _Stop(Exception):
    """Raised in a callback to stop parsing (httptools then raises HttpParserCallbackError)."""
