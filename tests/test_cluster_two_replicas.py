"""Two (or three) relay replicas in one process, sharing Redis: a call's clients on any replica.

Real uvicorn servers on loopback (emulator, control API, relays), real python-socketio clients,
real Redis and PostgreSQL, the targeted client manager. The emulated agent echoes voiced audio
byte for byte, so the checks are exact in both directions.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client import REGISTRY

from relay.app import RelayApp
from tests.support.relay_stack import (
    CallClient,
    RelayStack,
    call_client,
    pcm_silence,
    pcm_tone,
    relay_stack,
    serve_relay,
    stack_settings,
    stream,
)
from tests.support.tenants import auth
from voicerelay.emulators.elevenlabs import EmulatedAgent
from voicerelay.settings import Settings

FRAME_20MS = 640  # PCM16 at 16 kHz


@dataclass
class Replicas:
    stack: RelayStack
    r1: RelayApp
    r1_url: str
    r2: RelayApp
    r2_url: str


def replica_settings(stack: RelayStack, name: str, **changes: Any) -> Settings:
    return stack_settings(stack.settings, relay_id=f"{name}-{uuid.uuid4().hex[:6]}", **changes)


@pytest.fixture(scope="module")
async def replicas(settings: Settings) -> AsyncIterator[Replicas]:
    async with (
        relay_stack(settings) as stack,
        serve_relay(replica_settings(stack, "r2")) as (r2_url, r2),
    ):
        yield Replicas(stack, stack.relay_app, stack.relay_url, r2, r2_url)


@pytest.fixture
async def api(replicas: Replicas) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=replicas.stack.api_url, timeout=10) as client:
        yield client


async def eventually(check: Callable[[], Any], *, timeout: float = 10.0) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if result:
                return result
            await asyncio.sleep(0.02)


async def echo_turn(client: CallClient, seconds: float = 0.4, *, hz: float = 440.0) -> bytes:
    """Speak a tone and wait for the agent's echo of it; returns what was said."""
    voiced = pcm_tone(seconds, hz=hz)
    mark = len(client.events)
    await stream(client, voiced + pcm_silence(0.8), chunk_bytes=FRAME_20MS)
    await eventually(lambda: len(client.audio(mark)) >= len(voiced))
    assert client.audio(mark) == voiced
    return voiced


async def conversation_ids(api: httpx.AsyncClient, tenant: Any, call_id: str) -> list[str]:
    r = await api.get(f"/v1/calls/{call_id}", headers=auth(tenant))
    assert r.status_code == 200, r.text
    ids: list[str] = r.json().get("conversation_ids") or []
    return ids


def emits_published() -> float:
    """Emit envelopes any replica in this process sent through Redis."""
    sample = REGISTRY.get_sample_value(
        "voicerelay_relay_cluster_envelopes_total", {"direction": "out", "kind": "emit"}
    )
    return sample or 0.0


async def test_reconnect_to_the_other_replica_continues_the_same_conversation(
    replicas: Replicas, api: httpx.AsyncClient, tenant: Any
) -> None:
    stack = replicas.stack
    agent = await stack.agent(api, tenant, EmulatedAgent(realtime=False))
    call = await stack.call(api, tenant, agent)
    async with call_client(replicas.r1_url, call["token"]) as first:
        ready = await first.wait_for("call.ready")
        assert ready["resumed"] is False
        published_before = emits_published()
        said = [await echo_turn(first)]
        # Caller and bridge on one replica: nothing crossed Redis.
        assert emits_published() == published_before
    async with call_client(replicas.r2_url, call["token"]) as second:
        resumed = await second.wait_for("call.ready")
        assert resumed["resumed"] is True
        assert resumed["conversation_id"] == ready["conversation_id"]
        # The bridge stayed on replica 1; replica 2 holds a remote participant.
        call_id = uuid.UUID(call["call_id"])
        assert replicas.r1.runtime.registry.get(call_id) is not None
        assert replicas.r2.runtime.registry.get(call_id) is None
        said.append(await echo_turn(second, hz=660.0))
        async with httpx.AsyncClient(base_url=replicas.r2_url) as http:
            assert (await http.get("/ready")).json()["checks"]["pubsub"] == "ok"
        assert emits_published() > published_before  # agent audio went to replica 2
        mark = len(second.events)
        await second.emit("user_message", {"text": "across replicas"})
        assert (await second.wait_for("agent_response", after=mark))["text"]
        await second.emit("call.end")
        ended = await second.wait_for("call.ended")
        assert ended["reason"] == "caller_hangup"
    conversation = stack.conversation(ready["conversation_id"])
    spoken = sum(len(s) + len(pcm_silence(0.8)) for s in said)
    assert conversation.audio_bytes_in == spoken  # every caller byte reached the agent once
    assert conversation.user_messages == ["across replicas"]
    async with call_client(replicas.r1_url) as late:
        from tests.support.relay_stack import ConnectRefused

        with pytest.raises(ConnectRefused) as refused:
            await late.connect(call["token"])
        assert refused.value.code == "call_ended"


async def test_monitor_on_the_other_replica_hears_both_sides(
    replicas: Replicas, api: httpx.AsyncClient, tenant: Any
) -> None:
    stack = replicas.stack
    agent = await stack.agent(api, tenant, EmulatedAgent(realtime=False))
    call = await stack.call(api, tenant, agent)
    async with call_client(replicas.r1_url, call["token"]) as caller:
        ready = await caller.wait_for("call.ready")
        token = await stack.monitor_token(api, tenant, call["call_id"])
        async with call_client(replicas.r2_url, token["token"]) as monitor:
            monitor_ready = await monitor.wait_for("call.ready")
            assert monitor_ready["conversation_id"] == ready["conversation_id"]
            voiced = pcm_tone(0.5)
            spoken = voiced + pcm_silence(0.8)
            await stream(caller, spoken, chunk_bytes=FRAME_20MS)
            await eventually(lambda: len(monitor.audio()) >= len(voiced))
            await eventually(lambda: len(monitor.audio(name="caller_audio")) >= len(spoken))
            assert monitor.audio() == voiced
            assert monitor.audio(name="caller_audio") == spoken
            assert caller.audio() == voiced
            mark = len(monitor.events)
            await monitor.emit("user_message", {"text": "hello"})
            assert (await monitor.wait_for("error", after=mark))["code"] == "monitor_read_only"
            await caller.emit("call.end")
            assert (await monitor.wait_for("call.ended"))["reason"] == "caller_hangup"
            await asyncio.wait_for(monitor.disconnected.wait(), 5)
    assert stack.conversation(ready["conversation_id"]).user_messages == []


async def test_owner_that_loses_its_lease_stops_quietly_and_the_call_goes_on(
    replicas: Replicas, api: httpx.AsyncClient, tenant: Any, redis_client: Any
) -> None:
    stack = replicas.stack
    agent = await stack.agent(api, tenant, EmulatedAgent(realtime=False))
    call = await stack.call(api, tenant, agent)
    call_id = uuid.UUID(call["call_id"])
    r1, r2 = replicas.r1.runtime, replicas.r2.runtime
    assert r1.cluster is not None
    assert r2.cluster is not None
    async with call_client(replicas.r1_url, call["token"]) as caller:
        ready = await caller.wait_for("call.ready")
        await echo_turn(caller)
        bridge = r1.registry.get(call_id)
        assert bridge is not None
        # Replica 2 takes the call (as if replica 1 had been unreachable past its lease).
        await redis_client.hset(r1.cluster.call_key(call_id), "lease_until_ms", 1)
        epoch = await r2.cluster.claim(call_id, tenant.tenant_id)
        assert epoch is not None
        assert bridge.epoch is not None
        assert epoch > bridge.epoch
        told = await caller.wait_for("relay.reconnect", timeout=10)
        assert told == {"reason": "owner_moved"}
        await asyncio.wait_for(caller.disconnected.wait(), 5)
        await bridge.wait_ended()
        assert caller.index_of("call.ended") == -1  # nobody was told the call ended
        assert r1.registry.get(call_id) is None
        assert not r1.registry.recently_ended(call_id)
        # The tenant slot is untouched (the new owner holds it under the same call id).
        assert await redis_client.zscore(r1.cap.key(tenant.tenant_id), str(call_id)) is not None
    async with call_client(replicas.r2_url, call["token"]) as again:
        resumed = await again.wait_for("call.ready")
        assert resumed["resumed"] is True
        assert resumed["conversation_id"] != ready["conversation_id"]
        await echo_turn(again, hz=550.0)
        await again.emit("call.end")
        assert (await again.wait_for("call.ended"))["reason"] == "caller_hangup"
    async with asyncio.timeout(15):
        while True:
            ids = await conversation_ids(api, tenant, call["call_id"])
            if {ready["conversation_id"], resumed["conversation_id"]} <= set(ids):
                break
            await asyncio.sleep(0.1)


class Balancer:
    """A TCP load balancer on loopback: each new connection goes to the next backend port."""

    def __init__(self) -> None:
        self.backends: list[int] = []
        self._turn = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            port = self.backends[self._turn % len(self.backends)]
            self._turn += 1
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except (OSError, ZeroDivisionError):
            writer.close()
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


async def test_drain_sends_clients_elsewhere_and_keeps_the_bridge_until_the_call_ends(
    replicas: Replicas, api: httpx.AsyncClient, tenant: Any
) -> None:
    """SIGTERM's drain on the owner: its client gets ``relay.reconnect``, its transport closes,
    python-socketio's own reconnection goes through the balancer to replica 1 and the call
    continues there (same conversation) while the bridge stays on the draining replica."""
    stack = replicas.stack
    agent = await stack.agent(api, tenant, EmulatedAgent(realtime=False))
    call = await stack.call(api, tenant, agent)
    balancer = Balancer()
    async with (
        serve_relay(replica_settings(stack, "r3", drain_deadline_seconds=30)) as (r3_url, r3),
        balancer.running() as lb_url,
    ):
        balancer.backends = [port_of(r3_url)]
        client = CallClient(lb_url, reconnection=True)
        try:
            await client.connect(call["token"])
            ready = await client.wait_for("call.ready")
            said = [await echo_turn(client)]
            bridge = r3.runtime.registry.get(uuid.UUID(call["call_id"]))
            assert bridge is not None

            balancer.backends = [port_of(replicas.r1_url)]  # r3 leaves the rotation
            mark = len(client.events)
            drain = asyncio.create_task(r3.drain())
            told = await client.wait_for("relay.reconnect", after=mark)
            assert told == {"reason": "draining"}
            resumed = await client.wait_for("call.ready", after=mark)
            assert resumed["resumed"] is True
            assert resumed["conversation_id"] == ready["conversation_id"]
            assert not drain.done()  # the bridge is still on r3, serving the call
            said.append(await echo_turn(client, hz=330.0))
            await client.emit("call.end")
            assert (await client.wait_for("call.ended", after=mark))["reason"] == "caller_hangup"
            await asyncio.wait_for(drain, 10)  # the last call ended: the drain is over
            assert bridge.ended
            assert [name for name, _ in client.events].count("call.ended") == 1
        finally:
            await client.close()
    conversation = stack.conversation(ready["conversation_id"])
    assert conversation.audio_bytes_in == sum(len(s) + len(pcm_silence(0.8)) for s in said)
