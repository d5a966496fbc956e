"""Platform bootstrap and API-key authentication."""

from __future__ import annotations

import httpx

from control_api.bootstrap import NewTenant
from tests.support.tenants import auth


async def test_api_key_authenticates(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    # Any authenticated endpoint: the JWKS is public, so use a tenant one once it exists.
    r = await http.get("/health", headers=auth(tenant))
    assert r.status_code == 200
