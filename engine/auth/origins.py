"""The browser origin allowlist (`server.allowed_origins`). PURE.

Rules this module owns:

1. An empty allowlist allows every origin. A request without an `Origin`
   header (a non-browser client) is always allowed: the check protects users'
   browsers from other sites' pages, not the server from scripts.
2. Entries are exact origins (`https://app.example.com`, `http://localhost:3000`)
   or subdomain patterns (`https://*.example.com`: any host ending in
   `.example.com`, at any depth, but not `example.com` itself). Scheme and port
   must match; a default port (80 for http, 443 for https) may be written or
   left out on either side. Comparison ignores case.
3. Anything else, including the opaque origin `null`, is refused when the
   allowlist is not empty.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

_DEFAULT_PORTS: Final = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def _split(origin: str) -> tuple[str, str, str] | None:
    """(scheme, host, port) with the default port filled in, or None if malformed."""
    scheme, sep, rest = origin.strip().lower().partition("://")
    if not sep or not scheme or not rest or "/" in rest or "@" in rest:
        return None
    if rest.startswith("["):  # IPv6 literal
        host, close, tail = rest.partition("]")
        if not close:
            return None
        host += "]"
        port = tail[1:] if tail.startswith(":") else ("" if not tail else None)
        if port is None:
            return None
    else:
        host, _, port = rest.partition(":")
    if not host:
        return None
    return scheme, host, port or _DEFAULT_PORTS.get(scheme, "")


class OriginPolicy:
    """Decides whether a request's `Origin` may connect (rules 1-3)."""

    __slots__ = ("_exact", "_suffixes")

    def __init__(self, allowed: Iterable[str]) -> None:
        self._exact: set[tuple[str, str, str]] = set()
        self._suffixes: list[tuple[str, str, str]] = []  # (scheme, ".example.com", port)
        for entry in allowed:
            parts = _split(entry)
            if parts is None:
                raise ValueError(f"bad origin {entry!r}")
            scheme, host, port = parts
            if host.startswith("*."):
                self._suffixes.append((scheme, host[1:], port))
            else:
                self._exact.add(parts)

    @property
    def open(self) -> bool:
        """True when every origin is allowed (empty allowlist)."""
        return not self._exact and not self._suffixes

    def allows(self, origin: str | None) -> bool:
        if origin is None or self.open:
            return True
        parts = _split(origin)
        if parts is None:
            return False
        if parts in self._exact:
            return True
        scheme, host, port = parts
        for s, suffix, p in self._suffixes:
            if s == scheme and p == port and host.endswith(suffix) and len(host) > len(suffix):
                return True
        return False
