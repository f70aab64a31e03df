"""Checks the supervisor runs once, before it forks anything.

Rules:
1. Nothing here leaves a socket open. A listening SO_REUSEPORT socket held by
   the supervisor (which never accepts) would get a share of the connections
   and hang them (field notes), so the port check binds, never listens, and
   closes before returning.
2. A failure names the config key and the address, so an operator knows which
   setting to change.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile

from engine.errors import EngineError


class PortUnavailable(EngineError):
    """A port fanout must listen on cannot be bound (the CLI exits with EXIT_PORT_IN_USE).

    `key` is the config key of the port (`server.port`), `host` and `port` the
    address tried, `errno` the OS error number (EADDRINUSE when taken).
    """

    def __init__(self, key: str, host: str, port: int, err: OSError) -> None:
        reason = "address already in use" if err.errno == errno.EADDRINUSE else str(err)
        super().__init__(
            f"{key}: cannot listen on {format_address(host, port)}: {reason}"
            f" (choose another port with {key})"
        )
        self.key = key
        self.host = host
        self.port = port
        self.errno = err.errno


def format_address(host: str, port: int) -> str:
    """`host:port`, with IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_port(host: str, port: int, key: str, *, reuse_port: bool = False) -> int:
    """Verify that `host:port` can be bound; return the concrete port.

    Port 0 is resolved to a free port chosen by the kernel (nothing reserves
    it: another process could take it before the workers bind it). The socket
    is bound without listening and closed before returning.

    By default the check does not set SO_REUSEPORT, so it also fails when
    another SO_REUSEPORT listener (for example a second `fanout serve` of the
    same user) already holds the port: with SO_REUSEPORT the bind would succeed
    and both servers would silently split the connections. Pass
    `reuse_port=True` only to accept such an overlap on purpose.
    SO_REUSEADDR is set, so connections of a previous run in TIME_WAIT do not
    count as "in use".

    Raises PortUnavailable naming `key` and the address when the bind fails
    (in use, address not local, privileged port, unknown host).
    """
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise PortUnavailable(key, host, port, exc) from None
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            raise PortUnavailable(key, host, port, exc) from None
        bound: int = sock.getsockname()[1]
        return bound
    finally:
        sock.close()


def make_run_dir(base: str) -> str:
    """Create a fresh private run directory (`fanout-XXXX`, mode 0700) under `base`.

    It holds the status board and the hub's Unix socket; the caller removes it.
    """
    path = tempfile.mkdtemp(prefix="fanout-", dir=base)
    os.chmod(path, 0o700)  # mkdtemp already does; say it where the rule lives
    return path


def available_cpus(cgroup_cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """Cores this process may really use: the CPU affinity mask, capped by a
    cgroup v2 CPU quota (a container's CPU limit), rounded up; at least 1.

    `os.cpu_count()` counts the host's cores, which in a container limited to
    2 CPUs on a 64-core node would start 64 workers.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        with open(cgroup_cpu_max, encoding="ascii") as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)
