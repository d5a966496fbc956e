"""Phone calls with several replicas: a phone call is pinned to the replica its stream reached. Its
registry record says so, and when that replica is found dead, the replica that notices ends the
call (reason relay_lost) instead of taking it over: no caller could ever come back to it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from control_api.bootstrap import NewTenant
from relay.cluster.registry import ClusterRegistry, OwnedCall, Renewal
from tests.support.relay_stack import call_client
from tests.test_cluster_two_replicas import Replicas, replicas  # noqa: F401 - the fixture
from tests.test_relay_call import call_log, eventually
from tests.test_relay_phone import ULAW, ULAW_AGENT, el_agent, make_phone_call, stream_url
from voicerelay.emulators.audio import tone
from voicerelay.emulators.twilio_media import ULAW_SILENCE, MediaStreamsCaller
from voicerelay.settings import Settings


@pytest.fixture
async def api(replicas: Replicas) -> AsyncIterator[httpx.AsyncClient]:  # noqa: F811
    async with httpx.AsyncClient(base_url=replicas.stack.api_url, timeout=10) as client:
        yield client


async def test_the_pinned_mark_survives_claim_renewal_and_restore(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    registry = ClusterRegistry(redis_client, settings, "replica-" + uuid.uuid4().hex[:6])
    call_id, tenant_id = uuid.uuid4(), uuid.uuid4()
    epoch = await registry.claim(call_id, tenant_id, pinned=True)
    assert epoch is not None
    record = await registry.lookup(call_id)
    assert record is not None
    assert record.pinned
    report = OwnedCall(tenant_id=str(tenant_id), state="active", pinned=True)
    assert await registry.renew(call_id, epoch, report) is Renewal.RENEWED
    await redis_client.delete(registry.call_key(call_id))  # Redis lost it
    assert await registry.renew(call_id, epoch, report) is Renewal.MISSING
    await registry.restore(call_id, epoch, report)
    restored = await registry.lookup(call_id)
    assert restored is not None
    assert restored.pinned
    browser = uuid.uuid4()
    await registry.claim(browser, tenant_id)
    plain = await registry.lookup(browser)
    assert plain is not None
    assert not plain.pinned


async def test_a_dead_owners_phone_call_is_ended_not_taken_over(
    replicas: Replicas,  # noqa: F811
    api: httpx.AsyncClient,
    tenant: NewTenant,
    owner_conn: asyncpg.Connection,
    redis_client: aioredis.Redis,
) -> None:
    stack = replicas.stack
    r1, r2 = replicas.r1.runtime, replicas.r2.runtime
    assert r1.cluster is not None
    agent_id, el_id = await el_agent(stack, api, tenant, ULAW_AGENT)
    phone = await make_phone_call(stack, api, tenant, owner_conn, agent_id)
    call_id = uuid.UUID(phone.call_id)
    spoken = tone(ULAW, 0.4)
    url = stream_url(stack)  # replica 1
    async with MediaStreamsCaller.connect(
        url,
        custom_parameters={"token": phone.token},
        call_sid=phone.call_sid,
        account_sid=phone.account_sid,
    ) as caller:
        await caller.send_audio(spoken + ULAW_SILENCE * 5600)
        await caller.wait_for_audio(len(spoken), within=20)
        record = await r1.cluster.lookup(call_id)
        assert record is not None
        assert record.pinned
        token = (await stack.monitor_token(api, tenant, phone.call_id))["token"]
        async with call_client(replicas.r2_url, token) as monitor:  # a remote participant
            await monitor.wait_for("call.ready")
            # Replica 1 looks dead to replica 2 (its lease ran out).
            await redis_client.hset(r1.cluster.call_key(call_id), "lease_until_ms", 1)
            ended = await monitor.wait_for("call.ended", timeout=20)
            assert ended == {"reason": "relay_lost", "code": "owner_crashed"}
        after = await r2.cluster.lookup(call_id) if r2.cluster is not None else None
        assert after is not None
        assert after.ended
        # Replica 1, still alive here, learns at its next renewal that the call is over.
        await caller.wait_closed(within=20)
        assert caller.close_reason == "relay_lost"
    # Nobody started a second conversation for the call.
    conversations = [c for c in stack.emulator_app.state.conversations if c.agent_id == el_id]
    assert len(conversations) == 1
    assert r2.registry.get(call_id) is None
    record_ = await call_log(api, tenant, phone.call_id)
    assert record_["end_reason"] == "relay_lost"
    await eventually(lambda: r1.registry.get(call_id) is None)
