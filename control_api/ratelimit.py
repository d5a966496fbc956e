"""The control API's rate limits, on the GCRA core shared with the relay (voicerelay.gcra).

The limiter fails open: if Redis is unreachable, requests pass (the database and auth still
protect the API); the failure is logged at most once a minute and counted.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import TYPE_CHECKING

from prometheus_client import Counter
from redis.exceptions import RedisError

from control_api.principal import Principal
from control_api.problems import Problem
from voicerelay.gcra import GCRA_SCRIPT, Decision, Rate, RateLimiter, limiter_for

if TYPE_CHECKING:
    from control_api.state import AppState

__all__ = [
    "GCRA_SCRIPT",
    "Decision",
    "Rate",
    "RateLimiter",
    "enforce",
    "limit_login",
    "limit_principal",
    "limit_refresh",
    "limiter_for",
]

log = logging.getLogger(__name__)

DECISIONS = Counter(
    "voicerelay_ratelimit_decisions_total",
    "Rate-limit decisions by limiter and result (allowed, limited, error).",
    ["limiter", "result"],
)

_ERROR_LOG_INTERVAL_SECONDS = 60.0
_last_error_logged = -math.inf


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


def _sign_in_rate(state: AppState) -> Rate:
    settings = state.settings
    return Rate.per_minute(
        settings.rate_limit_login_per_minute_per_ip, settings.rate_limit_login_burst
    )


async def limit_login(state: AppState, *, client_ip: str, email: str) -> None:
    """Per client address (password spraying) and per account (guessing one password)."""
    rate = _sign_in_rate(state)
    await enforce(state, "login-ip", client_ip, rate)
    # Hashed so that Redis never holds the address book of who tried to sign in.
    account = hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]
    await enforce(state, "login-email", account, rate)


async def limit_refresh(state: AppState, *, client_ip: str) -> None:
    """Per client address, at the login rate but in a budget of its own, so that refreshing does
    not use up signing in. Every refresh costs database work before the token is known to be
    good; a flood of made-up tokens is what this stops. Per session there is nothing to limit:
    a refresh token works once, and presenting it again ends its session."""
    await enforce(state, "refresh-ip", client_ip, _sign_in_rate(state))
