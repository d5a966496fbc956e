"""POST /v1/twilio/voice: Twilio's voice webhook, signed as Twilio signs it, against a control API
whose PUBLIC_API_URL is not its bind address (as behind a proxy)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from control_api.app import create_app
from control_api.bootstrap import NewTenant
from control_api.call_tokens import issue_call_token, verify_issued_call_token
from control_api.security.signing import SigningKeyring
from control_api.telephony.prefetch import associated_data
from control_api.vault import Sealed, Vault
from relay.admission import TenantCallCap
from tests.support.servers import serve
from tests.support.tenants import auth
from tests.support.twilio import (
    PUBLIC_API_URL,
    VOICE_PATH,
    PhoneTenant,
    TwiML,
    call_id_of,
    is_apology,
    phone_tenant,
    sign,
    twilio_post,
)
from tests.test_call_tokens import insert_elevenlabs_credential
from voicerelay.emulators.elevenlabs import EmulatedAgent, EmulatorConfig, create_emulator_app
from voicerelay.settings import Settings
from voicerelay.tenant_calls import tenant_calls_key

EL_KEY = "sk_phone_tenant_elevenlabs_key_77aa"
PRIVATE_AGENT = "agent_phone_private"


@pytest.fixture(scope="module")
async def emulator_url() -> AsyncIterator[str]:
    config = EmulatorConfig(
        api_keys=frozenset({EL_KEY}),
        agents={
            PRIVATE_AGENT: EmulatedAgent(requires_auth=True),
            "agent_phone_public": EmulatedAgent(),
        },
        accept_unknown_agents=False,
    )
    async with serve(create_emulator_app(config)) as url:
        yield url


@pytest.fixture(scope="module")
def phone_settings(settings: Settings, emulator_url: str) -> Settings:
    return settings.model_copy(
        update={
            "public_api_url": PUBLIC_API_URL,
            "elevenlabs_api_url": emulator_url,
            "relay_public_url": "https://relay.example.com",
        }
    )


@pytest.fixture(scope="module")
async def api(phone_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        serve(create_app(phone_settings)) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as client,
    ):
        yield client


@pytest.fixture
async def phone(api: httpx.AsyncClient, tenant: NewTenant) -> PhoneTenant:
    return await phone_tenant(
        api,
        tenant,
        phone_dynamic_variables={"caller_number": "From", "caller_city": "FromCity"},
    )


def _service(settings: Settings) -> dict[str, str]:
    assert settings.internal_service_token is not None
    return {"authorization": f"Bearer {settings.internal_service_token.get_secret_value()}"}


async def _calls_for(owner_conn: asyncpg.Connection, call_sid: str) -> list[asyncpg.Record]:
    return await owner_conn.fetch("SELECT * FROM calls WHERE provider_call_id = $1", call_sid)


# --- a call that connects ----------------------------------------------------------------------


async def test_signed_webhook_answers_a_stream_to_the_relay(
    api: httpx.AsyncClient,
    phone_settings: Settings,
    phone: PhoneTenant,
    owner_conn: asyncpg.Connection,
) -> None:
    params = phone.voice_params()
    r = await twilio_post(api, VOICE_PATH, params, auth_token=phone.auth_token)
    assert r.status_code == 200, r.text
    twiml = TwiML.parse(r)
    assert twiml.verbs == ["Connect"]
    # Twilio takes no query string on the Stream URL: everything else travels as Parameters.
    assert twiml.stream_url == "wss://relay.example.com/twilio/stream"
    assert twiml.stream_url == phone_settings.twilio_media_stream_url()
    assert set(twiml.parameters) == {"token", "from", "to"}
    assert twiml.parameters["from"] == phone.caller
    assert twiml.parameters["to"] == phone.number
    for name, value in twiml.parameters.items():
        assert len(name) + len(value) < 500, name

    signing = SigningKeyring(phone_settings.signing_keyring())
    claims = verify_issued_call_token(signing, phone_settings, twiml.parameters["token"])
    assert claims.tenant_id == phone.tenant.tenant_id
    assert claims.role == "caller"

    [row] = await _calls_for(owner_conn, params["CallSid"])
    assert row["id"] == claims.call_id
    assert row["direction"] == "phone_inbound"
    assert row["status"] == "created"
    assert row["client_audio_format"] == "ulaw_8000"
    assert str(row["agent_id"]) == phone.agent_id
    assert (row["from_number"], row["to_number"]) == (phone.caller, phone.number)
    assert json.loads(row["dynamic_variables"]) == {
        "caller_number": phone.caller,
        "caller_city": "SAN FRANCISCO",
    }
    assert json.loads(row["metadata"]) == {
        "twilio": {
            "call_sid": params["CallSid"],
            "account_sid": phone.account_sid,
            "from": phone.caller,
            "to": phone.number,
        }
    }

    # The relay's session carries the phone leg's ids, to check against the stream's start.
    r = await api.post(
        "/internal/v1/call-sessions",
        json={"token": twiml.parameters["token"]},
        headers=_service(phone_settings),
    )
    assert r.status_code == 200, r.text
    session = r.json()
    assert session["direction"] == "phone_inbound"
    assert session["telephony"] == {
        "provider": "twilio",
        "call_sid": params["CallSid"],
        "account_sid": phone.account_sid,
    }
    assert session["client_audio_format"] == "ulaw_8000"
    assert session["conversation_initiation"]["dynamic_variables"] == {
        "caller_number": phone.caller,
        "caller_city": "SAN FRANCISCO",
    }


async def test_a_retried_webhook_finds_the_call_it_created(
    api: httpx.AsyncClient, phone: PhoneTenant, owner_conn: asyncpg.Connection
) -> None:
    params = phone.voice_params()
    first, second = await asyncio.gather(
        twilio_post(api, VOICE_PATH, params, auth_token=phone.auth_token),
        twilio_post(api, VOICE_PATH, params, auth_token=phone.auth_token),
    )
    assert call_id_of(TwiML.parse(first)) == call_id_of(TwiML.parse(second))
    [row] = await _calls_for(owner_conn, params["CallSid"])
    # Once the call is under way, a replayed webhook gets no token for it.
    await owner_conn.execute("UPDATE calls SET status = 'active' WHERE id = $1", row["id"])
    replay = await twilio_post(api, VOICE_PATH, params, auth_token=phone.auth_token)
    assert replay.status_code == 200
    assert is_apology(TwiML.parse(replay))
    assert "token" not in replay.text


async def test_phone_tokens_fit_a_twilio_parameter(settings: Settings) -> None:
    """Compact tokens (hex ids, 64-bit jti) leave room for a key id of 16 characters."""
    signing = SigningKeyring([("2026-11-primary1", os.urandom(32))])
    issued = issue_call_token(
        signing,
        settings,
        call_id=uuid.uuid4(),
        tenant_id=uuid.uuid4(),
        role="caller",
        compact=True,
    )
    assert len("token") + len(issued.token) < 500
    claims = verify_issued_call_token(signing, settings, issued.token)
    assert claims.role == "caller"


# --- signatures --------------------------------------------------------------------------------


async def test_missing_or_wrong_signature_is_403(
    api: httpx.AsyncClient, phone: PhoneTenant, owner_conn: asyncpg.Connection
) -> None:
    params = phone.voice_params()
    bind_url = str(api.base_url).rstrip("/") + VOICE_PATH
    attempts: list[dict[str, Any]] = [
        {"auth_token": None},
        {"auth_token": "a_different_auth_token_0123456789"},
        # Signed for the address the server listens on, not the public one Twilio was given.
        {"auth_token": phone.auth_token, "signed_url": bind_url},
        {"auth_token": phone.auth_token, "signed_url": PUBLIC_API_URL + "/v1/twilio/other"},
        {"auth_token": None, "headers": {"x-twilio-signature": "bm90IGEgc2ln"}},
        {"auth_token": None, "headers": {"x-twilio-signature": "A" * 5000}},
    ]
    for attempt in attempts:
        r = await twilio_post(api, VOICE_PATH, params, **attempt)
        assert r.status_code == 403, attempt
        assert is_apology(TwiML.parse(r)), attempt
    # Parameters changed after signing (a forged caller id) break the signature too.
    signature = sign(phone.auth_token, PUBLIC_API_URL + VOICE_PATH, params)
    forged = await twilio_post(
        api,
        VOICE_PATH,
        {**params, "From": "+12025550123"},
        auth_token=None,
        headers={"x-twilio-signature": signature},
    )
    assert forged.status_code == 403
    assert await _calls_for(owner_conn, params["CallSid"]) == []


async def test_signed_url_is_the_public_one_whatever_the_headers_say(
    api: httpx.AsyncClient, phone: PhoneTenant
) -> None:
    """Host and X-Forwarded-* are chosen by whoever talks to us; PUBLIC_API_URL is not."""
    params = phone.voice_params()
    spoofed = {
        "host": "evil.example",
        "x-forwarded-host": "evil.example",
        "x-forwarded-proto": "http",
    }
    r = await twilio_post(
        api,
        VOICE_PATH,
        params,
        auth_token=phone.auth_token,
        signed_url="http://evil.example" + VOICE_PATH,
        headers=spoofed,
    )
    assert r.status_code == 403
    r = await twilio_post(api, VOICE_PATH, params, auth_token=phone.auth_token, headers=spoofed)
    assert r.status_code == 200, r.text


async def test_query_string_and_explicit_port_are_signed_as_twilio_does(
    api: httpx.AsyncClient, phone: PhoneTenant
) -> None:
    path = VOICE_PATH + "?site=eu&x=a%20b"
    r = await twilio_post(api, path, phone.voice_params(), auth_token=phone.auth_token)
    assert r.status_code == 200, r.text
    # Twilio may sign https://host:443/... for https://host/...: both are accepted.
    r = await twilio_post(
        api,
        VOICE_PATH,
        phone.voice_params(),
        auth_token=phone.auth_token,
        signed_url=PUBLIC_API_URL.replace(".com", ".com:443") + VOICE_PATH,
    )
    assert r.status_code == 200, r.text
    # The query string is part of what is signed.
    r = await twilio_post(
        api,
        VOICE_PATH + "?site=us",
        phone.voice_params(),
        auth_token=phone.auth_token,
        signed_url=PUBLIC_API_URL + VOICE_PATH + "?site=eu",
    )
    assert r.status_code == 403


async def test_shared_key_signatures_are_refused(
    api: httpx.AsyncClient, phone: PhoneTenant
) -> None:
    r = await twilio_post(
        api,
        VOICE_PATH,
        phone.voice_params(),
        auth_token=phone.auth_token,
        headers={"x-twilio-webhooks-signature-settings": "key=KS1,algorithm=HMAC_SHA256"},
    )
    assert r.status_code == 403


async def test_account_sid_must_be_the_tenants(
    api: httpx.AsyncClient, phone: PhoneTenant, other_tenant: NewTenant
) -> None:
    """Another tenant's Twilio account cannot place calls to this tenant's number, even with a
    signature that is valid for its own auth token."""
    other = await phone_tenant(api, other_tenant)
    params = phone.voice_params(AccountSid=other.account_sid)
    r = await twilio_post(api, VOICE_PATH, params, auth_token=other.auth_token)
    assert r.status_code == 403
    assert is_apology(TwiML.parse(r))
    r = await twilio_post(
        api, VOICE_PATH, phone.voice_params(AccountSid="ACnot-a-sid"), auth_token=phone.auth_token
    )
    assert r.status_code == 403


# --- polite refusals ---------------------------------------------------------------------------


async def test_unknown_number_hears_an_apology(api: httpx.AsyncClient, phone: PhoneTenant) -> None:
    for to in ("+12025550199", "client:alice", ""):
        r = await twilio_post(
            api, VOICE_PATH, phone.voice_params(To=to), auth_token=phone.auth_token
        )
        assert r.status_code == 200
        twiml = TwiML.parse(r)
        assert is_apology(twiml)
        assert "not in service" in twiml.said


async def test_over_the_call_cap_hears_busy(
    api: httpx.AsyncClient,
    phone_settings: Settings,
    phone: PhoneTenant,
    redis_client: aioredis.Redis,
    owner_conn: asyncpg.Connection,
) -> None:
    tenant_id = phone.tenant.tenant_id
    # The webhook reads exactly the leases the relay writes.
    cap = TenantCallCap(redis_client, phone_settings)
    assert cap.key(tenant_id) == tenant_calls_key(phone_settings, tenant_id)
    await owner_conn.execute("UPDATE tenants SET max_concurrent_calls = 1 WHERE id = $1", tenant_id)
    assert await cap.acquire(tenant_id, uuid.uuid4(), 1)
    params = phone.voice_params()
    r = await twilio_post(api, VOICE_PATH, params, auth_token=phone.auth_token)
    assert r.status_code == 200
    twiml = TwiML.parse(r)
    assert is_apology(twiml)
    assert "busy" in twiml.said
    assert await _calls_for(owner_conn, params["CallSid"]) == []


async def test_floods_are_limited_per_address_and_number(
    phone_settings: Settings, phone: PhoneTenant
) -> None:
    """Twilio's few addresses carry every tenant's calls: a flood from one address at one number
    is refused (429) without holding up that address's calls to other numbers."""
    settings = phone_settings.model_copy(
        update={"rate_limit_api_per_second": 0.01, "rate_limit_api_burst": 1}
    )
    address = {"x-forwarded-for": "198.18.7.7"}
    async with serve(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as api:
        statuses = [
            (
                await twilio_post(
                    api, VOICE_PATH, phone.voice_params(), auth_token="x" * 32, headers=address
                )
            ).status_code
            for _ in range(3)
        ]
        assert statuses == [403, 403, 429]
        elsewhere = phone.voice_params(To="+12025550188")
        r = await twilio_post(api, VOICE_PATH, elsewhere, auth_token="x" * 32, headers=address)
        assert r.status_code == 200  # an unknown number, but not limited
        r = await twilio_post(api, VOICE_PATH, phone.voice_params(), auth_token=phone.auth_token)
        assert r.status_code == 200, r.text  # another address


async def test_an_internal_failure_is_an_apology(
    phone_settings: Settings, phone: PhoneTenant
) -> None:
    """A control API that cannot open the tenant's credentials (no ENCRYPTION_KEYS) still
    answers Twilio with TwiML the caller hears, not an error page."""
    broken = phone_settings.model_copy(update={"encryption_keys": None})
    async with serve(create_app(broken)) as url, httpx.AsyncClient(base_url=url) as api:
        r = await twilio_post(api, VOICE_PATH, phone.voice_params(), auth_token=phone.auth_token)
    assert r.status_code == 200
    twiml = TwiML.parse(r)
    assert is_apology(twiml)
    assert "technical difficulties" in twiml.said


async def test_not_form_encoded_is_415(api: httpx.AsyncClient, phone: PhoneTenant) -> None:
    r = await api.post(
        VOICE_PATH, json=phone.voice_params(), headers={"x-twilio-signature": "c2lnbmF0dXJl"}
    )
    assert r.status_code == 415


# --- fast first word: the prefetched signed URL ------------------------------------------------


async def test_prefetched_signed_url_is_used_once(
    api: httpx.AsyncClient,
    phone_settings: Settings,
    tenant: NewTenant,
    owner_conn: asyncpg.Connection,
) -> None:
    credential_id = await insert_elevenlabs_credential(api, tenant, EL_KEY)
    phone = await phone_tenant(
        api,
        tenant,
        elevenlabs_agent_id=PRIVATE_AGENT,
        elevenlabs_credential_id=str(credential_id),
    )
    r = await twilio_post(api, VOICE_PATH, phone.voice_params(), auth_token=phone.auth_token)
    assert r.status_code == 200, r.text
    twiml = TwiML.parse(r)
    call_id = call_id_of(twiml)
    row = None
    async with asyncio.timeout(15):
        while row is None or row["upstream_url_ciphertext"] is None:
            await asyncio.sleep(0.05)
            row = await owner_conn.fetchrow("SELECT * FROM calls WHERE id = $1", call_id)
    vault = Vault(phone_settings.encryption_keyring())
    sealed = Sealed(
        row["upstream_url_key_id"], row["upstream_url_nonce"], row["upstream_url_ciphertext"]
    )
    prefetched = vault.open(
        sealed, associated_data(tenant.tenant_id, call_id), what="test", bound_to="call"
    ).decode()
    assert "conversation_signature=" in prefetched
    # Bound to its call: the same ciphertext does not open for another one.
    with pytest.raises(Exception, match="failed authentication"):
        vault.open(sealed, associated_data(tenant.tenant_id, uuid.uuid4()), what="x", bound_to="y")

    async def session() -> dict[str, Any]:
        r = await api.post(
            "/internal/v1/call-sessions",
            json={"token": twiml.parameters["token"]},
            headers=_service(phone_settings),
        )
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    first = await session()
    assert first["upstream_url"] == prefetched
    cleared = await owner_conn.fetchrow(
        "SELECT upstream_url_ciphertext, upstream_url_expires_at FROM calls WHERE id = $1", call_id
    )
    assert tuple(cleared) == (None, None)
    # Single use: a reconnect gets a freshly fetched URL.
    second = await session()
    assert second["upstream_url"] != prefetched
    assert "conversation_signature=" in second["upstream_url"]


# --- secrets -----------------------------------------------------------------------------------


async def test_secrets_stay_out_of_logs_and_answers(
    api: httpx.AsyncClient, phone: PhoneTenant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ok = await twilio_post(api, VOICE_PATH, phone.voice_params(), auth_token=phone.auth_token)
    token = TwiML.parse(ok).parameters["token"]
    refused = await twilio_post(api, VOICE_PATH, phone.voice_params(), auth_token="wrong_" * 5)
    assert refused.status_code == 403
    for text in (caplog.text, refused.text, ok.text):
        assert phone.auth_token not in text
    assert token not in caplog.text
    assert token.split(".")[2] not in caplog.text
    assert any("twilio voice: connecting the stream" in r.getMessage() for r in caplog.records)
    assert any("invalid X-Twilio-Signature" in r.getMessage() for r in caplog.records)


async def test_webhooks_are_documented_as_form_bodies(api: httpx.AsyncClient) -> None:
    spec = (await api.get("/openapi.json")).json()
    for path in (VOICE_PATH, "/v1/twilio/status"):
        operation = spec["paths"][path]["post"]
        assert "application/x-www-form-urlencoded" in operation["requestBody"]["content"]
        assert "text/xml" in operation["responses"]["200"]["content"]
        assert "text/xml" in operation["responses"]["403"]["content"]
        assert "security" not in operation
    agent = spec["components"]["schemas"]["AgentCreate"]["properties"]
    assert "transfer_numbers" in agent
    assert "phone_dynamic_variables" in agent


async def test_agent_phone_settings_are_validated(
    api: httpx.AsyncClient, tenant: NewTenant
) -> None:
    base = {"name": "a", "elevenlabs_agent_id": "agent_a"}
    r = await api.post(
        "/v1/agents",
        headers=auth(tenant),
        json={
            **base,
            "transfer_numbers": ["+1 (415) 555-2671", "+14155552671"],
            "phone_dynamic_variables": {"caller": "From", "city": "FromCity"},
        },
    )
    assert r.status_code == 201, r.text
    assert r.json()["transfer_numbers"] == ["+14155552671"]
    assert r.json()["phone_dynamic_variables"] == {"caller": "From", "city": "FromCity"}
    for bad in (
        {"transfer_numbers": ["911"]},
        {"transfer_numbers": ["+1415555"]},
        {"transfer_numbers": [f"+1415555{n:04d}" for n in range(21)]},
        {"phone_dynamic_variables": {"caller": "AuthToken"}},
        {"phone_dynamic_variables": {"system__caller": "From"}},
        {"phone_dynamic_variables": {"caller": 1}},
    ):
        r = await api.post("/v1/agents", headers=auth(tenant), json={**base, **bad})
        assert r.status_code == 422, bad
    agent_id = (await api.get("/v1/agents", headers=auth(tenant))).json()["items"][0]["id"]
    r = await api.patch(
        f"/v1/agents/{agent_id}", headers=auth(tenant), json={"transfer_numbers": []}
    )
    assert r.status_code == 200
    assert r.json()["transfer_numbers"] == []
