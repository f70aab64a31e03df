"""engine/auth/permissions.py and engine/auth/origins.py."""

from __future__ import annotations

import pytest

from engine.auth.origins import OriginPolicy
from engine.auth.permissions import ALLOW_ALL, SUBSCRIBE_ONLY, anonymous, permissions_from_claims


def test_claims_give_patterns_with_protocol_defaults() -> None:
    p = permissions_from_claims({})
    # safe by default: no sub_topics subscribes to nothing, no pub_topics publishes nothing
    assert not p.can_sub("any.topic") and not p.can_pub("any.topic")
    assert p.first_refused_sub(["any.topic"]) == "any.topic"
    p = permissions_from_claims({"sub_topics": ["prices.>", "scores.*.live"], "pub_topics": ["x"]})
    assert p.can_sub("prices.fx") and p.can_sub("prices.fx.eu") and not p.can_sub("prices")
    assert p.can_sub("scores.nba.live") and not p.can_sub("scores.nba.final")
    assert p.can_pub("x") and not p.can_pub("x.y")
    assert p.first_refused_sub(["prices.a", "other", "more"]) == "other"
    assert p.first_refused_sub(["prices.a"]) is None
    nothing = permissions_from_claims({"sub_topics": [], "pub_topics": []})
    assert not nothing.can_sub("a") and not nothing.can_pub("a")


@pytest.mark.parametrize(
    ("missing", "subscribes"), [("none", False), ("all", True), ("NONE", False)]
)
def test_missing_sub_topics_setting_decides_a_token_without_the_claim(
    missing: str, subscribes: bool
) -> None:
    p = permissions_from_claims({"pub_topics": ["x"]}, missing_sub_topics=missing.lower())
    assert p.can_sub("any.topic") is subscribes
    assert p.can_pub("x") and not p.can_pub("any.topic")  # pub_topics is not affected
    # an explicit claim always wins over the setting, an empty list allows nothing
    explicit = permissions_from_claims({"sub_topics": ["a.>"]}, missing_sub_topics=missing.lower())
    assert explicit.can_sub("a.b") and not explicit.can_sub("b")
    empty = permissions_from_claims({"sub_topics": []}, missing_sub_topics=missing.lower())
    assert not empty.can_sub("a.b")


def test_missing_sub_topics_refuses_an_unknown_choice() -> None:
    with pytest.raises(ValueError, match="missing_sub_topics"):
        permissions_from_claims({}, missing_sub_topics="some")


@pytest.mark.parametrize(
    "claims",
    [
        {"sub_topics": "prices.>"},
        {"sub_topics": [1]},
        {"pub_topics": ["a b"]},
        {"pub_topics": ["a.>.b"]},
        {"sub_topics": ["x"] * 257},
    ],
)
def test_bad_claims_are_refused(claims: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        permissions_from_claims(claims)


def test_anonymous_permissions() -> None:
    assert anonymous(True) is ALLOW_ALL and ALLOW_ALL.can_pub("a")
    assert anonymous(False) is SUBSCRIBE_ONLY
    assert SUBSCRIBE_ONLY.can_sub("a") and not SUBSCRIBE_ONLY.can_pub("a")


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),
        ("https://app.example.com", True),
        ("HTTPS://APP.EXAMPLE.COM", True),
        ("https://app.example.com:443", True),
        ("http://app.example.com", False),  # scheme differs
        ("https://app.example.com:8443", False),
        ("https://eu.example.org", True),
        ("https://a.b.example.org", True),
        ("https://example.org", False),  # the pattern needs a subdomain
        ("https://evilexample.org", False),
        ("https://example.org.evil.net", False),
        ("http://localhost:3000", True),
        ("http://localhost:3001", False),
        ("null", False),
        ("", False),
        ("https://user@app.example.com", False),
        ("https://app.example.com/path", False),
        ("http://[::1]:8080", True),
    ],
)
def test_origin_policy(origin: str | None, allowed: bool) -> None:
    policy = OriginPolicy(
        [
            "https://app.example.com",
            "https://*.example.org",
            "http://localhost:3000",
            "http://[::1]:8080",
        ]
    )
    assert policy.allows(origin) is allowed


def test_empty_allowlist_allows_everything() -> None:
    policy = OriginPolicy([])
    assert policy.open and policy.allows("null") and policy.allows("https://x.y")
    with pytest.raises(ValueError):
        OriginPolicy(["not an origin"])
