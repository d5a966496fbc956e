"""Call tokens: the claims a caller presents to the relay, and their verification.

The control API mints these (``control_api.call_tokens``); the relay verifies them with nothing but
the public keys from ``/.well-known/jwks.json``, so it can check a token without being able to
mint one. This module is pure (no I/O) so both services share one verifier.

Verification never trusts the token's own header for the algorithm: only ``EdDSA`` is accepted,
and only with an Ed25519 key found by ``kid`` among the published keys.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

CALL_TOKEN_TYP = "call+jwt"
ALGORITHMS = ["EdDSA"]
# Clocks drift between hosts; a few seconds of leeway, never more.
MAX_LEEWAY_SECONDS = 5.0
REQUIRED_CLAIMS = ["iss", "aud", "sub", "tid", "role", "jti", "iat", "nbf", "exp", "cnb"]
MAX_TOKEN_LENGTH = 4096

CallRole = Literal["caller", "monitor"]
CALL_ROLES: frozenset[str] = frozenset({"caller", "monitor"})


class CallTokenError(Exception):
    """The token is not a valid call token. The message is safe to log; it never holds the token."""


@dataclass(frozen=True)
class CallTokenClaims:
    call_id: uuid.UUID
    tenant_id: uuid.UUID
    role: CallRole
    token_id: str
    issued_at: int
    not_before: int
    expires_at: int
    # The relay refuses a first connection after this instant; reconnects are allowed until exp.
    connect_by: int

    def may_first_connect(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) <= self.connect_by


def parse_jwks(document: Mapping[str, Any]) -> dict[str, Ed25519PublicKey]:
    """Ed25519 public keys by kid from a JWKS document; keys of any other kind are skipped."""
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise ValueError("a JWKS document needs a 'keys' list")
    parsed: dict[str, Ed25519PublicKey] = {}
    for jwk in keys:
        if not isinstance(jwk, Mapping):
            continue
        kid, x = jwk.get("kid"), jwk.get("x")
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        if jwk.get("alg", "EdDSA") != "EdDSA" or jwk.get("use", "sig") != "sig":
            continue
        if not isinstance(kid, str) or not kid or not isinstance(x, str):
            continue
        try:
            raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
            parsed[kid] = Ed25519PublicKey.from_public_bytes(raw)
        except (binascii.Error, ValueError):
            continue
    return parsed


def verify_call_token(
    token: str,
    jwks_keys: Mapping[str, Ed25519PublicKey],
    *,
    issuer: str,
    audience: str,
    now: float | None = None,
    leeway: float = MAX_LEEWAY_SECONDS,
) -> CallTokenClaims:
    """Verify signature, type, issuer, audience and times; raise CallTokenError on any problem."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
        raise CallTokenError("malformed token")
    leeway = min(max(leeway, 0.0), MAX_LEEWAY_SECONDS)
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise CallTokenError("malformed token") from None
    if header.get("typ") != CALL_TOKEN_TYP:
        raise CallTokenError("not a call token")
    if header.get("alg") not in ALGORITHMS:
        raise CallTokenError("algorithm not allowed")
    kid = header.get("kid")
    key = jwks_keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise CallTokenError("unknown signing key")
    try:
        # Times are checked below against ``now`` so callers (and tests) control the clock.
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=ALGORITHMS,
            audience=audience,
            issuer=issuer,
            options={
                "require": REQUIRED_CLAIMS,
                "strict_aud": True,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    except jwt.InvalidTokenError as exc:
        raise CallTokenError(_reason(exc)) from None
    parsed = _claims(claims)
    current = time.time() if now is None else now
    if parsed.not_before > current + leeway or parsed.issued_at > current + leeway:
        raise CallTokenError("token not yet valid")
    if parsed.expires_at <= current - leeway:
        raise CallTokenError("token expired")
    return parsed


def _reason(exc: jwt.InvalidTokenError) -> str:
    if isinstance(exc, jwt.InvalidAudienceError):
        return "wrong audience"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "wrong issuer"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing claim {exc.claim}"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad signature"
    return "invalid token"


def _claims(claims: dict[str, Any]) -> CallTokenClaims:
    role = claims["role"]
    if role not in CALL_ROLES:
        raise CallTokenError("unknown role")
    jti = claims["jti"]
    if not isinstance(jti, str) or not jti:
        raise CallTokenError("invalid jti")
    times = [claims[name] for name in ("iat", "nbf", "exp", "cnb")]
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in times):
        raise CallTokenError("times must be integers")
    iat, nbf, exp, cnb = times
    if not iat <= cnb <= exp:
        raise CallTokenError("inconsistent times")
    try:
        call_id = uuid.UUID(str(claims["sub"]))
        tenant_id = uuid.UUID(str(claims["tid"]))
    except ValueError:
        raise CallTokenError("invalid subject or tenant") from None
    return CallTokenClaims(
        call_id=call_id,
        tenant_id=tenant_id,
        role=role,
        token_id=jti,
        issued_at=iat,
        not_before=nbf,
        expires_at=exp,
        connect_by=cnb,
    )
