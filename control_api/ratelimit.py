"""Rate limits shared by every replica: GCRA in one Redis Lua script, with Redis's clock.

GCRA keeps one number per key, the theoretical arrival time (TAT) of the next request. A request
is allowed while TAT - now stays within the burst tolerance (emission interval * burst), so a
fresh key admits burst + 1 requests at once and then one per emission interval. The script runs
atomically in Redis and reads TIME there, so replicas with skewed clocks share one limit.

The limiter fails open: if Redis is unreachable, requests pass (the database and auth still
protect the API); the failure is logged at most once a minute and counted.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from control_api.principal import Principal
from control_api.problems import Problem

if TYPE_CHECKING:
    from control_api.state import AppState

log = logging.getLogger(__name__)

DECISIONS = Counter(
    "voicerelay_ratelimit_decisions_total",
    "Rate-limit decisions by limiter and result (allowed, limited, error).",
    ["limiter", "result"],
)

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

_ERROR_LOG_INTERVAL_SECONDS = 60.0


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
_last_error_logged = -math.inf


def limiter_for(redis: Redis) -> RateLimiter:
    limiter = _limiters.get(redis)
    if limiter is None:
        limiter = _limiters[redis] = RateLimiter(redis)
    return limiter


async def enforce(state: AppState, limiter: str, subject: str, rate: Rate) -> None:
    """Raise 429 ``rate_limited`` with Retry-After when ``subject`` is over ``rate``."""
    key = state.settings.redis_key("rl", limiter, subject)
    try:
        decision = await limiter_for(state.redis).check(key, rate)
    except (TimeoutError, RedisError, OSError):
        DECISIONS.labels(limiter, "error").inc()
        _log_failure(limiter)
        return
    if decision.allowed:
        DECISIONS.labels(limiter, "allowed").inc()
        return
    DECISIONS.labels(limiter, "limited").inc()
    raise Problem(
        429,
        "rate_limited",
        "Too many requests; retry after the number of seconds in Retry-After.",
        headers={"retry-after": decision.retry_after_header},
    )


def _log_failure(limiter: str) -> None:
    global _last_error_logged
    now = time.monotonic()
    if now - _last_error_logged >= _ERROR_LOG_INTERVAL_SECONDS:
        _last_error_logged = now
        log.warning(
            "rate limiter unavailable; allowing requests", exc_info=True, extra={"limiter": limiter}
        )


async def limit_principal(state: AppState, principal: Principal) -> None:
    settings = state.settings
    rate = Rate(settings.rate_limit_api_per_second, settings.rate_limit_api_burst)
    await enforce(state, "api", principal.rate_limit_key, rate)


async def limit_login(state: AppState, *, client_ip: str, email: str) -> None:
    """Per client address (password spraying) and per account (guessing one password)."""
    settings = state.settings
    rate = Rate.per_minute(
        settings.rate_limit_login_per_minute_per_ip, settings.rate_limit_login_burst
    )
    await enforce(state, "login-ip", client_ip, rate)
    # Hashed so that Redis never holds the address book of who tried to sign in.
    account = hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]
    await enforce(state, "login-email", account, rate)
