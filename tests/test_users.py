"""People of a tenant: roles, owner protection, viewers read-only, password change."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from control_api.bootstrap import NewTenant
from tests.support.sessions import bearer, first_sign_in, login, login_response, refresh_response
from tests.support.tenants import auth


async def _owner(http: httpx.AsyncClient, tenant: NewTenant) -> dict[str, str]:
    session = await login(http, tenant.owner_email, tenant.owner_password)
    return bearer(session["access_token"])


async def _add_user(
    http: httpx.AsyncClient, headers: dict[str, str], email: str, role: str
) -> dict[str, Any]:
    r = await http.post("/v1/users", json={"email": email, "role": role}, headers=headers)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def _session_of(http: httpx.AsyncClient, user: dict[str, Any]) -> dict[str, str]:
    session = await first_sign_in(http, user["email"], user["password"])
    return bearer(session["access_token"])


async def test_create_list_get_user(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    owner = await _owner(http, tenant)
    created = await _add_user(http, owner, "  Ada.Lovelace@Example.COM ", "admin")
    assert created["email"] == "ada.lovelace@example.com"
    assert created["role"] == "admin"
    assert created["must_change_password"] is True
    assert len(created["password"]) >= 16
    listed = (await http.get("/v1/users", headers=owner)).json()["items"]
    assert {u["email"] for u in listed} == {tenant.owner_email, "ada.lovelace@example.com"}
    assert all("password" not in u and "password_hash" not in u for u in listed)
    one = await http.get(f"/v1/users/{created['id']}", headers=owner)
    assert one.status_code == 200
    assert "password" not in one.json()
    # The one-time password works, once, for signing in.
    session = await login(http, created["email"], created["password"])
    assert session["user"]["must_change_password"] is True


@pytest.mark.parametrize(
    "email", ["no-at-sign", "a@b", "two@@example.com", "sp ace@example.com", ""]
)
async def test_invalid_emails_are_rejected(
    http: httpx.AsyncClient, tenant: NewTenant, email: str
) -> None:
    r = await http.post("/v1/users", json={"email": email, "role": "viewer"}, headers=auth(tenant))
    assert r.status_code == 422


async def test_duplicate_email_conflicts(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    r = await http.post(
        "/v1/users",
        json={"email": tenant.owner_email.upper(), "role": "viewer"},
        headers=auth(tenant),
    )
    assert r.status_code == 409
    assert r.json()["code"] == "email_taken"


async def test_only_owners_make_owners(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    owner = await _owner(http, tenant)
    admin_user = await _add_user(http, owner, "admin@example.com", "admin")
    admin = await _session_of(http, admin_user)
    for headers in (admin, auth(tenant)):  # an admin user and an admin API key
        r = await http.post(
            "/v1/users", json={"email": "boss@example.com", "role": "owner"}, headers=headers
        )
        assert r.status_code == 403
    viewer_user = await _add_user(http, admin, "viewer@example.com", "viewer")
    r = await http.patch(f"/v1/users/{viewer_user['id']}", json={"role": "owner"}, headers=admin)
    assert r.status_code == 403
    # Admins cannot touch an owner either.
    r = await http.patch(f"/v1/users/{tenant.owner_id}", json={"role": "viewer"}, headers=admin)
    assert r.status_code == 403
    r = await http.delete(f"/v1/users/{tenant.owner_id}", headers=admin)
    assert r.status_code == 403
    # An owner can promote.
    r = await http.patch(f"/v1/users/{viewer_user['id']}", json={"role": "owner"}, headers=owner)
    assert r.status_code == 200
    assert r.json()["role"] == "owner"


async def test_last_owner_is_protected(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    owner = await _owner(http, tenant)
    me = f"/v1/users/{tenant.owner_id}"
    for change in ({"role": "admin"}, {"disabled": True}):
        r = await http.patch(me, json=change, headers=owner)
        assert r.status_code == 409
        assert r.json()["code"] == "last_owner"
    r = await http.delete(me, headers=owner)
    assert r.status_code == 409
    second = await _add_user(http, owner, "second-owner@example.com", "owner")
    r = await http.patch(me, json={"role": "admin"}, headers=owner)
    assert r.status_code == 200
    # The old owner's token now carries admin rights only, straight away.
    r = await http.delete(f"/v1/users/{second['id']}", headers=owner)
    assert r.status_code == 403
    new_owner = await _session_of(http, second)
    r = await http.delete(f"/v1/users/{second['id']}", headers=new_owner)
    assert r.status_code == 409


async def test_disable_and_enable_user(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    owner = await _owner(http, tenant)
    user = await _add_user(http, owner, "temp@example.com", "viewer")
    session = await login(http, user["email"], user["password"])
    r = await http.patch(f"/v1/users/{user['id']}", json={"disabled": True}, headers=owner)
    assert r.status_code == 200
    assert r.json()["disabled"] is True
    assert (await http.get("/v1/me", headers=bearer(session["access_token"]))).status_code == 401
    r = await refresh_response(http, session["refresh_token"])
    assert r.status_code == 401
    assert (await login_response(http, user["email"], user["password"])).status_code == 403
    r = await http.patch(f"/v1/users/{user['id']}", json={"disabled": False}, headers=owner)
    assert r.json()["disabled"] is False
    assert (await login_response(http, user["email"], user["password"])).status_code == 200


async def test_delete_user(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    owner = await _owner(http, tenant)
    user = await _add_user(http, owner, "leaver@example.com", "admin")
    session = await _session_of(http, user)
    assert (await http.delete(f"/v1/users/{user['id']}", headers=owner)).status_code == 204
    assert (await http.get(f"/v1/users/{user['id']}", headers=owner)).status_code == 404
    assert (await http.get("/v1/me", headers=session)).status_code == 401
    assert (await http.delete(f"/v1/users/{user['id']}", headers=owner)).status_code == 404


async def test_viewer_is_read_only(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    owner = await _owner(http, tenant)
    viewer = await _session_of(http, await _add_user(http, owner, "look@example.com", "viewer"))
    for method, path in (("GET", "/v1/users"), ("GET", "/v1/api-keys"), ("GET", "/v1/tenant")):
        assert (await http.request(method, path, headers=viewer)).status_code == 200
    writes: list[tuple[str, str, dict[str, Any] | None]] = [
        ("POST", "/v1/users", {"email": "x@example.com", "role": "viewer"}),
        ("PATCH", f"/v1/users/{tenant.owner_id}", {"disabled": True}),
        ("DELETE", f"/v1/users/{tenant.owner_id}", None),
        ("POST", "/v1/api-keys", {"name": "k", "role": "viewer"}),
        ("DELETE", f"/v1/api-keys/{tenant.api_key_id}", None),
        ("PATCH", "/v1/tenant", {"name": "renamed"}),
    ]
    for method, path, body in writes:
        r = await http.request(method, path, json=body, headers=viewer)
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["code"] == "forbidden"


async def test_users_of_other_tenants_are_invisible(
    http: httpx.AsyncClient, tenant: NewTenant, other_tenant: NewTenant
) -> None:
    path = f"/v1/users/{other_tenant.owner_id}"
    assert (await http.get(path, headers=auth(tenant))).status_code == 404
    assert (
        await http.patch(path, json={"role": "viewer"}, headers=auth(tenant))
    ).status_code == 404
    assert (await http.delete(path, headers=auth(tenant))).status_code == 404
    listed = (await http.get("/v1/users", headers=auth(tenant))).json()["items"]
    assert [u["id"] for u in listed] == [str(tenant.owner_id)]


async def test_change_password(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    first = await login(http, tenant.owner_email, tenant.owner_password)
    other = await login(http, tenant.owner_email, tenant.owner_password)
    new_password = "a much better passphrase"
    r = await http.post(
        "/v1/users/me/password",
        json={"current_password": tenant.owner_password, "new_password": new_password},
        headers=bearer(first["access_token"]),
    )
    assert r.status_code == 200, r.text
    fresh = r.json()
    assert fresh["user"]["must_change_password"] is False
    # Every earlier session and access token has ended; the fresh one works.
    for session in (first, other):
        assert (
            await http.get("/v1/me", headers=bearer(session["access_token"]))
        ).status_code == 401
        r = await refresh_response(http, session["refresh_token"])
        assert r.status_code == 401
    assert (await http.get("/v1/me", headers=bearer(fresh["access_token"]))).status_code == 200
    assert (
        await login_response(http, tenant.owner_email, tenant.owner_password)
    ).status_code == 401
    assert (await login_response(http, tenant.owner_email, new_password)).status_code == 200


async def test_change_password_rules(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    headers = await _owner(http, tenant)
    url = "/v1/users/me/password"
    r = await http.post(
        url,
        json={"current_password": tenant.owner_password, "new_password": "short"},
        headers=headers,
    )
    assert r.status_code == 422
    r = await http.post(
        url,
        json={"current_password": "wrong password!", "new_password": "long enough pass"},
        headers=headers,
    )
    assert r.status_code == 403
    assert r.json()["code"] == "wrong_password"
    r = await http.post(
        url,
        json={"current_password": "x", "new_password": "long enough pass"},
        headers=auth(tenant),
    )
    assert r.status_code == 403
    assert r.json()["code"] == "not_a_user"
