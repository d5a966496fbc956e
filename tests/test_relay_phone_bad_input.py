"""Bad Media Streams input at /twilio/stream: every case is a clean close with its documented code
(relay.phone.closes), one log line without the token, a counted metric, and the relay goes on
serving other calls."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY

from control_api.bootstrap import NewTenant
from tests.support.relay_stack import CallClient, ConnectRefused, RelayStack, relay_stack
from tests.test_relay_call import call_log, eventually
from tests.test_relay_phone import (
    ULAW,
    ULAW_AGENT,
    PhoneCall,
    el_agent,
    ended_data,
    make_phone_call,
    stream_url,
)
from voicerelay.emulators.audio import tone
from voicerelay.emulators.twilio_media import (
    ULAW_SILENCE,
    MediaStreamsCaller,
    StreamMessages,
    encode,
    twilio_sid,
)
from voicerelay.settings import Settings


@pytest.fixture(scope="module")
async def stack(settings: Settings) -> AsyncIterator[RelayStack]:
    quick = settings.model_copy(update={"relay_twilio_start_timeout_seconds": 1.0})
    async with relay_stack(quick) as running:
        yield running


@pytest.fixture
async def phone(
    stack: RelayStack, api: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> PhoneCall:
    agent_id, _ = await el_agent(stack, api, tenant, ULAW_AGENT)
    return await make_phone_call(stack, api, tenant, owner_conn, agent_id)


@pytest.fixture(autouse=True)
def relay_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="relay.phone.stream")
    return caplog


def refusals(code: str) -> float:
    return (
        REGISTRY.get_sample_value("voicerelay_relay_phone_streams_total", {"result": code}) or 0.0
    )


def log_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def closed_with(caller: Any, code: int, reason: str) -> None:
    await caller.wait_closed(within=15)
    assert (caller.close_code, caller.close_reason) == (code, reason)


async def assert_still_serving(stack: RelayStack, phone: PhoneCall) -> None:
    spoken = tone(ULAW, 0.5)
    async with phone.caller(stack) as caller:
        await caller.send_audio(spoken + ULAW_SILENCE * 5600)
        assert await caller.wait_for_audio(len(spoken), within=20) == spoken
        await caller.stop()


# --- before the call starts --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code", "close"),
    [
        ("{not json", "invalid_json", 4400),
        (b"\x00\xff binary", "invalid_json", 4400),
        ('{"event": 7}', "invalid_message", 4400),
        ("x" * (64 * 1024 + 1), "message_too_large", 1009),
    ],
)
async def test_garbage_before_start(
    stack: RelayStack,
    phone: PhoneCall,
    relay_logs: pytest.LogCaptureFixture,
    frame: Any,
    code: str,
    close: int,
) -> None:
    before = refusals(code)
    async with MediaStreamsCaller.connect(stream_url(stack), handshake=False) as caller:
        await caller.send_raw(frame)
        await closed_with(caller, close, code)
    assert refusals(code) == before + 1
    assert len(log_lines(relay_logs, f"phone stream refused: {code}")) == 1
    await assert_still_serving(stack, phone)


async def test_media_before_start_and_no_start_at_all(
    stack: RelayStack, phone: PhoneCall, relay_logs: pytest.LogCaptureFixture
) -> None:
    async with MediaStreamsCaller.connect(stream_url(stack), handshake=False) as caller:
        await caller.send_message(caller.messages.connected())
        await caller.send_message(caller.messages.media(b"\xff" * 160))
        await closed_with(caller, 4400, "missing_start")
    async with MediaStreamsCaller.connect(stream_url(stack), handshake=False) as caller:
        await caller.send_message(caller.messages.connected())  # then nothing
        await closed_with(caller, 4408, "start_timeout")
    assert log_lines(relay_logs, "phone stream refused: missing_start")
    assert log_lines(relay_logs, "phone stream refused: start_timeout")
    await assert_still_serving(stack, phone)


async def test_unsupported_media_format(stack: RelayStack, phone: PhoneCall) -> None:
    async with MediaStreamsCaller.connect(stream_url(stack), handshake=False) as caller:
        start = caller.messages.start({"token": phone.token})
        start["start"]["mediaFormat"] = {
            "encoding": "audio/l16",
            "sampleRate": 16000,
            "channels": 1,
        }
        await caller.send_raw(encode(start))
        await closed_with(caller, 4415, "unsupported_format")
    await assert_still_serving(stack, phone)


async def test_bad_tokens_are_refused_and_never_logged(
    stack: RelayStack,
    api: httpx.AsyncClient,
    tenant: NewTenant,
    phone: PhoneCall,
    relay_logs: pytest.LogCaptureFixture,
) -> None:
    url = stream_url(stack)
    forged = phone.token[:-4] + ("AAAA" if not phone.token.endswith("AAAA") else "BBBB")
    cases: list[tuple[dict[str, str], str | None, int, str]] = [
        ({}, phone.call_sid, 4401, "unauthorized"),
        ({"token": "not-a-token"}, phone.call_sid, 4401, "unauthorized"),
        ({"token": forged}, phone.call_sid, 4401, "unauthorized"),
        # The right token, but Twilio says it is another call.
        ({"token": phone.token}, twilio_sid("CA"), 4403, "call_mismatch"),
    ]
    for parameters, call_sid, close, code in cases:
        async with MediaStreamsCaller.connect(
            url, custom_parameters=parameters, call_sid=call_sid, account_sid=phone.account_sid
        ) as caller:
            await closed_with(caller, close, code)
    # A browser call's token, and a monitor's, are not a phone line's.
    browser = await stack.call(api, tenant, (await el_agent(stack, api, tenant, ULAW_AGENT))[0])
    async with MediaStreamsCaller.connect(url, custom_parameters={"token": browser["token"]}) as c:
        await closed_with(c, 4403, "not_a_phone_call")
    monitor = (await stack.monitor_token(api, tenant, phone.call_id))["token"]
    async with MediaStreamsCaller.connect(url, custom_parameters={"token": monitor}) as c:
        await closed_with(c, 4403, "forbidden")
    for token in (phone.token, forged, browser["token"], monitor):
        assert token not in relay_logs.text
    assert len(log_lines(relay_logs, "phone stream refused: unauthorized")) == 3
    await assert_still_serving(stack, phone)  # the call itself was never harmed


async def test_a_second_stream_for_a_live_call_is_refused(
    stack: RelayStack, phone: PhoneCall
) -> None:
    spoken = tone(ULAW, 0.5)
    async with phone.caller(stack) as first:
        await first.send_silence(0.2)
        async with phone.caller(stack) as second:
            await closed_with(second, 4409, "call_in_progress")
        await first.send_audio(spoken + ULAW_SILENCE * 5600)
        assert await first.wait_for_audio(len(spoken), within=20) == spoken
        await first.stop()


# --- during the call ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_frame", "code", "close"),
    [
        (lambda m: encode(StreamMessages(stream_sid=twilio_sid("MZ")).media(b"\xff" * 160)), "unknown_stream", 4400),
        (lambda m: encode({**m.media(b"\xff"), "media": {"payload": "***"}}), "bad_payload", 4400),
        (lambda m: "[]", "invalid_json", 4400),
        (lambda m: encode(m.media(b"\xff" * 50_000)), "message_too_large", 1009),
    ],
)  # fmt: skip
async def test_a_broken_stream_ends_its_call(
    stack: RelayStack,
    api: httpx.AsyncClient,
    tenant: NewTenant,
    owner_conn: asyncpg.Connection,
    relay_logs: pytest.LogCaptureFixture,
    make_frame: Any,
    code: str,
    close: int,
) -> None:
    agent_id, _ = await el_agent(stack, api, tenant, ULAW_AGENT)
    phone = await make_phone_call(stack, api, tenant, owner_conn, agent_id)
    async with phone.caller(stack) as caller:
        await caller.send_silence(0.2)
        await caller.send_raw(make_frame(caller.messages))
        await closed_with(caller, close, code)
    record = await call_log(api, tenant, phone.call_id)
    assert record["status"] == "failed"
    assert record["end_reason"] == "phone_protocol_error"
    assert record["ended_by"] == "caller"
    assert ended_data(record)["code"] == code
    await eventually(lambda: log_lines(relay_logs, f"phone stream broke the protocol: {code}"))
    other = await make_phone_call(stack, api, tenant, owner_conn, agent_id)
    await assert_still_serving(stack, other)


async def test_http_on_the_stream_path_is_a_clear_error(stack: RelayStack) -> None:
    async with httpx.AsyncClient() as client:
        r = await client.get(stack.relay_url + "/twilio/stream")
    assert r.status_code == 400
    assert r.json()["code"] == "websocket_required"


async def test_a_phone_calls_caller_token_cannot_join_over_socketio(
    stack: RelayStack, phone: PhoneCall
) -> None:
    client = CallClient(stack.relay_url)
    try:
        with pytest.raises(ConnectRefused) as refused:
            await client.connect(phone.token)
        assert refused.value.code == "forbidden"
    finally:
        await client.close()
    await assert_still_serving(stack, phone)
