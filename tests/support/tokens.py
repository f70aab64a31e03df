"""Test keys and tokens for auth tests: an HS256 secret, RSA and EC key pairs."""

from __future__ import annotations

import time
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SECRET = "test-secret-for-fanout-hs256-0123456789abcdef"  # >= 32 bytes: PyJWT warns below


# Test tokens may subscribe to every topic unless a test says otherwise: a token
# without `sub_topics` subscribes to nothing by default (auth.missing_sub_topics).
ALL_TOPICS: Final = [">"]


def _claims(ttl_s: float, claims: dict[str, Any]) -> dict[str, Any]:
    """The token body: `sub` alice, `exp` in `ttl_s`, `sub_topics` every topic; a
    claim given as None is left out (`sub_topics=None`: a token without the claim)."""
    body: dict[str, Any] = {"sub": "alice", "exp": time.time() + ttl_s, "sub_topics": ALL_TOPICS}
    body.update(claims)
    return {k: v for k, v in body.items() if v is not None}


def hs256(secret: str = SECRET, ttl_s: float = 60.0, **claims: Any) -> str:
    return jwt.encode(_claims(ttl_s, claims), secret, algorithm="HS256")


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def signed(key: Any, alg: str, ttl_s: float = 60.0, kid: str | None = None, **claims: Any) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(_claims(ttl_s, claims), key, algorithm=alg, headers=headers)


def jwk(key: Any, alg: str, kid: str) -> dict[str, Any]:
    """The public JWK of a private key."""
    import json

    algo = jwt.algorithms.RSAAlgorithm if alg == "RS256" else jwt.algorithms.ECAlgorithm
    out: dict[str, Any] = json.loads(algo.to_jwk(key.public_key()))
    out.update({"kid": kid, "alg": alg, "use": "sig"})
    return out
