"""SessionClient against the real control API: the session it parses and every error it maps."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from control_api.app import create_app
from control_api.bootstrap import NewTenant
from relay.sessions import CallSession, SessionClient, SessionError
from tests.support.servers import serve
from tests.support.services import free_port
from tests.support.tenants import auth
from tests.test_call_tokens import create_call, insert_agent, insert_elevenlabs_credential
from voicerelay.settings import Settings

EL_KEY = "sk_tenant_key_for_relay_sessions_7d1e"


@pytest.fixture
async def plain_http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture(scope="module")
async def el_unreachable_api(settings: Settings) -> AsyncIterator[str]:
    """A control API whose ElevenLabs is a closed port."""
    closed = f"http://127.0.0.1:{free_port()}"
    async with serve(create_app(settings.model_copy(update={"elevenlabs_api_url": closed}))) as url:
        yield url


def client(http: httpx.AsyncClient, base_url: str, settings: Settings) -> SessionClient:
    return SessionClient(http, base_url, settings.require("internal_service_token"))


async def _code(session_client: SessionClient, token: str) -> str:
    with pytest.raises(SessionError) as failed:
        await session_client.fetch(token)
    assert failed.value.message
    return failed.value.code


async def test_public_agent_session(
    http: httpx.AsyncClient,
    plain_http: httpx.AsyncClient,
    api_url: str,
    settings: Settings,
    tenant: NewTenant,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    agent_id = await insert_agent(
        http,
        tenant,
        elevenlabs_agent_id="agent_relay_public",
        input_audio_format="ulaw_8000",
        output_audio_format="pcm_24000",
        overrides={"agent": {"first_message": "Hi"}},
        variables={"user_name": "default", "plan": "gold"},
        allowed_origins=["https://app.example.com"],
    )
    body = await create_call(
        http,
        tenant,
        agent_id,
        client_audio_format="pcm_16000",
        dynamic_variables={"user_name": "Ada"},
    )
    got = await client(plain_http, api_url, settings).fetch(body["token"])
    assert isinstance(got, CallSession)
    assert got.call_id == uuid.UUID(body["call_id"])
    assert got.tenant_id == tenant.tenant_id
    assert got.role == "caller"
    assert got.status == "created"
    assert got.agent.id == agent_id
    assert got.agent.elevenlabs_agent_id == "agent_relay_public"
    assert (got.agent.input_audio_format, got.agent.output_audio_format) == (
        "ulaw_8000",
        "pcm_24000",
    )
    assert got.agent.allowed_origins == ["https://app.example.com"]
    assert got.client_audio_format == "pcm_16000"
    assert got.conversation_initiation.conversation_config_override == {
        "agent": {"first_message": "Hi"}
    }
    assert got.conversation_initiation.dynamic_variables == {"user_name": "Ada", "plan": "gold"}
    assert got.upstream_url.endswith("/v1/convai/conversation?agent_id=agent_relay_public")
    assert got.upstream_url_expires_at is None
    assert got.max_duration_seconds == settings.max_call_duration_seconds
    assert got.tenant_max_concurrent_calls >= 1
    assert got.conversation_ids == []
    # The URL (a credential for private agents) stays out of reprs; the token out of logs.
    assert got.upstream_url not in repr(got)
    assert body["token"] not in caplog.text

    monitor = await http.post(f"/v1/calls/{body['call_id']}/monitor-token", headers=auth(tenant))
    watched = await client(plain_http, api_url, settings).fetch(monitor.json()["token"])
    assert watched.role == "monitor"
    assert watched.call_id == got.call_id


async def test_from_settings(
    http: httpx.AsyncClient,
    plain_http: httpx.AsyncClient,
    api_url: str,
    settings: Settings,
    tenant: NewTenant,
) -> None:
    body = await create_call(http, tenant, await insert_agent(http, tenant))
    sessions = SessionClient.from_settings(
        plain_http, settings.model_copy(update={"control_api_internal_url": api_url})
    )
    assert (await sessions.fetch(body["token"])).call_id == uuid.UUID(body["call_id"])
    assert settings.require("internal_service_token") not in repr(sessions)


async def test_wrong_service_token_is_unauthorized(
    http: httpx.AsyncClient,
    plain_http: httpx.AsyncClient,
    api_url: str,
    settings: Settings,
    tenant: NewTenant,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    body = await create_call(http, tenant, await insert_agent(http, tenant))
    wrong = SessionClient(plain_http, api_url, "not-the-service-token")
    assert await _code(wrong, body["token"]) == "unauthorized"
    # The operator hears about it: this is the relay's misconfiguration, not the caller's.
    assert any("service token" in r.getMessage() for r in caplog.records)
    assert body["token"] not in caplog.text


async def test_forged_or_garbage_call_token_is_unauthorized(
    plain_http: httpx.AsyncClient, api_url: str, settings: Settings
) -> None:
    sessions = client(plain_http, api_url, settings)
    assert await _code(sessions, "not-a-token") == "unauthorized"
    header_payload = "eyJhbGciOiJFZERTQSIsInR5cCI6ImNhbGwrand0In0.e30"
    assert await _code(sessions, header_payload + ".c2lnbmF0dXJl") == "unauthorized"


async def test_ended_call_is_call_ended(
    http: httpx.AsyncClient,
    plain_http: httpx.AsyncClient,
    api_url: str,
    settings: Settings,
    tenant: NewTenant,
    owner_conn: asyncpg.Connection,
) -> None:
    body = await create_call(http, tenant, await insert_agent(http, tenant))
    await owner_conn.execute(
        "UPDATE calls SET status = 'ended' WHERE id = $1", uuid.UUID(body["call_id"])
    )
    assert await _code(client(plain_http, api_url, settings), body["token"]) == "call_ended"


async def test_deleted_agent_is_forbidden(
    http: httpx.AsyncClient,
    plain_http: httpx.AsyncClient,
    api_url: str,
    settings: Settings,
    tenant: NewTenant,
) -> None:
    agent_id = await insert_agent(http, tenant)
    body = await create_call(http, tenant, agent_id)
    r = await http.delete(f"/v1/agents/{agent_id}", headers=auth(tenant))
    assert r.status_code == 204
    sessions = client(plain_http, api_url, settings)
    with pytest.raises(SessionError) as failed:
        await sessions.fetch(body["token"])
    assert failed.value.code == "forbidden"
    assert (failed.value.status, failed.value.problem) == (409, "agent_unavailable")


async def test_elevenlabs_unreachable_is_upstream_unavailable(
    el_unreachable_api: str,
    plain_http: httpx.AsyncClient,
    settings: Settings,
    tenant: NewTenant,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with httpx.AsyncClient(base_url=el_unreachable_api, timeout=10) as api:
        credential_id = await insert_elevenlabs_credential(api, tenant, EL_KEY)
        agent_id = await insert_agent(
            api, tenant, elevenlabs_agent_id="agent_private_r", credential_id=credential_id
        )
        body = await create_call(api, tenant, agent_id)
    sessions = client(plain_http, el_unreachable_api, settings)
    assert await _code(sessions, body["token"]) == "upstream_unavailable"
    assert EL_KEY not in caplog.text
    assert body["token"] not in caplog.text


async def test_control_api_unreachable_is_upstream_unavailable(
    plain_http: httpx.AsyncClient, settings: Settings
) -> None:
    sessions = client(plain_http, f"http://127.0.0.1:{free_port()}", settings)
    assert await _code(sessions, "whatever") == "upstream_unavailable"


async def test_unexpected_answers_are_internal_errors(
    plain_http: httpx.AsyncClient, settings: Settings
) -> None:
    """Something that is not the control API (a misrouted URL) answers with HTML or odd JSON."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    answers = iter(
        [
            PlainTextResponse("<html>oops</html>", status_code=500),
            JSONResponse({"call_id": "not-a-uuid"}),
            JSONResponse({"code": "rate_limited"}, status_code=429),
        ]
    )

    async def endpoint(request: object) -> object:
        return next(answers)

    app = Starlette(routes=[Route("/internal/v1/call-sessions", endpoint, methods=["POST"])])
    async with serve(app) as url:
        sessions = client(plain_http, url, settings)
        for _ in range(3):
            assert await _code(sessions, "whatever") == "internal_error"
