"""Admission against real Redis: the tenant call cap (atomic, idempotent, leased) and connection rates."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from relay.admission import AdmissionUnavailable, ConnectionRateLimiter, TenantCallCap
from tests.support.services import free_port
from voicerelay.client_ip import scope_client_ip
from voicerelay.settings import Settings


@pytest.fixture
async def dead_redis() -> AsyncIterator[aioredis.Redis]:
    """A client of a Redis that is not there (a closed port)."""
    # No client-side retries, so each refused connection fails at once.
    client = aioredis.Redis(host="127.0.0.1", port=free_port(), retry=Retry(NoBackoff(), 0))
    yield client
    await client.aclose()


@pytest.fixture
async def second_redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    """Another connection pool, as a second relay replica would have."""
    client = aioredis.Redis.from_url(settings.require("redis_url"))
    yield client
    await client.aclose()


def calls(n: int) -> list[uuid.UUID]:
    return [uuid.uuid4() for _ in range(n)]


def _ip() -> str:
    return f"198.51.{random.randrange(256)}.{random.randrange(1, 255)}"


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- tenant call cap ------------------------------------------------------------------------------


async def test_concurrent_acquires_never_exceed_the_limit(
    redis_client: aioredis.Redis, settings: Settings
) -> None:
    cap = TenantCallCap(redis_client, settings)
    tenant = uuid.uuid4()
    results = await asyncio.gather(*(cap.acquire(tenant, call, 5) for call in calls(20)))
    assert results.count(True) == 5
    assert await cap.active(tenant) == 5
    # Another tenant has its own cap.
    assert await cap.acquire(uuid.uuid4(), uuid.uuid4(), 5)


async def test_reacquire_is_idempotent_and_release_frees_the_slot(
    redis_client: aioredis.Redis, settings: Settings
) -> None:
    cap = TenantCallCap(redis_client, settings)
    tenant = uuid.uuid4()
    first, second, third = calls(3)
    assert await cap.acquire(tenant, first, 2)
    assert await cap.acquire(tenant, second, 2)
    # A reconnecting call keeps its slot rather than needing a second one.
    assert await cap.acquire(tenant, first, 2)
    assert await cap.active(tenant) == 2
    assert not await cap.acquire(tenant, third, 2)
    await cap.release(tenant, first)
    await cap.release(tenant, first)  # twice is harmless
    assert await cap.acquire(tenant, third, 2)
    assert not await cap.acquire(tenant, first, 2)
    assert not await cap.acquire(tenant, uuid.uuid4(), 0)


async def test_renew_keeps_a_live_lease_and_reports_a_lost_one(
    redis_client: aioredis.Redis, settings: Settings
) -> None:
    cap = TenantCallCap(redis_client, settings)
    tenant = uuid.uuid4()
    held, released = calls(2)
    assert await cap.acquire(tenant, held, 3)
    assert await cap.acquire(tenant, released, 3)
    await cap.release(tenant, released)
    assert await cap.renew(tenant, held)
    assert not await cap.renew(tenant, released)
    assert not await cap.renew(tenant, uuid.uuid4())
    # Renewing never sneaks a released call back in.
    assert await cap.active(tenant) == 1
    assert cap.renew_interval_seconds == settings.tenant_call_lease_seconds / 3


async def test_a_crashed_relays_slots_expire_with_their_lease(
    redis_client: aioredis.Redis, settings: Settings
) -> None:
    crashed = TenantCallCap(redis_client, settings, lease_seconds=0.3)
    alive = TenantCallCap(redis_client, settings)
    tenant = uuid.uuid4()
    orphans = calls(2)
    for call in orphans:
        assert await crashed.acquire(tenant, call, 2)
    assert not await alive.acquire(tenant, uuid.uuid4(), 2)
    await asyncio.sleep(0.5)  # the crashed relay never renews
    assert await alive.active(tenant) == 0
    assert await alive.acquire(tenant, uuid.uuid4(), 2)
    assert not await crashed.renew(tenant, orphans[0])  # reaped by that acquire


async def test_two_replicas_share_one_cap(
    redis_client: aioredis.Redis, second_redis: aioredis.Redis, settings: Settings
) -> None:
    replica_a = TenantCallCap(redis_client, settings)
    replica_b = TenantCallCap(second_redis, settings)
    tenant = uuid.uuid4()
    results = await asyncio.gather(
        *(replica_a.acquire(tenant, call, 3) for call in calls(6)),
        *(replica_b.acquire(tenant, call, 3) for call in calls(6)),
    )
    assert results.count(True) == 3
    a_call = uuid.uuid4()
    assert not await replica_a.acquire(tenant, a_call, 3)
    assert not await replica_b.acquire(tenant, a_call, 3)


async def test_lease_set_is_hash_tagged_and_expires(
    redis_client: aioredis.Redis, settings: Settings
) -> None:
    cap = TenantCallCap(redis_client, settings)
    tenant = uuid.uuid4()
    key = cap.key(tenant)
    assert key == settings.redis_key("tenant-calls", "{" + str(tenant) + "}")
    assert await cap.acquire(tenant, uuid.uuid4(), 1)
    ttl = await redis_client.pttl(key)
    assert 0 < ttl <= 2 * settings.tenant_call_lease_seconds * 1000
    # A replica with a shorter lease never shortens the set's life under longer leases.
    short = TenantCallCap(redis_client, settings, lease_seconds=3)
    assert await short.acquire(tenant, uuid.uuid4(), 2)
    assert await redis_client.pttl(key) > 6000


async def test_cap_fails_closed_and_release_never_raises(
    dead_redis: aioredis.Redis, settings: Settings
) -> None:
    cap = TenantCallCap(dead_redis, settings)
    before = _sample("voicerelay_relay_tenant_cap_decisions_total", {"result": "error"})
    with pytest.raises(AdmissionUnavailable):
        await cap.acquire(uuid.uuid4(), uuid.uuid4(), 5)
    with pytest.raises(AdmissionUnavailable):
        await cap.renew(uuid.uuid4(), uuid.uuid4())
    await cap.release(uuid.uuid4(), uuid.uuid4())
    assert _sample("voicerelay_relay_tenant_cap_decisions_total", {"result": "error"}) == before + 1


# --- connection rates -----------------------------------------------------------------------------


def rate_settings(settings: Settings, *, per_ip: int, per_tenant: int) -> Settings:
    return settings.model_copy(
        update={
            "relay_connect_rate_per_minute_per_ip": per_ip,
            "relay_connect_rate_per_minute_per_tenant": per_tenant,
        }
    )


async def test_connection_rate_per_ip(redis_client: aioredis.Redis, settings: Settings) -> None:
    limiter = ConnectionRateLimiter(
        redis_client, rate_settings(settings, per_ip=3, per_tenant=1000)
    )
    ip = _ip()
    for _ in range(3):
        assert await limiter.check(ip, uuid.uuid4()) is None
    retry = await limiter.check(ip, uuid.uuid4())
    assert retry is not None
    assert 0 < retry <= 20  # one connection per 20 s at 3 a minute
    # Other addresses are unaffected.
    assert await limiter.check(_ip(), uuid.uuid4()) is None


async def test_connection_rate_per_tenant(redis_client: aioredis.Redis, settings: Settings) -> None:
    limiter = ConnectionRateLimiter(
        redis_client, rate_settings(settings, per_ip=1000, per_tenant=4)
    )
    tenant = uuid.uuid4()
    for _ in range(4):
        assert await limiter.check(_ip(), tenant) is None
    retry = await limiter.check(_ip(), tenant)
    assert retry is not None
    assert 0 < retry <= 15
    assert await limiter.check(_ip(), uuid.uuid4()) is None


async def test_limited_address_does_not_spend_the_tenants_budget(
    redis_client: aioredis.Redis, settings: Settings
) -> None:
    limiter = ConnectionRateLimiter(redis_client, rate_settings(settings, per_ip=1, per_tenant=2))
    tenant, noisy = uuid.uuid4(), _ip()
    assert await limiter.check(noisy, tenant) is None
    for _ in range(5):
        assert await limiter.check(noisy, tenant) is not None
    assert await limiter.check(_ip(), tenant) is None


async def test_connection_rate_fails_open(dead_redis: aioredis.Redis, settings: Settings) -> None:
    limiter = ConnectionRateLimiter(dead_redis, rate_settings(settings, per_ip=1, per_tenant=1))
    labels = {"limiter": "ip", "result": "error"}
    before = _sample("voicerelay_relay_connect_rate_decisions_total", labels)
    for _ in range(3):
        assert await limiter.check("203.0.113.5", uuid.uuid4()) is None
    assert _sample("voicerelay_relay_connect_rate_decisions_total", labels) == before + 3


def test_client_address_of_a_socketio_connection_comes_from_the_asgi_scope() -> None:
    """python-socketio's environ always says REMOTE_ADDR=127.0.0.1; the scope has the peer."""

    def scope(peer: str | None, *forwarded: str) -> dict[str, object]:
        return {
            "type": "websocket",
            "client": (peer, 50000) if peer else None,
            "headers": [(b"x-forwarded-for", f.encode()) for f in forwarded]
            + [(b"host", b"relay.example")],
        }

    trusted = ["127.0.0.1", "10.0.0.0/8"]
    assert scope_client_ip(scope("203.0.113.9", "198.51.100.1"), trusted) == "203.0.113.9"
    assert scope_client_ip(scope("10.0.0.3", "6.6.6.6, 198.51.100.1"), trusted) == "198.51.100.1"
    assert (
        scope_client_ip(scope("127.0.0.1", "198.51.100.2", "10.0.0.4"), trusted) == "198.51.100.2"
    )
    assert scope_client_ip(scope(None, "198.51.100.1"), trusted) == "unknown"
    assert scope_client_ip({"type": "websocket", "headers": []}, trusted) == "unknown"
