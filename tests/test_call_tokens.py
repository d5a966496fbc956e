"""Call tokens: issued by POST /v1/calls, verified with the published JWKS as the relay does."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from typing import Any

import asyncpg
import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from control_api.bootstrap import NewTenant, new_id
from control_api.call_tokens import issue_call_token
from control_api.security.api_keys import generate_api_key
from control_api.security.signing import SigningKeyring
from tests.support.tenants import auth
from voicerelay.call_token import (
    CallTokenError,
    parse_jwks,
    verify_call_token,
)
from voicerelay.settings import Settings

# --- helpers shared with test_internal_session -------------------------------------------------


async def insert_agent(
    client: httpx.AsyncClient,
    tenant: NewTenant,
    *,
    elevenlabs_agent_id: str = "agent_public_demo",
    credential_id: uuid.UUID | None = None,
    input_audio_format: str = "pcm_16000",
    output_audio_format: str = "pcm_16000",
    overrides: dict[str, Any] | None = None,
    variables: dict[str, Any] | None = None,
    allowed_origins: list[str] | None = None,
) -> uuid.UUID:
    """Through the agents API, so the stored settings are exactly what production stores."""
    r = await client.post(
        "/v1/agents",
        json={
            "name": "Test agent",
            "elevenlabs_agent_id": elevenlabs_agent_id,
            "credential_id": str(credential_id) if credential_id else None,
            "input_audio_format": input_audio_format,
            "output_audio_format": output_audio_format,
            "conversation_overrides": overrides or {},
            "dynamic_variables": variables or {},
            "allowed_origins": allowed_origins or [],
        },
        headers=auth(tenant),
    )
    assert r.status_code == 201, r.text
    return uuid.UUID(r.json()["id"])


async def insert_elevenlabs_credential(
    http: httpx.AsyncClient, tenant: NewTenant, api_key: str
) -> uuid.UUID:
    """Through the credentials API, so the secret is sealed exactly as in production."""
    r = await http.post(
        "/v1/credentials",
        json={"provider": "elevenlabs", "name": "ElevenLabs", "api_key": api_key},
        headers=auth(tenant),
    )
    assert r.status_code == 201, r.text
    return uuid.UUID(r.json()["id"])


async def create_call(http: httpx.AsyncClient, tenant: NewTenant, agent_id: uuid.UUID, **body: Any):  # type: ignore[no-untyped-def]
    r = await http.post("/v1/calls", json={"agent_id": str(agent_id), **body}, headers=auth(tenant))
    assert r.status_code == 201, r.text
    return r.json()


async def published_keys(http: httpx.AsyncClient) -> dict[str, Any]:
    r = await http.get("/.well-known/jwks.json")
    assert r.status_code == 200
    return parse_jwks(r.json())


def verify(settings: Settings, token: str, keys: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
    return verify_call_token(
        token,
        keys,
        issuer=settings.jwt_issuer,
        audience=settings.relay_token_audience,
        **kwargs,
    )


# --- issuing through the API -------------------------------------------------------------------


async def test_call_token_verifies_with_published_jwks(
    http: httpx.AsyncClient, settings: Settings, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    agent_id = await insert_agent(http, tenant, input_audio_format="ulaw_8000")
    before = int(time.time())
    body = await create_call(
        http,
        tenant,
        agent_id,
        dynamic_variables={"user_name": "Ada", "n": 3, "ratio": 0.5, "vip": True},
        metadata={"crm": {"id": "42"}},
    )
    assert set(body) == {"call_id", "role", "token", "relay_url", "expires_at", "connect_by"}
    assert body["relay_url"] == settings.relay_public_url
    assert body["role"] == "caller"

    header = jwt.get_unverified_header(body["token"])
    assert header["typ"] == "call+jwt"
    assert header["alg"] == "EdDSA"
    claims = verify(settings, body["token"], await published_keys(http))
    assert str(claims.call_id) == body["call_id"]
    assert claims.tenant_id == tenant.tenant_id
    assert claims.role == "caller"
    assert claims.token_id
    assert before <= claims.issued_at <= claims.connect_by <= claims.expires_at
    assert claims.connect_by == claims.issued_at + settings.call_token_connect_window_seconds
    assert claims.expires_at > claims.issued_at + settings.max_call_duration_seconds
    assert claims.may_first_connect(now=claims.connect_by)
    assert not claims.may_first_connect(now=claims.connect_by + 1)

    row = await owner_conn.fetchrow("SELECT * FROM calls WHERE id = $1", claims.call_id)
    assert row is not None
    assert row["tenant_id"] == tenant.tenant_id
    assert row["agent_id"] == agent_id
    assert (row["status"], row["direction"]) == ("created", "browser")
    # Defaults to the agent's input format.
    assert row["client_audio_format"] == "ulaw_8000"
    assert json.loads(row["dynamic_variables"]) == {
        "user_name": "Ada",
        "n": 3,
        "ratio": 0.5,
        "vip": True,
    }
    assert json.loads(row["metadata"]) == {"crm": {"id": "42"}}


async def test_explicit_client_audio_format(
    http: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    agent_id = await insert_agent(http, tenant)
    body = await create_call(http, tenant, agent_id, client_audio_format="pcm_48000")
    fmt = await owner_conn.fetchval(
        "SELECT client_audio_format FROM calls WHERE id = $1", uuid.UUID(body["call_id"])
    )
    assert fmt == "pcm_48000"


async def test_call_token_is_not_an_access_token(
    http: httpx.AsyncClient, settings: Settings, tenant: NewTenant
) -> None:
    agent_id = await insert_agent(http, tenant)
    token = (await create_call(http, tenant, agent_id))["token"]
    r = await http.post(
        "/v1/calls",
        json={"agent_id": str(agent_id)},
        headers={"authorization": f"Bearer {token}"},
    )
    assert r.status_code == 401
    r = await http.get("/.well-known/jwks.json", headers={"authorization": f"Bearer {token}"})
    assert r.status_code == 200  # public, unaffected
    keyring = SigningKeyring(settings.signing_keyring())
    with pytest.raises(jwt.InvalidTokenError):
        keyring.verify(
            token,
            typ="call+jwt",
            audience=settings.access_token_audience,
            issuer=settings.jwt_issuer,
            required=["exp"],
        )
    with pytest.raises(jwt.InvalidTokenError):
        keyring.verify(
            token,
            typ="at+jwt",
            audience=settings.relay_token_audience,
            issuer=settings.jwt_issuer,
            required=["exp"],
        )


async def test_monitor_token(
    http: httpx.AsyncClient, settings: Settings, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    agent_id = await insert_agent(http, tenant)
    call_id = (await create_call(http, tenant, agent_id))["call_id"]
    r = await http.post(f"/v1/calls/{call_id}/monitor-token", headers=auth(tenant))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["call_id"] == call_id
    assert body["role"] == "monitor"
    claims = verify(settings, body["token"], await published_keys(http))
    assert claims.role == "monitor"
    assert str(claims.call_id) == call_id

    await owner_conn.execute(
        "UPDATE calls SET status = 'ended', ended_at = now() WHERE id = $1", uuid.UUID(call_id)
    )
    r = await http.post(f"/v1/calls/{call_id}/monitor-token", headers=auth(tenant))
    assert r.status_code == 409
    assert r.json()["code"] == "call_ended"


async def test_other_tenants_agent_and_call_are_not_found(
    http: httpx.AsyncClient,
    tenant: NewTenant,
    other_tenant: NewTenant,
    owner_conn: asyncpg.Connection,
) -> None:
    theirs = await insert_agent(http, other_tenant)
    r = await http.post("/v1/calls", json={"agent_id": str(theirs)}, headers=auth(tenant))
    assert r.status_code == 404
    assert r.json()["code"] == "not_found"
    assert await owner_conn.fetchval("SELECT count(*) FROM calls WHERE agent_id = $1", theirs) == 0

    their_call = (await create_call(http, other_tenant, theirs))["call_id"]
    for path in (
        f"/v1/calls/{their_call}/monitor-token",
        f"/v1/calls/{uuid.uuid4()}/monitor-token",
        "/v1/calls/not-a-uuid/monitor-token",
    ):
        r = await http.post(path, headers=auth(tenant))
        assert r.status_code == 404, path
    r = await http.post("/v1/calls", json={"agent_id": str(uuid.uuid4())}, headers=auth(tenant))
    assert r.status_code == 404


async def test_viewer_key_cannot_create_calls(
    http: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    key = generate_api_key()
    await owner_conn.execute(
        "INSERT INTO api_keys (id, tenant_id, name, prefix, key_hash, role)"
        " VALUES ($1, $2, 'viewer', $3, $4, 'viewer')",
        new_id(),
        tenant.tenant_id,
        key.prefix,
        key.key_hash,
    )
    agent_id = await insert_agent(http, tenant)
    headers = {"authorization": f"Bearer {key.plaintext}"}
    r = await http.post("/v1/calls", json={"agent_id": str(agent_id)}, headers=headers)
    assert r.status_code == 403
    assert (await http.post("/v1/calls", json={"agent_id": str(agent_id)})).status_code == 401


@pytest.mark.parametrize(
    "extra",
    [
        {"client_audio_format": "mp3_44100"},
        {"dynamic_variables": {"1st": "x"}},
        {"dynamic_variables": {"bad-name": "x"}},
        {"dynamic_variables": {"system__caller_id": "x"}},
        {"dynamic_variables": {"nested": {"a": 1}}},
        {"dynamic_variables": {"items": [1, 2]}},
        {"dynamic_variables": {"nothing": None}},
        {"dynamic_variables": {"long": "x" * 5000}},
        {"dynamic_variables": {f"v{i}": i for i in range(51)}},
        {"metadata": {"blob": "x" * 5000}},
        {"metadata": ["not", "an", "object"]},
        {"unexpected": True},
    ],
)
async def test_invalid_call_bodies_are_422(
    http: httpx.AsyncClient,
    tenant: NewTenant,
    extra: dict[str, Any],
) -> None:
    agent_id = await insert_agent(http, tenant)
    r = await http.post(
        "/v1/calls", json={"agent_id": str(agent_id), **extra}, headers=auth(tenant)
    )
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "validation_failed"


async def test_non_finite_numbers_are_rejected(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    agent_id = await insert_agent(http, tenant)
    for literal in ("NaN", "Infinity", "1e999"):
        raw = f'{{"agent_id": "{agent_id}", "dynamic_variables": {{"x": {literal}}}}}'
        r = await http.post(
            "/v1/calls",
            content=raw,
            headers={**auth(tenant), "content-type": "application/json"},
        )
        assert r.status_code in (400, 422), (literal, r.text)


# --- the pure verifier against forgeries -------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture
def keyring() -> SigningKeyring:
    return SigningKeyring([("k1", os.urandom(32))])


def _mint(keyring: SigningKeyring, settings: Settings, **kwargs: Any) -> str:
    return issue_call_token(
        keyring, settings, call_id=uuid.uuid4(), tenant_id=uuid.uuid4(), role="caller", **kwargs
    ).token


def _claims(settings: Settings, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.jwt_issuer,
        "aud": settings.relay_token_audience,
        "sub": str(uuid.uuid4()),
        "tid": str(uuid.uuid4()),
        "role": "caller",
        "jti": "abc",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "cnb": now + 60,
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def test_valid_token_passes(keyring: SigningKeyring, settings: Settings) -> None:
    claims = verify(settings, _mint(keyring, settings), parse_jwks(keyring.jwks()))
    assert claims.role == "caller"


def test_alg_none_is_rejected(keyring: SigningKeyring, settings: Settings) -> None:
    header = _b64(orjson.dumps({"alg": "none", "typ": "call+jwt", "kid": "k1"}))
    payload = _b64(orjson.dumps(_claims(settings)))
    for token in (f"{header}.{payload}.", f"{header}.{payload}"):
        with pytest.raises(CallTokenError):
            verify(settings, token, parse_jwks(keyring.jwks()))


def test_hs256_with_public_key_is_rejected(keyring: SigningKeyring, settings: Settings) -> None:
    raw = keyring.active.public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    x = keyring.jwks()["keys"][0]["x"].encode()
    for secret in (raw, x):
        token = jwt.encode(
            _claims(settings),
            secret,
            algorithm="HS256",
            headers={"typ": "call+jwt", "kid": "k1"},
        )
        with pytest.raises(CallTokenError):
            verify(settings, token, parse_jwks(keyring.jwks()))


@pytest.mark.parametrize(
    "changes",
    [
        {"aud": "voicerelay-api"},
        {"aud": ["voicerelay-relay", "voicerelay-api"]},
        {"iss": "someone-else"},
        {"exp": int(time.time()) - 60, "cnb": int(time.time()) - 120, "iat": 0, "nbf": 0},
        {"nbf": int(time.time()) + 120},
        {"iat": int(time.time()) + 120, "nbf": int(time.time()) + 120},
        {"cnb": None},
        {"jti": None},
        {"tid": None},
        {"role": "admin"},
        {"sub": "not-a-uuid"},
        {"cnb": int(time.time()) + 10_000},
    ],
)
def test_bad_claims_are_rejected(
    keyring: SigningKeyring, settings: Settings, changes: dict[str, Any]
) -> None:
    token = keyring.sign(_claims(settings, **changes), typ="call+jwt")
    with pytest.raises(CallTokenError):
        verify(settings, token, parse_jwks(keyring.jwks()))


def test_wrong_typ_is_rejected(keyring: SigningKeyring, settings: Settings) -> None:
    for typ in ("at+jwt", "JWT"):
        token = keyring.sign(_claims(settings), typ=typ)
        with pytest.raises(CallTokenError):
            verify(settings, token, parse_jwks(keyring.jwks()))


def test_expiry_follows_the_given_clock(keyring: SigningKeyring, settings: Settings) -> None:
    keys = parse_jwks(keyring.jwks())
    token = _mint(keyring, settings, now=1_000_000)
    claims = verify(settings, token, keys, now=1_000_000)
    verify(settings, token, keys, now=claims.expires_at + 4)  # within leeway
    with pytest.raises(CallTokenError, match="expired"):
        verify(settings, token, keys, now=claims.expires_at + 6)
    # A caller cannot widen the leeway beyond five seconds.
    with pytest.raises(CallTokenError, match="expired"):
        verify(settings, token, keys, now=claims.expires_at + 60, leeway=3600)
    with pytest.raises(CallTokenError, match="not yet valid"):
        verify(settings, token, keys, now=1_000_000 - 60)


def test_unknown_kid_and_foreign_key_are_rejected(
    keyring: SigningKeyring, settings: Settings
) -> None:
    keys = parse_jwks(keyring.jwks())
    other_kid = SigningKeyring([("k2", os.urandom(32))])
    with pytest.raises(CallTokenError, match="unknown signing key"):
        verify(settings, _mint(other_kid, settings), keys)
    same_kid = SigningKeyring([("k1", os.urandom(32))])
    with pytest.raises(CallTokenError, match="bad signature"):
        verify(settings, _mint(same_kid, settings), keys)


def test_tampered_payload_is_rejected(keyring: SigningKeyring, settings: Settings) -> None:
    token = _mint(keyring, settings)
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["role"] = "monitor"
    forged = f"{header}.{_b64(orjson.dumps(claims))}.{signature}"
    with pytest.raises(CallTokenError):
        verify(settings, forged, parse_jwks(keyring.jwks()))


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "x" * 5000])
def test_garbage_is_rejected(keyring: SigningKeyring, settings: Settings, token: str) -> None:
    with pytest.raises(CallTokenError):
        verify(settings, token, parse_jwks(keyring.jwks()))


def test_parse_jwks_keeps_only_ed25519_signing_keys(keyring: SigningKeyring) -> None:
    good = keyring.jwks()["keys"][0]
    document = {
        "keys": [
            good,
            {"kty": "RSA", "kid": "rsa", "n": "AQAB", "e": "AQAB"},
            {**good, "kid": "enc", "use": "enc"},
            {**good, "kid": "short", "x": "AAAA"},
            {**good, "kid": None},
            "not-a-key",
        ]
    }
    assert set(parse_jwks(document)) == {"k1"}
    with pytest.raises(ValueError):
        parse_jwks({"nokeys": []})


def test_tokens_of_a_retiring_key_verify_after_rotation(settings: Settings) -> None:
    old_seed, new_seed = os.urandom(32), os.urandom(32)
    before = SigningKeyring([("old", old_seed)])
    after = SigningKeyring([("new", new_seed), ("old", old_seed)])
    keys = parse_jwks(after.jwks())
    assert verify(settings, _mint(before, settings), keys).role == "caller"
    assert jwt.get_unverified_header(_mint(after, settings))["kid"] == "new"
    assert verify(settings, _mint(after, settings), keys).role == "caller"
