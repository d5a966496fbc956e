"""The Redis key of a tenant's concurrent-call leases, and a read-only count of them.

The relay owns the leases (``relay.admission.TenantCallCap``: a sorted set of call ids scored by
lease expiry in milliseconds of Redis's own clock). The control API only reads them, to refuse a
phone call politely before Twilio connects a stream the relay would refuse anyway. Both name the
key through ``tenant_calls_key``.
"""

from __future__ import annotations

import uuid

from redis.asyncio import Redis

from voicerelay.settings import Settings


def tenant_calls_key(settings: Settings, tenant_id: uuid.UUID | str) -> str:
    # The tenant id in a hash tag keeps the set in one Redis Cluster slot.
    return settings.redis_key("tenant-calls", "{" + str(tenant_id) + "}")


async def count_active_calls(redis: Redis, settings: Settings, tenant_id: uuid.UUID | str) -> int:
    """Leases not yet expired by Redis's clock (the one the relay scores them with)."""
    seconds, microseconds = await redis.time()
    now_ms = int(seconds) * 1000 + int(microseconds) // 1000
    count = await redis.zcount(tenant_calls_key(settings, tenant_id), f"({now_ms}", "+inf")
    return int(count)
