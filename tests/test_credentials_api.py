"""The credentials API: write-only secrets, masks, tenant isolation, and decrypt-on-use."""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import httpx
import pytest

from control_api.bootstrap import NewTenant, new_id
from control_api.credential_store import (
    CredentialNotFound,
    CredentialUnreadable,
    load_credential_secret,
)
from control_api.security.api_keys import generate_api_key
from control_api.vault import Vault
from tests.support.secrets import assert_no_secret_in
from tests.support.tenants import auth
from voicerelay.settings import Settings

TWILIO_SID = "AC" + "0123456789abcdef" * 2


def el_key() -> str:
    return "sk_" + secrets.token_hex(24)


def twilio_token() -> str:
    return secrets.token_hex(16)


async def viewer_headers(owner_conn: asyncpg.Connection, tenant: NewTenant) -> dict[str, str]:
    key = generate_api_key()
    await owner_conn.execute(
        "INSERT INTO api_keys (id, tenant_id, name, prefix, key_hash, role)"
        " VALUES ($1, $2, 'viewer', $3, $4, 'viewer')",
        new_id(),
        tenant.tenant_id,
        key.prefix,
        key.key_hash,
    )
    return {"authorization": f"Bearer {key.plaintext}"}


@asynccontextmanager
async def as_tenant(conn: asyncpg.Connection, tenant_id: uuid.UUID) -> AsyncIterator[None]:
    """What tenant_tx does, on a bare application-role connection."""
    async with conn.transaction():
        await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(tenant_id))
        yield


async def create_el(
    http: httpx.AsyncClient, tenant: NewTenant, api_key: str, name: str = "EL"
) -> dict:
    r = await http.post(
        "/v1/credentials",
        json={"provider": "elevenlabs", "name": name, "api_key": api_key},
        headers=auth(tenant),
    )
    assert r.status_code == 201, r.text
    return r.json()


async def test_secrets_never_appear_in_responses_or_logs(
    http: httpx.AsyncClient,
    tenant: NewTenant,
    settings: Settings,
    app_conn: asyncpg.Connection,
    owner_conn: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    api_key, token, rotated = el_key(), twilio_token(), el_key()
    rejected = [el_key() for _ in range(6)]
    bodies: list[str] = []

    async def call(method: str, path: str, **kwargs: object) -> httpx.Response:
        headers = {**auth(tenant), **kwargs.pop("headers", {})}  # type: ignore[dict-item]
        r = await http.request(method, path, headers=headers, **kwargs)  # type: ignore[arg-type]
        bodies.append(r.text)
        return r

    r = await call(
        "POST",
        "/v1/credentials",
        json={"provider": "elevenlabs", "name": "Prod", "api_key": api_key},
    )
    assert r.status_code == 201
    el = r.json()
    assert el["mask"] == "\u2026" + api_key[-4:]
    assert el["provider"] == "elevenlabs"
    assert el["name"] == "Prod"
    assert el["public_info"] == {}
    assert set(el) == {"id", "provider", "name", "mask", "public_info", "created_at", "updated_at"}

    r = await call(
        "POST",
        "/v1/credentials",
        json={
            "provider": "twilio",
            "name": "Phones",
            "account_sid": TWILIO_SID,
            "auth_token": token,
        },
    )
    assert r.status_code == 201
    tw = r.json()
    assert tw["mask"] == "\u2026" + token[-4:]
    assert tw["public_info"] == {"account_sid": TWILIO_SID}

    assert (await call("GET", f"/v1/credentials/{el['id']}")).json() == el
    listed = (await call("GET", "/v1/credentials")).json()
    assert [c["id"] for c in listed["items"]] == [tw["id"], el["id"]]
    assert listed["next_cursor"] is None

    # Rotation by the tenant: a new mask, same id; the provider cannot change.
    r = await call(
        "PUT",
        f"/v1/credentials/{el['id']}/secret",
        json={"provider": "elevenlabs", "api_key": rotated},
    )
    assert r.status_code == 200
    assert r.json()["mask"] == "\u2026" + rotated[-4:]
    assert r.json()["id"] == el["id"]
    r = await call(
        "PUT",
        f"/v1/credentials/{el['id']}/secret",
        json={"provider": "twilio", "account_sid": TWILIO_SID, "auth_token": rejected[0]},
    )
    assert r.status_code == 409
    assert r.json()["code"] == "provider_mismatch"

    # Invalid requests carrying secrets: the problem documents echo none of the input.
    invalid = [
        {"provider": "elevenlabs", "name": "", "api_key": rejected[1]},
        {"provider": "elevenlabs", "name": "x", "api_key": rejected[2] + " tail"},
        {"provider": "elevenlabs", "name": "x", "api_key": rejected[3], "note": rejected[3]},
        {"provider": "twilio", "name": "x", "account_sid": "AC123", "auth_token": rejected[4]},
        {"provider": "openai", "name": "x", "api_key": rejected[5]},
        {"provider": "elevenlabs", "name": "x", "api_key": 12345678901234567890},
        {"provider": "elevenlabs", "name": "x", "api_key": "short"},
        {"provider": "elevenlabs", "name": "nul\u0000", "api_key": rejected[1]},
        {"provider": "elevenlabs", "name": "x", "api_key": rejected[2] + "\u0000"},
    ]
    for body in invalid:
        r = await call("POST", "/v1/credentials", json=body)
        assert r.status_code == 422, body
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "validation_failed"
    r = await call(
        "POST",
        "/v1/credentials",
        content=b'{"provider": "elevenlabs", "name": "x", "api_key": "'
        + rejected[1].encode()
        + b'"',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400

    # Decrypt on use returns exactly what was stored, and its repr is redacted.
    vault = Vault(settings.encryption_keyring())
    async with as_tenant(app_conn, tenant.tenant_id):
        provider, secret = await load_credential_secret(
            app_conn, tenant.tenant_id, uuid.UUID(el["id"]), vault=vault
        )
        assert (provider, secret) == ("elevenlabs", {"api_key": rotated})
        assert rotated not in repr(secret)
        assert rotated not in str(secret)
        provider, secret = await load_credential_secret(
            app_conn, tenant.tenant_id, uuid.UUID(tw["id"]), vault=vault
        )
        assert (provider, secret) == ("twilio", {"account_sid": TWILIO_SID, "auth_token": token})

    # At rest: ciphertext only, under the active key.
    rows = await owner_conn.fetch(
        "SELECT key_id, ciphertext, mask, public_info::text AS info FROM credentials"
        " WHERE tenant_id = $1",
        tenant.tenant_id,
    )
    for row in rows:
        assert row["key_id"] == vault.active_key_id
        for plain in (api_key, token, rotated):
            assert plain.encode() not in row["ciphertext"]
            assert plain not in row["mask"]
            assert plain not in row["info"]

    assert (await call("DELETE", f"/v1/credentials/{el['id']}")).status_code == 204
    assert (await call("GET", f"/v1/credentials/{el['id']}")).status_code == 404
    assert (await call("DELETE", f"/v1/credentials/{el['id']}")).status_code == 404

    assert_no_secret_in(bodies, caplog.records, [api_key, token, rotated, *rejected])


async def test_pagination_newest_first(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    created = [(await create_el(http, tenant, el_key(), name=f"c{i}"))["id"] for i in range(5)]
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await http.get("/v1/credentials", params=params, headers=auth(tenant))).json()
        seen += [c["id"] for c in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(created))
    assert pages == 3
    for bad in ({"cursor": "not-a-cursor"}, {"cursor": "WzEsMl0"}):
        r = await http.get("/v1/credentials", params=bad, headers=auth(tenant))
        assert r.status_code == 400
        assert r.json()["code"] == "invalid_cursor"
    for bad_limit in ("0", "101", "x"):
        r = await http.get("/v1/credentials", params={"limit": bad_limit}, headers=auth(tenant))
        assert r.status_code == 422


async def test_other_tenant_cannot_see_change_or_delete(
    http: httpx.AsyncClient, tenant: NewTenant, other_tenant: NewTenant
) -> None:
    mine = await create_el(http, tenant, el_key())
    path = f"/v1/credentials/{mine['id']}"
    assert (await http.get(path, headers=auth(other_tenant))).status_code == 404
    assert (await http.delete(path, headers=auth(other_tenant))).status_code == 404
    r = await http.put(
        path + "/secret",
        json={"provider": "elevenlabs", "api_key": el_key()},
        headers=auth(other_tenant),
    )
    assert r.status_code == 404
    listed = (await http.get("/v1/credentials", headers=auth(other_tenant))).json()
    assert listed["items"] == []
    r = await http.get(path, headers=auth(tenant))
    assert r.status_code == 200
    assert r.json() == mine
    assert (await http.get("/v1/credentials/not-a-uuid", headers=auth(tenant))).status_code == 404


async def test_viewer_reads_but_cannot_write(
    http: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    existing = await create_el(http, tenant, el_key())
    viewer = await viewer_headers(owner_conn, tenant)
    assert (await http.get("/v1/credentials", headers=viewer)).status_code == 200
    assert (await http.get(f"/v1/credentials/{existing['id']}", headers=viewer)).status_code == 200
    r = await http.post(
        "/v1/credentials",
        json={"provider": "elevenlabs", "name": "x", "api_key": el_key()},
        headers=viewer,
    )
    assert r.status_code == 403
    assert r.json()["code"] == "forbidden"
    r = await http.put(
        f"/v1/credentials/{existing['id']}/secret",
        json={"provider": "elevenlabs", "api_key": el_key()},
        headers=viewer,
    )
    assert r.status_code == 403
    assert (
        await http.delete(f"/v1/credentials/{existing['id']}", headers=viewer)
    ).status_code == 403
    assert (await http.get("/v1/credentials")).status_code == 401


async def test_credential_in_use_cannot_be_deleted(
    http: httpx.AsyncClient, tenant: NewTenant
) -> None:
    cred = await create_el(http, tenant, el_key())
    r = await http.post(
        "/v1/agents",
        json={"name": "Private", "elevenlabs_agent_id": "agent_x", "credential_id": cred["id"]},
        headers=auth(tenant),
    )
    assert r.status_code == 201, r.text
    agent_id = r.json()["id"]
    r = await http.delete(f"/v1/credentials/{cred['id']}", headers=auth(tenant))
    assert r.status_code == 409
    assert r.json()["code"] == "credential_in_use"
    assert (
        await http.get(f"/v1/credentials/{cred['id']}", headers=auth(tenant))
    ).status_code == 200
    assert (await http.delete(f"/v1/agents/{agent_id}", headers=auth(tenant))).status_code == 204
    assert (
        await http.delete(f"/v1/credentials/{cred['id']}", headers=auth(tenant))
    ).status_code == 204


async def test_ciphertext_moved_to_another_tenant_does_not_decrypt(
    http: httpx.AsyncClient,
    tenant: NewTenant,
    other_tenant: NewTenant,
    settings: Settings,
    app_conn: asyncpg.Connection,
    owner_conn: asyncpg.Connection,
) -> None:
    victim = await create_el(http, tenant, el_key())
    attacker = await create_el(http, other_tenant, el_key())
    # An attacker with write access to the table copies the victim's ciphertext into their row.
    await owner_conn.execute(
        """
        UPDATE credentials AS a SET key_id = v.key_id, nonce = v.nonce, ciphertext = v.ciphertext
        FROM credentials AS v WHERE a.id = $1 AND v.id = $2
        """,
        uuid.UUID(attacker["id"]),
        uuid.UUID(victim["id"]),
    )
    vault = Vault(settings.encryption_keyring())
    async with as_tenant(app_conn, other_tenant.tenant_id):
        with pytest.raises(CredentialUnreadable):
            await load_credential_secret(
                app_conn, other_tenant.tenant_id, uuid.UUID(attacker["id"]), vault=vault
            )
        # And RLS hides the victim's row itself.
        with pytest.raises(CredentialNotFound):
            await load_credential_secret(
                app_conn, other_tenant.tenant_id, uuid.UUID(victim["id"]), vault=vault
            )
    # Moving the whole row to the other tenant fails the same way.
    await owner_conn.execute(
        "UPDATE credentials SET tenant_id = $2 WHERE id = $1",
        uuid.UUID(victim["id"]),
        other_tenant.tenant_id,
    )
    async with as_tenant(app_conn, other_tenant.tenant_id):
        with pytest.raises(CredentialUnreadable):
            await load_credential_secret(
                app_conn, other_tenant.tenant_id, uuid.UUID(victim["id"]), vault=vault
            )
