"""GCRA rate limiting shared by every replica: one Redis Lua script, with Redis's clock.

GCRA keeps one number per key, the theoretical arrival time (TAT) of the next request. A request
is allowed while TAT - now stays within the burst tolerance (emission interval * burst), so a
fresh key admits burst + 1 requests at once and then one per emission interval. The script runs
atomically in Redis and reads TIME there, so replicas with skewed clocks share one limit.

Both services use this core: the control API for request and login limits, the relay for
connection rates. Whether to fail open when Redis is unreachable is the caller's decision; this
module raises Redis errors as they come.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

from redis.asyncio import Redis

# KEYS[1] = limiter key. ARGV[1] = emission interval (µs), ARGV[2] = burst.
# Returns {allowed (0|1), retry_after (µs)}. Times are integral µs, exact in Lua's doubles.
GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local emission = tonumber(ARGV[1])
local tolerance = emission * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then
    tat = now
end
local allow_at = tat - tolerance
if now < allow_at then
    return {0, allow_at - now}
end
local new_tat = tat + emission
redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
           'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0}
"""


@dataclass(frozen=True)
class Rate:
    per_second: float
    burst: int

    @classmethod
    def per_minute(cls, count: int, burst: int) -> Rate:
        return cls(per_second=count / 60.0, burst=burst)

    @property
    def emission_interval_us(self) -> int:
        return max(1, round(1_000_000 / self.per_second))


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_seconds: float

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after_seconds)))


class RateLimiter:
    """One GCRA check per call; raises Redis errors (the caller decides to fail open)."""

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(GCRA_SCRIPT)

    async def check(self, key: str, rate: Rate) -> Decision:
        allowed, retry_us = await self._script(
            keys=[key], args=[rate.emission_interval_us, rate.burst]
        )
        return Decision(allowed=bool(allowed), retry_after_seconds=int(retry_us) / 1_000_000)


_limiters: weakref.WeakKeyDictionary[Redis, RateLimiter] = weakref.WeakKeyDictionary()


def limiter_for(redis: Redis) -> RateLimiter:
    """One limiter (one registered script) per Redis client."""
    limiter = _limiters.get(redis)
    if limiter is None:
        limiter = _limiters[redis] = RateLimiter(redis)
    return limiter
