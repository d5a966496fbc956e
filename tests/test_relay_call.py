"""End-to-end calls through the relay: control API token → Socket.IO → relay → emulated agent.

Real uvicorn servers on loopback (emulator, control API, relay), real python-socketio clients,
real Redis and PostgreSQL. The emulated agent echoes the caller's voiced audio byte for byte when
its input and output formats are equal, which makes the audio checks exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.support.relay_stack import (
    RelayStack,
    call_client,
    pcm_rms,
    pcm_silence,
    pcm_tone,
    stream,
)
from tests.support.tenants import auth
from voicerelay.emulators.elevenlabs import EmulatedAgent

FRAME_20MS = 640  # PCM16 at 16 kHz


async def eventually(check: Callable[[], Any], *, timeout: float = 10.0) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if result:
                return result
            await asyncio.sleep(0.02)


async def call_log(api: httpx.AsyncClient, tenant: Any, call_id: str) -> dict[str, Any]:
    """The call's record once the API's consumer has written its end (polls)."""
    async with asyncio.timeout(15):
        while True:
            r = await api.get(f"/v1/calls/{call_id}", headers=auth(tenant))
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            # Several consumers of the group may write a call's events (every control API
            # instance runs one), so the final usage can land just after `ended`: wait for both.
            types = [e["type"] for e in body["timeline"]]
            if (
                body["status"] in ("ended", "failed")
                and "ended" in types
                and "usage" in types[types.index("ended") - 1 :]
            ):
                return body
            await asyncio.sleep(0.1)


async def test_full_call_audio_transcripts_tool_and_call_log(
    stack: RelayStack, api: httpx.AsyncClient, tenant: Any
) -> None:
    agent = await stack.agent(
        api,
        tenant,
        EmulatedAgent(realtime=False, ping_interval_seconds=0.3),
        dynamic_variables={"company": "Acme"},
        conversation_overrides={"agent": {"language": "en"}},
    )
    call = await stack.call(api, tenant, agent, dynamic_variables={"customer": "Ada"})
    voiced = pcm_tone(1.0)
    spoken = voiced + pcm_silence(0.8)
    async with call_client(stack.relay_url, call["token"]) as client:
        ready = await client.wait_for("call.ready")
        assert ready == {
            "call_id": call["call_id"],
            "conversation_id": ready["conversation_id"],
            "input_format": "pcm_16000",
            "output_format": "pcm_16000",
            "resumed": False,
        }
        conversation = stack.conversation(ready["conversation_id"])
        assert conversation.initiation["conversation_config_override"] == {
            "agent": {"language": "en"}
        }
        assert conversation.initiation["dynamic_variables"] == {
            "company": "Acme",
            "customer": "Ada",
        }

        # Audio both ways, byte-exact: the agent echoes the voiced part of what it heard.
        mark = len(client.events)
        await stream(client, spoken, chunk_bytes=FRAME_20MS)
        transcript = await client.wait_for("user_transcript", after=mark)
        assert transcript["text"].startswith("(audio")
        await client.wait_for("agent_response", after=mark)
        await eventually(lambda: len(client.audio(mark)) >= len(voiced))
        await asyncio.sleep(0.2)  # nothing more may follow
        assert client.audio(mark) == voiced
        assert conversation.audio_bytes_in == len(spoken)

        # A client tool round trip, scripted through a user message.
        mark = len(client.events)
        await client.emit("user_message", {"text": 'tool:lookup_order {"order": 42}'})
        tool = await client.wait_for("client_tool_call", after=mark)
        assert tool["tool_name"] == "lookup_order"
        assert tool["parameters"] == {"order": 42}
        mark = len(client.events)
        await client.emit(
            "client_tool_result",
            {"tool_call_id": tool["tool_call_id"], "result": "shipped", "is_error": False},
        )
        answer = await client.wait_for("agent_response", after=mark)
        assert answer["text"] == "lookup_order returned: shipped"

        await client.emit("contextual_update", {"text": "page=checkout"})
        await client.emit("user_activity")
        await eventually(lambda: conversation.user_activity == 1)
        assert conversation.contextual_updates == ["page=checkout"]

        # The agent pings every 0.3 s; the relay answers each at once.
        await eventually(lambda: conversation.pongs_received >= 2)

        await client.emit("call.end")
        ended = await client.wait_for("call.ended")
        assert ended == {"reason": "caller_hangup", "code": "normal"}
        await asyncio.wait_for(client.disconnected.wait(), 5)
        assert [e for e, _ in client.events].count("call.ended") == 1

    await eventually(lambda: conversation.closed_by is not None)
    assert conversation.close_code == 1000
    # Every ping was answered (one may have been in flight when the call ended).
    assert conversation.pings_sent >= 2
    assert conversation.pongs_received >= conversation.pings_sent - 1

    record = await call_log(api, tenant, call["call_id"])
    assert record["status"] == "ended"
    assert record["end_reason"] == "caller_hangup"
    assert record["ended_by"] == "caller"
    assert record["conversation_ids"] == [ready["conversation_id"]]
    assert record["duration_ms"] > 0
    usage = record["usage"]
    assert usage["bytes_in"] == len(spoken)
    assert usage["frames_in"] == len(spoken) // FRAME_20MS
    assert usage["bytes_out"] >= len(voiced)
    assert usage["audio_in_seconds"] == pytest.approx(1.8, abs=0.01)
    assert usage["frames_out"] >= 1
    assert usage["audio_out_seconds"] == pytest.approx(usage["bytes_out"] / 32_000, abs=0.01)
    lines = [(line["role"], line["text"]) for line in record["transcript"]]
    assert ("agent", "lookup_order returned: shipped") in lines
    assert any(role == "user" for role, _ in lines)
    types = [event["type"] for event in record["timeline"]]
    for expected in ("connecting", "connected", "upstream_connected", "usage", "ended"):
        assert expected in types


async def test_transcoded_call_pcm16k_client_ulaw8k_agent(
    stack: RelayStack, api: httpx.AsyncClient, tenant: Any
) -> None:
    agent = await stack.agent(
        api,
        tenant,
        EmulatedAgent(input_format="ulaw_8000", output_format="ulaw_8000", realtime=False),
    )
    call = await stack.call(api, tenant, agent, client_audio_format="pcm_16000")
    voiced = pcm_tone(1.0, amplitude=8000)
    async with call_client(stack.relay_url, call["token"]) as client:
        ready = await client.wait_for("call.ready")
        assert ready["input_format"] == ready["output_format"] == "pcm_16000"
        conversation = stack.conversation(ready["conversation_id"])
        mark = len(client.events)
        await stream(client, voiced + pcm_silence(0.8), chunk_bytes=FRAME_20MS)
        await client.wait_for("agent_response", after=mark)
        # The agent heard μ-law 8 kHz: half the samples, one byte each.
        await eventually(lambda: conversation.audio_bytes_in >= 0.95 * 1.8 * 8000)
        # It echoed about a second of μ-law, which reaches the client as PCM 16 kHz.
        await eventually(lambda: len(client.audio(mark)) >= 0.9 * len(voiced))
        await asyncio.sleep(0.2)
        heard = client.audio(mark)
        assert len(heard) % 2 == 0
        assert abs(len(heard) - len(voiced)) <= 0.1 * len(voiced)
        # Energy survives both conversions (μ-law is within a few percent on a tone).
        middle = heard[len(heard) // 4 : 3 * len(heard) // 4]
        assert pcm_rms(middle) == pytest.approx(pcm_rms(voiced), rel=0.1)
        await client.emit("call.end")
        await client.wait_for("call.ended")


async def test_barge_in_drops_stale_audio(
    stack: RelayStack, api: httpx.AsyncClient, tenant: Any
) -> None:
    agent = await stack.agent(
        api, tenant, EmulatedAgent(realtime=True, stale_chunk_after_interruption=True)
    )
    call = await stack.call(api, tenant, agent)
    async with call_client(stack.relay_url, call["token"]) as client:
        ready = await client.wait_for("call.ready")
        conversation = stack.conversation(ready["conversation_id"])
        await client.emit("user_message", {"text": "tone:5"})
        await client.wait_for("audio")  # the agent is talking, in real time
        # The caller talks over it: a voice different from the agent's tone.
        barge = pcm_tone(0.6, hz=1000.0)
        mark = len(client.events)
        await stream(client, barge + pcm_silence(0.8), chunk_bytes=FRAME_20MS)
        await client.wait_for("interruption", after=mark)
        flush = client.index_of("interruption", mark)
        # What the agent actually got to say of the reply it was cut off in.
        correction = await client.wait_for("agent_response_correction", after=flush)
        assert set(correction) == {"original", "corrected"}
        assert correction["original"].startswith(correction["corrected"].rstrip("…. "))
        await client.wait_for("agent_response", after=flush)
        await eventually(lambda: len(client.audio(flush)) >= len(barge), timeout=10)
        await asyncio.sleep(0.3)
        assert conversation.interruptions == 1
        assert conversation.stale_chunks_sent == 1
        # After the interruption the client heard only the new reply (the echo of its own
        # barge-in), never the stale chunk of the old tone the agent sent after it.
        assert client.audio(flush) == barge
        await client.emit("call.end")
        await client.wait_for("call.ended")


async def test_monitor_hears_both_sides_and_cannot_speak(
    stack: RelayStack, api: httpx.AsyncClient, tenant: Any
) -> None:
    agent = await stack.agent(api, tenant, EmulatedAgent(realtime=False))
    call = await stack.call(api, tenant, agent)
    voiced = pcm_tone(0.5)
    async with call_client(stack.relay_url, call["token"]) as caller:
        ready = await caller.wait_for("call.ready")
        conversation = stack.conversation(ready["conversation_id"])
        monitor_token = await stack.monitor_token(api, tenant, call["call_id"])
        async with call_client(stack.relay_url, monitor_token["token"]) as monitor:
            monitor_ready = await monitor.wait_for("call.ready")
            assert monitor_ready["conversation_id"] == ready["conversation_id"]
            await stream(caller, voiced + pcm_silence(0.8), chunk_bytes=FRAME_20MS)
            await eventually(lambda: len(monitor.audio()) >= len(voiced))
            await eventually(lambda: len(monitor.audio(name="caller_audio")) >= len(voiced))
            assert monitor.audio() == voiced
            assert monitor.audio(name="caller_audio")[: len(voiced)] == voiced
            await monitor.wait_for("user_transcript")

            # Read-only: audio and messages from a monitor never reach the agent.
            spoken = len(voiced) + len(pcm_silence(0.8))
            # (The caller's trailing silence may still be on its way to the agent.)
            await eventually(lambda: conversation.audio_bytes_in >= spoken)
            received = conversation.audio_bytes_in
            mark = len(monitor.events)
            await monitor.emit("audio", voiced[:FRAME_20MS])
            await monitor.emit("user_message", {"text": "hello"})
            error = await monitor.wait_for("error", after=mark)
            assert error["code"] == "monitor_read_only"
            await asyncio.sleep(0.2)
            assert conversation.audio_bytes_in == received
            assert conversation.user_messages == []

            # A monitor's call.end only takes the monitor out.
            await monitor.emit("call.end")
            await asyncio.wait_for(monitor.disconnected.wait(), 5)
        mark = len(caller.events)
        await caller.emit("user_message", {"text": "still there?"})
        await caller.wait_for("agent_response", after=mark)
        await caller.emit("call.end")
        assert (await caller.wait_for("call.ended"))["reason"] == "caller_hangup"


async def test_caller_reconnect_resumes_the_same_conversation(
    stack: RelayStack, api: httpx.AsyncClient, tenant: Any
) -> None:
    agent = await stack.agent(api, tenant, EmulatedAgent(realtime=False))
    call = await stack.call(api, tenant, agent)
    async with call_client(stack.relay_url, call["token"]) as first:
        ready = await first.wait_for("call.ready")
    async with call_client(stack.relay_url, call["token"]) as second:
        resumed = await second.wait_for("call.ready")
        assert resumed["resumed"] is True
        assert resumed["conversation_id"] == ready["conversation_id"]
        mark = len(second.events)
        voiced = pcm_tone(0.4)
        await stream(second, voiced + pcm_silence(0.8), chunk_bytes=FRAME_20MS)
        await eventually(lambda: len(second.audio(mark)) >= len(voiced))
        assert second.audio(mark) == voiced
        await second.emit("call.end")
        await second.wait_for("call.ended")
    # The call has ended: the same token cannot start it again.
    async with call_client(stack.relay_url) as third:
        from tests.support.relay_stack import ConnectRefused

        with pytest.raises(ConnectRefused) as refused:
            await third.connect(call["token"])
        assert refused.value.code == "call_ended"
