"""POST /internal/v1/calls/hangup and /transfer: the control API updates the live call through
Twilio's REST API (here the REST emulator) with the tenant's credentials, and only dials numbers
in the agent's transfer allow-list."""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from control_api.app import create_app
from control_api.bootstrap import NewTenant
from tests.support.servers import serve
from tests.support.services import free_port
from tests.support.tenants import auth
from tests.support.twilio import (
    PUBLIC_API_URL,
    VOICE_PATH,
    PhoneTenant,
    TwiML,
    call_id_of,
    phone_tenant,
    twilio_post,
)
from tests.test_call_tokens import create_call, insert_agent
from voicerelay.emulators.elevenlabs import create_emulator_app
from voicerelay.emulators.twilio_rest import TwilioRestConfig
from voicerelay.settings import Environment, Settings
from voicerelay.up import Plan, emulator_service

TRANSFER_TO = "+14155550123"


@dataclass
class Stack:
    api: httpx.AsyncClient
    twilio: TwilioRestConfig
    settings: Settings
    emulator_url: str


@pytest.fixture(scope="module")
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    twilio = TwilioRestConfig()
    async with serve(create_emulator_app(twilio=twilio)) as emulator_url:
        api_settings = settings.model_copy(
            update={"public_api_url": PUBLIC_API_URL, "twilio_api_url": emulator_url}
        )
        async with (
            serve(create_app(api_settings)) as url,
            httpx.AsyncClient(base_url=url, timeout=20) as client,
        ):
            yield Stack(client, twilio, api_settings, emulator_url)


@dataclass
class LiveCall:
    phone: PhoneTenant
    call_sid: str
    token: str
    call_id: uuid.UUID


async def _live_call(stack: Stack, tenant: NewTenant, *, known_to_twilio: bool = True) -> LiveCall:
    phone = await phone_tenant(stack.api, tenant, transfer_numbers=[TRANSFER_TO])
    stack.twilio.accounts[phone.account_sid] = phone.auth_token
    params = phone.voice_params()
    if known_to_twilio:
        stack.twilio.add_call(phone.account_sid, params["CallSid"], to_number=phone.number)
    r = await twilio_post(stack.api, VOICE_PATH, params, auth_token=phone.auth_token)
    assert r.status_code == 200, r.text
    twiml = TwiML.parse(r)
    return LiveCall(phone, params["CallSid"], twiml.parameters["token"], call_id_of(twiml))


def _service(settings: Settings) -> dict[str, str]:
    assert settings.internal_service_token is not None
    return {"authorization": f"Bearer {settings.internal_service_token.get_secret_value()}"}


async def _post(
    api: httpx.AsyncClient, settings: Settings, action: str, **body: Any
) -> httpx.Response:
    return await api.post(f"/internal/v1/calls/{action}", json=body, headers=_service(settings))


def _requests_for(twilio: TwilioRestConfig, call_sid: str) -> list[Any]:
    return [r for r in twilio.requests if r.call_sid == call_sid]


# --- hang-up -----------------------------------------------------------------------------------


async def test_hangup_completes_the_call_with_the_tenants_credentials(
    stack: Stack, tenant: NewTenant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    live = await _live_call(stack, tenant)
    r = await _post(stack.api, stack.settings, "hangup", token=live.token)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "completed"}
    [request] = _requests_for(stack.twilio, live.call_sid)
    assert request.method == "POST"
    assert request.path == (
        f"/2010-04-01/Accounts/{live.phone.account_sid}/Calls/{live.call_sid}.json"
    )
    assert request.authenticated
    assert request.auth_user == live.phone.account_sid
    assert request.form == {"Status": "completed"}
    assert stack.twilio.calls[live.call_sid].status == "completed"
    for text in (caplog.text, r.text):
        assert live.phone.auth_token not in text
        assert base64.b64encode(live.phone.auth_token.encode()).decode()[:20] not in text
        assert live.token not in text


async def test_hangup_of_a_call_twilio_no_longer_has_is_already_ended(
    stack: Stack, tenant: NewTenant
) -> None:
    live = await _live_call(stack, tenant, known_to_twilio=False)
    r = await _post(stack.api, stack.settings, "hangup", token=live.token)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "already_ended"}
    [request] = _requests_for(stack.twilio, live.call_sid)
    assert request.status == 404


async def test_hangup_can_be_switched_off(stack: Stack, tenant: NewTenant) -> None:
    live = await _live_call(stack, tenant)
    settings = stack.settings.model_copy(update={"twilio_hangup_on_agent_end": False})
    async with serve(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as api:
        r = await _post(api, settings, "hangup", token=live.token)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "skipped"}
    assert _requests_for(stack.twilio, live.call_sid) == []


async def test_rejected_credentials_are_a_twilio_error(stack: Stack, tenant: NewTenant) -> None:
    live = await _live_call(stack, tenant)
    stack.twilio.accounts[live.phone.account_sid] = "rotated_in_twilio_0123456789"
    r = await _post(stack.api, stack.settings, "hangup", token=live.token)
    assert r.status_code == 502
    assert r.json()["code"] == "twilio_error"
    [request] = _requests_for(stack.twilio, live.call_sid)
    assert (request.status, request.authenticated) == (401, False)
    assert live.phone.auth_token not in r.text


async def test_an_older_credential_of_the_account_is_tried_after_a_rejected_one(
    stack: Stack, tenant: NewTenant
) -> None:
    """Mid-rotation the tenant may store the account twice; the newest is tried first."""
    live = await _live_call(stack, tenant)
    r = await stack.api.post(
        "/v1/credentials",
        headers=auth(tenant),
        json={
            "provider": "twilio",
            "name": "Twilio, new token (not active in Twilio yet)",
            "account_sid": live.phone.account_sid,
            "auth_token": "not_yet_active_token_0123456789",
        },
    )
    assert r.status_code == 201, r.text
    r = await _post(stack.api, stack.settings, "hangup", token=live.token)
    assert r.status_code == 200, r.text
    tried = _requests_for(stack.twilio, live.call_sid)
    assert [(t.authenticated, t.status) for t in tried] == [(False, 401), (True, 200)]


async def test_unreachable_twilio_is_twilio_unavailable(stack: Stack, tenant: NewTenant) -> None:
    live = await _live_call(stack, tenant)
    settings = stack.settings.model_copy(
        update={"twilio_api_url": f"http://127.0.0.1:{free_port()}"}
    )
    async with serve(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as api:
        r = await _post(api, settings, "hangup", token=live.token)
    assert r.status_code in (502, 504)
    assert r.json()["code"] == "twilio_unavailable"


async def test_browser_calls_and_bad_tokens_are_refused(stack: Stack, tenant: NewTenant) -> None:
    agent_id = await insert_agent(stack.api, tenant)
    browser = await create_call(stack.api, tenant, agent_id)
    r = await _post(stack.api, stack.settings, "hangup", token=browser["token"])
    assert r.status_code == 409
    assert r.json()["code"] == "not_a_phone_call"
    r = await _post(stack.api, stack.settings, "hangup", token="not-a-token")
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_call_token"
    monitor = await stack.api.post(
        f"/v1/calls/{browser['call_id']}/monitor-token", headers=auth(tenant)
    )
    r = await _post(stack.api, stack.settings, "hangup", token=monitor.json()["token"])
    assert r.status_code == 403
    # The service token comes first: without it, nothing about the body is revealed.
    for action in ("hangup", "transfer"):
        r = await stack.api.post(f"/internal/v1/calls/{action}", content=b"{not json")
        assert r.status_code == 401
        r = await stack.api.post(
            f"/internal/v1/calls/{action}", json={"token": "x"}, headers=auth(tenant)
        )
        assert r.status_code == 401


async def test_without_a_twilio_credential_the_call_cannot_be_controlled(
    stack: Stack, tenant: NewTenant
) -> None:
    live = await _live_call(stack, tenant)
    r = await stack.api.delete(f"/v1/credentials/{live.phone.credential_id}", headers=auth(tenant))
    assert r.status_code == 204, r.text
    r = await _post(stack.api, stack.settings, "hangup", token=live.token)
    assert r.status_code == 409
    assert r.json()["code"] == "credential_unusable"


# --- transfer ----------------------------------------------------------------------------------


async def test_transfer_dials_an_allowed_number(stack: Stack, tenant: NewTenant) -> None:
    live = await _live_call(stack, tenant)
    r = await _post(stack.api, stack.settings, "transfer", token=live.token, to="+1 415-555-0123")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "transferred", "to": TRANSFER_TO}
    [request] = _requests_for(stack.twilio, live.call_sid)
    assert request.authenticated
    twiml = request.form["Twiml"]
    assert "<Dial>+14155550123</Dial>" in twiml
    assert stack.twilio.calls[live.call_sid].twiml == twiml
    # The call log says who the call went to.
    async with asyncio.timeout(20):
        while True:
            r = await stack.api.get(f"/v1/calls/{live.call_id}", headers=auth(tenant))
            logged = [e["data"] for e in r.json()["timeline"] if e["type"] == "telephony"]
            if logged:
                break
            await asyncio.sleep(0.05)
    assert logged == [
        {
            "provider": "twilio",
            "call_status": "in-progress",
            "call_sid": live.call_sid,
            "action": "transfer",
            "to": TRANSFER_TO,
        }
    ]


async def test_transfer_outside_the_allow_list_is_refused(
    stack: Stack, tenant: NewTenant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    live = await _live_call(stack, tenant)
    for number in ("+19005550100", "+442079460000"):
        r = await _post(stack.api, stack.settings, "transfer", token=live.token, to=number)
        assert r.status_code == 403
        assert r.json()["code"] == "transfer_not_allowed"
    for bad in ("911", "+1", "call my friend", "+" + "9" * 20):
        r = await _post(stack.api, stack.settings, "transfer", token=live.token, to=bad)
        assert r.status_code == 422, bad
    # Nothing reached Twilio.
    assert _requests_for(stack.twilio, live.call_sid) == []
    assert "+19005550100" not in caplog.text


async def test_transfer_of_an_ended_call_is_409(stack: Stack, tenant: NewTenant) -> None:
    live = await _live_call(stack, tenant)
    assert (await _post(stack.api, stack.settings, "hangup", token=live.token)).status_code == 200
    r = await _post(stack.api, stack.settings, "transfer", token=live.token, to=TRANSFER_TO)
    assert r.status_code == 409
    assert r.json()["code"] == "call_ended"


# --- the REST emulator speaks Twilio's error shapes --------------------------------------------


async def test_emulator_answers_like_twilio(stack: Stack, tenant: NewTenant) -> None:
    live = await _live_call(stack, tenant)
    path = f"/2010-04-01/Accounts/{live.phone.account_sid}/Calls/{live.call_sid}.json"
    async with httpx.AsyncClient(base_url=stack.emulator_url) as client:
        r = await client.post(path, data={"Status": "completed"}, auth=("ACbad", "nope"))
        assert r.status_code == 401
        assert r.json()["code"] == 20003
        assert r.headers["www-authenticate"].startswith("Basic")
        good = (live.phone.account_sid, live.phone.auth_token)
        unknown = path.replace(live.call_sid, "CA" + "f" * 32)
        r = await client.post(unknown, data={"Status": "completed"}, auth=good)
        assert (r.status_code, r.json()["code"]) == (404, 20404)
        r = await client.get(path, auth=good)
        assert r.status_code == 200
        assert r.json()["sid"] == live.call_sid
        assert r.json()["status"] == "in-progress"


# --- local runs ------------------------------------------------------------------------------


def test_up_points_twilio_at_the_emulator(settings: Settings) -> None:
    """`voicerelay up` in development hangs phone calls up through its own emulator, unless
    TWILIO_API_URL is configured."""
    local = settings.model_copy(update={"environment": Environment.development})
    plan = Plan(local)
    assert emulator_service(plan, frozenset()) is not None
    assert plan.settings.twilio_api_url == f"http://127.0.0.1:{local.emulator_port}"
    assert "Twilio REST" in plan.sources
    configured = Plan(local)
    emulator_service(configured, frozenset({"TWILIO_API_URL"}))
    assert configured.settings.twilio_api_url == local.twilio_api_url
