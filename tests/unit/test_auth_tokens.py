"""engine/auth/tokens.py: JWT verification with each key source, claims checks,
and refusals that never leak anything but TokenError."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest

from engine.auth.tokens import (
    LEEWAY_S,
    MAX_TOKEN_BYTES,
    TokenError,
    TokenVerifier,
    load_verifier,
    parse_jwks,
    parse_public_key,
)
from engine.config import MIN_HS256_SECRET_BYTES, AuthConfig, parse_config
from engine.errors import ConfigError
from tests.support.tokens import SECRET, ec_key, hs256, jwk, public_pem, rsa_key, signed

NOW = time.time()


def hs(**kw: Any) -> TokenVerifier:
    return load_verifier(AuthConfig(mode="jwt", **kw), {"FANOUT_JWT_SECRET": SECRET}, _no_file)


def _no_file(path: str) -> str:
    raise FileNotFoundError(2, "No such file", path)


def test_hs256_token_gives_user_expiry_and_permissions() -> None:
    now = time.time()
    ident = hs().verify(hs256(sub="bob", sub_topics=["a.>"], pub_topics=["a.b"]), now)
    assert ident.user == "bob"
    assert now + 60 <= ident.expires_at <= now + 61 + LEEWAY_S
    assert ident.permissions.can_sub("a.x") and not ident.permissions.can_sub("b")
    assert ident.permissions.can_pub("a.b") and not ident.permissions.can_pub("a.c")


@pytest.mark.parametrize(
    ("token", "why"),
    [
        (hs256(secret="another-secret-that-is-long-enough-xx"), "bad signature"),
        (hs256(ttl_s=-LEEWAY_S - 1), "expired"),
        (jwt.encode({"sub": "x"}, SECRET, algorithm="HS256"), "exp"),  # no exp
        (jwt.encode({"exp": "soon"}, SECRET, algorithm="HS256"), "refused"),
        (hs256(nbf=NOW + LEEWAY_S + 60), "not valid yet"),
        (hs256(sub=5), "refused"),
        (hs256(sub_topics="a.>"), "sub_topics"),
        (hs256(pub_topics=["bad pattern"]), "pub_topics"),
        (hs256(sub_topics=["x"] * 300), "sub_topics"),
        (jwt.encode({"exp": NOW + 60}, None, algorithm="none"), "algorithm"),
        ("", "missing"),
        ("a.b.c", "malformed"),
        ("x" * (MAX_TOKEN_BYTES + 1), "oversized"),
        ("\udcff.\x00.é", "malformed"),
    ],
)
def test_refusals_are_token_errors_saying_why(token: str, why: str) -> None:
    with pytest.raises(TokenError, match=why):
        hs().verify(token, NOW)


def test_leeway_accepts_a_token_just_expired_and_one_not_quite_valid_yet() -> None:
    v = hs()
    assert v.verify(hs256(ttl_s=-LEEWAY_S + 5), NOW).user == "alice"
    assert v.verify(hs256(nbf=NOW + LEEWAY_S - 5), NOW).user == "alice"


def test_issuer_and_audience_are_checked_when_configured() -> None:
    v = hs(issuer="https://id.example", audience="fanout")
    assert v.verify(hs256(iss="https://id.example", aud="fanout"), NOW).user == "alice"
    with pytest.raises(TokenError, match="issuer"):
        v.verify(hs256(iss="https://evil.example", aud="fanout"), NOW)
    with pytest.raises(TokenError, match="audience"):
        v.verify(hs256(iss="https://id.example", aud="other"), NOW)
    with pytest.raises(TokenError):
        v.verify(hs256(), NOW)  # neither claim
    # not configured: not checked
    assert hs().verify(hs256(iss="anyone", aud="anything"), NOW).user == "alice"


@pytest.mark.parametrize(("make", "alg"), [(rsa_key, "RS256"), (ec_key, "ES256")])
def test_public_key_file(make: Any, alg: str) -> None:
    key = make()
    files = {"/k.pem": public_pem(key)}
    v = load_verifier(AuthConfig(mode="jwt", jwt_public_key_file="/k.pem"), {}, files.__getitem__)
    assert v.verify(signed(key, alg, sub="k"), NOW).user == "k"
    with pytest.raises(TokenError):
        v.verify(signed(make(), alg), NOW)  # another key
    # algorithm confusion: HS256 signed with the public key's PEM text
    forged = jwt.encode({"exp": NOW + 60}, "k" * 40, algorithm="HS256")
    with pytest.raises(TokenError, match="algorithm"):
        v.verify(forged, NOW)


def test_jwks_picks_the_key_by_kid_and_rotates() -> None:
    old, new, ec1 = rsa_key(), rsa_key(), ec_key()
    v = TokenVerifier(jwks=parse_jwks(json.dumps({"keys": [jwk(old, "RS256", "old")]})))
    assert v.verify(signed(old, "RS256", kid="old"), NOW).user == "alice"
    with pytest.raises(TokenError, match="kid"):
        v.verify(signed(new, "RS256", kid="new"), NOW)
    # rotation: publish the new key beside the old one, then drop the old one
    both = [jwk(old, "RS256", "old"), jwk(new, "RS256", "new"), jwk(ec1, "ES256", "ec")]
    v.replace_jwks(parse_jwks(json.dumps({"keys": both})))
    assert v.verify(signed(new, "RS256", kid="new"), NOW).user == "alice"
    assert v.verify(signed(ec1, "ES256", kid="ec"), NOW).user == "alice"
    with pytest.raises(TokenError, match="kid"):
        v.verify(signed(new, "RS256"), NOW)  # several keys: a kid is required
    with pytest.raises(TokenError):
        v.verify(signed(old, "RS256", kid="new"), NOW)  # wrong key for that kid
    v.replace_jwks(parse_jwks(json.dumps({"keys": [jwk(new, "RS256", "new")]})))
    with pytest.raises(TokenError):
        v.verify(signed(old, "RS256", kid="old"), NOW)
    assert v.verify(signed(new, "RS256"), NOW).user == "alice"  # one key: kid optional


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"keys": []}',
        '{"keys": [1]}',
        '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}',
        '{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB", "d": "AQAB"}]}',  # a private key
        '{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB", "alg": "HS256"}]}',
    ],
)
def test_bad_jwks_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_jwks(text)
    assert info.value.key == "auth.jwks_file"


def test_bad_key_sources_are_config_errors_naming_the_setting() -> None:
    with pytest.raises(ConfigError) as info:
        parse_public_key("-----BEGIN NOTHING-----")
    assert info.value.key == "auth.jwt_public_key_file"
    with pytest.raises(ConfigError) as info:
        load_verifier(AuthConfig(mode="jwt", jwks_file="/missing.json"), {}, _no_file)
    assert info.value.key == "auth.jwks_file" and "/missing.json" in info.value.message
    with pytest.raises(ConfigError) as info:
        load_verifier(AuthConfig(mode="jwt"), {}, _no_file)
    assert info.value.key == "auth.jwt_secret_env"


def test_a_token_without_sub_topics_subscribes_to_nothing_unless_configured() -> None:
    token = hs256(sub_topics=None)  # the claim left out
    assert "sub_topics" not in jwt.decode(token, options={"verify_signature": False})
    assert not hs().verify(token, NOW).permissions.can_sub("any.topic")  # the default: "none"
    assert hs(missing_sub_topics="all").verify(token, NOW).permissions.can_sub("any.topic")
    # a token that names its topics is judged by them whatever the setting
    named = hs256(sub_topics=["a.>"])
    for missing in ("none", "all"):
        perms = hs(missing_sub_topics=missing).verify(named, NOW).permissions
        assert perms.can_sub("a.b") and not perms.can_sub("b")


def test_missing_sub_topics_is_a_setting_with_a_safe_default() -> None:
    assert AuthConfig().missing_sub_topics == "none"
    assert (
        parse_config({"auth": {"missing_sub_topics": "all"}}, {}).auth.missing_sub_topics == "all"
    )
    env = {"FANOUT_AUTH_MISSING_SUB_TOPICS": "none"}
    assert parse_config({}, env).auth.missing_sub_topics == "none"
    with pytest.raises(ConfigError) as info:
        parse_config({"auth": {"missing_sub_topics": "some"}}, {})
    assert info.value.key == "auth.missing_sub_topics"


@pytest.mark.parametrize("secret", ["", "x", "short-secret", "s" * (MIN_HS256_SECRET_BYTES - 1)])
def test_an_hs256_secret_under_32_bytes_is_refused_at_config_load(secret: str) -> None:
    """RFC 7518 section 3.2: an HS256 key must be at least as long as the hash (256 bits)."""
    assert MIN_HS256_SECRET_BYTES == 32
    env = {"FANOUT_JWT_SECRET": secret}
    with pytest.raises(ConfigError) as info:
        parse_config({"auth": {"mode": "jwt"}}, env)
    assert info.value.key == "auth.jwt_secret_env"
    assert "FANOUT_JWT_SECRET" in info.value.message
    if len(secret) > 1:
        assert secret not in info.value.message  # the error names the variable, never its value
    with pytest.raises(ConfigError) as info:
        load_verifier(AuthConfig(mode="jwt"), env, _no_file)
    assert info.value.key == "auth.jwt_secret_env"
    if secret:
        assert "32 bytes" in info.value.message and "RFC 7518" in info.value.message


def test_an_hs256_secret_of_32_bytes_is_accepted_counted_in_utf8_bytes() -> None:
    ok = "s" * MIN_HS256_SECRET_BYTES
    assert parse_config({"auth": {"mode": "jwt"}}, {"FANOUT_JWT_SECRET": ok}).auth.mode == "jwt"
    v = load_verifier(AuthConfig(mode="jwt"), {"FANOUT_JWT_SECRET": ok}, _no_file)
    assert v.verify(hs256(secret=ok), NOW).user == "alice"
    # 16 characters of two bytes each are 32 bytes: long enough
    wide = "é" * 16
    assert load_verifier(AuthConfig(mode="jwt"), {"FANOUT_JWT_SECRET": wide}, _no_file)
    # the secret is only checked when it is the key source in use
    cfg = parse_config(
        {"auth": {"mode": "jwt", "jwks_file": "/k.json"}}, {"FANOUT_JWT_SECRET": "short"}
    )
    assert cfg.auth.jwks_file == "/k.json"


def _release(text: str) -> tuple[int, int, int]:
    """(major, minor, micro) of a version string, missing parts as 0 ("0.16" -> (0, 16, 0))."""
    parts = [int(x) for x in text.strip().split(".")[:3] if x.isdigit()]
    major, minor, micro = (*parts, 0, 0, 0)[:3]
    return major, minor, micro


def _floor(requirement: str) -> tuple[int, int, int]:
    return _release(requirement.split(">=", 1)[1].split(",")[0])


def _version(dist: str) -> tuple[int, int, int]:
    from importlib.metadata import version

    return _release(version(dist))


@pytest.mark.parametrize(
    ("dist", "fixed", "cve"),
    [("PyJWT", (2, 10, 1), "CVE-2024-53861"), ("h11", (0, 16, 0), "CVE-2025-43859")],
)
def test_dependency_floors_exclude_known_vulnerable_versions(
    dist: str, fixed: tuple[int, ...], cve: str
) -> None:
    import tomllib
    from pathlib import Path

    doc = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    reqs = [r for r in doc["project"]["dependencies"] if r.lower().startswith(dist.lower() + ">=")]
    assert len(reqs) == 1, f"pyproject.toml must pin a floor for {dist}"
    assert _floor(reqs[0]) >= fixed, f"{reqs[0]} allows versions with {cve}"
    assert _version(dist) >= fixed, f"the installed {dist} is older than the fix of {cve}"


def test_auth_leeway_s_sets_how_long_past_exp_a_token_lives() -> None:
    """auth.leeway_s (default LEEWAY_S): 0 ends a token exactly at `exp`."""
    now = time.time()
    token = hs256(ttl_s=-5)  # expired 5 s ago: inside the default leeway
    assert hs().verify(token, now).expires_at == pytest.approx(now - 5 + LEEWAY_S, abs=1)
    with pytest.raises(TokenError, match="expired"):
        hs(leeway_s=0).verify(token, now)
    fresh = hs256(ttl_s=3)
    assert hs(leeway_s=0).verify(fresh, now).expires_at == pytest.approx(now + 3, abs=1)
    with pytest.raises(TokenError, match="not valid yet"):
        hs(leeway_s=0).verify(hs256(nbf=now + 5), now)
    cfg = parse_config({"auth": {"leeway_s": 0}}, {})
    assert cfg.auth.leeway_s == 0.0
    with pytest.raises(ConfigError, match=r"auth\.leeway_s"):
        parse_config({"auth": {"leeway_s": -1}}, {})
