"""Access tokens: short-lived EdDSA JWTs for dashboard users.

The token says who the user is and which tenant they act in; every request still checks the user
row, so disabling a user, logging out everywhere or changing a password takes effect at once,
and the role applied is always the current one rather than the one frozen into the token.

A user still holding a one-time password gets a token marked ``must_change_password``; such a
principal is refused everywhere except the endpoints that let them choose a password (see
control_api/security/password_change.py). The user row is consulted as well, so a flag set after
the token was issued applies at once too.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, cast

import jwt

from control_api.db import Conn, tenant_tx
from control_api.principal import Principal
from control_api.problems import Problem

if TYPE_CHECKING:
    from control_api.security.signing import SigningKeyring
    from control_api.state import AppState
    from voicerelay.settings import Settings

TOKEN_TYPE = "at+jwt"
REQUIRED_CLAIMS = ["iss", "aud", "sub", "tid", "role", "iat", "exp", "jti"]
ROLES = ("viewer", "admin", "owner")
BEARER_CHALLENGE = {"www-authenticate": 'Bearer realm="voicerelay"'}

RoleName = Literal["viewer", "admin", "owner"]


@dataclass(frozen=True)
class IssuedAccessToken:
    token: str
    expires_in: int


def issue_access_token(
    signing: SigningKeyring,
    settings: Settings,
    *,
    user_id: uuid.UUID,
    tenant_id: uuid.UUID,
    role: str,
    must_change_password: bool = False,
) -> IssuedAccessToken:
    # iat keeps sub-second precision: users.tokens_valid_after is compared against it, and a
    # token issued right after a password change must not fall in the same whole second.
    now = time.time()
    ttl = settings.access_token_ttl_seconds
    claims = {
        "iss": settings.jwt_issuer,
        "aud": settings.access_token_audience,
        "sub": str(user_id),
        "tid": str(tenant_id),
        "role": role,
        "iat": round(now, 6),
        "exp": int(now) + ttl,
        "jti": uuid.uuid4().hex,
    }
    if must_change_password:
        # Present only on restricted tokens, so every other token keeps the standard claims.
        claims["must_change_password"] = True
    return IssuedAccessToken(token=signing.sign(claims, typ=TOKEN_TYPE), expires_in=ttl)


@dataclass(frozen=True)
class AccessClaims:
    user_id: uuid.UUID
    tenant_id: uuid.UUID
    issued_at: float
    must_change_password: bool


def verify_access_token(signing: SigningKeyring, settings: Settings, token: str) -> AccessClaims:
    """Signature, type, issuer, audience, expiry and claim shapes; no database."""
    try:
        claims = signing.verify(
            token,
            typ=TOKEN_TYPE,
            audience=settings.access_token_audience,
            issuer=settings.jwt_issuer,
            required=REQUIRED_CLAIMS,
        )
    except jwt.ExpiredSignatureError:
        raise _unauthorized("token_expired", "The access token has expired.") from None
    except (jwt.InvalidTokenError, ValueError, TypeError):
        raise _unauthorized("invalid_token", "The access token is invalid.") from None
    return _parse_claims(claims)


def _parse_claims(claims: dict[str, Any]) -> AccessClaims:
    iat = claims.get("iat")
    # Optional: without it, the user row alone decides (it is read on every request anyway).
    must_change = claims.get("must_change_password", False)
    if (
        claims.get("role") not in ROLES
        or not isinstance(iat, int | float)
        or not isinstance(must_change, bool)
    ):
        raise _unauthorized("invalid_token", "The access token is invalid.")
    try:
        user_id = uuid.UUID(str(claims["sub"]))
        tenant_id = uuid.UUID(str(claims["tid"]))
    except ValueError:
        raise _unauthorized("invalid_token", "The access token is invalid.") from None
    return AccessClaims(
        user_id=user_id,
        tenant_id=tenant_id,
        issued_at=float(iat),
        must_change_password=must_change,
    )


async def principal_from_access_token(state: AppState, token: str) -> Principal:
    claims = verify_access_token(state.signing, state.settings, token)
    async with tenant_tx(state.pool, claims.tenant_id, readonly=True) as conn:
        row = await conn.fetchrow(
            """
            SELECT role, must_change_password, disabled_at IS NOT NULL AS disabled,
                   tokens_valid_after <= to_timestamp($2::double precision) AS current
            FROM users WHERE id = $1
            """,
            claims.user_id,
            claims.issued_at,
        )
    if row is None or row["disabled"]:
        raise _unauthorized("invalid_token", "The user no longer exists or is disabled.")
    if not row["current"]:
        raise _unauthorized("token_revoked", "The access token has been revoked; sign in again.")
    return Principal(
        tenant_id=claims.tenant_id,
        kind="user",
        subject_id=claims.user_id,
        role=cast(RoleName, row["role"]),
        must_change_password=claims.must_change_password or row["must_change_password"],
    )


def _unauthorized(code: str, detail: str) -> Problem:
    return Problem(401, code, detail, headers=BEARER_CHALLENGE)


async def revoke_issued_access_tokens(conn: Conn, user_id: uuid.UUID) -> None:
    """Every access token issued to the user until now stops working (same clock as ``iat``)."""
    await conn.execute(
        "UPDATE users SET tokens_valid_after = $2, updated_at = now() WHERE id = $1",
        user_id,
        datetime.fromtimestamp(time.time(), UTC),
    )
