"""Endpoints: the tenant's API keys for servers. The key itself is shown once, at creation."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, Field
from starlette.responses import Response

from control_api.bootstrap import new_id
from control_api.db import tenant_tx
from control_api.endpoints import ApiCall, ApiModel, EndpointGroup
from control_api.problems import Problem
from control_api.security.api_keys import generate_api_key

group = EndpointGroup("api-keys")

KeyRole = Literal["admin", "viewer"]
_KEY_COLUMNS = "id, name, prefix, role, created_at, last_used_at, expires_at, revoked_at"


class ApiKey(BaseModel):
    id: uuid.UUID
    name: str
    prefix: str = Field(description="The key's public start, to recognise it; not a secret.")
    role: KeyRole
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None


class ApiKeyList(BaseModel):
    items: list[ApiKey]


class CreatedApiKey(ApiKey):
    key: str = Field(description="The API key; shown only in this response, store it now.")


class CreateApiKeyBody(ApiModel):
    name: str = Field(min_length=1, max_length=200)
    role: KeyRole
    expires_at: AwareDatetime | None = None


@group(
    "POST",
    "/v1/api-keys",
    summary="Create an API key; the response is the only time the key is shown",
    body=CreateApiKeyBody,
    response=CreatedApiKey,
    status=201,
    role="admin",
)
async def create_api_key(call: ApiCall[CreateApiKeyBody, Any]) -> CreatedApiKey:
    principal = call.require_principal()
    body = call.body
    if body.expires_at is not None and body.expires_at <= datetime.now(UTC):
        raise Problem(422, "expires_in_past", "expires_at must be in the future.")
    key = generate_api_key()
    async with tenant_tx(call.state.pool, principal.tenant_id) as conn:
        row = await conn.fetchrow(
            f"""
            INSERT INTO api_keys (id, tenant_id, name, prefix, key_hash, role, created_by, expires_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            RETURNING {_KEY_COLUMNS}
            """,
            new_id(),
            principal.tenant_id,
            body.name,
            key.prefix,
            key.key_hash,
            body.role,
            principal.subject_id if principal.kind == "user" else None,
            body.expires_at,
        )
    assert row is not None
    return CreatedApiKey(key=key.plaintext, **dict(row))


@group(
    "GET", "/v1/api-keys", summary="List API keys (never the keys themselves)", response=ApiKeyList
)
async def list_api_keys(call: ApiCall[Any, Any]) -> ApiKeyList:
    async with tenant_tx(call.state.pool, call.tenant_id, readonly=True) as conn:
        rows = await conn.fetch(f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created_at DESC, id")
    return ApiKeyList(items=[ApiKey(**dict(r)) for r in rows])


@group(
    "DELETE",
    "/v1/api-keys/{id}",
    summary="Revoke an API key (it stops working at once)",
    status=204,
    role="admin",
    errors=[404],
)
async def revoke_api_key(call: ApiCall[Any, Any]) -> Response:
    async with tenant_tx(call.state.pool, call.tenant_id) as conn:
        found = await conn.fetchval(
            """
            UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
            WHERE id = $1 RETURNING id
            """,
            call.path["id"],
        )
    if found is None:
        raise Problem(404, "not_found", "No such API key.")
    return Response(status_code=204)
