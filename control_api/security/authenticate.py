"""Turns an ``Authorization: Bearer`` header into a Principal (access token or API key)."""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING

import asyncpg
from starlette.requests import Request

from control_api.db import platform_tx, tenant_tx
from control_api.principal import Principal
from control_api.problems import Problem
from control_api.security.access_tokens import BEARER_CHALLENGE, principal_from_access_token
from control_api.security.api_keys import hash_api_key, looks_like_api_key
from voicerelay.logs import tenant_id_var

if TYPE_CHECKING:
    from control_api.state import AppState

log = logging.getLogger(__name__)

_CHALLENGE = BEARER_CHALLENGE
# last_used_at is informational: one write per key per minute per process is plenty, and the
# conditional UPDATE keeps several replicas from writing more than about once a minute either.
_LAST_USED_INTERVAL_SECONDS = 60.0
_LAST_USED_MEMORY = 10_000
_last_used_written: dict[uuid.UUID, float] = {}


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Problem(
            401,
            "unauthorized",
            "Send an access token or API key as a Bearer token.",
            headers=_CHALLENGE,
        )
    return token.strip()


async def authenticate_request(state: AppState, request: Request) -> Principal:
    token = bearer_token(request)
    if looks_like_api_key(token):
        principal = await _authenticate_api_key(state, token)
    else:
        principal = await _authenticate_access_token(state, token)
    tenant_id_var.set(str(principal.tenant_id))
    return principal


async def _authenticate_api_key(state: AppState, token: str) -> Principal:
    async with platform_tx(state.pool) as conn:
        row = await conn.fetchrow("SELECT * FROM auth_api_key($1)", hash_api_key(token))
    if row is None or not row["active"]:
        raise Problem(
            401,
            "invalid_credentials",
            "The API key is unknown, expired or revoked.",
            headers=_CHALLENGE,
        )
    principal = Principal(
        tenant_id=row["tenant_id"], kind="api_key", subject_id=row["api_key_id"], role=row["role"]
    )
    await _note_api_key_use(state, principal)
    return principal


async def _note_api_key_use(state: AppState, principal: Principal) -> None:
    now = time.monotonic()
    last = _last_used_written.get(principal.subject_id)
    if last is not None and now - last < _LAST_USED_INTERVAL_SECONDS:
        return
    if len(_last_used_written) >= _LAST_USED_MEMORY:
        _last_used_written.clear()
    _last_used_written[principal.subject_id] = now
    try:
        async with tenant_tx(state.pool, principal.tenant_id) as conn:
            await conn.execute(
                """
                UPDATE api_keys SET last_used_at = now()
                WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')
                """,
                principal.subject_id,
            )
    except (asyncpg.PostgresError, OSError):
        # Bookkeeping only: never fail a request because it could not be recorded.
        log.warning("could not record API key use", exc_info=True)


async def _authenticate_access_token(state: AppState, token: str) -> Principal:
    return await principal_from_access_token(state, token)


def parse_uuid(value: object) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise Problem(401, "invalid_token", "The token is malformed.", headers=_CHALLENGE) from None
