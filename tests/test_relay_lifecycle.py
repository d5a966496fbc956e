"""Every way a call ends, admission limits, draining, and SIGTERM on a `voicerelay relay` process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets

from relay.admission import TenantCallCap
from tests.support.ports import subprocess_port
from tests.support.relay_stack import (
    ConnectRefused,
    RelayStack,
    call_client,
    serve_relay,
    stack_settings,
)
from tests.support.servers import serve
from tests.support.tenants import make_tenant
from voicerelay.emulators.elevenlabs import EmulatedAgent
from voicerelay.settings import Settings


async def active_slots(stack: RelayStack, tenant: Any) -> int:
    runtime = stack.relay_app.runtime
    cap: TenantCallCap = runtime.cap
    return await cap.active(tenant.tenant_id)


async def wait_until(check: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


# --- how calls end ------------------------------------------------------------------------------


async def test_caller_vanishing_ends_the_call_after_the_grace(
    stack: RelayStack, api: httpx.AsyncClient, tenant: Any
) -> None:
    agent = await stack.agent(api, tenant, EmulatedAgent(realtime=False))
    call = await stack.call(api, tenant, agent)
    url = stack.relay_url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
    ws = await websockets.connect(url, compression=None)
    await asyncio.wait_for(ws.recv(), 5)
    await ws.send('40{"token":"' + call["token"] + '"}')
    assert (await asyncio.wait_for(ws.recv(), 10)).startswith("40{")
    ready = await asyncio.wait_for(ws.recv(), 10)
    assert ready.startswith('42["call.ready"')
    assert await active_slots(stack, tenant) == 1
    vanished = time.monotonic()
    ws.transport.abort()  # no close frame, no Socket.IO disconnect: the client is just gone

    runtime = stack.relay_app.runtime
    bridge = runtime.registry.get(__import__("uuid").UUID(call["call_id"]))
    assert bridge is not None
    await asyncio.wait_for(bridge.wait_ended(), 10)
    waited = time.monotonic() - vanished
    assert waited >= stack.relay_app.runtime.options.bridge.caller_grace_seconds - 0.1
    assert await active_slots(stack, tenant) == 0
    assert runtime.registry.get(bridge.call_id) is None


@pytest.mark.parametrize(
    ("script", "reason", "code"),
    [
        ("close:1000", "agent_ended", "normal"),
        # The agent's end_call tool, then its close (ElevenLabs' way), or no close at all.
        ("end", "agent_ended", "end_call"),
        ("end:open", "agent_ended", "end_call"),
        ("close:1002", "upstream_error", None),
        ("error:quota", "upstream_error", "quota_exceeded"),
        ("close:1008", "upstream_rejected", None),
        ("error:override_error", "upstream_rejected", "override_error"),
        ("close:1011", "upstream_crashed", None),
    ],
)
async def test_upstream_close_codes_end_the_call(
    stack: RelayStack,
    api: httpx.AsyncClient,
    tenant: Any,
    script: str,
    reason: str,
    code: str | None,
) -> None:
    agent = await stack.agent(api, tenant, EmulatedAgent(realtime=False))
    call = await stack.call(api, tenant, agent)
    async with call_client(stack.relay_url, call["token"]) as client:
        await client.wait_for("call.ready")
        await client.emit("user_message", {"text": script})
        ended = await client.wait_for("call.ended")
        assert ended["reason"] == reason
        if code is not None:
            assert ended["code"] == code
        await asyncio.wait_for(client.disconnected.wait(), 5)
        assert [e for e, _ in client.events].count("call.ended") == 1
    await wait_until(lambda: _zero(stack, tenant))


async def _zero(stack: RelayStack, tenant: Any) -> bool:
    return await active_slots(stack, tenant) == 0


async def test_unresponsive_agent_is_upstream_unavailable(
    stack: RelayStack, api: httpx.AsyncClient, tenant: Any
) -> None:
    # The emulator completes the WebSocket handshake, then never sends metadata.
    agent = await stack.agent(api, tenant, EmulatedAgent(unresponsive=True))
    call = await stack.call(api, tenant, agent)
    started = time.monotonic()
    async with call_client(stack.relay_url, call["token"]) as client:
        ended = await client.wait_for("call.ended", timeout=15)
    elapsed = time.monotonic() - started
    assert ended == {"reason": "upstream_unavailable", "code": "upstream_timeout"}
    assert client.index_of("call.ready") == -1
    assert elapsed < stack.settings.upstream_connect_timeout_seconds + 3


async def test_silent_tcp_upstream_is_upstream_unavailable(
    settings: Settings, stack: RelayStack, tenant: Any
) -> None:
    """An 'ElevenLabs' that accepts TCP and says nothing, not even the WebSocket handshake."""
    held: list[asyncio.StreamWriter] = []

    async def accept_and_ignore(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept_and_ignore, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        from control_api.app import create_app as create_api_app

        api_settings = stack_settings(settings, elevenlabs_api_url=f"http://127.0.0.1:{port}")
        async with serve(create_api_app(api_settings)) as api_url:
            relay_settings = stack_settings(
                stack.settings,
                control_api_internal_url=api_url,
                upstream_connect_timeout_seconds=1.0,
            )
            async with (
                serve_relay(relay_settings) as (relay_url, _),
                httpx.AsyncClient(base_url=api_url, timeout=10) as api,
            ):
                agent = await stack.agent(api, tenant, EmulatedAgent(requires_auth=False))
                call = await stack.call(api, tenant, agent)
                started = time.monotonic()
                async with call_client(relay_url, call["token"]) as client:
                    ended = await client.wait_for("call.ended", timeout=10)
                elapsed = time.monotonic() - started
        assert ended["reason"] == "upstream_unavailable"
        assert held, "the relay never reached the silent upstream"
        assert 0.9 <= elapsed < 4.0
    finally:
        for writer in held:
            writer.close()
        server.close()


async def test_idle_call_ends(stack: RelayStack, api: httpx.AsyncClient, tenant: Any) -> None:
    agent = await stack.agent(api, tenant, EmulatedAgent(realtime=False))
    call = await stack.call(api, tenant, agent)
    relay_settings = stack_settings(stack.settings, call_idle_timeout_seconds=0.5)
    async with (
        serve_relay(relay_settings) as (relay_url, _),
        call_client(relay_url, call["token"]) as client,
    ):
        await client.wait_for("call.ready")
        ended = await client.wait_for("call.ended", timeout=10)
    assert ended["reason"] == "idle_timeout"


# --- admission ----------------------------------------------------------------------------------


async def test_tenant_cap_refuses_the_second_call_and_frees_the_slot(
    stack: RelayStack, api: httpx.AsyncClient, database: Any
) -> None:
    small = await make_tenant(database.owner_dsn, max_concurrent_calls=1)
    agent = await stack.agent(api, small, EmulatedAgent(realtime=False))
    first = await stack.call(api, small, agent)
    second = await stack.call(api, small, agent)
    async with call_client(stack.relay_url, first["token"]) as one:
        await one.wait_for("call.ready")
        async with call_client(stack.relay_url) as two:
            with pytest.raises(ConnectRefused) as refused:
                await two.connect(second["token"])
        assert refused.value.code == "tenant_limit"
        # A monitor does not take a slot.
        monitor = await stack.monitor_token(api, small, first["call_id"])
        async with call_client(stack.relay_url, monitor["token"]) as listener:
            await listener.wait_for("call.ready")
        await one.emit("call.end")
        await one.wait_for("call.ended")
    await wait_until(lambda: _zero(stack, small))
    async with call_client(stack.relay_url, second["token"]) as two:
        await two.wait_for("call.ready")
        await two.emit("call.end")
        await two.wait_for("call.ended")


async def test_connection_rate_limit_per_ip(
    stack: RelayStack, api: httpx.AsyncClient, tenant: Any
) -> None:
    relay_settings = stack_settings(
        stack.settings,
        relay_connect_rate_per_minute_per_ip=2,
        # Its own limiter keys, so this slow limit does not linger for the other tests.
        redis_key_prefix=stack.settings.redis_key_prefix + "rate-test:",
    )
    agent = await stack.agent(api, tenant, EmulatedAgent(realtime=False))
    call = await stack.call(api, tenant, agent)
    async with serve_relay(relay_settings) as (relay_url, _):
        results = []
        for _ in range(4):
            async with call_client(relay_url) as client:
                try:
                    await client.connect(call["token"])
                    results.append("ok")
                except ConnectRefused as refused:
                    results.append(refused.code)
        assert results == ["ok", "ok", "rate_limited", "rate_limited"]


async def test_draining_relay_refuses_new_connects_and_is_not_ready(
    stack: RelayStack, api: httpx.AsyncClient, tenant: Any
) -> None:
    agent = await stack.agent(api, tenant, EmulatedAgent(realtime=False))
    call = await stack.call(api, tenant, agent)
    async with (
        serve_relay(stack.settings) as (relay_url, app),
        httpx.AsyncClient(base_url=relay_url) as http,
    ):
        assert (await http.get("/ready")).status_code == 200
        app.runtime.drain.begin()
        r = await http.get("/ready")
        assert r.status_code == 503
        assert r.json()["checks"]["draining"] == "true"
        async with call_client(relay_url) as client:
            with pytest.raises(ConnectRefused) as refused:
                await client.connect(call["token"])
        assert refused.value.code == "draining"
        assert (await http.get("/health")).status_code == 200
        metrics = (await http.get("/metrics")).text
        assert "voicerelay_relay_draining 1.0" in metrics


# --- SIGTERM ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def relay_process(settings: Settings, **env: str) -> AsyncIterator[tuple[str, Any]]:
    port = subprocess_port()
    environment = {
        **os.environ,
        "REDIS_URL": settings.require("redis_url"),
        "REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "INTERNAL_SERVICE_TOKEN": settings.require("internal_service_token"),
        "CONTROL_API_INTERNAL_URL": settings.control_api_internal_url,
        "RELAY_CONNECT_RATE_PER_MINUTE_PER_IP": "100000",
        "LOG_FORMAT": "text",
        **env,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "voicerelay", "relay", "--host", "127.0.0.1", "--port", str(port)],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            async with asyncio.timeout(20):
                while True:
                    if process.poll() is not None:
                        raise RuntimeError(process.stdout.read().decode() if process.stdout else "")
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.get("/ready")).status_code == 200:
                            break
                    await asyncio.sleep(0.1)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


async def test_sigterm_drains_then_ends_calls_with_shutdown(
    stack: RelayStack, api: httpx.AsyncClient, tenant: Any
) -> None:
    agent = await stack.agent(api, tenant, EmulatedAgent(realtime=False))
    call = await stack.call(api, tenant, agent)
    late = await stack.call(api, tenant, agent)
    deadline = 2.0
    async with (
        # A lone replica (no cluster): its clients stay through the drain, as there is nowhere
        # else for them to go (with other replicas up they would be told to reconnect).
        relay_process(
            stack.settings, DRAIN_DEADLINE_SECONDS=str(deadline), RELAY_CLIENT_MANAGER="local"
        ) as (url, process),
        httpx.AsyncClient(base_url=url) as http,
        call_client(url, call["token"]) as client,
    ):
        await client.wait_for("call.ready")
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        async with asyncio.timeout(5):
            while (await http.get("/ready")).status_code != 503:
                await asyncio.sleep(0.05)
        async with call_client(url) as newcomer:
            with pytest.raises(ConnectRefused) as refused:
                await newcomer.connect(late["token"])
        assert refused.value.code == "draining"
        # The active call carries on until the deadline...
        mark = len(client.events)
        await client.emit("user_message", {"text": "are you still there?"})
        await client.wait_for("agent_response", after=mark)
        # ...then ends cleanly.
        ended = await client.wait_for("call.ended", timeout=deadline + 10)
        assert ended["reason"] == "shutdown"
        assert time.monotonic() - signalled >= deadline - 0.2
        await asyncio.wait_for(client.disconnected.wait(), 5)
        for _ in range(100):
            if process.poll() is not None:
                break
            await asyncio.sleep(0.1)
        assert process.wait(5) == 0
