"""POST /v1/twilio/status: Twilio's call status callback lands in the call log as a ``telephony``
event, written by the real call-log consumer."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from control_api.app import create_app
from control_api.bootstrap import NewTenant
from tests.support.servers import serve
from tests.support.twilio import (
    PUBLIC_API_URL,
    STATUS_PATH,
    VOICE_PATH,
    PhoneTenant,
    TwiML,
    call_id_of,
    new_call_sid,
    phone_tenant,
    twilio_post,
)
from voicerelay.settings import Settings


@pytest.fixture(scope="module")
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings.model_copy(update={"public_api_url": PUBLIC_API_URL}))
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
        yield client


@pytest.fixture
async def phone(api: httpx.AsyncClient, tenant: NewTenant) -> PhoneTenant:
    return await phone_tenant(api, tenant)


def _status_params(phone: PhoneTenant, call_sid: str, **extra: str) -> dict[str, str]:
    return {
        "AccountSid": phone.account_sid,
        "ApiVersion": "2010-04-01",
        "CallSid": call_sid,
        "CallStatus": "completed",
        "CallDuration": "42",
        "Direction": "inbound",
        "From": phone.caller,
        "To": phone.number,
        "SequenceNumber": "3",
        "Timestamp": "Thu, 26 Nov 2026 01:02:03 +0000",
        **extra,
    }


async def _telephony_events(
    owner_conn: asyncpg.Connection, call_id: object, count: int = 1
) -> list[asyncpg.Record]:
    async with asyncio.timeout(20):
        while True:
            rows = await owner_conn.fetch(
                "SELECT * FROM call_events WHERE call_id = $1 AND type = 'telephony'"
                " ORDER BY occurred_at",
                call_id,
            )
            if len(rows) >= count:
                return rows
            await asyncio.sleep(0.05)


async def test_status_callback_is_recorded_in_the_call_log(
    api: httpx.AsyncClient, phone: PhoneTenant, owner_conn: asyncpg.Connection
) -> None:
    voice = phone.voice_params()
    call_sid = voice["CallSid"]
    r = await twilio_post(api, VOICE_PATH, voice, auth_token=phone.auth_token)
    call_id = call_id_of(TwiML.parse(r))

    params = _status_params(phone, call_sid)
    r = await twilio_post(api, STATUS_PATH, params, auth_token=phone.auth_token)
    assert r.status_code == 200, r.text
    assert TwiML.parse(r).verbs == []
    [event] = await _telephony_events(owner_conn, call_id)
    assert event["tenant_id"] == phone.tenant.tenant_id
    assert json.loads(event["data"]) == {
        "provider": "twilio",
        "call_status": "completed",
        "call_sid": call_sid,
        "duration_seconds": 42,
        "sequence": 3,
    }
    assert event["occurred_at"].isoformat() == "2026-11-26T01:02:03+00:00"

    # Twilio retrying the same callback changes nothing; the next status is a new event.
    r = await twilio_post(api, STATUS_PATH, params, auth_token=phone.auth_token)
    assert r.status_code == 200
    ringing = _status_params(
        phone,
        call_sid,
        CallStatus="ringing",
        SequenceNumber="0",
        Timestamp="Thu, 26 Nov 2026 01:01:00 +0000",
    )
    del ringing["CallDuration"]
    r = await twilio_post(api, STATUS_PATH, ringing, auth_token=phone.auth_token)
    assert r.status_code == 200
    events = await _telephony_events(owner_conn, call_id, count=2)
    assert [json.loads(e["data"])["call_status"] for e in events] == ["ringing", "completed"]
    # The call row itself is the relay's to end: a telephony event does not touch its status.
    status = await owner_conn.fetchval("SELECT status FROM calls WHERE id = $1", call_id)
    assert status == "created"


async def test_unknown_call_sid_is_acknowledged_and_logged(
    api: httpx.AsyncClient, phone: PhoneTenant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for call_sid in (new_call_sid(), "not-a-sid"):
        params = _status_params(phone, call_sid)
        r = await twilio_post(api, STATUS_PATH, params, auth_token=phone.auth_token)
        assert r.status_code == 200
    assert sum("unknown CallSid" in r.getMessage() for r in caplog.records) == 2


async def test_status_callback_signature_is_checked(
    api: httpx.AsyncClient,
    phone: PhoneTenant,
    other_tenant: NewTenant,
    owner_conn: asyncpg.Connection,
) -> None:
    voice = phone.voice_params()
    r = await twilio_post(api, VOICE_PATH, voice, auth_token=phone.auth_token)
    call_id = call_id_of(TwiML.parse(r))
    params = _status_params(phone, voice["CallSid"])
    other = await phone_tenant(api, other_tenant)
    for attempt in (
        {"auth_token": None},
        {"auth_token": other.auth_token},
        {"auth_token": phone.auth_token, "signed_url": str(api.base_url) + STATUS_PATH},
    ):
        r = await twilio_post(api, STATUS_PATH, params, **attempt)  # type: ignore[arg-type]
        assert r.status_code == 403, attempt
    # Another tenant's account cannot write into this tenant's call log (refused before any
    # event is appended, so nothing can arrive later).
    r = await twilio_post(
        api,
        STATUS_PATH,
        {**params, "AccountSid": other.account_sid},
        auth_token=other.auth_token,
    )
    assert r.status_code == 403
    assert (
        await owner_conn.fetchval(
            "SELECT count(*) FROM call_events WHERE call_id = $1 AND type = 'telephony'", call_id
        )
        == 0
    )
