"""Password login, logout (one session or everywhere) and /v1/me against the real server."""

from __future__ import annotations

import logging
import uuid

import asyncpg
import httpx
import pytest

from control_api.bootstrap import NewTenant
from tests.conftest import TestDatabase
from tests.support.secrets import assert_no_secret_in
from tests.support.sessions import bearer, login, login_response, refresh_response
from tests.support.tenants import auth, make_tenant


async def test_login_returns_tokens_and_user(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    body = await login(http, tenant.owner_email.upper(), tenant.owner_password)
    assert body["token_type"] == "Bearer"
    assert 0 < body["expires_in"] <= 900
    assert body["refresh_expires_in"] > 0
    assert body["user"] == {
        "id": str(tenant.owner_id),
        "email": tenant.owner_email,
        "role": "owner",
        "tenant_id": str(tenant.tenant_id),
        "must_change_password": False,
    }
    me = await http.get("/v1/me", headers=bearer(body["access_token"]))
    assert me.status_code == 200
    assert me.json()["kind"] == "user"
    assert me.json()["id"] == str(tenant.owner_id)
    assert me.json()["email"] == tenant.owner_email


async def test_me_with_api_key(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    r = await http.get("/v1/me", headers=auth(tenant))
    assert r.status_code == 200
    assert r.json()["kind"] == "api_key"
    assert r.json()["id"] == str(tenant.api_key_id)
    assert r.json()["role"] == "admin"
    assert r.json()["name"] == "bootstrap"


async def test_wrong_password_and_unknown_email_look_alike(
    http: httpx.AsyncClient, tenant: NewTenant
) -> None:
    wrong = await login_response(http, tenant.owner_email, "not-the-password")
    unknown = await login_response(http, f"nobody-{uuid.uuid4().hex}@example.com", "whatever")
    garbage = await login_response(http, "not an email", "whatever")
    for r in (wrong, unknown, garbage):
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "invalid_credentials"
    assert wrong.json()["detail"] == unknown.json()["detail"]


async def test_disabled_user_cannot_log_in(
    http: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    await owner_conn.execute("UPDATE users SET disabled_at = now() WHERE id = $1", tenant.owner_id)
    r = await login_response(http, tenant.owner_email, tenant.owner_password)
    assert r.status_code == 403
    assert r.json()["code"] == "account_disabled"
    # A wrong password still gets the generic answer: being disabled is no oracle.
    r = await login_response(http, tenant.owner_email, "wrong-password")
    assert r.json()["code"] == "invalid_credentials"


async def test_disabling_a_user_ends_their_access_tokens(
    http: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    session = await login(http, tenant.owner_email, tenant.owner_password)
    await owner_conn.execute("UPDATE users SET disabled_at = now() WHERE id = $1", tenant.owner_id)
    r = await http.get("/v1/me", headers=bearer(session["access_token"]))
    assert r.status_code == 401
    r = await refresh_response(http, session["refresh_token"])
    assert r.status_code == 401


async def test_same_credentials_in_two_tenants_need_the_slug(
    http: httpx.AsyncClient, database: TestDatabase
) -> None:
    email = f"shared-{uuid.uuid4().hex[:8]}@example.com"
    password = "correct horse battery staple"
    first = await make_tenant(database.owner_dsn, owner_email=email, password=password)
    second = await make_tenant(database.owner_dsn, owner_email=email, password=password)
    r = await login_response(http, email, password)
    assert r.status_code == 409
    assert r.json()["code"] == "tenant_required"
    assert sorted(r.json()["tenants"]) == sorted([first.slug, second.slug])
    body = await login(http, email, password, tenant=second.slug)
    assert body["user"]["tenant_id"] == str(second.tenant_id)
    r = await login_response(http, email, password, tenant="no-such-tenant")
    assert r.status_code == 401


async def test_logout_ends_the_session(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    session = await login(http, tenant.owner_email, tenant.owner_password)
    r = await http.post("/v1/auth/logout", json={"refresh_token": session["refresh_token"]})
    assert r.status_code == 204
    r = await refresh_response(http, session["refresh_token"])
    assert r.status_code == 401
    assert r.json()["code"] == "refresh_token_revoked"
    # Logout is idempotent and says nothing about unknown tokens.
    r = await http.post("/v1/auth/logout", json={"refresh_token": session["refresh_token"]})
    assert r.status_code == 204
    r = await http.post("/v1/auth/logout", json={"refresh_token": "never-issued"})
    assert r.status_code == 204


async def test_logout_keeps_other_sessions(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    laptop = await login(http, tenant.owner_email, tenant.owner_password)
    phone = await login(http, tenant.owner_email, tenant.owner_password)
    await http.post("/v1/auth/logout", json={"refresh_token": laptop["refresh_token"]})
    r = await refresh_response(http, phone["refresh_token"])
    assert r.status_code == 200
    assert (await http.get("/v1/me", headers=bearer(laptop["access_token"]))).status_code == 200


async def test_logout_everywhere_ends_all_sessions_and_access_tokens(
    http: httpx.AsyncClient, tenant: NewTenant
) -> None:
    laptop = await login(http, tenant.owner_email, tenant.owner_password)
    phone = await login(http, tenant.owner_email, tenant.owner_password)
    r = await http.post(
        "/v1/auth/logout", json={"refresh_token": laptop["refresh_token"], "everywhere": True}
    )
    assert r.status_code == 204
    for session in (laptop, phone):
        r = await http.get("/v1/me", headers=bearer(session["access_token"]))
        assert r.status_code == 401
        assert r.json()["code"] == "token_revoked"
        r = await refresh_response(http, session["refresh_token"])
        assert r.status_code == 401
    # Signing in again right away works: the cut-off is not rounded to whole seconds.
    fresh = await login(http, tenant.owner_email, tenant.owner_password)
    assert (await http.get("/v1/me", headers=bearer(fresh["access_token"]))).status_code == 200


async def test_login_body_is_validated(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/auth/login", json={"email": "a@example.com"})
    assert r.status_code == 422
    r = await http.post(
        "/v1/auth/login", json={"email": "a@example.com", "password": "x", "extra": 1}
    )
    assert r.status_code == 422
    r = await http.post(
        "/v1/auth/login", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400


async def test_missing_or_malformed_bearer(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/me")
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = await http.get("/v1/me", headers=bearer("vr_live_deadbeef_" + "x" * 43))
    assert r.status_code == 401
    r = await http.get("/v1/me", headers=bearer("not.a.jwt"))
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_token"


async def test_passwords_are_stored_as_argon2id_hashes(
    tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    stored = await owner_conn.fetchval(
        "SELECT password_hash FROM users WHERE id = $1", tenant.owner_id
    )
    assert stored.startswith("$argon2id$")
    assert tenant.owner_password not in stored


async def test_passwords_and_tokens_never_appear_in_logs(
    http: httpx.AsyncClient, tenant: NewTenant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong, new = "wrong-" + uuid.uuid4().hex, "new-passphrase-" + uuid.uuid4().hex
    bodies: list[str] = []
    r = await login_response(http, tenant.owner_email, wrong)
    assert r.status_code == 401
    bodies.append(r.text)
    first = await login(http, tenant.owner_email, tenant.owner_password)
    r = await refresh_response(http, first["refresh_token"])
    assert r.status_code == 200
    second = r.json()
    r = await http.post(
        "/v1/users/me/password",
        json={"current_password": tenant.owner_password, "new_password": new},
        headers=bearer(second["access_token"]),
    )
    assert r.status_code == 200, r.text
    bodies.append(r.text)
    third = r.json()
    # Reuse of a rotated refresh token: the family is revoked (and that is logged).
    r = await refresh_response(http, first["refresh_token"])
    assert r.status_code == 401
    bodies.append(r.text)
    r = await http.post(
        "/v1/auth/logout",
        json={"refresh_token": third["refresh_token"]},
        headers=bearer(third["access_token"]),
    )
    assert r.status_code in (200, 204), r.text

    passwords = [wrong, new, tenant.owner_password]
    tokens = [s[k] for s in (first, second, third) for k in ("access_token", "refresh_token")]
    # Tokens are in the responses that issue them, by design; passwords are in none.
    assert_no_secret_in(bodies, caplog.records, passwords)
    assert_no_secret_in([], caplog.records, tokens)
