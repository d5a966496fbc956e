"""Minting call tokens: short-lived EdDSA JWTs that admit one caller (or monitor) to one call.

A call token is deliberately unlike an access token: its header ``typ`` is ``call+jwt`` and its
audience is the relay, so neither kind is accepted where the other is expected. ``exp`` covers the
longest call plus a little grace so a dropped caller can reconnect; ``cnb`` (connect-by) is the
much shorter window in which the first connection must happen, enforced by the relay.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from control_api.security.signing import SigningKeyring
from voicerelay.call_token import (
    CALL_TOKEN_TYP,
    CallRole,
    CallTokenClaims,
    parse_jwks,
    verify_call_token,
)
from voicerelay.settings import Settings

# Room for a reconnect right at the maximum duration, and for clock skew between hosts.
EXPIRY_GRACE_SECONDS = 60


@dataclass(frozen=True)
class IssuedCallToken:
    token: str
    token_id: str
    issued_at: datetime
    expires_at: datetime
    connect_by: datetime


def issue_call_token(
    signing: SigningKeyring,
    settings: Settings,
    *,
    call_id: uuid.UUID,
    tenant_id: uuid.UUID,
    role: CallRole,
    now: float | None = None,
    compact: bool = False,
) -> IssuedCallToken:
    """``compact`` writes the ids as 32 hex digits and a 64-bit jti: the same claims, verified the
    same way, about 30 characters shorter, so that a phone call's token fits in a Twilio
    ``<Parameter>`` (name + value under 500 characters)."""
    iat = int(time.time() if now is None else now)
    exp = iat + settings.max_call_duration_seconds + EXPIRY_GRACE_SECONDS
    cnb = min(iat + settings.call_token_connect_window_seconds, exp)
    jti = secrets.token_urlsafe(8 if compact else 16)
    token = signing.sign(
        {
            "iss": settings.jwt_issuer,
            "aud": settings.relay_token_audience,
            "sub": call_id.hex if compact else str(call_id),
            "tid": tenant_id.hex if compact else str(tenant_id),
            "role": role,
            "jti": jti,
            "iat": iat,
            "nbf": iat,
            "exp": exp,
            "cnb": cnb,
        },
        typ=CALL_TOKEN_TYP,
    )
    return IssuedCallToken(
        token=token,
        token_id=jti,
        issued_at=_utc(iat),
        expires_at=_utc(exp),
        connect_by=_utc(cnb),
    )


def verify_issued_call_token(
    signing: SigningKeyring, settings: Settings, token: str
) -> CallTokenClaims:
    """Verify with the published keys, exactly as the relay does; raises CallTokenError."""
    return verify_call_token(
        token,
        parse_jwks(signing.jwks()),
        issuer=settings.jwt_issuer,
        audience=settings.relay_token_audience,
    )


def _utc(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)
