"""Opaque refresh tokens with rotation, reuse detection and family-wide revocation.

Only SHA-256 hashes are stored. Every token belongs to a family started at login; a refresh marks
the presented token used and issues its child. Presenting a used token again means it was copied,
so the whole family is revoked (RFC 9700 §4.14.2), except for the immediately-previous token
within a short grace window, which is a client racing itself and gets a sibling instead.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from control_api.bootstrap import new_id
from control_api.db import Conn, platform_tx, tenant_tx
from control_api.problems import Problem
from control_api.security.access_tokens import revoke_issued_access_tokens

if TYPE_CHECKING:
    import asyncpg

    from voicerelay.settings import Settings

log = logging.getLogger(__name__)

REFRESH_RESULTS = Counter(
    "voicerelay_auth_refresh_total",
    "Refresh-token exchanges by outcome.",
    ["result"],
)


@dataclass(frozen=True)
class IssuedRefreshToken:
    token: str
    expires_in: int
    family_id: uuid.UUID


@dataclass(frozen=True)
class RotatedSession:
    tenant_id: uuid.UUID
    user_id: uuid.UUID
    refresh: IssuedRefreshToken


class RefreshRejected(Problem):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(401, code, detail)


def hash_refresh_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def start_family(
    conn: Conn, settings: Settings, *, tenant_id: uuid.UUID, user_id: uuid.UUID
) -> IssuedRefreshToken:
    """A new session (login): a fresh family and its first token."""
    family_id = new_id()
    await conn.execute(
        """
        INSERT INTO refresh_token_families (id, tenant_id, user_id, absolute_expires_at)
        VALUES ($1, $2, $3, now() + make_interval(secs => $4))
        """,
        family_id,
        tenant_id,
        user_id,
        settings.refresh_family_max_age_seconds,
    )
    return await _issue(conn, settings, tenant_id=tenant_id, family_id=family_id, parent_id=None)


async def _issue(
    conn: Conn,
    settings: Settings,
    *,
    tenant_id: uuid.UUID,
    family_id: uuid.UUID,
    parent_id: uuid.UUID | None,
) -> IssuedRefreshToken:
    token = secrets.token_urlsafe(32)
    # Idle expiry slides with every rotation but never past the family's absolute expiry.
    expires_in = await conn.fetchval(
        """
        INSERT INTO refresh_tokens (id, tenant_id, family_id, parent_id, token_hash, expires_at)
        SELECT $1, $2, $3, $4, $5,
               least(now() + make_interval(secs => $6), f.absolute_expires_at)
        FROM refresh_token_families f WHERE f.id = $3
        RETURNING greatest(0, floor(extract(epoch FROM expires_at - now())))::integer
        """,
        new_id(),
        tenant_id,
        family_id,
        parent_id,
        hash_refresh_token(token),
        settings.refresh_token_ttl_seconds,
    )
    if expires_in is None:
        raise RuntimeError("refresh token family vanished while issuing a token")
    return IssuedRefreshToken(token=token, expires_in=int(expires_in), family_id=family_id)


async def rotate_refresh_token(
    pool: asyncpg.Pool, settings: Settings, token: str
) -> RotatedSession:
    token_hash = hash_refresh_token(token)
    tenant_id = await _tenant_of(pool, token_hash)
    if tenant_id is None:
        REFRESH_RESULTS.labels("unknown").inc()
        raise RefreshRejected("invalid_refresh_token", "The refresh token is not valid.")
    # A rejection that revokes the family must still commit, so the transaction returns the
    # outcome and the exception is raised only after it has ended.
    async with tenant_tx(pool, tenant_id) as conn:
        outcome = await _rotate_locked(conn, settings, tenant_id, token_hash)
    if isinstance(outcome, RefreshRejected):
        raise outcome
    return outcome


async def _tenant_of(pool: asyncpg.Pool, token_hash: bytes) -> uuid.UUID | None:
    async with platform_tx(pool) as conn:
        tenant_id: uuid.UUID | None = await conn.fetchval(
            "SELECT auth_refresh_token_tenant($1)", token_hash
        )
    return tenant_id


async def _rotate_locked(
    conn: Conn, settings: Settings, tenant_id: uuid.UUID, token_hash: bytes
) -> RotatedSession | RefreshRejected:
    family = await _lock_family_of(conn, token_hash)
    if family is None:
        return _reject("unknown", "invalid_refresh_token", "The refresh token is not valid.")
    if family["revoked"]:
        return _reject("revoked", "refresh_token_revoked", "This session has been signed out.")
    if family["expired"]:
        return _reject("expired", "refresh_token_expired", "This session has expired.")
    # Read after the family lock: a concurrent rotation has committed by now and is visible.
    current = await conn.fetchrow(
        """
        SELECT id, used_at IS NOT NULL AS used, expires_at <= now() AS expired,
               used_at > now() - make_interval(secs => $2) AS within_grace
        FROM refresh_tokens WHERE token_hash = $1
        """,
        token_hash,
        settings.refresh_reuse_grace_seconds,
    )
    assert current is not None  # the family lock was found through this very row
    user = await conn.fetchrow(
        "SELECT disabled_at IS NOT NULL AS disabled FROM users WHERE id = $1", family["user_id"]
    )
    if user is None or user["disabled"]:
        await revoke_family(conn, family["id"], "user_disabled")
        return _reject("revoked", "refresh_token_revoked", "This session has been signed out.")
    parent_id = current["id"]
    if current["used"]:
        if not (current["within_grace"] and await _latest_used(conn, family["id"]) == parent_id):
            await revoke_family(conn, family["id"], "reuse_detected")
            log.warning(
                "refresh token reuse detected; session family revoked",
                extra={"family_id": str(family["id"]), "user_id": str(family["user_id"])},
            )
            return _reject(
                "reuse_detected",
                "refresh_token_reused",
                "This refresh token was already used; the session has been signed out.",
            )
        result = "grace_sibling"
    elif current["expired"]:
        return _reject("expired", "refresh_token_expired", "This session has expired.")
    else:
        await conn.execute("UPDATE refresh_tokens SET used_at = now() WHERE id = $1", parent_id)
        result = "rotated"
    issued = await _issue(
        conn, settings, tenant_id=tenant_id, family_id=family["id"], parent_id=parent_id
    )
    REFRESH_RESULTS.labels(result).inc()
    return RotatedSession(tenant_id=tenant_id, user_id=family["user_id"], refresh=issued)


async def _lock_family_of(conn: Conn, token_hash: bytes) -> Any:
    # Every exchange in a family serialises on the family row, so two concurrent refreshes with
    # the same token cannot both rotate it.
    return await conn.fetchrow(
        """
        SELECT f.id, f.user_id, f.revoked_at IS NOT NULL AS revoked,
               f.absolute_expires_at <= now() AS expired
        FROM refresh_token_families f
        WHERE f.id = (SELECT t.family_id FROM refresh_tokens t WHERE t.token_hash = $1)
        FOR UPDATE
        """,
        token_hash,
    )


async def _latest_used(conn: Conn, family_id: uuid.UUID) -> uuid.UUID | None:
    latest: uuid.UUID | None = await conn.fetchval(
        """
        SELECT id FROM refresh_tokens
        WHERE family_id = $1 AND used_at IS NOT NULL
        ORDER BY used_at DESC, created_at DESC LIMIT 1
        """,
        family_id,
    )
    return latest


def _reject(result: str, code: str, detail: str) -> RefreshRejected:
    REFRESH_RESULTS.labels(result).inc()
    return RefreshRejected(code, detail)


async def revoke_family(conn: Conn, family_id: uuid.UUID, reason: str) -> None:
    await conn.execute(
        """
        UPDATE refresh_token_families SET revoked_at = now(), revoke_reason = $2
        WHERE id = $1 AND revoked_at IS NULL
        """,
        family_id,
        reason,
    )


async def revoke_user_families(conn: Conn, user_id: uuid.UUID, reason: str) -> None:
    await conn.execute(
        """
        UPDATE refresh_token_families SET revoked_at = now(), revoke_reason = $2
        WHERE user_id = $1 AND revoked_at IS NULL
        """,
        user_id,
        reason,
    )


@dataclass(frozen=True)
class LoggedOutSession:
    tenant_id: uuid.UUID
    user_id: uuid.UUID


async def end_session(
    pool: asyncpg.Pool, token: str, *, everywhere: bool = False
) -> LoggedOutSession | None:
    """Revokes the token's family (with ``everywhere``, every session of the user and every
    access token issued so far); returns whose session it was, or None for an unknown or
    already-ended session (logout is idempotent and reveals nothing)."""
    token_hash = hash_refresh_token(token)
    tenant_id = await _tenant_of(pool, token_hash)
    if tenant_id is None:
        return None
    async with tenant_tx(pool, tenant_id) as conn:
        family = await _lock_family_of(conn, token_hash)
        if family is None or family["revoked"] or family["expired"]:
            return None
        await revoke_family(conn, family["id"], "logout")
        if everywhere:
            await revoke_user_families(conn, family["user_id"], "logout_everywhere")
            await revoke_issued_access_tokens(conn, family["user_id"])
    return LoggedOutSession(tenant_id=tenant_id, user_id=family["user_id"])
