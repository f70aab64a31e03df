"""The pure rules behind WebSocket ingress (issue 11 findings 1 and 9, issue 15):
close codes (engine.protocol.closecodes), upgrade attempts per second
(engine.auth.ratelimit.UpgradeLimiter), the client address behind trusted
proxies (engine.auth.clientip). No loop, no socket."""

from __future__ import annotations

import pytest

from engine import codes
from engine.auth.clientip import TrustedProxies, parse_address
from engine.auth.ratelimit import (
    MAX_WINDOW_IPS,
    UPGRADE_ADMITTED,
    UPGRADE_BUSY,
    UPGRADE_IP_LIMITED,
    UpgradeLimiter,
)
from engine.metrics import worker_families
from engine.protocol.closecodes import KNOWN_CODES, close_label, close_reply, sendable
from engine.status import WorkerStatus

# -- close codes (closecodes rules 1-3) ----------------------------------------------------


def test_an_empty_close_is_answered_empty() -> None:
    assert close_reply(0, 0) is None


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1011, 1012, 1014, 3000, 4999])
def test_a_sendable_code_is_echoed(code: int) -> None:
    assert sendable(code) and close_reply(2, code) == code


@pytest.mark.parametrize("code", [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
def test_any_other_code_is_answered_1002(code: int) -> None:
    assert not sendable(code) and close_reply(2, code) == 1002


def test_half_a_code_is_answered_1002() -> None:
    assert close_reply(1, 0) == 1002


# -- close code labels (closecodes rule 4) -------------------------------------------------


def test_the_engine_codes_are_their_own_labels() -> None:
    for code in (
        codes.CLOSE_NORMAL,
        codes.CLOSE_RATE_LIMITED,
        codes.CLOSE_SLOW_CONSUMER,
        codes.CLOSE_NOT_AUTHENTICATED,
        1005,
        1006,
    ):
        assert close_label(code) == str(code)


def test_client_chosen_codes_make_a_bounded_set_of_labels() -> None:
    labels = {close_label(c) for c in range(0, 65536)}
    assert labels <= {str(c) for c in KNOWN_CODES} | {"3xxx", "4xxx", "other"}
    assert len(labels) <= len(KNOWN_CODES) + 3
    assert close_label(3001) == "3xxx" and close_label(4321) == "4xxx"
    assert close_label(5000) == "other"


def test_metrics_relabel_codes_from_a_status() -> None:
    status = {"closes": {"1000": 2, "3001": 1, "3002": 4, "4029": 1, "4444": 3}}
    families = worker_families({1: WorkerStatus.from_json(status)}, {})
    (fam,) = [f for f in families if f.name == "fanout_disconnects_total"]
    got = {labels["code"]: n for labels, n in fam.samples}
    assert got == {"1000": 2, "3xxx": 5, "4029": 1, "4xxx": 3}


# -- upgrade attempts per second (ratelimit rule 7) ------------------------------------------


def test_the_worker_bucket_admits_a_second_s_worth_then_refuses() -> None:
    lim = UpgradeLimiter(10, 0, now=0.0)
    verdicts = [lim.admit("1.1.1.1", 0.0) for _ in range(12)]
    assert verdicts.count(UPGRADE_ADMITTED) == 10 and verdicts[-1] == UPGRADE_BUSY
    assert lim.admit("1.1.1.1", 0.1) == UPGRADE_ADMITTED  # one token refilled
    assert lim.admit("1.1.1.1", 0.1) == UPGRADE_BUSY


def test_per_ip_windows_refuse_one_address_not_the_others() -> None:
    lim = UpgradeLimiter(0, 3, now=0.0)
    assert [lim.admit("a", 0.0) for _ in range(4)] == [UPGRADE_ADMITTED] * 3 + [UPGRADE_IP_LIMITED]
    assert lim.admit("b", 0.5) == UPGRADE_ADMITTED
    assert lim.admit("a", 0.9) == UPGRADE_IP_LIMITED
    assert lim.admit("a", 1.0) == UPGRADE_ADMITTED  # a new window


def test_an_address_over_its_limit_spends_none_of_the_worker_budget() -> None:
    lim = UpgradeLimiter(5, 2, now=0.0)
    for _ in range(100):
        lim.admit("flood", 0.0)
    assert [lim.admit(f"ip{i}", 0.0) for i in range(3)] == [UPGRADE_ADMITTED] * 3


def test_zero_means_no_limit() -> None:
    lim = UpgradeLimiter(0, 0, now=0.0)
    assert all(lim.admit("a", 0.0) == UPGRADE_ADMITTED for _ in range(10_000))


def test_the_window_table_is_bounded() -> None:
    lim = UpgradeLimiter(0, 1, now=0.0)
    for i in range(MAX_WINDOW_IPS):
        assert lim.admit(str(i), 0.0) == UPGRADE_ADMITTED
    assert lim.admit("one-more", 0.0) == UPGRADE_BUSY
    assert lim.admit("one-more", 1.0) == UPGRADE_ADMITTED  # the next window starts empty


# -- the client address behind trusted proxies (clientip rules 1-4) -------------------------


PROXIES = TrustedProxies(["10.0.0.0/8", "fd00::/8"])


def test_no_trusted_proxies_means_the_peer_always() -> None:
    assert TrustedProxies([]).client_ip("10.1.1.1", ["203.0.113.9"]) == "10.1.1.1"


def test_a_header_from_an_untrusted_peer_is_ignored() -> None:
    assert PROXIES.client_ip("198.51.100.7", ["203.0.113.9"]) == "198.51.100.7"


def test_the_rightmost_untrusted_entry_is_the_client() -> None:
    # the client wrote "1.2.3.4" itself; the ingress appended what it saw
    assert PROXIES.client_ip("10.0.0.2", ["1.2.3.4, 203.0.113.9, 10.0.0.5"]) == "203.0.113.9"
    assert PROXIES.client_ip("10.0.0.2", ["1.2.3.4", "203.0.113.9"]) == "203.0.113.9"


def test_garbled_or_missing_headers_give_the_peer() -> None:
    assert PROXIES.client_ip("10.0.0.2", []) == "10.0.0.2"
    assert PROXIES.client_ip("10.0.0.2", ["1.2.3.4, unknown"]) == "10.0.0.2"
    assert PROXIES.client_ip("10.0.0.2", [""]) == "10.0.0.2"


def test_every_entry_trusted_gives_the_leftmost() -> None:
    assert PROXIES.client_ip("10.0.0.2", ["10.9.9.9, 10.0.0.5"]) == "10.9.9.9"


def test_addresses_in_normal_form() -> None:
    assert str(parse_address("::ffff:203.0.113.9")) == "203.0.113.9"
    assert str(parse_address("[2001:db8::1]:443")) == "2001:db8::1"
    assert str(parse_address("203.0.113.9:5678")) == "203.0.113.9"
    assert parse_address("not an address") is None
    assert PROXIES.client_ip("fd00::1", ["2001:DB8::7"]) == "2001:db8::7"


# -- open files (finding 9: RLIMIT_NOFILE was never raised) ---------------------------------


def test_connection_capacity_keeps_a_reserve_of_descriptors() -> None:
    from workers.main import FD_RESERVE, connection_capacity

    assert connection_capacity(20_000, 1_048_576) == 20_000
    assert connection_capacity(20_000, 20_000) == 20_000 - FD_RESERVE
    assert connection_capacity(20_000, 10) == 1


def test_the_soft_open_files_limit_is_raised_to_the_hard_limit() -> None:
    """In a child process whose soft limit starts low (the limit is per process)."""
    import subprocess
    import sys

    code = (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "from workers.main import raise_open_files_limit\n"
        "before, now, hard2 = raise_open_files_limit()\n"
        "print(before, now, hard2, resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    before, now, hard, soft = map(int, out)
    assert before == min(256, hard) and now == soft
    assert soft == hard or hard == -1
