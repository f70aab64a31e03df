"""Pre-flight checks: the port probe and the run directory (real sockets, no children)."""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.supervisor.preflight import PortUnavailable, check_port, make_run_dir


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A socket listening on a free loopback port, as another server would."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def test_port_zero_is_resolved_to_a_free_port() -> None:
    port = check_port("127.0.0.1", 0, "server.port")
    assert 0 < port < 65536
    # The probe released it: a server can listen there now.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()


def test_free_port_is_returned_as_is() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert check_port("127.0.0.1", port, "server.port") == port


def test_probe_leaves_no_listener_behind() -> None:
    port = check_port("127.0.0.1", 0, "server.port")
    with socket.socket() as client, pytest.raises(ConnectionRefusedError):
        client.connect(("127.0.0.1", port))


def test_port_in_use_names_the_key_and_address(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    with pytest.raises(PortUnavailable) as info:
        check_port("127.0.0.1", port, "server.admin_port")
    err = info.value
    assert err.key == "server.admin_port"
    assert err.errno == errno.EADDRINUSE
    assert str(err).startswith(f"server.admin_port: cannot listen on 127.0.0.1:{port}")
    assert "already in use" in str(err)


def test_reuse_port_listener_of_another_server_counts_as_in_use() -> None:
    # A second `fanout serve` on the same port: its workers listen with SO_REUSEPORT.
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(PortUnavailable):
            check_port("127.0.0.1", port, "server.port")
        # ... unless the caller accepts sharing on purpose.
        assert check_port("127.0.0.1", port, "server.port", reuse_port=True) == port


def test_address_that_is_not_local_is_reported_with_the_key() -> None:
    with pytest.raises(PortUnavailable) as info:
        check_port("192.0.2.1", 0, "server.port")  # TEST-NET-1: never a local address
    assert str(info.value).startswith("server.port: cannot listen on 192.0.2.1:0")


def test_ipv6_address_is_bracketed() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        port = check_port("::1", 0, "server.port")
    except PortUnavailable as exc:
        assert "[::1]:0" in str(exc)  # no IPv6 loopback here: still a clear message
    else:
        assert port > 0


def test_run_dir_is_private_and_fresh(tmp_path: os.PathLike[str]) -> None:
    a = make_run_dir(str(tmp_path))
    b = make_run_dir(str(tmp_path))
    assert a != b
    for path in (a, b):
        assert os.path.basename(path).startswith("fanout-")
        assert os.path.dirname(path) == str(tmp_path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700


def test_available_cpus_honours_a_cgroup_quota(tmp_path: Path) -> None:
    from engine.supervisor.preflight import available_cpus

    free = available_cpus(str(tmp_path / "no-such-file"))
    limited = tmp_path / "cpu.max"
    limited.write_text("150000 100000\n")  # 1.5 CPUs: 2 workers
    assert available_cpus(str(limited)) == min(2, free)
    unlimited = tmp_path / "max"
    unlimited.write_text("max 100000\n")
    assert available_cpus(str(unlimited)) == free >= 1
