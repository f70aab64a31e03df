"""Free loopback ports for the servers the load tools (and the tests) start."""

from __future__ import annotations

import random
import socket


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port *below* the kernel's ephemeral range: a port from
    that range (what binding port 0 gives) can be taken as the local port of
    some client connection between this probe and the server's bind, which
    then fails with EADDRINUSE (seen when load tests ran alongside)."""
    low = _ephemeral_low()
    if low > 12000:
        for _ in range(100):
            port = random.randint(10000, low - 1)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
