"""The relay's per-tenant connection rate, end to end: real Socket.IO connects, one client address.

The per-address rate has its own test (test_relay_lifecycle); the limiter itself is tested against
Redis in test_admission. Here a relay with a generous per-address rate and a small per-tenant one
refuses a tenant past its burst, whichever of its calls connects, while another tenant connecting
from the same address at the same moment is admitted; the refusal is counted in /metrics, and the
tenant is admitted again once its rate has refilled.
"""

from __future__ import annotations

import asyncio
import math
import re
from typing import Any

import httpx

from tests.support.relay_stack import (
    ConnectRefused,
    RelayStack,
    call_client,
    serve_relay,
    stack_settings,
)
from tests.test_relay_ops import scrape, value
from voicerelay.emulators.elevenlabs import EmulatedAgent

# Connections a tenant may open at once; then one every 60 / TENANT_PER_MINUTE seconds (6 s):
# long enough that the burst below cannot refill while it is being spent, short enough to wait.
TENANT_PER_MINUTE = 10


async def connect_once(relay_url: str, token: str) -> ConnectRefused | None:
    """Connects and disconnects; the refusal, or None when the relay admitted the connection."""
    async with call_client(relay_url) as client:
        try:
            await client.connect(token)
        except ConnectRefused as refused:
            return refused
    return None


def assert_rate_limited(refused: ConnectRefused | None) -> None:
    assert refused is not None, "the connection was admitted"
    message = refused.data["message"]
    # python-socketio's connect_error: the refusal's message, and the relay's {code, message}.
    assert refused.data == {
        "message": message,
        "data": {"code": "rate_limited", "message": message},
    }
    retry = re.fullmatch(r"Too many connections; retry in (\d+) s\.", message)
    assert retry is not None, message
    assert 1 <= int(retry.group(1)) <= math.ceil(60 / TENANT_PER_MINUTE)


async def test_a_tenant_past_its_connection_rate_is_refused_while_another_tenant_is_admitted(
    stack: RelayStack, api: httpx.AsyncClient, tenant: Any, other_tenant: Any
) -> None:
    relay_settings = stack_settings(
        stack.settings,
        relay_connect_rate_per_minute_per_ip=100_000,
        relay_connect_rate_per_minute_per_tenant=TENANT_PER_MINUTE,
    )
    agent_a = await stack.agent(api, tenant, EmulatedAgent(realtime=False))
    first_a = await stack.call(api, tenant, agent_a)
    second_a = await stack.call(api, tenant, agent_a)
    agent_b = await stack.agent(api, other_tenant, EmulatedAgent(realtime=False))
    call_b = await stack.call(api, other_tenant, agent_b)

    async with serve_relay(relay_settings) as (relay_url, _):
        before = await scrape(relay_url)
        # The burst, spent by one call of tenant A (the caller reconnecting within its grace).
        for _ in range(TENANT_PER_MINUTE):
            assert await connect_once(relay_url, first_a["token"]) is None
        # Tenant A's other call, never connected before, shares the tenant's budget.
        assert_rate_limited(await connect_once(relay_url, second_a["token"]))
        # Tenant B, from the same address at the same moment, has its own budget.
        assert await connect_once(relay_url, call_b["token"]) is None
        assert_rate_limited(await connect_once(relay_url, first_a["token"]))
        after = await scrape(relay_url)

        def grew(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert grew("voicerelay_relay_connect_rejected_total", code="rate_limited") == 2
        decisions = "voicerelay_relay_connect_rate_decisions_total"
        assert grew(decisions, limiter="tenant", result="limited") == 2
        assert grew(decisions, limiter="tenant", result="allowed") == TENANT_PER_MINUTE + 1
        assert grew(decisions, limiter="ip", result="limited") == 0

        # Once the tenant's rate has refilled, its waiting call is admitted.
        async with asyncio.timeout(30):
            while (refused := await connect_once(relay_url, second_a["token"])) is not None:
                assert_rate_limited(refused)
                await asyncio.sleep(0.25)
