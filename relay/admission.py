"""Admission checks before a call starts: the tenant's concurrent-call cap and connection rates.

**Tenant call cap.** Each tenant has a Redis sorted set of leases: member = call id, score = the
lease's expiry in milliseconds of Redis's own clock (TIME), so relays with skewed clocks agree.
Acquiring runs in one Lua script (reap expired leases, re-acquire idempotently, check the limit,
add), so concurrent acquires on any number of replicas never exceed the limit. A live call renews
its lease every third of ``tenant_call_lease_seconds``; a relay that crashes stops renewing and
its calls' slots free themselves within one lease. The key carries the tenant id in a hash tag so
it lives in one Redis Cluster slot.

The cap is a paid limit, so it fails **closed**: if Redis cannot be asked, ``acquire`` (and
``renew``) raise ``AdmissionUnavailable``, which the relay reports to the client as
``upstream_unavailable`` (a transient dependency failure worth a retry). ``release`` never raises:
a slot Redis did not hear about frees itself when its lease runs out.

**Connection rates.** GCRA (voicerelay.gcra) per client address and per tenant. Unlike the cap
these fail **open**: refusing every caller because Redis blinked would be worse than letting a few
extra connection attempts through (the cap and the token still apply). Each rate allows a full
minute's worth of connections at once, then the steady rate.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid

from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay.metrics import CONNECT_RATE_DECISIONS, TENANT_CAP_DECISIONS, TENANT_CAP_RELEASE_ERRORS
from voicerelay.gcra import Rate, limiter_for
from voicerelay.settings import Settings
from voicerelay.tenant_calls import tenant_calls_key

log = logging.getLogger(__name__)

_REDIS_ERRORS = (RedisError, OSError, TimeoutError)
_ERROR_LOG_INTERVAL_SECONDS = 60.0

# The key's own TTL only ever grows, to twice the longest lease written, so a replica configured
# with a shorter lease cannot expire the set under another replica's longer leases.
_EXTEND_TTL = """
local function extend_ttl(key, lease)
    if redis.call('PTTL', key) < lease * 2 then
        redis.call('PEXPIRE', key, lease * 2)
    end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] = lease set. ARGV = limit, call id, lease (ms). Returns 1 if the call holds a slot.
ACQUIRE_SCRIPT = (
    _EXTEND_TTL
    + """
local limit, member, lease = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], member) then
    redis.call('ZADD', KEYS[1], now + lease, member)
    extend_ttl(KEYS[1], lease)
    return 1
end
if redis.call('ZCARD', KEYS[1]) >= limit then
    return 0
end
redis.call('ZADD', KEYS[1], now + lease, member)
extend_ttl(KEYS[1], lease)
return 1
"""
)

# KEYS[1] = lease set. ARGV = call id, lease (ms). Returns 0 if the lease was already lost.
RENEW_SCRIPT = (
    _EXTEND_TTL
    + """
local member, lease = ARGV[1], tonumber(ARGV[2])
local score = redis.call('ZSCORE', KEYS[1], member)
if not score then
    return 0
end
-- An expired lease that nobody reaped yet still counted against the limit the whole time, so
-- extending it never lets the tenant exceed the cap.
redis.call('ZADD', KEYS[1], 'XX', now + lease, member)
extend_ttl(KEYS[1], lease)
return 1
"""
)

# KEYS[1] = lease set. Returns the number of unexpired leases (read-only).
COUNT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""


class AdmissionUnavailable(Exception):
    """Redis could not be asked; the relay refuses the call with ``upstream_unavailable``."""


class TenantCallCap:
    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        *,
        lease_seconds: float | None = None,
        timeout: float = 3.0,
    ) -> None:
        self._settings = settings
        # Bounds a hung Redis (the client's own retries can take seconds) for acquire and renew.
        self._timeout = timeout
        seconds = settings.tenant_call_lease_seconds if lease_seconds is None else lease_seconds
        self.lease_ms = max(1, round(seconds * 1000))
        self._acquire = redis.register_script(ACQUIRE_SCRIPT)
        self._renew = redis.register_script(RENEW_SCRIPT)
        self._count = redis.register_script(COUNT_SCRIPT)
        self._redis = redis

    @property
    def renew_interval_seconds(self) -> float:
        """How often a live call should renew its lease."""
        return self.lease_ms / 3000

    def key(self, tenant_id: uuid.UUID | str) -> str:
        return tenant_calls_key(self._settings, tenant_id)

    async def acquire(
        self, tenant_id: uuid.UUID | str, call_id: uuid.UUID | str, limit: int
    ) -> bool:
        """Take (or keep) a slot for the call; False when the tenant is at its limit."""
        if limit < 1:
            TENANT_CAP_DECISIONS.labels("refused").inc()
            return False
        try:
            async with asyncio.timeout(self._timeout):
                held = await self._acquire(
                    keys=[self.key(tenant_id)], args=[limit, str(call_id), self.lease_ms]
                )
        except _REDIS_ERRORS as exc:
            TENANT_CAP_DECISIONS.labels("error").inc()
            raise AdmissionUnavailable("the call cap could not be checked") from exc
        TENANT_CAP_DECISIONS.labels("acquired" if held else "refused").inc()
        return bool(held)

    async def renew(self, tenant_id: uuid.UUID | str, call_id: uuid.UUID | str) -> bool:
        """Extend the call's lease; False if it was lost (expired and reaped, or released).

        Raises ``AdmissionUnavailable`` when Redis is unreachable; a caller that keeps the call
        going through a short outage should renew again soon, before the lease runs out.
        """
        try:
            async with asyncio.timeout(self._timeout):
                renewed = await self._renew(
                    keys=[self.key(tenant_id)], args=[str(call_id), self.lease_ms]
                )
        except _REDIS_ERRORS as exc:
            raise AdmissionUnavailable("the call's slot could not be renewed") from exc
        return bool(renewed)

    async def release(self, tenant_id: uuid.UUID | str, call_id: uuid.UUID | str) -> None:
        """Free the call's slot. Never raises: an unheard release expires with its lease."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._redis.zrem(self.key(tenant_id), str(call_id))
        except _REDIS_ERRORS:
            TENANT_CAP_RELEASE_ERRORS.inc()
            log.warning(
                "could not release a tenant call slot; it frees itself when its lease expires",
                extra={"tenant_id": str(tenant_id), "call_id": str(call_id)},
            )

    async def active(self, tenant_id: uuid.UUID | str) -> int:
        """Unexpired leases of the tenant (for operators and tests)."""
        return int(await self._count(keys=[self.key(tenant_id)], args=[]))


class ConnectionRateLimiter:
    def __init__(self, redis: Redis, settings: Settings, *, timeout: float = 1.0) -> None:
        self._settings = settings
        # Failing open must also be fast: a hung Redis must not hold every connect for seconds.
        self._timeout = timeout
        self._limiter = limiter_for(redis)
        self._per_ip = _full_minute_burst(settings.relay_connect_rate_per_minute_per_ip)
        self._per_tenant = _full_minute_burst(settings.relay_connect_rate_per_minute_per_tenant)
        self._last_error_logged = -math.inf

    async def check(self, ip: str, tenant_id: uuid.UUID | str) -> float | None:
        """Seconds to wait before retrying, or None when the connection may proceed.

        The address is checked first, so one noisy client cannot spend its tenant's budget.
        """
        retry = await self._check("ip", ip, self._per_ip)
        if retry is not None:
            return retry
        return await self._check("tenant", str(tenant_id), self._per_tenant)

    async def check_tenant(self, tenant_id: uuid.UUID | str) -> float | None:
        """The tenant's rate only: for connections whose address says nothing about who is
        calling (Twilio's media servers open every tenant's phone streams)."""
        return await self._check("tenant", str(tenant_id), self._per_tenant)

    async def _check(self, limiter: str, subject: str, rate: Rate) -> float | None:
        key = self._settings.redis_key("rl", "relay-connect-" + limiter, subject)
        try:
            async with asyncio.timeout(self._timeout):
                decision = await self._limiter.check(key, rate)
        except _REDIS_ERRORS:
            CONNECT_RATE_DECISIONS.labels(limiter, "error").inc()
            self._log_failure()
            return None
        if decision.allowed:
            CONNECT_RATE_DECISIONS.labels(limiter, "allowed").inc()
            return None
        CONNECT_RATE_DECISIONS.labels(limiter, "limited").inc()
        # Never 0: a client told to retry "now" would spin.
        return max(decision.retry_after_seconds, 0.001)

    def _log_failure(self) -> None:
        now = time.monotonic()
        if now - self._last_error_logged >= _ERROR_LOG_INTERVAL_SECONDS:
            self._last_error_logged = now
            log.warning("connection-rate limiter unavailable; allowing connections", exc_info=True)


def _full_minute_burst(per_minute: int) -> Rate:
    return Rate.per_minute(per_minute, burst=per_minute - 1)
