"""Phone calls end to end: Twilio Media Streams (the emulated Twilio side, a real WebSocket with
real message shapes and 20 ms pacing) → the relay's /twilio/stream → CallBridge → the emulated
ElevenLabs agent, with the real control API, Redis and PostgreSQL; Twilio's REST API (hang-ups
and transfers through the control API) is the emulator's.

Phone calls are created like browser calls and then made phone calls in the database (direction,
μ-law client format, metadata.twilio), as the voice webhook does. The emulated agent echoes the
caller's voiced audio byte for byte when its formats are equal, which makes the checks exact.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
import httpx
import pytest

from control_api.bootstrap import NewTenant
from relay.protocol.elevenlabs import ClientToolCall
from tests.support.relay_stack import RelayStack, call_client, relay_stack
from tests.support.tenants import auth
from tests.support.twilio import PhoneTenant, phone_tenant
from tests.test_relay_call import call_log, eventually
from voicerelay.emulators.audio import parse_format, rms, tone
from voicerelay.emulators.elevenlabs import EmulatedAgent
from voicerelay.emulators.twilio_media import (
    ULAW_SILENCE,
    MediaStreamsCaller,
    twilio_sid,
)
from voicerelay.settings import Settings

ULAW = parse_format("ulaw_8000")
PCM16 = parse_format("pcm_16000")


@dataclass(frozen=True)
class PhoneCall:
    call_id: str
    token: str
    call_sid: str
    account_sid: str

    def caller(self, stack: RelayStack, **kwargs: Any) -> Any:
        return MediaStreamsCaller.connect(
            stream_url(stack),
            custom_parameters={"token": self.token, "from": "+15550001111", "to": "+15550002222"},
            call_sid=self.call_sid,
            account_sid=self.account_sid,
            **kwargs,
        )


def stream_url(stack: RelayStack) -> str:
    return stack.relay_url.replace("http://", "ws://") + "/twilio/stream"


async def make_phone_call(
    stack: RelayStack,
    api: httpx.AsyncClient,
    tenant: NewTenant,
    owner_conn: asyncpg.Connection,
    agent_id: str,
    *,
    call_sid: str | None = None,
    account_sid: str | None = None,
) -> PhoneCall:
    """A call as the voice webhook creates it: phone_inbound, μ-law, Twilio ids in metadata."""
    call = await stack.call(api, tenant, agent_id, client_audio_format="ulaw_8000")
    call_sid, account_sid = call_sid or twilio_sid("CA"), account_sid or twilio_sid("AC")
    twilio = {"call_sid": call_sid, "account_sid": account_sid, "from": "+15550001111"}
    await owner_conn.execute(
        "UPDATE calls SET direction = 'phone_inbound', client_audio_format = 'ulaw_8000',"
        " metadata = metadata || jsonb_build_object('twilio', $2::jsonb) WHERE id = $1",
        uuid.UUID(call["call_id"]),
        json.dumps(twilio),
    )
    return PhoneCall(call["call_id"], call["token"], call_sid, account_sid)


def ended_data(record: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = next(e for e in record["timeline"] if e["type"] == "ended")["data"]
    return data


async def latest_conversation(stack: RelayStack, agent_id: str) -> Any:
    """The emulator's conversation for this test's agent (each test has its own agent)."""

    def find() -> Any:
        for conversation in stack.emulator_app.state.conversations:
            if conversation.agent_id == agent_id:
                return conversation
        return None

    return await eventually(find)


async def el_agent(
    stack: RelayStack, api: httpx.AsyncClient, tenant: NewTenant, emulated: EmulatedAgent
) -> tuple[str, str]:
    """(control API agent id, ElevenLabs agent id)."""
    agent_id = await stack.agent(api, tenant, emulated)
    r = await api.get(f"/v1/agents/{agent_id}", headers=auth(tenant))
    return agent_id, r.json()["elevenlabs_agent_id"]


ULAW_AGENT = EmulatedAgent(
    input_format="ulaw_8000", output_format="ulaw_8000", realtime=False, ping_interval_seconds=1
)


# --- full calls --------------------------------------------------------------------------------


async def test_ulaw_passthrough_byte_exact_marks_and_caller_hangup(
    stack: RelayStack, api: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    agent_id, el_id = await el_agent(stack, api, tenant, ULAW_AGENT)
    phone = await make_phone_call(stack, api, tenant, owner_conn, agent_id)
    spoken = tone(ULAW, 1.0)
    async with phone.caller(stack) as caller:
        # Spoken at once after start: the agent is not ready yet, so the relay holds it.
        await caller.send_audio(spoken + ULAW_SILENCE * 6400)
        heard = await caller.wait_for_audio(len(spoken), within=20)
        assert heard == spoken  # both ways untouched
        # Every mark the relay sent was echoed once its audio played.
        marks = len(caller.events_of("mark"))
        assert marks >= 1
        await caller.wait_for(lambda: caller.stats.marks_echoed == marks, within=20)
        conversation = await latest_conversation(stack, el_id)
        assert conversation.audio_bytes_in == len(spoken) + 6400
        await caller.stop()
        await caller.wait_closed(within=15)
        assert caller.close_code == 1000
        assert not caller.events_of("clear")

    record = await call_log(api, tenant, phone.call_id)
    assert record["end_reason"] == "caller_hangup"
    assert record["ended_by"] == "caller"
    assert record["usage"]["bytes_in"] == len(spoken) + 6400
    assert record["usage"]["bytes_out"] == len(spoken)
    data = ended_data(record)
    assert data["played_out_ms"] == len(spoken) // 8
    assert data["cut_off_ms"] == 0
    assert data["marks_sent"] == marks
    assert data["marks_echoed"] == marks
    types = [e["type"] for e in record["timeline"]]
    for expected in ("connecting", "connected", "upstream_connected", "usage", "ended"):
        assert expected in types


async def test_pcm_agent_is_transcoded_both_ways(
    stack: RelayStack, api: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    agent_id, el_id = await el_agent(
        stack, api, tenant, EmulatedAgent(realtime=False, ping_interval_seconds=1)
    )
    phone = await make_phone_call(stack, api, tenant, owner_conn, agent_id)
    spoken = tone(ULAW, 1.0)
    async with phone.caller(stack) as caller:
        await caller.send_audio(spoken + ULAW_SILENCE * 6400)
        conversation = await latest_conversation(stack, el_id)
        # The agent got PCM 16 kHz: twice the samples, two bytes each (less the resampler lag).
        await eventually(lambda: conversation.audio_bytes_in >= 4 * (len(spoken) + 6400) - 2000)
        await eventually(lambda: conversation.audio_bytes_out > 0)
        # Its echo (PCM 16 kHz) came back as μ-law 8 kHz: a tone of the same energy and length.
        await asyncio.sleep(0.5)
        heard = caller.received_audio()
        assert abs(len(heard) - len(spoken)) <= 8 * 80  # within 80 ms
        assert rms(heard, ULAW) == pytest.approx(rms(spoken, ULAW), rel=0.1)
        await caller.stop()
        await caller.wait_closed(within=15)


async def test_barge_in_clears_at_once_and_no_stale_audio_follows(
    stack: RelayStack, api: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    # Real-time replies in 100 ms chunks, and the stale chunk an interruption leaves in flight.
    talker = replace(ULAW_AGENT, realtime=True, stale_chunk_after_interruption=True)
    agent_id, _ = await el_agent(stack, api, tenant, talker)
    phone = await make_phone_call(stack, api, tenant, owner_conn, agent_id)
    first = tone(ULAW, 3.0)
    second = bytes(0x80 ^ b for b in tone(ULAW, 0.6))  # another voiced signal (phase-inverted)
    async with phone.caller(stack) as caller:
        await caller.send_audio(first + ULAW_SILENCE * 5600)
        await caller.wait_for_audio(8 * 300, within=20)  # the agent is answering
        await caller.send_audio(second + ULAW_SILENCE * 5600)  # talk over it
        await caller.wait_for(lambda: bool(caller.events_of("clear")), within=20)
        await caller.wait_for(lambda: len(audio_after_clear(caller)) >= len(second), within=20)
        before, after = audio_before_clear(caller), audio_after_clear(caller)
        assert len(caller.events_of("clear")) == 1
        assert 0 < len(before) < len(first)
        assert first.startswith(before)  # the first answer, cut short
        assert after == second  # then only the answer to the barge-in: nothing stale
        await caller.wait_for(
            lambda: caller.stats.marks_echoed == len(caller.events_of("mark")), within=20
        )
        await caller.stop()

    data = ended_data(await call_log(api, tenant, phone.call_id))
    assert data["cut_off_ms"] > 0
    assert data["played_out_ms"] >= len(second) // 8
    # Everything sent was either heard or cut off (and some never left the relay's queue).
    assert data["played_out_ms"] + data["cut_off_ms"] >= (len(before) + len(after)) // 8
    assert data["marks_echoed"] == data["marks_sent"]


def audio_before_clear(caller: Any) -> bytes:
    out = []
    for event in caller.events:
        if event.kind == "clear":
            break
        if event.kind == "media":
            out.append(event.payload)
    return b"".join(out)


def audio_after_clear(caller: Any) -> bytes:
    kinds = [e.kind for e in caller.events]
    if "clear" not in kinds:
        return b""
    start = kinds.index("clear")
    return b"".join(e.payload for e in caller.events[start:] if e.kind == "media")


async def test_dtmf_reaches_the_agent_and_a_monitor_who_hears_the_call(
    stack: RelayStack, api: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    agent_id, el_id = await el_agent(stack, api, tenant, ULAW_AGENT)
    phone = await make_phone_call(stack, api, tenant, owner_conn, agent_id)
    spoken = tone(ULAW, 0.6)
    async with phone.caller(stack) as caller:
        conversation = await latest_conversation(stack, el_id)
        monitor_token = (await stack.monitor_token(api, tenant, phone.call_id))["token"]
        async with call_client(stack.relay_url, monitor_token) as monitor:
            ready = await monitor.wait_for("call.ready")
            assert ready["output_format"] == "ulaw_8000"
            await caller.send_dtmf("5")
            assert await monitor.wait_for("dtmf") == {"digit": "5"}
            await eventually(
                lambda: "The caller pressed 5 on the keypad." in conversation.user_messages
            )
            # The monitor hears both sides.
            await caller.send_audio(spoken + ULAW_SILENCE * 5600)
            await caller.wait_for_audio(len(spoken), within=20)
            await eventually(lambda: len(monitor.audio(name="caller_audio")) >= len(spoken))
            await eventually(lambda: spoken in monitor.audio())
            await caller.stop()
            ended = await monitor.wait_for("call.ended")
            assert ended == {"reason": "caller_hangup", "code": "normal"}
    record = await call_log(api, tenant, phone.call_id)
    assert ended_data(record)["dtmf_digits"] == 1


# --- hang-up and transfer through the control API and Twilio's REST API (emulated) -------

ALLOWED = "+14155552671"
NOT_ALLOWED = "+442071838750"


async def twilio_line(
    stack: RelayStack,
    api: httpx.AsyncClient,
    tenant: NewTenant,
    owner_conn: asyncpg.Connection,
    emulated: EmulatedAgent,
) -> tuple[PhoneTenant, PhoneCall]:
    """A tenant with a Twilio credential (known to the emulated REST API), an agent that may
    transfer to ALLOWED, and a live Twilio call for it."""
    el_id = "agent_" + uuid.uuid4().hex[:12]
    stack.emulator.agents[el_id] = emulated
    line = await phone_tenant(
        api,
        tenant,
        elevenlabs_agent_id=el_id,
        elevenlabs_credential_id=await stack.credential(api, tenant),
        transfer_numbers=[ALLOWED],
    )
    rest = stack.twilio_rest
    rest.accounts[line.account_sid] = line.auth_token
    twilio_call = rest.add_call(line.account_sid)
    phone = await make_phone_call(
        stack,
        api,
        tenant,
        owner_conn,
        line.agent_id,
        call_sid=twilio_call.sid,
        account_sid=line.account_sid,
    )
    return line, phone


def requests_for(stack: RelayStack, call_sid: str) -> list[Any]:
    return [r for r in stack.twilio_rest.requests if r.call_sid == call_sid]


async def test_agent_end_hangs_the_call_up_through_twilio(
    stack: RelayStack, api: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    line, phone = await twilio_line(
        stack, api, tenant, owner_conn, replace(ULAW_AGENT, max_duration_seconds=2.0)
    )
    async with phone.caller(stack) as caller:
        await caller.send_silence(0.5)
        await caller.wait_closed(within=20)
        assert (caller.close_code, caller.close_reason) == (1000, "max_duration")
    await eventually(lambda: requests_for(stack, phone.call_sid))
    (request,) = requests_for(stack, phone.call_sid)
    assert request.method == "POST"
    assert request.form == {"Status": "completed"}
    assert request.auth_user == line.account_sid
    assert request.authenticated
    assert request.status == 200
    assert stack.twilio_rest.calls[phone.call_sid].status == "completed"
    record = await call_log(api, tenant, phone.call_id)
    assert record["ended_by"] == "agent"


async def test_transfer_tool_refused_then_transferred(
    stack: RelayStack, api: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    _, phone = await twilio_line(stack, api, tenant, owner_conn, ULAW_AGENT)
    tool = stack.settings.twilio_transfer_tool_name
    async with phone.caller(stack) as caller:
        await caller.send_silence(0.2)
        registry = stack.relay_app.runtime.registry
        bridge = await eventually(
            lambda: (b := registry.get(uuid.UUID(phone.call_id))) and b.ready and b
        )
        conversation = stack.conversation(bridge.conversation_id)

        # The emulated agent's tools are driven by text, which a phone line cannot send: the
        # agent's client_tool_call is handed to the bridge as its upstream would.
        def agent_asks(call_id: str, number: str) -> None:
            event = ClientToolCall(tool, call_id, {"phone_number": number}, None)
            bridge._on_upstream_event(event, asyncio.get_running_loop().time())

        agent_asks("t-refused", NOT_ALLOWED)
        refused = await eventually(
            lambda: [r for r in conversation.tool_results if r.tool_call_id == "t-refused"]
        )
        assert refused[0].is_error
        assert "not one the call may be transferred to" in refused[0].result
        assert not requests_for(stack, phone.call_sid)  # Twilio was never asked
        assert not bridge.ended

        agent_asks("t-ok", ALLOWED)
        done = await eventually(
            lambda: [r for r in conversation.tool_results if r.tool_call_id == "t-ok"]
        )
        assert not done[0].is_error
        await caller.wait_closed(within=15)
        assert (caller.close_code, caller.close_reason) == (1000, "transferred")
    (request,) = requests_for(stack, phone.call_sid)
    assert ALLOWED in request.form["Twiml"]
    assert "<Dial" in request.form["Twiml"]
    record = await call_log(api, tenant, phone.call_id)
    assert record["end_reason"] == "transferred"
    assert record["status"] == "ended"
    assert len(requests_for(stack, phone.call_sid)) == 1  # no hang-up after a transfer


# --- drain -------------------------------------------------------------------------------------


async def test_a_phone_call_on_a_draining_relay_finishes_in_place(
    settings: Settings, owner_conn: asyncpg.Connection, tenant: NewTenant
) -> None:
    async with (
        relay_stack(settings) as own,
        httpx.AsyncClient(base_url=own.api_url, timeout=10) as api,
    ):
        agent_id, _ = await el_agent(own, api, tenant, ULAW_AGENT)
        phone = await make_phone_call(own, api, tenant, owner_conn, agent_id)
        later = await make_phone_call(own, api, tenant, owner_conn, agent_id)
        spoken = tone(ULAW, 0.6)
        async with phone.caller(own) as caller:
            await caller.send_audio(spoken + ULAW_SILENCE * 5600)
            await caller.wait_for_audio(len(spoken), within=20)
            drain = asyncio.create_task(own.relay_app.drain())
            await eventually(lambda: own.relay_app.runtime.drain.draining)
            # New streams go elsewhere...
            async with later.caller(own, handshake=False) as refused:
                await refused.wait_closed(within=15)
                assert (refused.close_code, refused.close_reason) == (4503, "draining")
            # ...while this call goes on, and ends when its caller hangs up.
            await caller.send_audio(spoken + ULAW_SILENCE * 5600)
            await caller.wait_for_audio(2 * len(spoken), within=20)
            assert caller.received_audio() == spoken + spoken
            assert not drain.done()
            await caller.stop()
            await asyncio.wait_for(drain, 30)
        record = await call_log(api, tenant, phone.call_id)
        assert record["end_reason"] == "caller_hangup"
