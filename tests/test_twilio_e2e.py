"""A phone call end to end, every hop real except Twilio and ElevenLabs: the signed voice webhook
→ TwiML → the Media Streams client emulator connects to the TwiML's Stream URL with its
Parameters → the relay → the emulated agent speaks → the caller presses a key (DTMF reaches the
agent as a user message) → the agent ends the call with its end_call tool, or asks for a transfer
→ the control API hangs up or transfers through the Twilio REST emulator with the tenant's account
SID and auth token."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from control_api.bootstrap import NewTenant
from tests.support.attack import unique_phone_number
from tests.support.relay_stack import RelayStack, relay_stack
from tests.support.tenants import auth
from tests.support.twilio import (
    STATUS_PATH,
    VOICE_PATH,
    TwiML,
    call_id_of,
    phone_tenant,
    twilio_post,
)
from tests.test_relay_call import call_log, eventually
from voicerelay.emulators.audio import parse_format, tone
from voicerelay.emulators.elevenlabs import EmulatedAgent
from voicerelay.emulators.twilio_media import ULAW_SILENCE, MediaStreamsCaller
from voicerelay.settings import Settings

ULAW = parse_format("ulaw_8000")
TRANSFER_TO = unique_phone_number()
# What a real agent's LLM would decide on these key presses: 9 hangs up (end_call), 0 transfers.
AGENT = EmulatedAgent(
    input_format="ulaw_8000",
    output_format="ulaw_8000",
    realtime=False,
    text_commands={
        "The caller pressed 9 on the keypad.": "end",
        "The caller pressed 0 on the keypad.": (
            "tool:transfer_to_number " + json.dumps({"phone_number": TRANSFER_TO})
        ),
    },
)


@pytest.fixture(scope="module")
async def stack(settings: Settings) -> AsyncIterator[RelayStack]:
    async with relay_stack(settings, advertise_relay=True) as running:
        yield running


async def test_webhook_stream_agent_hang_up(stack: RelayStack, tenant: NewTenant) -> None:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=20) as api:
        el_agent = "agent_e2e_phone"
        stack.emulator.agents[el_agent] = AGENT
        phone = await phone_tenant(
            api,
            tenant,
            elevenlabs_agent_id=el_agent,
            elevenlabs_credential_id=await stack.credential(api, tenant),
            phone_dynamic_variables={"caller_number": "From"},
        )
        twilio = stack.twilio_rest
        twilio.accounts[phone.account_sid] = phone.auth_token
        params = phone.voice_params()
        call_sid = params["CallSid"]
        twilio.add_call(phone.account_sid, call_sid, to_number=phone.number)

        async def as_twilio(path: str, form: dict[str, str]) -> httpx.Response:
            public = stack.settings.public_api_url + path
            r = await twilio_post(api, path, form, auth_token=phone.auth_token, signed_url=public)
            assert r.status_code == 200, r.text
            return r

        r = await as_twilio(VOICE_PATH, params)
        twiml = TwiML.parse(r)
        call_id = call_id_of(twiml)
        assert twiml.stream_url == stack.relay_url.replace("http://", "ws://") + "/twilio/stream"

        spoken = tone(ULAW, 0.6)
        async with MediaStreamsCaller.connect(
            twiml.stream_url,
            custom_parameters=twiml.parameters,
            call_sid=call_sid,
            account_sid=phone.account_sid,
        ) as caller:
            await caller.send_audio(spoken + ULAW_SILENCE * 4800)
            heard = await caller.wait_for_audio(len(spoken), within=20)
            assert heard == spoken  # the agent spoke (echoed the caller, μ-law untouched)
            await caller.send_dtmf("9")  # the agent hangs up on it (end_call)
            await caller.wait_closed(within=30)
            assert caller.close_code == 1000

        # The agent ended the call: the relay asked the control API, which asked "Twilio".
        hangups = await eventually(
            lambda: [
                req for req in twilio.requests if req.call_sid == call_sid and req.method == "POST"
            ],
            timeout=20,
        )
        [hangup] = hangups
        assert hangup.authenticated
        assert hangup.auth_user == phone.account_sid
        assert hangup.form == {"Status": "completed"}
        assert hangup.status == 200
        assert twilio.calls[call_sid].status == "completed"

        # Twilio's status callback for the finished call joins the call log.
        status = {
            "AccountSid": phone.account_sid,
            "CallSid": call_sid,
            "CallStatus": "completed",
            "CallDuration": "5",
            "From": phone.caller,
            "To": phone.number,
        }
        await as_twilio(STATUS_PATH, status)
        record = await call_log(api, tenant, str(call_id))
        assert record["ended_by"] == "agent"
        assert record["direction"] == "phone_inbound"

        async with asyncio.timeout(20):
            while True:
                r = await api.get(f"/v1/calls/{call_id}", headers=auth(tenant))
                timeline = r.json()["timeline"]
                telephony = [e["data"] for e in timeline if e["type"] == "telephony"]
                if len(telephony) == 2:
                    break
                await asyncio.sleep(0.05)
        # The hang-up the control API made, and the status Twilio reported afterwards.
        by_action = {data.get("action"): data for data in telephony}
        assert by_action["hangup"]["call_status"] == "completed"
        assert by_action[None]["call_status"] == "completed"
        assert by_action[None]["duration_seconds"] == 5


async def test_agent_transfers_the_call_to_an_allowed_number(
    stack: RelayStack, tenant: NewTenant
) -> None:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=20) as api:
        el_agent = "agent_e2e_transfer"
        stack.emulator.agents[el_agent] = AGENT
        phone = await phone_tenant(
            api,
            tenant,
            elevenlabs_agent_id=el_agent,
            elevenlabs_credential_id=await stack.credential(api, tenant),
            transfer_numbers=[TRANSFER_TO],
        )
        twilio = stack.twilio_rest
        twilio.accounts[phone.account_sid] = phone.auth_token
        params = phone.voice_params()
        call_sid = params["CallSid"]
        twilio.add_call(phone.account_sid, call_sid, to_number=phone.number)
        public = stack.settings.public_api_url + VOICE_PATH
        r = await twilio_post(
            api, VOICE_PATH, params, auth_token=phone.auth_token, signed_url=public
        )
        assert r.status_code == 200, r.text
        twiml = TwiML.parse(r)
        call_id = call_id_of(twiml)

        async with MediaStreamsCaller.connect(
            twiml.stream_url,
            custom_parameters=twiml.parameters,
            call_sid=call_sid,
            account_sid=phone.account_sid,
        ) as caller:
            await caller.send_audio(ULAW_SILENCE * 800)  # 100 ms: the call is up
            await caller.send_dtmf("0")  # the agent asks for a transfer
            updates = await eventually(
                lambda: [r for r in twilio.requests if r.call_sid == call_sid], timeout=20
            )
            # Twilio stops the stream of a redirected call; the relay ends the call meanwhile.
            await caller.wait_closed(within=30)

        [update] = updates
        assert update.authenticated
        assert update.auth_user == phone.account_sid
        assert set(update.form) == {"Twiml"}
        assert f"<Dial>{TRANSFER_TO}</Dial>" in update.form["Twiml"]
        assert twilio.calls[call_sid].twiml == update.form["Twiml"]
        record = await call_log(api, tenant, str(call_id))
        assert record["end_reason"] == "transferred"
        assert record["ended_by"] == "agent"
