"""PhoneLeg against a stand-in bridge and socket (no servers): the order of what reaches Twilio
(media then mark, clear ahead of queued audio), the pre-ready buffer (order, bound, key presses),
the play-out before an agent-ended call closes, and the answers to client tools."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from typing import Any

import pytest
from prometheus_client import REGISTRY

from relay.phone.control import TransferResult
from relay.phone.leg import PhoneLeg
from relay.protocol import client as wire
from relay.protocol.close_codes import CALLER_HANGUP, TRANSFERRED, CallEnd
from relay.protocol.elevenlabs import ClientToolCall
from relay.protocol.twilio import TwilioStreamProtocol

SID = "MZ" + "0" * 32
AGENT_END = CallEnd("agent_ended", "normal", "agent", False)


class FakeBridge:
    def __init__(self) -> None:
        self.call_id = uuid.uuid4()
        self.phone: Any = None
        self.heard: list[bytes] = []
        self.digits: list[str] = []
        self.answers: list[wire.ClientToolResult] = []
        self.how: CallEnd | None = None

    def attach_phone(self, phone: Any) -> None:
        self.phone = phone

    async def phone_audio(self, data: bytes, encoded: str) -> None:
        await asyncio.sleep(0)  # a real send yields to other tasks
        self.heard.append(data)

    async def dtmf(self, digit: str) -> bool:
        self.digits.append(digit)
        return True

    async def caller_command(self, command: object) -> None:
        assert isinstance(command, wire.ClientToolResult)
        self.answers.append(command)

    def end(self, how: CallEnd) -> None:
        if self.how is None:
            self.how = how

    @property
    def ended(self) -> bool:
        return self.how is not None

    @property
    def how_ended(self) -> CallEnd | None:
        return self.how


class FakeControl:
    def __init__(self, result: TransferResult) -> None:
        self.result = result
        self.transfers: list[str] = []
        self.hangups = 0

    async def transfer(self, token: str, to: str, *, call_id: str) -> TransferResult:
        self.transfers.append(to)
        return self.result

    async def hangup(self, token: str, *, call_id: str) -> str:
        self.hangups += 1
        return "completed"


class Wire:
    """The socket: frames sent (decoded) and the close."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None
        self.gate = asyncio.Event()
        self.gate.set()

    async def send(self, text: str) -> None:
        await self.gate.wait()
        self.frames.append(json.loads(text))

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def kinds(self) -> list[str]:
        return [f["event"] for f in self.frames]


def make_leg(
    *, prebuffer_ms: int = 1000, control: FakeControl | None = None
) -> tuple[PhoneLeg, FakeBridge, Wire, FakeControl]:
    protocol = TwilioStreamProtocol(max_message_bytes=65536)
    start = {
        "event": "start",
        "streamSid": SID,
        "start": {
            "streamSid": SID,
            "callSid": "CA1",
            "accountSid": "AC1",
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }
    protocol.receive(json.dumps(start))
    sock, bridge = Wire(), FakeBridge()
    control = control or FakeControl(TransferResult(True, "The call is being transferred."))
    leg = PhoneLeg(
        protocol=protocol,
        send=sock.send,
        close=sock.close,
        control=control,  # type: ignore[arg-type]
        token="t",
        transfer_tool="transfer_to_number",
        prebuffer_ms=prebuffer_ms,
        max_queued_chunks=4,
    )
    leg.attach(bridge)  # type: ignore[arg-type]
    return leg, bridge, sock, control


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_caller_audio_before_ready_is_held_then_delivered_in_order() -> None:
    leg, bridge, _, _ = make_leg(prebuffer_ms=100)  # 800 bytes
    dropped = metric("voicerelay_relay_phone_prebuffer_dropped_total")
    chunks = [bytes([n]) * 160 for n in range(8)]
    for chunk in chunks[:3]:
        await leg.caller_audio(chunk, "")
    await leg.dtmf("7")
    for chunk in chunks[3:7]:
        await leg.caller_audio(chunk, "")
    assert bridge.heard == []
    # Seven chunks held: 1120 bytes, over 800, so the two oldest went (counted); the digit stays.
    assert metric("voicerelay_relay_phone_prebuffer_dropped_total") == dropped + 2
    ready = asyncio.create_task(leg.ready())
    await asyncio.sleep(0)
    await leg.caller_audio(chunks[7], "")  # arrives while the buffer is being delivered
    await ready
    assert bridge.heard == chunks[2:7] + [chunks[7]]
    assert bridge.digits == ["7"]
    await leg.caller_audio(b"\x01", "")
    assert bridge.heard[-1] == b"\x01"


async def test_agent_audio_goes_out_as_media_then_mark() -> None:
    leg, _, sock, _ = make_leg()
    leg.play(b"\x10" * 800, "", 0.0)
    leg.play(b"\x20" * 3, "ICAg", 0.0)  # the agent's base64 goes out as is
    await settle()
    assert sock.kinds() == ["media", "mark", "media", "mark"]
    assert sock.frames[2]["media"]["payload"] == "ICAg"
    # Base64 that holds anything else (here a quote) is encoded again from the audio.
    leg.play(b"  ", 'IC"A=', 0.0)
    await settle()
    assert sock.frames[4]["media"]["payload"] == "ICA="
    names = [f["mark"]["name"] for f in sock.frames if f["event"] == "mark"]
    leg.mark_echoed(names[1])
    report = leg.report()
    assert report["played_out_ms"] == 100
    assert report["marks_sent"] == 3
    assert report["marks_echoed"] == 1


async def test_interruption_sends_clear_ahead_of_queued_audio() -> None:
    leg, _, sock, _ = make_leg()
    sock.gate.clear()  # Twilio's socket is slow: the first frame is in flight
    for n in range(3):
        leg.play(bytes([n]) * 800, "", 0.0)
    await settle()
    leg.interrupt()
    leg.play(b"\x09" * 800, "", 0.0)  # after the interruption: new audio
    sock.gate.set()
    await settle()
    # Only the frame already being written (and its mark) precede the clear.
    assert sock.kinds() == ["media", "mark", "clear", "media", "mark"]
    assert base64.b64decode(sock.frames[3]["media"]["payload"]) == b"\x09" * 800
    first_mark = sock.frames[1]["mark"]["name"]
    leg.mark_echoed(first_mark)  # Twilio echoes the cleared mark: not played
    report = leg.report()
    assert report["played_out_ms"] == 0
    assert report["cut_off_ms"] == 300  # the cleared frame and the two never sent


async def test_agent_end_lets_the_goodbye_play_before_closing() -> None:
    leg, _, sock, _ = make_leg()
    leg.play(b"\x10" * 800, "", 0.0)
    finish = asyncio.create_task(leg.finish(AGENT_END))
    await settle()
    assert sock.kinds() == ["media", "mark"]
    assert sock.closed is None  # waiting for the mark: the caller is still hearing it
    leg.mark_echoed(sock.frames[1]["mark"]["name"])
    await asyncio.wait_for(finish, 5)
    assert sock.closed == (1000, "agent_ended")


async def test_a_hang_up_during_the_goodbye_stops_the_wait() -> None:
    leg, _, sock, _ = make_leg()
    leg.play(b"\x10" * 80_000, "", 0.0)  # ten seconds of goodbye
    finish = asyncio.create_task(leg.finish(AGENT_END))
    await settle()
    assert not finish.done()
    leg.hung_up()  # the caller hangs up mid-goodbye
    await asyncio.wait_for(finish, 5)
    assert sock.closed == (1000, "agent_ended")


async def test_caller_hangup_closes_at_once_and_drops_queued_audio() -> None:
    leg, bridge, sock, _ = make_leg()
    sock.gate.clear()
    leg.play(b"\x10" * 800, "", 0.0)
    leg.play(b"\x11" * 800, "", 0.0)
    leg.hung_up()
    assert bridge.how is CALLER_HANGUP
    await asyncio.wait_for(leg.finish(CALLER_HANGUP), 5)
    assert sock.closed == (1000, "caller_hangup")


@pytest.mark.parametrize(
    ("result", "parameters", "ends"),
    [
        (TransferResult(True, "The call is being transferred."), {"phone_number": "+1"}, True),
        (TransferResult(False, "not allowed", "transfer_not_allowed"), {"phone_number": "+1"}, False),
        (TransferResult(True, "unused"), {}, False),
    ],
)  # fmt: skip
async def test_transfer_tool(
    result: TransferResult, parameters: dict[str, Any], ends: bool
) -> None:
    leg, bridge, _, control = make_leg(control=FakeControl(result))
    leg.tool_call(ClientToolCall("transfer_to_number", "t1", parameters, None))
    await settle()
    (answer,) = bridge.answers
    assert answer.tool_call_id == "t1"
    assert answer.is_error is not ends
    assert (bridge.how is TRANSFERRED) is ends
    assert control.transfers == ([parameters["phone_number"]] if parameters else [])
    await leg.hang_up_if_needed()
    assert control.hangups == 0  # a transferred (or still running) call is not hung up


async def test_other_client_tools_are_answered_at_once() -> None:
    leg, bridge, _, _ = make_leg()
    leg.tool_call(ClientToolCall("lookup_order", "t2", {}, None))
    await settle()
    (answer,) = bridge.answers
    assert answer.is_error
    assert "not available on a phone call" in answer.result
    assert bridge.how is None
