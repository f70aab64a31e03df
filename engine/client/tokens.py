"""A client's token: when it expires, when to ask for the next one. PURE: no I/O.

The Python client (`engine.client.client`) asks a token provider for a new
token before the current one expires and sends it in `auth` on the live
connection (docs/protocol.md section 2, "Token refresh"); the browser client
(`engine/static/fanout.js`) implements the same rules. Nothing here reads a
clock or draws a random number: callers pass `now` (wall-clock seconds, the
clock `exp` is written in) and `rand`.

Rules this module owns:

1. `exp` is read from the JWT's payload WITHOUT verifying the signature: the
   client only schedules with it, the server verifies. A token that is not
   three dot-separated segments, longer than `MAX_TOKEN_CHARS`, whose payload
   is not base64url of a JSON object, or whose `exp` is not a finite number
   (a bool is not a number) has no known expiry: `token_expiry` returns None.
2. A token with a known `exp` is refreshed `margin` before it, where
   margin = max(`min_margin_s`, `margin_fraction` * lifetime) and lifetime =
   exp - the time the token was obtained; never before half its lifetime (a
   margin as long as the lifetime would refresh in a loop).
3. A token with no known expiry is never refreshed on a schedule, only after
   the server closed 4001/4003.
4. A token from the provider that has already expired (`exp <= now`) is
   refused (`StaleToken`): a provider failure like any other (the issuer's
   clock, or ours, is wrong; sending it would only earn a 4001).
5. Provider failures are retried with full-jitter backoff (engine/backoff.py):
   retry n of a streak waits `rand * ceiling(n)`, the ceiling growing from
   the client's reconnect `base_ms` by `factor` up to `max_ms`; a token
   obtained ends the streak.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Final

from engine.backoff import Backoff

# Longer tokens are not decoded (the engine refuses tokens over 8 KiB anyway:
# engine/auth/tokens.py MAX_TOKEN_BYTES).
MAX_TOKEN_CHARS: Final = 8192


class StaleToken(ValueError):
    """The provider returned a token that has already expired (rule 4)."""


@dataclass(frozen=True, slots=True)
class TokenRefresh:
    """When to refresh (rule 2) and how long the provider may take.

    `margin_fraction` of the token's lifetime, at least `min_margin_s`, before
    its `exp`; a provider call taking longer than `timeout_s` has failed.
    """

    margin_fraction: float = 0.1
    min_margin_s: float = 1.0
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin_fraction) and 0 <= self.margin_fraction < 1):
            raise ValueError(f"margin_fraction must be in [0, 1), got {self.margin_fraction!r}")
        if not (math.isfinite(self.min_margin_s) and self.min_margin_s >= 0):
            raise ValueError(
                f"min_margin_s must be a finite number >= 0, got {self.min_margin_s!r}"
            )
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be a finite number > 0, got {self.timeout_s!r}")


def token_expiry(token: str) -> float | None:
    """The token's `exp` (seconds since the epoch), read without verification,
    or None when it has none that can be read (rule 1)."""
    if len(token) > MAX_TOKEN_CHARS:
        return None
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):  # not base64url/UTF-8/JSON; too deep
        return None
    if not isinstance(claims, dict):
        return None
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    exp = float(exp)
    return exp if math.isfinite(exp) else None


def check_fresh(exp: float | None, now: float) -> None:
    """Raise `StaleToken` when `exp` has passed at `now` (rule 4)."""
    if exp is not None and exp <= now:
        raise StaleToken(f"the token expired {now - exp:.1f} s ago (exp {exp:.0f})")


def refresh_at(exp: float | None, obtained_at: float, refresh: TokenRefresh) -> float | None:
    """When to ask for the next token (rules 2 and 3): wall-clock seconds, or
    None for a token with no known expiry. A token already expired at
    `obtained_at` is due at once."""
    if exp is None:
        return None
    lifetime = exp - obtained_at
    if lifetime <= 0:
        return obtained_at
    margin = max(refresh.min_margin_s, refresh.margin_fraction * lifetime)
    return max(exp - margin, obtained_at + lifetime / 2)


class ProviderRetry:
    """A streak of token provider failures and the wait before the next call (rule 5)."""

    __slots__ = ("backoff", "failures")

    def __init__(self, base_ms: float, max_ms: float, factor: float = 2.0) -> None:
        self.backoff = Backoff(base_ms, max_ms, factor)
        self.failures = 0

    def failed(self) -> None:
        self.failures += 1

    def succeeded(self) -> None:
        self.failures = 0

    def delay_ms(self, rand: float) -> float:
        """The wait after the latest failure: a uniform draw in [0, ceiling]."""
        r = min(max(rand, 0.0), 1.0)
        return r * self.backoff.ceiling_ms(max(self.failures - 1, 0))
