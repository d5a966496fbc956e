"""Tenant API keys: shown once, listed by prefix, revocable, never logged."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from control_api.bootstrap import NewTenant
from tests.support.sessions import bearer, login
from tests.support.tenants import auth

LISTED_FIELDS = {
    "id",
    "name",
    "prefix",
    "role",
    "created_at",
    "last_used_at",
    "expires_at",
    "revoked_at",
}


async def test_create_list_use_revoke(
    http: httpx.AsyncClient,
    tenant: NewTenant,
    owner_conn: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    r = await http.post(
        "/v1/api-keys", json={"name": "billing server", "role": "viewer"}, headers=auth(tenant)
    )
    assert r.status_code == 201, r.text
    created = r.json()
    key = created["key"]
    assert key.startswith("vr_live_")
    assert key.startswith(created["prefix"])
    assert created["role"] == "viewer"

    r = await http.get("/v1/me", headers=bearer(key))
    assert r.status_code == 200
    assert r.json()["role"] == "viewer"

    listed = (await http.get("/v1/api-keys", headers=auth(tenant))).json()["items"]
    mine = next(k for k in listed if k["id"] == created["id"])
    assert set(mine) == LISTED_FIELDS
    assert mine["last_used_at"] is not None
    assert key not in r.text

    r = await http.delete(f"/v1/api-keys/{created['id']}", headers=auth(tenant))
    assert r.status_code == 204
    r = await http.get("/v1/me", headers=bearer(key))
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_credentials"
    listed = (await http.get("/v1/api-keys", headers=auth(tenant))).json()["items"]
    assert next(k for k in listed if k["id"] == created["id"])["revoked_at"] is not None
    # Revoking again is harmless.
    assert (
        await http.delete(f"/v1/api-keys/{created['id']}", headers=auth(tenant))
    ).status_code == 204

    # The plaintext was shown exactly once: never again in any response, the database or a log.
    for path in ("/v1/api-keys", f"/v1/users/{tenant.owner_id}", "/v1/me", "/v1/tenant"):
        assert key not in (await http.get(path, headers=auth(tenant))).text
    row = await owner_conn.fetchrow("SELECT * FROM api_keys WHERE id = $1::uuid", created["id"])
    assert key not in str(dict(row))
    assert caplog.records  # capture was live: the check below is not vacuous
    # Everything after the listed prefix (the secret itself may contain "_").
    secret_part = key.removeprefix(created["prefix"]).removeprefix("_")
    assert len(secret_part) >= 32
    assert secret_part not in caplog.text
    assert key not in caplog.text


async def test_last_used_is_not_written_on_every_request(
    http: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    assert (await http.get("/v1/me", headers=auth(tenant))).status_code == 200
    first = await owner_conn.fetchval(
        "SELECT last_used_at FROM api_keys WHERE id = $1", tenant.api_key_id
    )
    assert first is not None
    for _ in range(3):
        assert (await http.get("/v1/me", headers=auth(tenant))).status_code == 200
    again = await owner_conn.fetchval(
        "SELECT last_used_at FROM api_keys WHERE id = $1", tenant.api_key_id
    )
    assert again == first


async def test_expired_key_is_rejected(
    http: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    expires = datetime.now(UTC) + timedelta(days=1)
    r = await http.post(
        "/v1/api-keys",
        json={"name": "temp", "role": "admin", "expires_at": expires.isoformat()},
        headers=auth(tenant),
    )
    assert r.status_code == 201
    created = r.json()
    assert (await http.get("/v1/me", headers=bearer(created["key"]))).status_code == 200
    await owner_conn.execute(
        "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1::uuid",
        created["id"],
    )
    assert (await http.get("/v1/me", headers=bearer(created["key"]))).status_code == 401


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "role": "owner"},
        {"name": "", "role": "admin"},
        {"name": "x"},
        {"name": "x", "role": "admin", "expires_at": "2001-01-01T00:00:00Z"},
        {"name": "x", "role": "admin", "expires_at": "2999-01-01T00:00:00"},  # no zone
        {"name": "x", "role": "admin", "key_hash": "00"},
    ],
)
async def test_invalid_create_requests(
    http: httpx.AsyncClient, tenant: NewTenant, body: dict[str, str]
) -> None:
    r = await http.post("/v1/api-keys", json=body, headers=auth(tenant))
    assert r.status_code == 422, r.text


async def test_viewer_key_cannot_manage_keys(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    r = await http.post("/v1/api-keys", json={"name": "ro", "role": "viewer"}, headers=auth(tenant))
    viewer = bearer(r.json()["key"])
    assert (await http.get("/v1/api-keys", headers=viewer)).status_code == 200
    r = await http.post("/v1/api-keys", json={"name": "x", "role": "viewer"}, headers=viewer)
    assert r.status_code == 403
    r = await http.delete(f"/v1/api-keys/{tenant.api_key_id}", headers=viewer)
    assert r.status_code == 403


async def test_keys_created_by_a_user_record_the_creator(
    http: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    session = await login(http, tenant.owner_email, tenant.owner_password)
    r = await http.post(
        "/v1/api-keys",
        json={"name": "from dashboard", "role": "admin"},
        headers=bearer(session["access_token"]),
    )
    assert r.status_code == 201
    creator = await owner_conn.fetchval(
        "SELECT created_by FROM api_keys WHERE id = $1::uuid", r.json()["id"]
    )
    assert creator == tenant.owner_id


async def test_other_tenants_keys_are_out_of_reach(
    http: httpx.AsyncClient, tenant: NewTenant, other_tenant: NewTenant
) -> None:
    r = await http.delete(f"/v1/api-keys/{other_tenant.api_key_id}", headers=auth(tenant))
    assert r.status_code == 404
    assert (await http.get("/v1/me", headers=auth(other_tenant))).status_code == 200
    listed = (await http.get("/v1/api-keys", headers=auth(tenant))).json()["items"]
    assert [k["id"] for k in listed] == [str(tenant.api_key_id)]
