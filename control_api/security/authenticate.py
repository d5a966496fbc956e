"""Turns an ``Authorization: Bearer`` header into a Principal (access token or API key)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from starlette.requests import Request

from control_api.db import platform_tx
from control_api.principal import Principal
from control_api.problems import Problem
from control_api.security.api_keys import hash_api_key, looks_like_api_key
from voicerelay.logs import tenant_id_var

if TYPE_CHECKING:
    from control_api.state import AppState

_CHALLENGE = {"www-authenticate": 'Bearer realm="voicerelay"'}


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
    return Principal(
        tenant_id=row["tenant_id"], kind="api_key", subject_id=row["api_key_id"], role=row["role"]
    )


async def _authenticate_access_token(state: AppState, token: str) -> Principal:
    # Access tokens (JWT) are verified in control_api.security.access_tokens.
    from control_api.security.access_tokens import principal_from_access_token

    return await principal_from_access_token(state, token)


def parse_uuid(value: object) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise Problem(401, "invalid_token", "The token is malformed.", headers=_CHALLENGE) from None
