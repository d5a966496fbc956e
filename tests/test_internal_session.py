"""POST /internal/v1/call-sessions: what the relay gets for one call, and what it never gets."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import pytest

from control_api.app import create_app
from control_api.bootstrap import NewTenant
from control_api.security.signing import SigningKeyring
from tests.support.servers import serve
from tests.support.services import free_port
from tests.support.tenants import auth
from tests.test_call_tokens import create_call, insert_agent, insert_elevenlabs_credential
from voicerelay.emulators.elevenlabs import (
    EmulatedAgent,
    EmulatorConfig,
    create_emulator_app,
    verify_conversation_signature,
)
from voicerelay.settings import Settings

EL_KEY = "sk_tenant_elevenlabs_key_5f2c9d0e7a1b"
PRIVATE_AGENT = "agent_private_x1"


@pytest.fixture(scope="module")
def emulator_config() -> EmulatorConfig:
    return EmulatorConfig(
        api_keys=frozenset({EL_KEY}),
        agents={PRIVATE_AGENT: EmulatedAgent(requires_auth=True)},
        accept_unknown_agents=False,
    )


@pytest.fixture(scope="module")
async def emulator_url(emulator_config: EmulatorConfig) -> AsyncIterator[str]:
    async with serve(create_emulator_app(emulator_config)) as url:
        yield url


@pytest.fixture(scope="module")
async def relay_api(settings: Settings, emulator_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A control API whose ELEVENLABS_API_URL is the emulator."""
    app = create_app(settings.model_copy(update={"elevenlabs_api_url": emulator_url}))
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
async def unreachable_api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A control API whose ELEVENLABS_API_URL is a closed port."""
    closed = f"http://127.0.0.1:{free_port()}"
    app = create_app(settings.model_copy(update={"elevenlabs_api_url": closed}))
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield client


def service(settings: Settings) -> dict[str, str]:
    assert settings.internal_service_token is not None
    return {"authorization": f"Bearer {settings.internal_service_token.get_secret_value()}"}


async def session(
    client: httpx.AsyncClient, settings: Settings, token: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await client.post(
        "/internal/v1/call-sessions",
        json={"token": token},
        headers=service(settings) if headers is None else headers,
    )


async def private_agent(
    client: httpx.AsyncClient, tenant: NewTenant, key: str = EL_KEY
) -> uuid.UUID:
    credential_id = await insert_elevenlabs_credential(client, tenant, key)
    return await insert_agent(
        client,
        tenant,
        elevenlabs_agent_id=PRIVATE_AGENT,
        credential_id=credential_id,
    )


def _assert_no_key(text: str, key: str = EL_KEY) -> None:
    assert key not in text
    assert key[-12:] not in text


# --- service authentication ------------------------------------------------------------------


async def test_service_token_is_required(
    relay_api: httpx.AsyncClient, settings: Settings, tenant: NewTenant
) -> None:
    for headers in (
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": "Basic " + service(settings)["authorization"].split()[1]},
        {"authorization": service(settings)["authorization"] + "x"},
        auth(tenant),
    ):
        r = await session(relay_api, settings, "whatever", headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["code"] == "unauthorized"
    # Unauthenticated callers learn nothing about the body either.
    r = await relay_api.post("/internal/v1/call-sessions", content=b"{not json")
    assert r.status_code == 401


async def test_not_in_public_schema(relay_api: httpx.AsyncClient) -> None:
    spec = (await relay_api.get("/openapi.json")).json()
    assert not any(path.startswith("/internal") for path in spec["paths"])


async def test_bad_body_with_service_token(
    relay_api: httpx.AsyncClient, settings: Settings
) -> None:
    r = await relay_api.post(
        "/internal/v1/call-sessions", json={"token": "x", "extra": 1}, headers=service(settings)
    )
    assert r.status_code == 422
    r = await relay_api.post(
        "/internal/v1/call-sessions", content=b"{not json", headers=service(settings)
    )
    assert r.status_code == 422


# --- call token checks -------------------------------------------------------------------------


async def test_forged_and_foreign_call_tokens_are_401(
    relay_api: httpx.AsyncClient,
    settings: Settings,
    tenant: NewTenant,
    other_tenant: NewTenant,
) -> None:
    agent_id = await insert_agent(relay_api, other_tenant)
    their_call = uuid.UUID((await create_call(relay_api, other_tenant, agent_id))["call_id"])
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.jwt_issuer,
        "aud": settings.relay_token_audience,
        "sub": str(their_call),
        "tid": str(tenant.tenant_id),  # the other tenant's call, claimed by this tenant
        "role": "caller",
        "jti": "x",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "cnb": now + 60,
    }
    # Even a correctly signed token cannot reach a call outside its own tenant.
    genuine_keys = SigningKeyring(settings.signing_keyring())
    r = await session(relay_api, settings, genuine_keys.sign(claims, typ="call+jwt"))
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_call_token"
    forged_keys = SigningKeyring([(settings.signing_keyring()[0][0], b"\x01" * 32)])
    for token in (
        forged_keys.sign({**claims, "tid": str(other_tenant.tenant_id)}, typ="call+jwt"),
        genuine_keys.sign({**claims, "tid": str(other_tenant.tenant_id)}, typ="at+jwt"),
        genuine_keys.sign(
            {**claims, "tid": str(other_tenant.tenant_id), "aud": "voicerelay-api"},
            typ="call+jwt",
        ),
        "not-a-token",
    ):
        r = await session(relay_api, settings, token)
        assert r.status_code == 401, token
        assert r.json()["code"] == "invalid_call_token"


async def test_ended_call_is_409(
    relay_api: httpx.AsyncClient,
    settings: Settings,
    tenant: NewTenant,
    owner_conn: asyncpg.Connection,
) -> None:
    agent_id = await insert_agent(relay_api, tenant)
    body = await create_call(relay_api, tenant, agent_id)
    await owner_conn.execute(
        "UPDATE calls SET status = 'failed' WHERE id = $1", uuid.UUID(body["call_id"])
    )
    r = await session(relay_api, settings, body["token"])
    assert r.status_code == 409
    assert r.json()["code"] == "call_ended"


# --- what the relay gets -----------------------------------------------------------------------


async def test_public_agent_session(
    relay_api: httpx.AsyncClient,
    settings: Settings,
    emulator_url: str,
    tenant: NewTenant,
) -> None:
    agent_id = await insert_agent(
        relay_api,
        tenant,
        elevenlabs_agent_id="agent_public_1",
        input_audio_format="ulaw_8000",
        output_audio_format="pcm_24000",
        overrides={"agent": {"first_message": "Hello"}},
        variables={"greeting": "hi", "user_name": "default"},
        allowed_origins=["https://app.example.com"],
    )
    body = await create_call(
        relay_api,
        tenant,
        agent_id,
        client_audio_format="pcm_16000",
        dynamic_variables={"user_name": "Ada", "n": 2},
    )
    r = await session(relay_api, settings, body["token"])
    assert r.status_code == 200, r.text
    got = r.json()
    assert got == {
        "call_id": body["call_id"],
        "tenant_id": str(tenant.tenant_id),
        "role": "caller",
        "status": "created",
        "agent": {
            "id": str(agent_id),
            "elevenlabs_agent_id": "agent_public_1",
            "input_audio_format": "ulaw_8000",
            "output_audio_format": "pcm_24000",
            "allowed_origins": ["https://app.example.com"],
        },
        "client_audio_format": "pcm_16000",
        "conversation_initiation": {
            "conversation_config_override": {"agent": {"first_message": "Hello"}},
            "dynamic_variables": {"greeting": "hi", "user_name": "Ada", "n": 2},
        },
        "upstream_url": emulator_url.replace("http://", "ws://")
        + "/v1/convai/conversation?agent_id=agent_public_1",
        "upstream_url_expires_at": None,
        "max_duration_seconds": settings.max_call_duration_seconds,
        "tenant_max_concurrent_calls": 10,
        "conversation_ids": [],
        "direction": "browser",
        "telephony": None,
    }

    monitor = await relay_api.post(
        f"/v1/calls/{body['call_id']}/monitor-token", headers=auth(tenant)
    )
    r = await session(relay_api, settings, monitor.json()["token"])
    assert r.status_code == 200
    assert r.json()["role"] == "monitor"


async def test_private_agent_gets_a_signed_url(
    relay_api: httpx.AsyncClient,
    settings: Settings,
    emulator_config: EmulatorConfig,
    tenant: NewTenant,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    agent_id = await private_agent(relay_api, tenant)
    body = await create_call(relay_api, tenant, agent_id)
    before = datetime.now(UTC)
    r = await session(relay_api, settings, body["token"])
    assert r.status_code == 200, r.text
    got = r.json()
    url = urlsplit(got["upstream_url"])
    assert url.scheme == "ws"
    query = parse_qs(url.query)
    assert query["agent_id"] == [PRIVATE_AGENT]
    assert verify_conversation_signature(
        emulator_config, PRIVATE_AGENT, query["conversation_signature"][0]
    )
    expires = datetime.fromisoformat(got["upstream_url_expires_at"])
    assert before < expires <= before + timedelta(minutes=15, seconds=5)
    _assert_no_key(r.text)
    _assert_no_key(caplog.text)
    # Nothing vault-shaped either.
    assert "ciphertext" not in r.text
    assert "credential" not in r.text


async def test_rejected_key_is_502_and_never_leaks(
    relay_api: httpx.AsyncClient,
    settings: Settings,
    tenant: NewTenant,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "sk_revoked_tenant_key_aa77bb88cc99"
    agent_id = await private_agent(relay_api, tenant, key=wrong)
    body = await create_call(relay_api, tenant, agent_id)
    r = await session(relay_api, settings, body["token"])
    assert r.status_code == 502
    assert r.json()["code"] == "upstream_auth_failed"
    _assert_no_key(r.text, wrong)
    _assert_no_key(caplog.text, wrong)
    assert any("rejected" in rec.getMessage() for rec in caplog.records)


async def test_unreachable_elevenlabs_is_upstream_unavailable(
    unreachable_api: httpx.AsyncClient,
    settings: Settings,
    tenant: NewTenant,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    agent_id = await private_agent(unreachable_api, tenant)
    body = await create_call(unreachable_api, tenant, agent_id)
    r = await session(unreachable_api, settings, body["token"])
    assert r.status_code in (502, 504)
    assert r.json()["code"] == "upstream_unavailable"
    _assert_no_key(r.text)
    _assert_no_key(caplog.text)
