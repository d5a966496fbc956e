"""Creates tenants through the real bootstrap path for tests."""

from __future__ import annotations

import uuid

from control_api.bootstrap import NewTenant, create_tenant


async def make_tenant(owner_dsn: str, **overrides: object) -> NewTenant:
    suffix = uuid.uuid4().hex[:8]
    kwargs: dict[str, object] = {
        "name": f"Tenant {suffix}",
        "owner_email": f"owner-{suffix}@example.com",
    }
    kwargs.update(overrides)
    return await create_tenant(owner_dsn, **kwargs)  # type: ignore[arg-type]


def auth(tenant: NewTenant) -> dict[str, str]:
    return {"authorization": f"Bearer {tenant.api_key}"}
