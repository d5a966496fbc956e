"""Endpoints: the caller's tenant and the settings its admins may change.

``max_concurrent_calls`` is a platform cap (what the tenant pays for), so it is read-only here and
changed only with `voicerelay tenant update`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from control_api.db import tenant_tx
from control_api.endpoints import ApiCall, ApiModel, EndpointGroup
from control_api.problems import Problem

group = EndpointGroup("tenant")

_TENANT_COLUMNS = (
    "id, name, slug, max_concurrent_calls, call_log_retention_days, created_at, updated_at"
)


class Tenant(BaseModel):
    id: uuid.UUID
    name: str
    slug: str
    max_concurrent_calls: int = Field(description="Platform cap; see `voicerelay tenant update`.")
    call_log_retention_days: int
    created_at: datetime
    updated_at: datetime


class UpdateTenantBody(ApiModel):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    call_log_retention_days: int | None = Field(default=None, ge=1, le=3650)


@group("GET", "/v1/tenant", summary="The caller's tenant", response=Tenant)
async def get_tenant(call: ApiCall[Any, Any]) -> Tenant:
    async with tenant_tx(call.state.pool, call.tenant_id, readonly=True) as conn:
        row = await conn.fetchrow(
            f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE id = $1", call.tenant_id
        )
    if row is None:  # the tenant was deleted while its credential was still in flight
        raise Problem(404, "not_found", "No such tenant.")
    return Tenant(**dict(row))


@group(
    "PATCH",
    "/v1/tenant",
    summary="Rename the tenant or change its call-log retention",
    body=UpdateTenantBody,
    response=Tenant,
    role="admin",
)
async def update_tenant(call: ApiCall[UpdateTenantBody, Any]) -> Tenant:
    body = call.body
    limit = call.state.settings.call_log_max_retention_days
    if body.call_log_retention_days is not None and body.call_log_retention_days > limit:
        raise Problem(
            422,
            "retention_too_long",
            f"call_log_retention_days may be at most {limit} on this platform.",
        )
    async with tenant_tx(call.state.pool, call.tenant_id) as conn:
        row = await conn.fetchrow(
            f"""
            UPDATE tenants SET
                name = coalesce($1, name),
                call_log_retention_days = coalesce($2, call_log_retention_days),
                updated_at = now()
            WHERE id = $3
            RETURNING {_TENANT_COLUMNS}
            """,
            body.name,
            body.call_log_retention_days,
            call.tenant_id,
        )
    if row is None:
        raise Problem(404, "not_found", "No such tenant.")
    return Tenant(**dict(row))
