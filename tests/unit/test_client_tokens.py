"""The client's token rules (engine/client/tokens.py): `exp` read without
verification, the refresh schedule, stale tokens, the provider's backoff.
No clock: `now` and `rand` are passed in."""

from __future__ import annotations

import base64
import json

import pytest

from engine.client.tokens import (
    MAX_TOKEN_CHARS,
    ProviderRetry,
    StaleToken,
    TokenRefresh,
    check_fresh,
    refresh_at,
    token_expiry,
)
from tests.support.tokens import hs256


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwt_with(payload: object) -> str:
    """An unsigned-looking JWT whose payload is `payload` as JSON (signature junk)."""
    return raw_payload(json.dumps(payload).encode())


def raw_payload(payload: bytes) -> str:
    """A three-segment token whose payload segment is base64url of `payload`."""
    return HEADER + "." + b64(payload) + ".c2ln"


HEADER = b64(b'{"alg": "HS256"}')


# -- rule 1: exp without verification -------------------------------------------------


def test_exp_of_a_real_signed_token_is_read_without_its_key() -> None:
    token = hs256(secret="a-key-this-client-never-sees-0123456789", ttl_s=3.0)
    exp = token_expiry(token)
    assert exp is not None
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert exp == claims["exp"]


@pytest.mark.parametrize("exp", [1_700_000_000, 1_700_000_000.25, 0, -5])
def test_exp_numbers_int_or_float(exp: float) -> None:
    assert token_expiry(jwt_with({"exp": exp, "sub": "x"})) == float(exp)


def test_exp_in_the_past_is_still_read() -> None:
    assert token_expiry(jwt_with({"exp": 10})) == 10.0


@pytest.mark.parametrize(
    "token",
    [
        "",
        "opaque-api-token",
        "a.b",
        "a.b.c.d",
        "x.!!!.y",  # not base64url
        raw_payload(b"not json"),
        raw_payload(bytes([0xFF, 0xFE])),  # not UTF-8
        jwt_with([1, 2, 3]),  # JSON, not an object
        jwt_with("exp"),
        jwt_with({"sub": "no exp"}),
        jwt_with({"exp": "1700000000"}),
        jwt_with({"exp": True}),  # a bool is not a number
        jwt_with({"exp": None}),
        jwt_with({"exp": [1]}),
        raw_payload(b'{"exp": 1e999}'),  # inf
        raw_payload(b'{"exp": NaN}'),
        raw_payload(b"[" * 3000 + b"]" * 3000),  # deep nesting, within the size bound
    ],
)
def test_malformed_or_without_exp_has_no_known_expiry(token: str) -> None:
    assert token_expiry(token) is None


def test_oversized_tokens_are_not_decoded() -> None:
    token = jwt_with({"exp": 1_700_000_000, "pad": "x" * MAX_TOKEN_CHARS})
    assert len(token) > MAX_TOKEN_CHARS
    assert token_expiry(token) is None


def test_padding_in_the_payload_is_tolerated() -> None:
    payload = base64.urlsafe_b64encode(b'{"exp": 42}').decode()  # with "=" padding kept
    assert payload.endswith("=")
    assert token_expiry("x." + payload + ".y") == 42.0


# -- rule 2 and 3: the schedule ------------------------------------------------------


def test_a_3_second_token_is_refreshed_one_second_before_exp() -> None:
    assert refresh_at(103.0, 100.0, TokenRefresh()) == 102.0


def test_a_long_token_is_refreshed_ten_percent_before_exp() -> None:
    assert refresh_at(1_000 + 3_600, 1_000, TokenRefresh()) == pytest.approx(1_000 + 3_240)


def test_the_margin_is_configurable() -> None:
    policy = TokenRefresh(margin_fraction=0.5, min_margin_s=0)
    assert refresh_at(110.0, 100.0, policy) == 105.0
    assert refresh_at(110.0, 100.0, TokenRefresh(min_margin_s=4)) == 106.0


def test_never_before_half_the_lifetime_so_short_tokens_do_not_loop() -> None:
    # margin 1 s > 0.8 s lifetime: without the floor the refresh would be due at once
    assert refresh_at(100.8, 100.0, TokenRefresh()) == pytest.approx(100.4)


def test_an_expired_token_is_due_at_once_and_one_without_exp_never() -> None:
    assert refresh_at(90.0, 100.0, TokenRefresh()) == 100.0
    assert refresh_at(None, 100.0, TokenRefresh()) is None


@pytest.mark.parametrize(
    "kw",
    [
        {"margin_fraction": 1.0},
        {"margin_fraction": -0.1},
        {"margin_fraction": float("nan")},
        {"min_margin_s": -1},
        {"min_margin_s": float("inf")},
        {"timeout_s": 0},
        {"timeout_s": float("nan")},
    ],
)
def test_refresh_settings_are_checked(kw: dict[str, float]) -> None:
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        TokenRefresh(**kw)


# -- rule 4: stale tokens ------------------------------------------------------------


def test_a_token_expired_when_obtained_is_refused() -> None:
    with pytest.raises(StaleToken, match=r"expired 5\.0 s ago"):
        check_fresh(95.0, 100.0)
    with pytest.raises(StaleToken):
        check_fresh(100.0, 100.0)
    check_fresh(100.5, 100.0)
    check_fresh(None, 100.0)  # no known exp: the server decides


# -- rule 5: the provider's backoff --------------------------------------------------


def test_provider_retries_grow_with_full_jitter_and_reset_on_success() -> None:
    retry = ProviderRetry(base_ms=100, max_ms=1_000)
    ceilings = []
    for _ in range(6):
        retry.failed()
        ceilings.append(retry.delay_ms(1.0))
    assert ceilings == [100, 200, 400, 800, 1_000, 1_000]
    assert retry.delay_ms(0.0) == 0 and retry.delay_ms(0.5) == 500
    assert retry.delay_ms(7.0) == 1_000  # an out-of-range draw is clamped
    retry.succeeded()
    retry.failed()
    assert retry.delay_ms(1.0) == 100
