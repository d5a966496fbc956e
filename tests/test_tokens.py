"""Access-token verification (forgeries, rotation) and refresh-token rotation with reuse detection."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
import uuid
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import SecretStr

from control_api.app import create_app
from control_api.bootstrap import NewTenant
from control_api.problems import Problem
from control_api.security.access_tokens import verify_access_token
from control_api.security.signing import SigningKeyring
from tests.conftest import TestDatabase
from tests.support.servers import serve
from tests.support.sessions import bearer, login, refresh_response
from tests.support.tenants import make_tenant
from voicerelay.settings import Settings


def _claims(settings: Settings, tenant: NewTenant, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.jwt_issuer,
        "aud": settings.access_token_audience,
        "sub": str(tenant.owner_id),
        "tid": str(tenant.tenant_id),
        "role": "owner",
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def _server_keyring(settings: Settings) -> SigningKeyring:
    return SigningKeyring(settings.signing_keyring())


def _seed() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


async def _me(http: httpx.AsyncClient, token: str) -> httpx.Response:
    return await http.get("/v1/me", headers=bearer(token))


# --- access tokens ----------------------------------------------------------------------------


async def test_a_well_formed_token_is_accepted(
    http: httpx.AsyncClient, settings: Settings, tenant: NewTenant
) -> None:
    token = _server_keyring(settings).sign(_claims(settings, tenant), typ="at+jwt")
    r = await _me(http, token)
    assert r.status_code == 200, r.text


async def test_issued_token_shape(
    http: httpx.AsyncClient, settings: Settings, tenant: NewTenant
) -> None:
    session = await login(http, tenant.owner_email, tenant.owner_password)
    header = jwt.get_unverified_header(session["access_token"])
    assert header == {"alg": "EdDSA", "typ": "at+jwt", "kid": "test-sig-1"}
    claims = jwt.decode(session["access_token"], options={"verify_signature": False})
    assert set(claims) == {"iss", "aud", "sub", "tid", "role", "iat", "exp", "jti"}
    assert claims["tid"] == str(tenant.tenant_id)
    assert claims["exp"] - claims["iat"] <= 900


def _forgeries(settings: Settings, tenant: NewTenant) -> dict[str, str]:
    ring = _server_keyring(settings)
    kid = ring.active.kid
    claims = _claims(settings, tenant)
    public_raw = ring.active.public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    public_pem = ring.active.public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    stranger = SigningKeyring([("test-sig-1", os.urandom(32))])  # same kid, different key
    valid = ring.sign(claims, typ="at+jwt")
    head, payload, signature = valid.split(".")
    swapped = dict(claims, role="owner", tid=str(uuid.uuid4()))
    swapped_payload = base64.urlsafe_b64encode(json.dumps(swapped).encode()).decode()
    return {
        "alg_none": jwt.encode(
            claims, None, algorithm="none", headers={"kid": kid, "typ": "at+jwt"}
        ),
        "hs256_public_raw": jwt.encode(
            claims, public_raw, algorithm="HS256", headers={"kid": kid, "typ": "at+jwt"}
        ),
        "hs256_public_pem": _hmac_token(claims, public_pem, kid),
        "wrong_iss": ring.sign(_claims(settings, tenant, iss="https://evil.example"), typ="at+jwt"),
        "wrong_aud": ring.sign(
            _claims(settings, tenant, aud=settings.relay_token_audience), typ="at+jwt"
        ),
        "list_aud": ring.sign(
            _claims(settings, tenant, aud=[settings.access_token_audience, "other"]), typ="at+jwt"
        ),
        "call_token_typ": ring.sign(claims, typ="call+jwt"),
        "plain_jwt_typ": ring.sign(claims, typ="JWT"),
        "unknown_kid": SigningKeyring([("retired-key", os.urandom(32))]).sign(claims, typ="at+jwt"),
        "wrong_key_same_kid": stranger.sign(claims, typ="at+jwt"),
        "expired": ring.sign(
            _claims(settings, tenant, iat=int(time.time()) - 1000, exp=int(time.time()) - 60),
            typ="at+jwt",
        ),
        "issued_in_future": ring.sign(
            _claims(settings, tenant, iat=int(time.time()) + 600), typ="at+jwt"
        ),
        "missing_exp": ring.sign(_claims(settings, tenant, exp=None), typ="at+jwt"),
        "missing_iat": ring.sign(_claims(settings, tenant, iat=None), typ="at+jwt"),
        "missing_tid": ring.sign(_claims(settings, tenant, tid=None), typ="at+jwt"),
        "missing_jti": ring.sign(_claims(settings, tenant, jti=None), typ="at+jwt"),
        "bad_role": ring.sign(_claims(settings, tenant, role="superuser"), typ="at+jwt"),
        "bad_sub": ring.sign(_claims(settings, tenant, sub="not-a-uuid"), typ="at+jwt"),
        "tampered_payload": f"{head}.{swapped_payload.rstrip('=')}.{signature}",
        "garbage": "eyJhbGciOiJFZERTQSJ9.e30.",
    }


def _hmac_token(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    # pyjwt refuses PEM-looking HMAC secrets, so build the HS256 token by hand.
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    header = b64(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": kid}).encode())
    body = b64(json.dumps(claims).encode())
    mac = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(mac)}"


FORGERY_NAMES = [
    "alg_none",
    "hs256_public_raw",
    "hs256_public_pem",
    "wrong_iss",
    "wrong_aud",
    "list_aud",
    "call_token_typ",
    "plain_jwt_typ",
    "unknown_kid",
    "wrong_key_same_kid",
    "expired",
    "issued_in_future",
    "missing_exp",
    "missing_iat",
    "missing_tid",
    "missing_jti",
    "bad_role",
    "bad_sub",
    "tampered_payload",
    "garbage",
]


@pytest.fixture(scope="module")
async def victim(database: TestDatabase) -> NewTenant:
    # One tenant for all forgeries: they only read, and each hashing of a password costs time.
    return await make_tenant(database.owner_dsn)


@pytest.mark.parametrize("name", FORGERY_NAMES)
async def test_forged_or_wrong_tokens_are_rejected(
    http: httpx.AsyncClient, settings: Settings, victim: NewTenant, name: str
) -> None:
    token = _forgeries(settings, victim)[name]
    r = await _me(http, token)
    assert r.status_code == 401, (name, r.text)
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == ("token_expired" if name == "expired" else "invalid_token")
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_every_forgery_is_covered(settings: Settings) -> None:
    fake = NewTenant(uuid.uuid4(), "x", uuid.uuid4(), "a@b.c", "p", uuid.uuid4(), "k")
    assert set(_forgeries(settings, fake)) == set(FORGERY_NAMES)


async def test_token_for_another_tenant_finds_no_user(
    http: httpx.AsyncClient, settings: Settings, tenant: NewTenant, other_tenant: NewTenant
) -> None:
    # Correctly signed, but naming a user of one tenant inside another: RLS finds nobody.
    token = _server_keyring(settings).sign(
        _claims(settings, tenant, tid=str(other_tenant.tenant_id)), typ="at+jwt"
    )
    r = await _me(http, token)
    assert r.status_code == 401


async def test_role_comes_from_the_database_not_the_token(
    http: httpx.AsyncClient, settings: Settings, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    await owner_conn.execute("UPDATE users SET role = 'viewer' WHERE id = $1", tenant.owner_id)
    token = _server_keyring(settings).sign(_claims(settings, tenant, role="owner"), typ="at+jwt")
    r = await _me(http, token)
    assert r.json()["role"] == "viewer"
    r = await http.post("/v1/api-keys", json={"name": "x", "role": "admin"}, headers=bearer(token))
    assert r.status_code == 403


async def test_key_rotation_old_tokens_still_verify(
    http: httpx.AsyncClient, settings: Settings, tenant: NewTenant
) -> None:
    session = await login(http, tenant.owner_email, tenant.owner_password)
    old_token = session["access_token"]
    old_ring = settings.require("signing_keys")
    rotated = settings.model_copy(
        update={"signing_keys": SecretStr(f"test-sig-2:{_seed()},{old_ring}")}
    )

    # Pure check: a keyring with a new key in front still verifies the old key's tokens.
    ring = SigningKeyring(rotated.signing_keyring())
    assert ring.active.kid == "test-sig-2"
    claims = verify_access_token(ring, rotated, old_token)
    assert claims.user_id == tenant.owner_id

    # End to end: a replica running the rotated keyring accepts old tokens and signs with the
    # new key; a replica without the new key rejects those (unknown kid) until it is deployed.
    async with serve(create_app(rotated)) as url, httpx.AsyncClient(base_url=url) as new_http:
        assert (await _me(new_http, old_token)).status_code == 200
        fresh = await login(new_http, tenant.owner_email, tenant.owner_password)
    assert jwt.get_unverified_header(fresh["access_token"])["kid"] == "test-sig-2"
    assert (await _me(http, fresh["access_token"])).status_code == 401
    # Keys that were removed from the ring stop verifying.
    only_new = SigningKeyring([("test-sig-2", os.urandom(32))])
    with pytest.raises(Problem):
        verify_access_token(only_new, settings, old_token)


# --- refresh tokens ---------------------------------------------------------------------------


async def _refresh(http: httpx.AsyncClient, token: str) -> httpx.Response:
    return await refresh_response(http, token)


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def test_refresh_rotates(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    first = await login(http, tenant.owner_email, tenant.owner_password)
    r = await _refresh(http, first["refresh_token"])
    assert r.status_code == 200, r.text
    second = r.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["user"]["id"] == str(tenant.owner_id)
    assert (await _me(http, second["access_token"])).status_code == 200
    r = await _refresh(http, second["refresh_token"])
    assert r.status_code == 200


async def test_only_hashes_are_stored(
    http: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    session = await login(http, tenant.owner_email, tenant.owner_password)
    stored = await owner_conn.fetchval(
        "SELECT count(*) FROM refresh_tokens WHERE token_hash = $1", _hash(session["refresh_token"])
    )
    assert stored == 1
    dump = await owner_conn.fetchval(
        "SELECT string_agg(t::text, ' ') FROM refresh_tokens t WHERE tenant_id = $1",
        tenant.tenant_id,
    )
    assert session["refresh_token"] not in dump


async def test_reuse_revokes_the_whole_family(
    http: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    a = (await login(http, tenant.owner_email, tenant.owner_password))["refresh_token"]
    b = (await _refresh(http, a)).json()["refresh_token"]
    c = (await _refresh(http, b)).json()["refresh_token"]
    # a is two generations old: even inside the grace window this is a stolen copy.
    r = await _refresh(http, a)
    assert r.status_code == 401
    assert r.json()["code"] == "refresh_token_reused"
    r = await _refresh(http, c)
    assert r.status_code == 401
    assert r.json()["code"] == "refresh_token_revoked"
    reason = await owner_conn.fetchval(
        "SELECT f.revoke_reason FROM refresh_token_families f"
        " JOIN refresh_tokens t ON t.family_id = f.id WHERE t.token_hash = $1",
        _hash(c),
    )
    assert reason == "reuse_detected"


async def test_reuse_of_previous_token_after_grace_revokes(
    http: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    a = (await login(http, tenant.owner_email, tenant.owner_password))["refresh_token"]
    b = (await _refresh(http, a)).json()["refresh_token"]
    await owner_conn.execute(
        "UPDATE refresh_tokens SET used_at = now() - interval '1 minute' WHERE token_hash = $1",
        _hash(a),
    )
    r = await _refresh(http, a)
    assert r.json()["code"] == "refresh_token_reused"
    assert (await _refresh(http, b)).status_code == 401


async def test_previous_token_within_grace_gets_a_sibling(
    http: httpx.AsyncClient, tenant: NewTenant, settings: Settings
) -> None:
    assert settings.refresh_reuse_grace_seconds >= 5
    a = (await login(http, tenant.owner_email, tenant.owner_password))["refresh_token"]
    b = (await _refresh(http, a)).json()["refresh_token"]
    # The client lost the response and retried with a: a benign race, not theft.
    r = await _refresh(http, a)
    assert r.status_code == 200, r.text
    sibling = r.json()["refresh_token"]
    assert sibling not in (a, b)
    assert (await _refresh(http, b)).status_code == 200
    assert (await _refresh(http, sibling)).status_code == 200


async def test_concurrent_refreshes_do_not_revoke(
    http: httpx.AsyncClient, tenant: NewTenant
) -> None:
    a = (await login(http, tenant.owner_email, tenant.owner_password))["refresh_token"]
    results = await asyncio.gather(*(_refresh(http, a) for _ in range(4)))
    assert [r.status_code for r in results] == [200] * 4
    tokens = {r.json()["refresh_token"] for r in results}
    assert len(tokens) == 4
    for token in tokens:
        assert (await _refresh(http, token)).status_code == 200


async def test_idle_expiry(
    http: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    a = (await login(http, tenant.owner_email, tenant.owner_password))["refresh_token"]
    await owner_conn.execute(
        "UPDATE refresh_tokens SET expires_at = now() - interval '1 second' WHERE token_hash = $1",
        _hash(a),
    )
    r = await _refresh(http, a)
    assert r.status_code == 401
    assert r.json()["code"] == "refresh_token_expired"


async def test_idle_expiry_slides_but_never_passes_the_family_cap(
    http: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    a = (await login(http, tenant.owner_email, tenant.owner_password))["refresh_token"]
    await owner_conn.execute(
        "UPDATE refresh_token_families f SET absolute_expires_at = now() + interval '1 hour'"
        " FROM refresh_tokens t WHERE t.family_id = f.id AND t.token_hash = $1",
        _hash(a),
    )
    r = await _refresh(http, a)
    assert r.status_code == 200
    assert 3500 <= r.json()["refresh_expires_in"] <= 3600


async def test_absolute_family_expiry(
    http: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    a = (await login(http, tenant.owner_email, tenant.owner_password))["refresh_token"]
    b = (await _refresh(http, a)).json()["refresh_token"]
    await owner_conn.execute(
        "UPDATE refresh_token_families f SET absolute_expires_at = now() - interval '1 second'"
        " FROM refresh_tokens t WHERE t.family_id = f.id AND t.token_hash = $1",
        _hash(b),
    )
    r = await _refresh(http, b)
    assert r.status_code == 401
    assert r.json()["code"] == "refresh_token_expired"


async def test_unknown_refresh_token(http: httpx.AsyncClient) -> None:
    r = await _refresh(http, "x" * 43)
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_refresh_token"
    r = await http.post("/v1/auth/refresh", json={"refresh_token": ""})
    assert r.status_code == 422


async def test_access_token_is_not_a_refresh_token(
    http: httpx.AsyncClient, tenant: NewTenant
) -> None:
    session = await login(http, tenant.owner_email, tenant.owner_password)
    r = await _refresh(http, session["access_token"][:200])
    assert r.status_code == 401
    r = await _me(http, session["refresh_token"])
    assert r.status_code == 401
