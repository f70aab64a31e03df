"""RFC 6455 section 4 (the opening handshake), against a real worker.

| section | what the server must do | tests |
| --- | --- | --- |
| 4.2.1 | refuse a request without Host, Upgrade, Connection or a valid 16-byte Sec-WebSocket-Key, or not a GET over HTTP/1.1 (400 Bad Request or another 4xx) | test_4_2_1_* |
| 4.2.2 | 101 with `Upgrade: websocket`, `Connection: Upgrade` and Sec-WebSocket-Accept = base64(SHA-1(key + GUID)) | test_4_2_2_accept_* |
| 4.2.2, 4.4 | a version other than 13: 426 Upgrade Required naming `Sec-WebSocket-Version: 13` (400 when the header is missing) | test_4_4_* |
| 4.2.2 item 5.4, 1.9 | the subprotocol: one the client offered or none; fanout selects `fanout.v1` when offered and serves version 1 without one (docs/protocol.md section 1) | test_4_2_2_subprotocol_* |
| 4.2.2, 9.1 | no extension the server does not implement is accepted; permessage-deflate (RFC 7692) is | test_9_1_* |
"""

from __future__ import annotations

import pytest

from tests.conformance.peer import (
    OP_BINARY,
    Peer,
    accept_key,
    http_upgrade,
    upgrade_request,
)
from tests.support.serve import Served

pytestmark = pytest.mark.slow  # one real `fanout serve` for the suite


def test_4_2_2_accept_key_upgrade_and_connection_headers(served: Served) -> None:
    status, headers, _ = http_upgrade(served.port, upgrade_request(served.port))
    assert status == 101
    assert headers["upgrade"].lower() == "websocket"
    assert "upgrade" in headers["connection"].lower()
    assert headers["sec-websocket-accept"] == accept_key("dGhlIHNhbXBsZSBub25jZQ==")
    assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # the RFC's example


@pytest.mark.parametrize(
    "case,request_kw",
    [
        ("no_key", {"drop": ("Sec-WebSocket-Key",)}),
        ("key_not_16_bytes", {"Sec_WebSocket_Key": "abc"}),
        ("no_upgrade", {"drop": ("Upgrade",)}),
        ("upgrade_not_websocket", {"Upgrade": "h2c"}),
        ("no_connection", {"drop": ("Connection",)}),
        ("no_host", {"drop": ("Host",)}),
    ],
)
def test_4_2_1_an_incomplete_upgrade_request_is_refused_400(
    served: Served, case: str, request_kw: dict[str, object]
) -> None:
    status, headers, _ = http_upgrade(served.port, upgrade_request(served.port, **request_kw))  # type: ignore[arg-type]
    assert status == 400, f"{case}: answered {status}"
    assert "sec-websocket-accept" not in headers


@pytest.mark.parametrize("first_line", ["POST /ws HTTP/1.1", "GET /ws HTTP/1.0"])
def test_4_2_1_only_a_get_over_http_1_1_upgrades(served: Served, first_line: str) -> None:
    request = upgrade_request(served.port).replace("GET /ws HTTP/1.1", first_line, 1)
    status, headers, _ = http_upgrade(served.port, request)
    assert 400 <= status < 600 and status != 101, first_line
    assert "sec-websocket-accept" not in headers


@pytest.mark.parametrize("version", ["8", "12", "14", "abc"])
def test_4_4_an_unsupported_version_gets_426_naming_version_13(
    served: Served, version: str
) -> None:
    status, headers, _ = http_upgrade(
        served.port, upgrade_request(served.port, Sec_WebSocket_Version=version)
    )
    assert status in (426, 400), f"version {version}: answered {status}"
    if status == 426:
        assert headers.get("sec-websocket-version") == "13"
    assert "sec-websocket-accept" not in headers


def test_4_4_a_missing_version_is_refused(served: Served) -> None:
    status, headers, _ = http_upgrade(
        served.port, upgrade_request(served.port, drop=("Sec-WebSocket-Version",))
    )
    assert status in (426, 400)
    assert "sec-websocket-accept" not in headers


@pytest.mark.parametrize(
    "offered,selected",
    [
        ("fanout.v1", "fanout.v1"),
        ("chat, fanout.v1", "fanout.v1"),
        ("fanout.v1, chat", "fanout.v1"),
        ("chat, superchat", None),  # none offered is ours: no header, version 1 served
        (None, None),  # nothing offered: version 1 served, no header (protocol.md 1)
    ],
)
def test_4_2_2_subprotocol_is_one_offered_or_none(
    served: Served, offered: str | None, selected: str | None
) -> None:
    headers = {} if offered is None else {"Sec-WebSocket-Protocol": offered}
    peer = Peer(served.port, headers)
    try:
        got = _header(peer.head, "sec-websocket-protocol")
        assert got == selected
        # version 1 is served either way: the first message is hello v1
        assert peer.hello.opcode == OP_BINARY
        assert peer.messages(peer.hello)[0]["op"] == "hello"
        assert peer.messages(peer.hello)[0]["v"] == 1
    finally:
        peer.close()


def test_9_1_an_unknown_extension_is_not_accepted(served: Served) -> None:
    peer = Peer(
        served.port,
        {"Sec-WebSocket-Extensions": "x-foo, permessage-deflate; x-unknown-param"},
    )
    try:
        assert _header(peer.head, "sec-websocket-extensions") is None
        assert peer.hello.rsv == 0  # nothing negotiated: no RSV bit ever set
        peer.probe()
    finally:
        peer.close()


def test_9_1_permessage_deflate_is_accepted_without_context_takeover(served: Served) -> None:
    # RFC 7692: the first acceptable offer wins; an unknown one before it is skipped
    peer = Peer(
        served.port,
        {"Sec-WebSocket-Extensions": "x-foo, permessage-deflate; client_max_window_bits"},
    )
    try:
        assert _header(peer.head, "sec-websocket-extensions") == (
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        )
        assert peer.hello.rsv == 0  # the hello is under fanout.compression_min_bytes
        peer.probe()
    finally:
        peer.close()


def _header(head: str, name: str) -> str | None:
    for line in head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == name:
            return v.strip()
    return None
