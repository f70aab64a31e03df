"""Who the client is, behind trusted proxies. PURE (no I/O; `ipaddress` parses).

Rules this module owns:

1. A connection's client address is its TCP peer's, unless the peer is in
   `server.trusted_proxies`. Only then is `X-Forwarded-For` read: a client
   that connects directly cannot choose the address it is counted under.
2. From a trusted peer, the client is the rightmost `X-Forwarded-For` entry
   that is not itself a trusted proxy (each proxy appends the address it saw:
   entries to the left of the first untrusted one are whatever the client
   wrote). Several headers read as one list, in order. When every entry is a
   trusted address, the client is the leftmost (an internal host).
3. A header that is absent, empty, or whose entries (read right to left) reach
   one that is not an IP address before an untrusted one, gives the peer's
   address: a garbled header never yields an address the proxies did not see.
   Only the last `MAX_HOPS` entries are read.
4. Addresses are returned in their normal form (`ipaddress`): "::ffff:1.2.3.4"
   is "1.2.3.4", so that one client is one key for the per-IP limits.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Final

MAX_HOPS: Final = 32

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_address(text: str) -> _Address | None:
    """An address from a peer name or an X-Forwarded-For entry ("1.2.3.4",
    "1.2.3.4:5678", "2001:db8::1", "[2001:db8::1]:443"), or None."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # IPv4 with a port
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class TrustedProxies:
    """The networks of `server.trusted_proxies`, and the client address rule."""

    __slots__ = ("networks",)

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in cidrs
        )

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, addr: _Address) -> bool:
        return any(addr in net for net in self.networks if net.version == addr.version)

    def client_ip(self, peer: str, forwarded_for: Sequence[str]) -> str:
        """The address a connection from `peer` is counted under (rules 1-4);
        `forwarded_for` holds the values of its X-Forwarded-For headers."""
        if not self.networks:
            return peer
        peer_addr = parse_address(peer)
        if peer_addr is None or not self.trusts(peer_addr):
            return peer
        entries = [e for value in forwarded_for for e in value.split(",")][-MAX_HOPS:]
        client = peer_addr
        for entry in reversed(entries):
            addr = parse_address(entry)
            if addr is None:
                return str(peer_addr)  # garbled: no address the proxies vouch for
            client = addr
            if not self.trusts(addr):
                break
        return str(client)
