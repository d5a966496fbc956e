"""A one-time password (the owner's from `tenant create`, a new user's) buys nothing but
choosing a new password: every other endpoint answers 403 ``password_change_required``."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import jwt
import pytest

from control_api.bootstrap import NewTenant
from control_api.routes import all_endpoints
from control_api.security.password_change import CHANGE_PASSWORD_PATH
from tests.conftest import TestDatabase
from tests.support.sessions import bearer, login, refresh_response
from tests.support.tenants import auth, make_tenant

NEW_PASSWORD = "a brand new passphrase"


@pytest.fixture
async def fresh_tenant(database: TestDatabase) -> NewTenant:
    """As `voicerelay tenant create` leaves it: the owner holds a one-time password."""
    return await make_tenant(database.owner_dsn, owner_must_change_password=True)


def _assert_change_required(r: httpx.Response) -> None:
    assert r.status_code == 403, r.text
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["code"] == "password_change_required"
    assert CHANGE_PASSWORD_PATH in problem["detail"]


def _concrete(path: str, tenant: NewTenant) -> str:
    # Any well-formed id will do: the refusal comes before the resource is looked up.
    return path.replace("{id}", str(tenant.owner_id)).replace("{call_id}", str(tenant.owner_id))


def _authenticated_endpoints() -> list[tuple[str, str]]:
    return sorted(
        (e.method, e.path)
        for e in all_endpoints()
        if e.auth and not e.before_password_change and "{" not in e.path.replace("{id}", "")
    )


async def test_login_reports_the_flag_in_the_response_and_the_token(
    http: httpx.AsyncClient, fresh_tenant: NewTenant
) -> None:
    session = await login(http, fresh_tenant.owner_email, fresh_tenant.owner_password)
    assert session["user"]["must_change_password"] is True
    claims = jwt.decode(session["access_token"], options={"verify_signature": False})
    assert claims["must_change_password"] is True


async def test_every_other_endpoint_refuses_a_one_time_password(
    http: httpx.AsyncClient, fresh_tenant: NewTenant
) -> None:
    session = await login(http, fresh_tenant.owner_email, fresh_tenant.owner_password)
    headers = bearer(session["access_token"])
    endpoints = _authenticated_endpoints()
    assert ("GET", "/v1/me") in endpoints
    assert ("POST", "/v1/calls") in endpoints
    for method, path in endpoints:
        body: Any = {} if method in {"POST", "PATCH", "PUT"} else None
        r = await http.request(method, _concrete(path, fresh_tenant), json=body, headers=headers)
        _assert_change_required(r)
    # A refreshed session is restricted just the same.
    r = await refresh_response(http, session["refresh_token"])
    assert r.status_code == 200
    assert r.json()["user"]["must_change_password"] is True
    _assert_change_required(await http.get("/v1/me", headers=bearer(r.json()["access_token"])))


async def test_changing_the_password_lifts_the_restriction(
    http: httpx.AsyncClient, fresh_tenant: NewTenant
) -> None:
    session = await login(http, fresh_tenant.owner_email, fresh_tenant.owner_password)
    r = await http.post(
        CHANGE_PASSWORD_PATH,
        json={"current_password": fresh_tenant.owner_password, "new_password": NEW_PASSWORD},
        headers=bearer(session["access_token"]),
    )
    assert r.status_code == 200, r.text
    changed = r.json()
    assert changed["user"]["must_change_password"] is False
    me = await http.get("/v1/me", headers=bearer(changed["access_token"]))
    assert me.status_code == 200
    assert me.json()["must_change_password"] is False
    assert (
        await http.get("/v1/agents", headers=bearer(changed["access_token"]))
    ).status_code == 200
    # The restricted login's tokens died with the change.
    assert (await http.get("/v1/me", headers=bearer(session["access_token"]))).status_code == 401
    again = await login(http, fresh_tenant.owner_email, NEW_PASSWORD)
    assert again["user"]["must_change_password"] is False


async def test_logout_works_before_the_password_is_changed(
    http: httpx.AsyncClient, fresh_tenant: NewTenant
) -> None:
    session = await login(http, fresh_tenant.owner_email, fresh_tenant.owner_password)
    r = await http.post("/v1/auth/logout", json={"refresh_token": session["refresh_token"]})
    assert r.status_code == 204
    r = await refresh_response(http, session["refresh_token"])
    assert r.status_code == 401


async def test_a_user_added_by_an_admin_must_change_their_password(
    http: httpx.AsyncClient, tenant: NewTenant
) -> None:
    created = await http.post(
        "/v1/users", json={"email": "new-admin@example.com", "role": "admin"}, headers=auth(tenant)
    )
    assert created.status_code == 201, created.text
    user = created.json()
    session = await login(http, user["email"], user["password"])
    _assert_change_required(await http.get("/v1/users", headers=bearer(session["access_token"])))
    r = await http.post(
        CHANGE_PASSWORD_PATH,
        json={"current_password": user["password"], "new_password": NEW_PASSWORD},
        headers=bearer(session["access_token"]),
    )
    assert r.status_code == 200, r.text
    assert (
        await http.get("/v1/users", headers=bearer(r.json()["access_token"]))
    ).status_code == 200


async def test_the_flag_set_after_sign_in_applies_at_once(
    http: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    # An unrestricted token whose user is later required to change their password.
    session = await login(http, tenant.owner_email, tenant.owner_password)
    headers = bearer(session["access_token"])
    assert (await http.get("/v1/me", headers=headers)).status_code == 200
    await owner_conn.execute(
        "UPDATE users SET must_change_password = true WHERE id = $1", tenant.owner_id
    )
    _assert_change_required(await http.get("/v1/me", headers=headers))


async def test_api_keys_are_never_restricted(
    http: httpx.AsyncClient, fresh_tenant: NewTenant
) -> None:
    for path in ("/v1/me", "/v1/agents", "/v1/users"):
        assert (await http.get(path, headers=auth(fresh_tenant))).status_code == 200
    r = await http.post(
        CHANGE_PASSWORD_PATH,
        json={"current_password": "whatever-it-is", "new_password": NEW_PASSWORD},
        headers=auth(fresh_tenant),
    )
    assert r.status_code == 403
    assert r.json()["code"] == "not_a_user"
