"""Platform bootstrap: create a tenant with its owner and a first API key (`voicerelay tenant create`).

Runs as the schema owner (MIGRATION_DATABASE_URL): creating tenants is a platform operation that
no tenant's credentials can perform.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

import asyncpg
import uuid_utils

from control_api.security.api_keys import generate_api_key
from control_api.security.passwords import generate_password, hash_password_async

_SLUG = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True)
class NewTenant:
    tenant_id: uuid.UUID
    slug: str
    owner_id: uuid.UUID
    owner_email: str
    owner_password: str
    api_key_id: uuid.UUID
    api_key: str


def new_id() -> uuid.UUID:
    """Time-ordered UUIDv7: index-friendly and sortable by creation."""
    return uuid.UUID(str(uuid_utils.uuid7()))


def slugify(name: str) -> str:
    slug = _SLUG.sub("-", name.lower()).strip("-")[:48] or "tenant"
    return slug if len(slug) >= 2 else f"{slug}-t"


async def create_tenant(
    owner_dsn: str,
    *,
    name: str,
    owner_email: str,
    slug: str | None = None,
    max_concurrent_calls: int = 10,
    call_log_retention_days: int = 90,
    password: str | None = None,
) -> NewTenant:
    tenant_id, owner_id, key_id = new_id(), new_id(), new_id()
    password = password or generate_password()
    password_hash = await hash_password_async(password)
    key = generate_api_key()
    slug = slug or f"{slugify(name)}-{tenant_id.hex[-6:]}"
    conn = await asyncpg.connect(owner_dsn, statement_cache_size=0)
    try:
        async with conn.transaction():
            # Satisfies the tenant policy even for an owner role that is itself subject to RLS.
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(tenant_id))
            await conn.execute(
                "INSERT INTO tenants (id, name, slug, max_concurrent_calls, call_log_retention_days)"
                " VALUES ($1, $2, $3, $4, $5)",
                tenant_id,
                name,
                slug,
                max_concurrent_calls,
                call_log_retention_days,
            )
            await conn.execute(
                "INSERT INTO users (id, tenant_id, email, password_hash, role, must_change_password)"
                " VALUES ($1, $2, $3, $4, 'owner', true)",
                owner_id,
                tenant_id,
                owner_email.strip().lower(),
                password_hash,
            )
            await conn.execute(
                "INSERT INTO api_keys (id, tenant_id, name, prefix, key_hash, role, created_by)"
                " VALUES ($1, $2, 'bootstrap', $3, $4, 'admin', $5)",
                key_id,
                tenant_id,
                key.prefix,
                key.key_hash,
                owner_id,
            )
    finally:
        await conn.close()
    return NewTenant(
        tenant_id=tenant_id,
        slug=slug,
        owner_id=owner_id,
        owner_email=owner_email.strip().lower(),
        owner_password=password,
        api_key_id=key_id,
        api_key=key.plaintext,
    )


@dataclass(frozen=True)
class TenantCaps:
    tenant_id: uuid.UUID
    slug: str
    max_concurrent_calls: int
    call_log_retention_days: int


async def update_tenant_caps(
    owner_dsn: str,
    *,
    slug: str,
    max_concurrent_calls: int | None = None,
    call_log_retention_days: int | None = None,
) -> TenantCaps | None:
    """Change a tenant's platform caps; None when no tenant has that slug."""
    conn = await asyncpg.connect(owner_dsn, statement_cache_size=0)
    try:
        row = await conn.fetchrow(
            """
            UPDATE tenants SET
                max_concurrent_calls = coalesce($2, max_concurrent_calls),
                call_log_retention_days = coalesce($3, call_log_retention_days),
                updated_at = now()
            WHERE slug = $1
            RETURNING id, slug, max_concurrent_calls, call_log_retention_days
            """,
            slug,
            max_concurrent_calls,
            call_log_retention_days,
        )
    finally:
        await conn.close()
    if row is None:
        return None
    return TenantCaps(
        tenant_id=row["id"],
        slug=row["slug"],
        max_concurrent_calls=row["max_concurrent_calls"],
        call_log_retention_days=row["call_log_retention_days"],
    )
