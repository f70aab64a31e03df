"""WebSocket close codes: which a peer may send, how a close is answered, and
how a code becomes a metric label. PURE.

Rules this module owns (RFC 6455 sections 5.5.1 and 7.4, the IANA registry):

1. A close frame without a body is answered with a close frame without a body.
   1005 ("no status received") is what an endpoint reports for it, never sent.
2. A close frame whose code a peer may send is answered with the same code:
   1000-1003, 1007-1014 (registered) and 3000-4999 (libraries, applications).
3. Any other code is a protocol error, answered with 1002: 0-999, 1004-1006
   and 1015 (reserved, never on the wire), 1016-2999 (unassigned), 5000+.
4. A close code becomes a metric label only if it is one the engine knows (the
   registered codes and the engine's own); every other code a client chooses
   (3000-4999) falls into one of two labels, "3xxx" or "4xxx": a client cannot
   create label values (series) by closing with new codes.
"""

from __future__ import annotations

from typing import Final

from engine import codes

CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_NO_STATUS: Final = 1005  # reported for a close frame without a body; never sent
CLOSE_ABNORMAL: Final = 1006  # reported when the TCP connection ended without a close

# RFC 6455 7.4.1 and the IANA "WebSocket Close Code Number Registry" (1012-1014).
_SENDABLE_REGISTERED: Final = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})

# Codes a worker can record, each its own label: the registered ones (and 1005,
# 1006, which a worker reports without receiving them), and the engine's own.
KNOWN_CODES: Final = frozenset(
    {
        *_SENDABLE_REGISTERED,
        CLOSE_NO_STATUS,
        CLOSE_ABNORMAL,
        *(v for k, v in vars(codes).items() if k.startswith("CLOSE_") and isinstance(v, int)),
    }
)


def sendable(code: int) -> bool:
    """Whether a peer may put `code` in a close frame (rules 2 and 3)."""
    return code in _SENDABLE_REGISTERED or 3000 <= code <= 4999


def close_reply(payload_size: int, code: int) -> int | None:
    """The code to answer a client's close frame with: None for a close
    without a body (answer with an empty close), the same code when it is
    sendable, else 1002 (`payload_size` of 1 is half a code: 1002 too)."""
    if payload_size == 0:
        return None
    if payload_size == 1 or not sendable(code):
        return CLOSE_PROTOCOL_ERROR
    return code


def close_label(code: int) -> str:
    """The metric label of a close code (rule 4): at most len(KNOWN_CODES) + 3 values."""
    if code in KNOWN_CODES:
        return str(code)
    if 3000 <= code <= 3999:
        return "3xxx"
    if 4000 <= code <= 4999:
        return "4xxx"
    return "other"
