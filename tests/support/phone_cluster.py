"""Phone calls on the process cluster (tests/support/cluster.py), placed the way Twilio places
them: the control API's signed voice webhook answers TwiML, and the Twilio Media Streams client
emulator opens its ``<Stream>`` with its ``<Parameter>``s on a replica the test picks (in
production the Stream URL is the load balancer's; a test picks the replica to know which one to
stop).

The agent is an emulated μ-law echo agent: each turn's voiced audio comes back byte for byte,
one 20 ms frame per ``audio`` event, so the caller can count frames and compare bytes. Every
voiced frame is unique to its turn and index, so a frame delivered twice, late or from another
call would show.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from control_api.bootstrap import NewTenant
from relay.phone.stream import STREAM_PATH
from tests.support.cluster import Cluster, Replica
from tests.support.twilio import PhoneTenant, TwiML, call_id_of, phone_tenant, twilio_post
from voicerelay.emulators.audio import parse_format, tone
from voicerelay.emulators.elevenlabs import EmulatedAgent
from voicerelay.emulators.twilio_media import (
    FRAME_BYTES,
    FRAME_MS,
    ULAW_SILENCE,
    MediaStreamsCaller,
)

ULAW = parse_format("ulaw_8000")
VOICE_PATH = "/v1/twilio/voice"
# The echo agent's turn ends after 100 ms of silence; a turn's tail of silence is longer.
TURN_END_MS = 100
TURN_SILENCE = ULAW_SILENCE * (FRAME_BYTES * 300 // FRAME_MS)
TURN_ECHO_SECONDS = 20.0

# Not real-time: a turn's echo goes out at once, so it never overlaps the next turn (which
# would be a barge-in); 20 ms chunks make one Twilio ``media`` frame per agent ``audio`` event.
ULAW_ECHO_AGENT = EmulatedAgent(
    input_format="ulaw_8000",
    output_format="ulaw_8000",
    reply_audio="echo",
    realtime=False,
    chunk_ms=FRAME_MS,
    end_of_turn_ms=TURN_END_MS,
    receive_timeout_seconds=600,
    max_duration_seconds=600,
)


def stream_url(replica: Replica) -> str:
    return replica.url.replace("http://", "ws://", 1) + STREAM_PATH


@dataclass(frozen=True)
class PhoneLine:
    """A tenant's number answered by a μ-law echo agent, and the Twilio account it is on."""

    phone: PhoneTenant
    elevenlabs_agent_id: str


@dataclass(frozen=True)
class TwilioCall:
    """A call the voice webhook accepted: what Twilio would now open a stream with."""

    call_id: str
    call_sid: str
    account_sid: str
    stream_url: str  # the TwiML's <Stream url>
    parameters: dict[str, str] = field(default_factory=dict)  # its <Parameter>s

    def dial(
        self, replica: Replica, **kwargs: Any
    ) -> contextlib.AbstractAsyncContextManager[MediaStreamsCaller]:
        """Open the call's Media Stream on ``replica``, as Twilio would through the balancer."""
        return MediaStreamsCaller.connect(
            stream_url(replica),
            custom_parameters=self.parameters,
            call_sid=self.call_sid,
            account_sid=self.account_sid,
            **kwargs,
        )


async def phone_line(cl: Cluster, api: httpx.AsyncClient, tenant: NewTenant) -> PhoneLine:
    stack = cl.stack()
    elevenlabs_agent_id = "agent_phone_" + uuid.uuid4().hex[:12]
    cl.emulator.agents[elevenlabs_agent_id] = ULAW_ECHO_AGENT
    phone = await phone_tenant(
        api,
        tenant,
        elevenlabs_agent_id=elevenlabs_agent_id,
        elevenlabs_credential_id=await stack.credential(api, tenant),
    )
    # Twilio's REST API knows the account, so the control API can hang its calls up.
    stack.twilio_rest.accounts[phone.account_sid] = phone.auth_token
    return PhoneLine(phone, elevenlabs_agent_id)


async def place_call(cl: Cluster, api: httpx.AsyncClient, line: PhoneLine) -> TwilioCall:
    """An inbound call to ``line``: Twilio knows it, then POSTs the signed voice webhook."""
    phone = line.phone
    params = phone.voice_params()
    call_sid = params["CallSid"]
    cl.stack().twilio_rest.add_call(phone.account_sid, call_sid, to_number=phone.number)
    r = await twilio_post(
        api,
        VOICE_PATH,
        params,
        auth_token=phone.auth_token,
        signed_url=cl.settings.public_api_url + VOICE_PATH,
    )
    assert r.status_code == 200, r.text
    twiml = TwiML.parse(r)
    assert twiml.stream_url is not None, twiml.text
    assert "token" in twiml.parameters, twiml.text
    return TwilioCall(
        call_id=str(call_id_of(twiml)),
        call_sid=call_sid,
        account_sid=phone.account_sid,
        stream_url=twiml.stream_url,
        parameters=twiml.parameters,
    )


def voiced(tag: str, frames: int) -> bytes:
    """``frames`` loud 20 ms μ-law frames, each unique to (tag, index)."""
    base = tone(ULAW, FRAME_MS / 1000)
    out = bytearray()
    for index in range(frames):
        head = hashlib.blake2b(f"{tag}/{index}".encode(), digest_size=16).digest()
        out += head + base[len(head) :]
    return bytes(out)


@dataclass(frozen=True)
class PhoneTurn:
    said: bytes  # the voiced audio (silence followed it)
    heard: bytes  # the agent audio that came back for it
    frames: list[bytes]  # that audio, one entry per Twilio ``media`` message

    @property
    def exact(self) -> bool:
        return self.heard == self.said

    @property
    def whole_frames(self) -> bool:
        """One full 20 ms frame per media message, as many as were said."""
        return len(self.frames) == len(self.said) // FRAME_BYTES and all(
            len(frame) == FRAME_BYTES for frame in self.frames
        )


async def speak(caller: MediaStreamsCaller, tag: str, frames: int) -> PhoneTurn:
    """Say ``frames`` voiced frames then silence (paced, 20 ms frames) and wait for the echo."""
    said = voiced(tag, frames)
    audio_before = len(caller.received_audio())
    media_before = len(caller.events_of("media"))
    await caller.send_audio(said + TURN_SILENCE)
    heard = await caller.wait_for_audio(audio_before + len(said), within=TURN_ECHO_SECONDS)
    media = caller.events_of("media")[media_before:]
    return PhoneTurn(said, heard[audio_before:], [m.payload for m in media])


def conversation_of(cl: Cluster, elevenlabs_agent_id: str) -> Any:
    """The emulator's conversation with this agent (one call per agent in these tests)."""
    for conversation in cl.emulator_app.state.conversations:
        if conversation.agent_id == elevenlabs_agent_id:
            return conversation
    return None
