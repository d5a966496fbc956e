"""What operators rely on, end to end: the per-call maximum duration, what /metrics shows after
calls, and the call's log lines (JSON, with its tenant and call ids, none per audio frame)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from control_api.app import create_app as create_api_app
from tests import test_relay_call as call_tests
from tests.support.relay_stack import (
    ConnectRefused,
    RelayStack,
    call_client,
    pcm_silence,
    pcm_tone,
    serve_relay,
    stack_settings,
    stream,
)
from tests.support.servers import serve
from tests.support.services import free_port
from voicerelay.emulators.elevenlabs import EmulatedAgent
from voicerelay.logs import JsonFormatter

FRAME_20MS = call_tests.FRAME_20MS


async def scrape(relay_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient(base_url=relay_url) as http:
        r = await http.get("/metrics")
    assert r.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(r.text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@contextlib.asynccontextmanager
async def own_api_and_relay(
    stack: RelayStack, **api_overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, str, Any]]:
    """A control API with ``api_overrides`` and a relay that uses it: (API client, relay URL,
    relay app)."""
    api_settings = stack_settings(stack.settings, **api_overrides)
    async with (
        serve(create_api_app(api_settings)) as api_url,
        httpx.AsyncClient(base_url=api_url, timeout=10) as api,
    ):
        relay_settings = stack_settings(stack.settings, control_api_internal_url=api_url)
        async with serve_relay(relay_settings) as (relay_url, app):
            yield api, relay_url, app


async def test_a_call_past_its_maximum_duration_ends_with_max_duration(
    stack: RelayStack, tenant: Any
) -> None:
    # MAX_CALL_DURATION_SECONDS is at least 30 in real settings; a copy skips that check.
    async with own_api_and_relay(stack, max_call_duration_seconds=2) as (api, relay_url, app):
        agent = await stack.agent(api, tenant, EmulatedAgent(realtime=False))
        call = await stack.call(api, tenant, agent)
        async with call_client(relay_url, call["token"]) as client:
            await client.wait_for("call.ready")
            ended = await client.wait_for("call.ended", timeout=15)
            await asyncio.wait_for(client.disconnected.wait(), 5)
        assert ended == {"reason": "max_duration", "code": "max_duration_exceeded"}
        assert await app.runtime.cap.active(tenant.tenant_id) == 0


async def test_metrics_count_calls_audio_both_ways_connects_latency_and_errors(
    stack: RelayStack, api: httpx.AsyncClient, tenant: Any
) -> None:
    before = await scrape(stack.relay_url)
    agent = await stack.agent(api, tenant, EmulatedAgent(realtime=False))
    voiced = pcm_tone(0.4)
    call = await stack.call(api, tenant, agent)
    async with call_client(stack.relay_url, call["token"]) as client:
        await client.wait_for("call.ready")
        during = await scrape(stack.relay_url)
        assert value(during, "voicerelay_relay_active_calls") >= 1
        mark = len(client.events)
        await stream(client, voiced + pcm_silence(0.8), chunk_bytes=FRAME_20MS)
        await client.wait_for("agent_response", after=mark)
        await call_tests.eventually(lambda: len(client.audio(mark)) >= len(voiced))
        # The agent's side crashes: a failed call, counted under its code.
        await client.emit("user_message", {"text": "close:1011"})
        ended = await client.wait_for("call.ended")
        # The relay disconnects the client once the call's end is fully accounted for.
        await asyncio.wait_for(client.disconnected.wait(), 5)
    after = await scrape(stack.relay_url)

    def grew(name: str, by: float = 1, **labels: str) -> None:
        assert value(after, name, **labels) - value(before, name, **labels) >= by, name

    sent = len(voiced) + len(pcm_silence(0.8))
    grew("voicerelay_relay_audio_frames_total", sent // FRAME_20MS, direction="in")
    grew("voicerelay_relay_audio_bytes_total", sent, direction="in")
    grew("voicerelay_relay_audio_frames_total", 1, direction="out")
    grew("voicerelay_relay_audio_bytes_total", len(voiced), direction="out")
    grew("voicerelay_relay_upstream_connect_seconds_count")
    # Observed once per frame relayed, each way.
    grew("voicerelay_relay_added_latency_seconds_count", sent // FRAME_20MS + 1)
    grew("voicerelay_relay_errors_total", code=ended["code"])
    grew("voicerelay_relay_calls_total", result=ended["reason"])
    assert ended["reason"] == "upstream_crashed"


class JsonLines(logging.Handler):
    """Formats each record as the relay's stderr handler does, in the emitting task's context
    (the tenant and call ids come from context variables)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(orjson.loads(self.format(record)))


@pytest.fixture
def relay_log_lines() -> Iterator[JsonLines]:
    handler = JsonLines()
    logger = logging.getLogger("relay")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_call_log_lines_are_json_with_tenant_and_call_ids_and_none_per_frame(
    stack: RelayStack, api: httpx.AsyncClient, tenant: Any, relay_log_lines: JsonLines
) -> None:
    agent = await stack.agent(api, tenant, EmulatedAgent(realtime=False))
    call = await stack.call(api, tenant, agent)
    frames = 150
    async with call_client(stack.relay_url, call["token"]) as client:
        await client.wait_for("call.ready")
        mark = len(client.events)
        await stream(client, pcm_tone(1.0) + pcm_silence(2.0), chunk_bytes=FRAME_20MS)
        await client.wait_for("agent_response", after=mark)
        await client.emit("call.end")
        await client.wait_for("call.ended")
        await asyncio.wait_for(client.disconnected.wait(), 5)
    lines = [line for line in relay_log_lines.lines if line.get("call_id") == call["call_id"]]
    messages = [line["msg"] for line in lines]
    assert "call ready" in messages
    assert "call ended" in messages
    for line in lines:
        assert line["tenant_id"] == str(tenant.tenant_id), line
    # A handful of lines for the whole call, whatever its length in frames.
    assert len(relay_log_lines.lines) < frames // 10, messages


async def stalled_caller(relay_url: str, token: str) -> websockets.ClientConnection:
    """A caller whose socket stops reading after ``call.ready``: its receive buffer is tiny, so
    the relay's sends back up at once instead of filling loopback buffers for megabytes."""
    host, port = relay_url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    ws = await websockets.connect(
        f"ws://{host}:{port}/socket.io/?EIO=4&transport=websocket", sock=sock, compression=None
    )
    await asyncio.wait_for(ws.recv(), 5)  # Engine.IO open
    await ws.send('40{"token":"' + token + '"}')
    assert str(await asyncio.wait_for(ws.recv(), 10)).startswith("40{")
    assert str(await asyncio.wait_for(ws.recv(), 10)).startswith('42["call.ready"')
    return ws


async def test_a_caller_that_stops_reading_loses_its_oldest_audio_and_blocks_no_other_call(
    stack: RelayStack, api: httpx.AsyncClient, tenant: Any
) -> None:
    before = await scrape(stack.relay_url)
    # 48 kHz both ways: two minutes of agent audio (11.5 MB) is far more than socket buffers.
    loud = await stack.agent(
        api,
        tenant,
        EmulatedAgent(realtime=False, input_format="pcm_48000", output_format="pcm_48000"),
    )
    stuck_call = await stack.call(api, tenant, loud, client_audio_format="pcm_48000")
    stuck = await stalled_caller(stack.relay_url, stuck_call["token"])
    try:
        await stuck.send('42["user_message",{"text":"tone:120"}]')

        async def dropped() -> float:
            samples = await scrape(stack.relay_url)
            name = "voicerelay_relay_client_queue_dropped_total"
            return value(samples, name) - value(before, name)

        async with asyncio.timeout(20):
            while await dropped() <= 0:
                await asyncio.sleep(0.1)

        # Meanwhile another call on the same relay goes on as usual, its audio byte-exact.
        agent = await stack.agent(api, tenant, EmulatedAgent(realtime=False))
        call = await stack.call(api, tenant, agent)
        voiced = pcm_tone(0.4)
        async with call_client(stack.relay_url, call["token"]) as client:
            await client.wait_for("call.ready")
            mark = len(client.events)
            await stream(client, voiced + pcm_silence(0.8), chunk_bytes=FRAME_20MS)
            await call_tests.eventually(lambda: len(client.audio(mark)) >= len(voiced))
            assert client.audio(mark) == voiced
            await client.emit("call.end")
            await client.wait_for("call.ended")
        # The stuck call's queue stays bounded: it holds at most the configured chunks.
        bridge = stack.relay_app.runtime.registry.get(uuid.UUID(stuck_call["call_id"]))
        assert bridge is not None
        assert len(bridge._outbox) <= stack.settings.relay_client_queue_chunks
    finally:
        stuck.transport.abort()


async def test_a_connect_the_agent_cannot_be_reached_for_is_refused_upstream_unavailable(
    stack: RelayStack, tenant: Any
) -> None:
    # A private agent needs a signed URL from ElevenLabs, and ElevenLabs is not there.
    unreachable = f"http://127.0.0.1:{free_port()}"
    async with own_api_and_relay(stack, elevenlabs_api_url=unreachable) as (api, relay_url, _):
        agent = await stack.agent(api, tenant, EmulatedAgent(requires_auth=True))
        call = await stack.call(api, tenant, agent)
        async with call_client(relay_url) as client:
            with pytest.raises(ConnectRefused) as refused:
                await client.connect(call["token"])
    assert refused.value.code == "upstream_unavailable"
    assert set(refused.value.data["data"]) == {"code", "message"}
