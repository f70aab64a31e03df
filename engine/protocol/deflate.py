"""permessage-deflate (RFC 7692), compressed once per group. PURE: no I/O.

The worker negotiates the extension at the upgrade (`negotiate`), the fan-out
core compresses each shared message once per flush (`Deflater.piece`) and
joins a session's pieces into its frame (`frame_of`); connections inflate
what clients send (`inflate`), and clients inflate what the engine sends.

Rules this module owns:

1. Negotiation. Every `Sec-WebSocket-Extensions` offer is read in order; the
   first `permessage-deflate` offer that can be accepted is answered
   `permessage-deflate; server_no_context_takeover; client_no_context_takeover`
   (plus `server_max_window_bits=15` when the offer named it). An offer is
   declined, and the next one tried, when a parameter is unknown, repeated,
   has a value it may not have or lacks one it needs, when a window size is
   not 8..15, or when `server_max_window_bits` is below 15: every client
   shares the same compressed bytes, made with one window (`WINDOW_BITS`).
   `client_max_window_bits` is accepted and not answered: the engine inflates
   with a 15-bit window, which reads what any client window wrote. Offers of
   more than `MAX_OFFER_BYTES` in all are not read (declined: the connection
   is uncompressed): parsing is a Python step per character, and a browser
   offers ~70 bytes.
2. No context on either side. The engine compresses with no context takeover,
   and the answer tells the client to do the same: no connection keeps a zlib
   stream. The engine keeps one compressor per worker; inbound messages are
   inflated with a decompressor made for the message and freed after it.
3. Pieces. `Deflater.piece(msg)` is a raw deflate stream of `msg` ended by a
   full flush: byte aligned, made of non-final blocks, ending with the empty
   stored block `00 00 ff ff`, referring to nothing before it. A message
   under `STORED_UNDER` bytes gets a stored piece instead (its bytes as they
   are, 5 bytes of block header per 64 KiB, no zlib call: deflate cannot win
   back its own overhead on so few). Pieces therefore concatenate: a frame of several messages is the concatenation of their
   pieces, in order.
4. Framing. A compressed frame (RSV1 set) is the concatenation of its pieces
   with the final `00 00 ff ff` removed (RFC 7692 7.2.1); when the last piece
   is a stored one, a lone `00` (the header of an empty stored block) is
   appended instead, so that the `00 00 ff ff` every receiver appends
   (7.2.2) completes a block either way.
5. Inbound messages are inflated to at most `max_bytes` (the connection's
   `limits.max_message_bytes`): more is `TooBig` (close 1009, whatever the
   compressed size: a zip bomb is cut at the bound), a broken stream
   `InflateError` (close 1007).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

EXTENSION: Final = "permessage-deflate"
WINDOW_BITS: Final = 15  # the engine's window (rule 1): every client reads it
LEVEL: Final = 6  # zlib's default: the ratio of 9 for a little more CPU than 1
MEM_LEVEL: Final = 8
TAIL: Final = b"\x00\x00\xff\xff"  # the empty stored block's LEN/NLEN (rule 4)
_EMPTY_STORED_HEADER: Final = b"\x00"
_STORED_MAX: Final = 65_535
_STORED: Final = struct.Struct("<BHH")
STORED_UNDER: Final = 64  # a message this short goes in a stored piece (rule 3)
MAX_OFFER_BYTES: Final = 1024  # Sec-WebSocket-Extensions read at most (rule 1)

RESPONSE: Final = f"{EXTENSION}; server_no_context_takeover; client_no_context_takeover"

# What a client offers (engine/client, loadtest): no context either way, which is
# what the engine answers anyway.
CLIENT_OFFER: Final = f"{EXTENSION}; server_no_context_takeover; client_no_context_takeover"

_FLAGS: Final = ("server_no_context_takeover", "client_no_context_takeover")


class InflateError(ValueError):
    """An inbound compressed message is not a valid deflate stream."""


class TooBig(ValueError):
    """An inbound compressed message inflates past the bound."""


@dataclass(frozen=True, slots=True)
class Offer:
    """One extension offer: its name and parameters (value None when bare)."""

    name: str
    params: tuple[tuple[str, str | None], ...]


def parse_offers(headers: Iterable[str]) -> list[Offer]:
    """Every extension offered in `headers` (the `Sec-WebSocket-Extensions`
    values, in order). Quoted values are unquoted; an element that does not
    parse is returned with the name "" (never accepted)."""
    offers: list[Offer] = []
    for header in headers:
        for element in _split(header, ","):
            parts = _split(element, ";")
            name = parts[0].strip().lower() if parts else ""
            params: list[tuple[str, str | None]] = []
            for raw in parts[1:]:
                key, eq, value = raw.partition("=")
                key = key.strip().lower()
                v: str | None = None
                if eq:
                    v = value.strip()
                    if len(v) >= 2 and v[0] == v[-1] == '"':
                        v = v[1:-1]
                if not key:
                    name = ""
                params.append((key, v))
            if name or params:
                offers.append(Offer(name, tuple(params)))
    return offers


def _split(text: str, sep: str) -> list[str]:
    """`text` split on `sep` outside double quotes (RFC 7230 quoted-string)."""
    out: list[str] = []
    cur: list[str] = []
    quoted = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
            continue
        elif ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return [s for s in out if s.strip()]


def accept(offer: Offer) -> str | None:
    """The response to one permessage-deflate `offer`, or None to decline it (rule 1)."""
    if offer.name != EXTENSION:
        return None
    seen: set[str] = set()
    server_bits = False
    for key, value in offer.params:
        if key in seen:
            return None
        seen.add(key)
        if key in _FLAGS:
            if value is not None:
                return None
        elif key == "server_max_window_bits":
            if _bits(value) != WINDOW_BITS:
                return None  # a smaller window than the shared bytes were made with
            server_bits = True
        elif key == "client_max_window_bits":
            if value is not None and _bits(value) is None:
                return None
        else:
            return None
    if server_bits:
        return f"{RESPONSE}; server_max_window_bits={WINDOW_BITS}"
    return RESPONSE


def _bits(value: str | None) -> int | None:
    if value is None or not value.isdigit() or len(value) > 2:
        return None
    n = int(value)
    return n if 8 <= n <= 15 else None


def negotiate(headers: Iterable[str]) -> str | None:
    """The `Sec-WebSocket-Extensions` response to a client's offers, or None
    when none is accepted (the connection is then uncompressed), as when the
    offers are longer than `MAX_OFFER_BYTES` in all (rule 1)."""
    headers = list(headers)
    if sum(map(len, headers)) > MAX_OFFER_BYTES:
        return None
    for offer in parse_offers(headers):
        response = accept(offer)
        if response is not None:
            return response
    return None


def accepted(response: str | None) -> bool:
    """A client's check of the server's response: permessage-deflate with no
    server context takeover (what a client of this module can inflate)."""
    if not response:
        return False
    offers = parse_offers([response])
    if len(offers) != 1 or offers[0].name != EXTENSION:
        return False
    keys = [k for k, _ in offers[0].params]
    return "server_no_context_takeover" in keys


# -- compressing (rules 3 and 4) --------------------------------------------------------


def stored(msg: bytes) -> bytes:
    """`msg` as stored (uncompressed) deflate blocks: a piece with no zlib call."""
    n = len(msg)
    if n <= _STORED_MAX:
        return _STORED.pack(0, n, n ^ 0xFFFF) + msg
    parts = []
    for i in range(0, n, _STORED_MAX):
        chunk = msg[i : i + _STORED_MAX]
        parts.append(_STORED.pack(0, len(chunk), len(chunk) ^ 0xFFFF))
        parts.append(chunk)
    return b"".join(parts)


class Deflater:
    """One worker's compressor (rule 2): `piece` compresses one message into
    a piece that refers to no other (a full flush resets the window)."""

    __slots__ = ("_z", "min_bytes", "pieces", "stored_under")

    def __init__(self, min_bytes: int = 0, stored_under: int = STORED_UNDER) -> None:
        self.min_bytes = min_bytes  # frames under it go raw (fanout.compression_min_bytes)
        self.stored_under = stored_under  # messages under it get a stored piece
        self._z = zlib.compressobj(LEVEL, zlib.DEFLATED, -WINDOW_BITS, MEM_LEVEL)
        self.pieces = 0  # zlib pieces made (what the CPU is spent on)

    def piece(self, msg: bytes) -> bytes:
        """`msg` as a piece (rule 3): compressed, or stored under `stored_under`."""
        if len(msg) < self.stored_under:
            return stored(msg)
        z = self._z
        self.pieces += 1
        return z.compress(msg) + z.flush(zlib.Z_FULL_FLUSH)

    def frame(self, msg: bytes) -> bytes:
        """One message as a whole compressed frame's payload (rule 4)."""
        return frame_of((self.piece(msg),))


def frame_of(pieces: Sequence[bytes]) -> bytes:
    """The payload of a compressed frame made of `pieces`, in order (rule 4)."""
    last = pieces[-1]
    if last.endswith(TAIL):
        if len(pieces) == 1:
            return last[:-4]
        return b"".join([*pieces[:-1], memoryview(last)[:-4]])
    return b"".join([*pieces, _EMPTY_STORED_HEADER])


# -- inflating (rule 5) -----------------------------------------------------------------


def inflate(payload: bytes, max_bytes: int) -> bytes:
    """A compressed message's payload inflated, at most `max_bytes` of it
    (`TooBig` past that; `InflateError` when it is not deflate)."""
    d = zlib.decompressobj(-WINDOW_BITS)
    try:
        out = d.decompress(payload, max_bytes + 1)
        if len(out) <= max_bytes and not d.unconsumed_tail:
            out += d.decompress(TAIL, max_bytes + 1 - len(out))
    except zlib.error as exc:
        raise InflateError(f"not a deflate stream: {exc}") from None
    if len(out) > max_bytes or d.unconsumed_tail:
        raise TooBig(f"inflates past {max_bytes} bytes")
    if d.eof and d.unused_data not in (b"", TAIL):
        # a final block (BFINAL, allowed by RFC 7692 7.2.3.4) then more bytes
        raise InflateError("bytes after the final deflate block")
    return out
