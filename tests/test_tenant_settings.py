"""The caller's tenant: read by anyone in it, renamed and retention changed by admins only."""

from __future__ import annotations

import httpx

from control_api.bootstrap import NewTenant
from tests.support.sessions import bearer
from tests.support.tenants import auth


async def test_get_tenant(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    r = await http.get("/v1/tenant", headers=auth(tenant))
    assert r.status_code == 200
    body = r.json()
    assert body["id"] == str(tenant.tenant_id)
    assert body["slug"] == tenant.slug
    assert body["max_concurrent_calls"] == 10
    assert body["call_log_retention_days"] == 90
    assert body["name"].startswith("Tenant ")


async def test_admin_updates_name_and_retention(
    http: httpx.AsyncClient, tenant: NewTenant, other_tenant: NewTenant
) -> None:
    r = await http.patch(
        "/v1/tenant",
        json={"name": "Acme Voice", "call_log_retention_days": 30},
        headers=auth(tenant),
    )
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "Acme Voice"
    assert r.json()["call_log_retention_days"] == 30
    r = await http.patch("/v1/tenant", json={"name": "Acme"}, headers=auth(tenant))
    assert r.json()["call_log_retention_days"] == 30  # untouched fields stay
    other = (await http.get("/v1/tenant", headers=auth(other_tenant))).json()
    assert other["name"] != "Acme"
    assert other["call_log_retention_days"] == 90


async def test_platform_caps_are_not_settable(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    for body in (
        {"max_concurrent_calls": 1000},
        {"slug": "taken-over"},
        {"id": "00000000-0000-0000-0000-000000000000"},
    ):
        r = await http.patch("/v1/tenant", json=body, headers=auth(tenant))
        assert r.status_code == 422, body
    assert (await http.get("/v1/tenant", headers=auth(tenant))).json()["max_concurrent_calls"] == 10


async def test_retention_bounds(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    for days in (0, -1, 401, 100_000):
        r = await http.patch(
            "/v1/tenant", json={"call_log_retention_days": days}, headers=auth(tenant)
        )
        assert r.status_code == 422, days
    r = await http.patch("/v1/tenant", json={"name": ""}, headers=auth(tenant))
    assert r.status_code == 422


async def test_viewer_cannot_update(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    r = await http.post("/v1/api-keys", json={"name": "ro", "role": "viewer"}, headers=auth(tenant))
    viewer = bearer(r.json()["key"])
    assert (await http.get("/v1/tenant", headers=viewer)).status_code == 200
    r = await http.patch("/v1/tenant", json={"name": "mine now"}, headers=viewer)
    assert r.status_code == 403
