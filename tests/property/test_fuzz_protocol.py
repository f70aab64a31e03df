"""Fuzzing what a hostile client controls (issue 4), with hypothesis:

1. `decode_request` on arbitrary bytes and arbitrary msgpack values (deeply
   nested and wide ones included) returns a request or raises
   `RemoteProtocolError`, and allocates at most a small multiple of the
   message's size (measured with tracemalloc).
2. Token verification of arbitrary strings raises only `TokenError`.
3. Permission claims of any shape give permissions or `ValueError`; matching
   agrees with a reference implementation of the pattern rules.
4. The origin check of any string answers True or False.
5. The rate limiter never admits more than the bucket allows, and never calls
   a connection abusive that stayed at or below three times the rate.

`make fuzz` (HYPOTHESIS_PROFILE=fuzz) runs many more examples.
"""

from __future__ import annotations

import math
import re
import time
import tracemalloc
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.auth.origins import OriginPolicy
from engine.auth.permissions import permissions_from_claims
from engine.auth.ratelimit import ABUSIVE, ADMITTED, RateLimiter, RatePolicy
from engine.auth.tokens import TokenError, TokenVerifier
from engine.codes import ErrorCode
from engine.errors import RemoteProtocolError
from engine.protocol.codec import decode_request
from tests.support.tokens import SECRET, hs256

ERROR_CODES = frozenset(v for k, v in vars(ErrorCode).items() if k.isupper())

examples = settings(
    max_examples=max(200, settings().max_examples),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=30),
    st.binary(max_size=30),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(
            st.one_of(st.text(max_size=8), st.integers(-(2**63), 2**64 - 1)), inner, max_size=6
        ),
    ),
    max_leaves=40,
)
field_names = st.sampled_from(
    ["op", "id", "topics", "topic", "key", "since", "max_hz", "token", "data", "pad"]
)
requestish = st.dictionaries(field_names, values, max_size=6)


def decode_bounded(payload: bytes) -> None:
    """Rule 1: only protocol errors, and allocation bounded by the payload size."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            decode_request(payload, 100)
        except RemoteProtocolError as exc:
            assert exc.code in ERROR_CODES
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 8 * len(payload) + 64 * 1024, (peak, len(payload))


@examples
@given(st.binary(max_size=2000))
def test_arbitrary_bytes(payload: bytes) -> None:
    decode_bounded(payload)


@examples
@given(st.one_of(requestish, values))
def test_arbitrary_msgpack_values(obj: Any) -> None:
    decode_bounded(msgpack.packb(obj, use_bin_type=True))


@examples
@given(
    field_names,
    st.integers(1, 20_000),
    st.sampled_from([b"\x91", b"\x81\xa1k", b"\x92\xc0"]),
    st.sampled_from([b"\x80", b"\x90", b"\xa1a", b"\xc0"]),
)
def test_deep_and_wide_containers_are_cheap(field: str, n: int, head: bytes, leaf: bytes) -> None:
    deep = msgpack.packb({"op": "sub", field: 0})[:-1] + head * n + b"\xc0"
    decode_bounded(deep)
    # one array claiming n small containers (wide)
    wide = msgpack.packb({"op": "sub", field: 0})[:-1] + b"\xdd" + n.to_bytes(4, "big") + leaf * n
    decode_bounded(wide)


# -- 2. tokens ---------------------------------------------------------------------------

VERIFIER = TokenVerifier(key=SECRET, algorithms=("HS256",))


@examples
@given(st.text(max_size=300))
def test_arbitrary_token_strings_are_refused_cleanly(token: str) -> None:
    try:
        VERIFIER.verify(token, time.time())
    except TokenError as exc:
        assert str(exc)


@examples
@given(st.dictionaries(st.sampled_from(["sub", "exp", "nbf", "sub_topics", "pub_topics"]), values))
def test_arbitrary_claims_in_a_validly_signed_token(claims: dict[str, Any]) -> None:
    import jwt

    try:
        token = jwt.encode(claims, SECRET, algorithm="HS256")
    except (TypeError, ValueError, OverflowError):
        return  # not JSON-encodable: no issuer could sign it
    try:
        ident = VERIFIER.verify(token, time.time())
    except TokenError:
        return
    assert isinstance(claims.get("exp"), int | float)
    assert ident.user is None or isinstance(ident.user, str)


# -- 3. permissions ------------------------------------------------------------------------

segments = st.sampled_from(["a", "b", "prices", "fx", "*", ">"])
patterns = st.lists(segments, min_size=1, max_size=4).map(".".join)
topics = st.lists(st.sampled_from(["a", "b", "prices", "fx", "x"]), min_size=1, max_size=5).map(
    ".".join
)


def reference_match(pattern: str, topic: str) -> bool:
    parts = pattern.split(".")
    rx = ""
    for i, seg in enumerate(parts):
        sep = r"\." if i else ""
        if seg == ">":
            rx += sep + r"[^.]+(\.[^.]+)*"
        elif seg == "*":
            rx += sep + r"[^.]+"
        else:
            rx += sep + re.escape(seg)
    return re.fullmatch(rx, topic) is not None


@examples
@given(st.lists(patterns, max_size=4), topics)
def test_permission_patterns_match_like_the_reference(pats: list[str], topic: str) -> None:
    try:
        perms = permissions_from_claims({"sub_topics": pats, "pub_topics": pats})
    except ValueError:
        assert any(">" in p.split(".")[:-1] for p in pats)  # '>' only last
        return
    expected = any(reference_match(p, topic) for p in pats)
    assert perms.can_sub(topic) is expected
    assert perms.can_pub(topic) is expected


@examples
@given(st.dictionaries(st.sampled_from(["sub_topics", "pub_topics", "other"]), values))
def test_claims_of_any_shape(claims: dict[str, Any]) -> None:
    try:
        perms = permissions_from_claims(claims)
    except ValueError:
        return
    assert perms.can_sub("a") in (True, False)


# -- 4. origins ------------------------------------------------------------------------------

POLICY = OriginPolicy(["https://app.example.com", "https://*.example.org"])


@examples
@given(
    st.one_of(
        st.none(), st.text(max_size=80), st.from_regex(r"https?://[a-z.]{1,20}(:[0-9]{1,5})?")
    )
)
def test_any_origin_gets_an_answer(origin: str | None) -> None:
    allowed = POLICY.allows(origin)
    assert allowed in (True, False)
    if allowed and origin is not None:
        o = origin.strip().lower()
        assert o.startswith("https://") and (".example.org" in o or "app.example.com" in o)


# -- 5. rate limiter -------------------------------------------------------------------------


@examples
@given(
    st.floats(0.5, 100),
    st.lists(st.floats(0.0, 2.0), min_size=1, max_size=400),
)
def test_the_bucket_never_admits_more_than_it_holds(rate: float, gaps: list[float]) -> None:
    lim = RateLimiter(RatePolicy(rate, 5.0), 0.0)
    t, admitted = 0.0, 0
    for gap in gaps:
        t += gap
        if lim.admit(t) == ADMITTED:
            admitted += 1
    assert admitted <= 2 * rate + rate * t + 1e-6


@examples
@given(st.floats(1, 50), st.lists(st.floats(0.0, 1.0), min_size=1, max_size=300))
def test_at_most_three_times_the_rate_is_never_abusive(rate: float, jitter: list[float]) -> None:
    lim = RateLimiter(RatePolicy(rate, 1.0), 0.0)
    # never more than floor(3 * rate) messages in any one-second interval
    spacing = 1.001 / max(1, math.floor(3 * rate))
    t = 0.0
    for j in jitter:
        t += spacing * (1 + j)  # never faster than 3x
        assert lim.admit(t) != ABUSIVE


def test_a_real_token_passes_the_fuzzed_verifier() -> None:
    assert VERIFIER.verify(hs256(), time.time()).user == "alice"
