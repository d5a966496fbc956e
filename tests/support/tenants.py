"""Creates tenants through the real bootstrap path for tests."""

from __future__ import annotations

import uuid

import asyncpg

from control_api.bootstrap import NewTenant, create_tenant


async def make_tenant(
    owner_dsn: str, *, owner_must_change_password: bool = False, **overrides: object
) -> NewTenant:
    """A tenant whose owner has already replaced the one-time password (so the owner's tokens
    work everywhere), unless ``owner_must_change_password``, as `tenant create` leaves it."""
    suffix = uuid.uuid4().hex[:8]
    kwargs: dict[str, object] = {
        "name": f"Tenant {suffix}",
        "owner_email": f"owner-{suffix}@example.com",
    }
    kwargs.update(overrides)
    tenant = await create_tenant(owner_dsn, **kwargs)  # type: ignore[arg-type]
    if not owner_must_change_password:
        conn = await asyncpg.connect(owner_dsn)
        try:
            async with conn.transaction():
                await conn.execute(
                    "SELECT set_config('app.tenant_id', $1, true)", str(tenant.tenant_id)
                )
                await conn.execute(
                    "UPDATE users SET must_change_password = false WHERE id = $1", tenant.owner_id
                )
        finally:
            await conn.close()
    return tenant


def auth(tenant: NewTenant) -> dict[str, str]:
    return {"authorization": f"Bearer {tenant.api_key}"}
