"""JWT verification for `auth.mode = "jwt"` (PyJWT). PURE: the clock and the
key material are arguments; `load_verifier` takes a `read_text` function for
key files.

Rules this module owns:

1. One key source, chosen by config: a JWKS file (`auth.jwks_file`, key chosen
   by the token's `kid`), else a PEM public key file (`auth.jwt_public_key_file`,
   RS256 for an RSA key, ES256 for an EC key), else the HS256 secret held by the
   environment variable `auth.jwt_secret_env` (at least `MIN_HS256_SECRET_BYTES`,
   32: RFC 7518 section 3.2). The algorithm is fixed by the key, never taken
   from the token (no `alg: none`, no HS256-with-a-public-key confusion).
2. `exp` is required (a token that never expires could only be revoked by
   rotating the key); `exp` and `nbf` are checked against the `now` the caller
   gives, with `auth.leeway_s` (default `LEEWAY_S`) of clock skew allowed;
   `iss` and `aud` are checked when configured.
3. Every refusal is a `TokenError` whose message says why, safe to show the
   client (it never echoes key material). Nothing else escapes `verify`.
4. A token without `sub_topics` gets what `auth.missing_sub_topics` says:
   nothing by default (engine.auth.permissions rule 1).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from engine.auth.permissions import Permissions, permissions_from_claims
from engine.config import AuthConfig, hs256_secret_problem
from engine.errors import ConfigError, EngineError

LEEWAY_S: Final = 30.0  # clock skew tolerated on exp/nbf between the issuer and us
MAX_TOKEN_BYTES: Final = 8192  # longer tokens are refused before any parsing

_ASYMMETRIC: Final = ("RS256", "ES256")


class TokenError(EngineError):
    """A token was refused; the message says why (safe to send to the client)."""


@dataclass(frozen=True, slots=True)
class Identity:
    """What a verified token grants: `user` (its `sub`, may be None), `expires_at`
    (`exp`, seconds since the epoch) and the topic permissions of its claims."""

    user: str | None
    expires_at: float
    permissions: Permissions


class TokenVerifier:
    """Verifies tokens against one configured key source (rule 1).

    `verify(token, now)` returns an `Identity` or raises `TokenError`. A JWKS
    set can be replaced at run time with `replace_jwks` (key rotation: publish
    the new key next to the old one, then drop the old one).
    """

    __slots__ = (
        "_algorithms",
        "_audience",
        "_issuer",
        "_jwks",
        "_key",
        "_leeway_s",
        "_missing_sub",
    )

    def __init__(
        self,
        *,
        key: Any = None,
        algorithms: tuple[str, ...] = (),
        jwks: jwt.PyJWKSet | None = None,
        issuer: str = "",
        audience: str = "",
        missing_sub_topics: str = "none",
        leeway_s: float = LEEWAY_S,
    ) -> None:
        if key is None and jwks is None:
            raise ValueError("a key or a JWKS set is required")
        self._leeway_s = leeway_s
        self._key = key
        self._algorithms = algorithms
        self._jwks = jwks
        self._issuer = issuer
        self._audience = audience
        self._missing_sub = missing_sub_topics

    def replace_jwks(self, jwks: jwt.PyJWKSet) -> None:
        self._jwks = jwks

    def verify(self, token: str, now: float) -> Identity:
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise TokenError("missing or oversized token")
        try:
            key, algorithms = self._key_for(token)
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(algorithms),
                audience=self._audience or None,
                issuer=self._issuer or None,
                options={
                    "verify_exp": False,  # checked below against the caller's clock
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": bool(self._audience),
                    "verify_iss": bool(self._issuer),
                    "require": ["exp"],
                },
            )
        except TokenError:
            raise
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"token refused: {exc}") from None
        except jwt.InvalidAudienceError:
            raise TokenError("token refused: wrong audience") from None
        except jwt.InvalidIssuerError:
            raise TokenError("token refused: wrong issuer") from None
        except jwt.InvalidSignatureError:
            raise TokenError("token refused: bad signature") from None
        except jwt.InvalidAlgorithmError:
            raise TokenError("token refused: algorithm not allowed") from None
        except Exception:  # DecodeError, PyJWKError, binascii/unicode errors in odd tokens
            raise TokenError("token refused: malformed") from None
        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, int | float) or exp != exp:
            raise TokenError("token refused: 'exp' must be a number")
        if now > exp + self._leeway_s:
            raise TokenError("token expired")
        nbf = claims.get("nbf")
        if nbf is not None:
            if isinstance(nbf, bool) or not isinstance(nbf, int | float):
                raise TokenError("token refused: 'nbf' must be a number")
            if now + self._leeway_s < nbf:
                raise TokenError("token not valid yet")
        sub = claims.get("sub")
        if sub is not None and not isinstance(sub, str):
            raise TokenError("token refused: 'sub' must be a string")
        try:
            permissions = permissions_from_claims(claims, missing_sub_topics=self._missing_sub)
        except ValueError as exc:
            raise TokenError(f"token refused: {exc}") from None
        return Identity(sub, float(exp) + self._leeway_s, permissions)

    def _key_for(self, token: str) -> tuple[Any, tuple[str, ...]]:
        jwks = self._jwks
        if jwks is None:
            return self._key, self._algorithms
        kid = jwt.get_unverified_header(token).get("kid")
        keys = jwks.keys
        if kid is None:
            if len(keys) != 1:
                raise TokenError("token refused: no 'kid' in its header")
            chosen = keys[0]
        else:
            match = [k for k in keys if k.key_id == kid]
            if not match:
                raise TokenError("token refused: unknown 'kid'")
            chosen = match[0]
        alg = chosen.algorithm_name
        if alg not in _ASYMMETRIC:
            raise TokenError("token refused: algorithm not allowed")
        return chosen.key, (alg,)


def parse_jwks(text: str, where: str = "auth.jwks_file") -> jwt.PyJWKSet:
    """A JWKS document's public keys (RS256/ES256 only); ConfigError if unusable."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise ConfigError(where, "not valid JSON (expected a JWKS document)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ConfigError(where, 'expected a JWKS document {"keys": [...]}')
    keys = []
    for i, k in enumerate(doc["keys"]):
        if not isinstance(k, dict):
            raise ConfigError(where, f"keys[{i}] is not an object")
        if k.get("kty") not in ("RSA", "EC") or "d" in k:
            raise ConfigError(where, f"keys[{i}]: only RSA and EC public keys are accepted")
        k = dict(k)
        k.setdefault("alg", "RS256" if k["kty"] == "RSA" else "ES256")
        if k["alg"] not in _ASYMMETRIC:
            raise ConfigError(where, f"keys[{i}]: alg must be RS256 or ES256")
        keys.append(k)
    if not keys:
        raise ConfigError(where, "the JWKS document holds no keys")
    try:
        return jwt.PyJWKSet(keys)
    except Exception as exc:
        raise ConfigError(where, f"unusable key set: {exc}") from None


def parse_public_key(pem: str, where: str = "auth.jwt_public_key_file") -> tuple[Any, str]:
    """A PEM public key and the one algorithm it verifies (RS256 or ES256)."""
    try:
        key = load_pem_public_key(pem.encode())
    except Exception:
        raise ConfigError(where, "not a PEM public key") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key, "ES256"
    raise ConfigError(where, "only RSA (RS256) and EC (ES256) public keys are accepted")


def load_verifier(
    cfg: AuthConfig, env: Mapping[str, str], read_text: Callable[[str], str]
) -> TokenVerifier:
    """The verifier `cfg` describes (rule 1). `read_text(path)` reads a key file;
    raises ConfigError naming the setting when the key is missing or unusable."""

    def read(path: str, key: str) -> str:
        try:
            return read_text(path)
        except OSError as exc:
            raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None

    common: dict[str, Any] = {
        "issuer": cfg.issuer,
        "audience": cfg.audience,
        "missing_sub_topics": cfg.missing_sub_topics,
        "leeway_s": cfg.leeway_s,
    }
    if cfg.jwks_file:
        jwks = parse_jwks(read(cfg.jwks_file, "auth.jwks_file"))
        return TokenVerifier(jwks=jwks, **common)
    if cfg.jwt_public_key_file:
        key, alg = parse_public_key(read(cfg.jwt_public_key_file, "auth.jwt_public_key_file"))
        return TokenVerifier(key=key, algorithms=(alg,), **common)
    secret = env.get(cfg.jwt_secret_env, "") if cfg.jwt_secret_env else ""
    if not secret:
        raise ConfigError(
            "auth.jwt_secret_env", f"the environment variable {cfg.jwt_secret_env} is not set"
        )
    problem = hs256_secret_problem(secret, cfg.jwt_secret_env)
    if problem:
        raise ConfigError("auth.jwt_secret_env", problem)
    return TokenVerifier(key=secret, algorithms=("HS256",), **common)
