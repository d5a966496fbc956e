"""Rate limits: the GCRA limiter against real Redis, the 429s it causes, and client addresses."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from control_api.app import create_app
from control_api.bootstrap import NewTenant
from control_api.client_ip import TrustedProxies, client_ip, parse_address
from control_api.ratelimit import Rate, RateLimiter
from tests.support.servers import serve
from tests.support.services import free_port
from tests.support.sessions import bearer, login, random_client_ip
from tests.support.tenants import auth
from voicerelay.settings import Settings

# --- client addresses (pure) ------------------------------------------------------------------

PROXIES = TrustedProxies(["127.0.0.1", "10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        # Untrusted peers are judged by their own address, whatever they claim.
        ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),
        ("203.0.113.9", [], "203.0.113.9"),
        # A trusted proxy: the rightmost hop it did not add itself is the client.
        ("127.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        ("127.0.0.1", ["198.51.100.1, 10.1.2.3"], "198.51.100.1"),
        # A client that prepends its own forged entry does not get to choose.
        ("127.0.0.1", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),
        ("127.0.0.1", ["6.6.6.6", "198.51.100.1, 10.0.0.2"], "198.51.100.1"),
        # Only proxies all the way: the leftmost address is the best we have.
        ("127.0.0.1", ["10.0.0.7, 10.0.0.8"], "10.0.0.7"),
        ("127.0.0.1", [], "127.0.0.1"),
        # Garbage stops the walk at the last address a trusted proxy vouched for.
        ("127.0.0.1", ["198.51.100.1, not-an-ip"], "127.0.0.1"),
        ("127.0.0.1", ["not-an-ip, 10.0.0.1"], "10.0.0.1"),
        # Ports, brackets, IPv6 and IPv4-mapped IPv6.
        ("127.0.0.1", ["198.51.100.1:4711"], "198.51.100.1"),
        ("127.0.0.1", ["[2001:db8::1]:443"], "2001:db8::1"),
        ("fd00::5", ["2001:db8::2"], "2001:db8::2"),
        ("::ffff:127.0.0.1", ["198.51.100.3"], "198.51.100.3"),
        (None, ["198.51.100.1"], "unknown"),
        ("unix-socket", ["198.51.100.1"], "unknown"),
    ],
)
def test_client_ip(peer: str | None, forwarded: list[str], expected: str) -> None:
    assert client_ip(peer, forwarded, PROXIES) == expected


def test_nothing_trusted_ignores_forwarded_for() -> None:
    assert client_ip("127.0.0.1", ["198.51.100.1"], TrustedProxies([])) == "127.0.0.1"


def test_parse_address() -> None:
    assert str(parse_address(" 2001:DB8::1 ")) == "2001:db8::1"
    assert parse_address("999.1.1.1") is None
    assert parse_address("") is None


# --- the limiter against Redis ----------------------------------------------------------------


@pytest.fixture
async def second_redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.require("redis_url"))
    yield client
    await client.aclose()


def _key(settings: Settings) -> str:
    return settings.redis_key("rl-test", uuid.uuid4().hex)


async def test_burst_then_limited(redis_client: aioredis.Redis, settings: Settings) -> None:
    limiter = RateLimiter(redis_client)
    rate = Rate.per_minute(1, burst=5)  # slow enough that no slot frees up during the test
    key = _key(settings)
    decisions = [await limiter.check(key, rate) for _ in range(8)]
    # Tolerance = emission interval x burst: burst + 1 at once, not a period's worth more.
    assert [d.allowed for d in decisions] == [True] * 6 + [False] * 2
    assert all(0 < d.retry_after_seconds <= 60 for d in decisions[6:])
    assert decisions[6].retry_after_header in {str(n) for n in range(1, 61)}
    ttl_ms = await redis_client.pttl(key)
    assert 0 < ttl_ms <= 6 * 60_000 + 1000


async def test_zero_burst_allows_one(redis_client: aioredis.Redis, settings: Settings) -> None:
    limiter = RateLimiter(redis_client)
    key = _key(settings)
    assert (await limiter.check(key, Rate(per_second=0.01, burst=0))).allowed
    assert not (await limiter.check(key, Rate(per_second=0.01, burst=0))).allowed


async def test_limit_is_shared_by_replicas(
    redis_client: aioredis.Redis, second_redis: aioredis.Redis, settings: Settings
) -> None:
    # Two limiters on two connections stand for two API replicas: they share one budget.
    one, two = RateLimiter(redis_client), RateLimiter(second_redis)
    rate = Rate.per_minute(1, burst=3)
    key = _key(settings)
    results = []
    for i in range(6):
        results.append((await (one if i % 2 else two).check(key, rate)).allowed)
    assert results == [True] * 4 + [False] * 2


async def test_concurrent_checks_never_over_admit(
    redis_client: aioredis.Redis, second_redis: aioredis.Redis, settings: Settings
) -> None:
    # Many requests at once from two replicas: the check-and-update is one atomic script, so
    # exactly the burst gets through (a read-then-write limiter would let more slip past).
    limiters = [RateLimiter(redis_client), RateLimiter(second_redis)]
    rate = Rate.per_minute(1, burst=9)
    key = _key(settings)
    decisions = await asyncio.gather(*(limiters[i % 2].check(key, rate) for i in range(60)))
    assert sum(d.allowed for d in decisions) == 10


async def test_keys_are_independent(redis_client: aioredis.Redis, settings: Settings) -> None:
    limiter = RateLimiter(redis_client)
    rate = Rate(per_second=0.01, burst=0)
    a, b = _key(settings), _key(settings)
    assert (await limiter.check(a, rate)).allowed
    assert (await limiter.check(b, rate)).allowed
    assert not (await limiter.check(a, rate)).allowed


# --- through the API --------------------------------------------------------------------------


def _low_limits(settings: Settings, **extra: object) -> Settings:
    return settings.model_copy(
        update={
            "rate_limit_login_per_minute_per_ip": 1,
            "rate_limit_login_burst": 1,
            "rate_limit_api_per_second": 0.01,
            "rate_limit_api_burst": 2,
            "redis_key_prefix": f"{settings.redis_key_prefix}rl-{uuid.uuid4().hex[:6]}:",
            **extra,
        }
    )


@pytest.fixture
async def strict_http(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        serve(create_app(_low_limits(settings))) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        yield client


async def _attempt(http: httpx.AsyncClient, email: str, ip: str) -> httpx.Response:
    return await http.post(
        "/v1/auth/login",
        json={"email": email, "password": "wrong password"},
        headers={"x-forwarded-for": ip},
    )


def _assert_limited(r: httpx.Response, max_seconds: int = 60) -> None:
    assert r.status_code == 429, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "rate_limited"
    retry_after = int(r.headers["retry-after"])
    assert 1 <= retry_after <= max_seconds


async def test_login_limited_per_client_ip(strict_http: httpx.AsyncClient) -> None:
    ip = random_client_ip()
    emails = [f"nobody-{uuid.uuid4().hex[:8]}@example.com" for _ in range(3)]
    assert (await _attempt(strict_http, emails[0], ip)).status_code == 401
    assert (await _attempt(strict_http, emails[1], ip)).status_code == 401
    _assert_limited(await _attempt(strict_http, emails[2], ip))
    # Another client is unaffected.
    assert (await _attempt(strict_http, emails[2], random_client_ip())).status_code == 401


async def test_login_limited_per_account(strict_http: httpx.AsyncClient) -> None:
    email = f"target-{uuid.uuid4().hex[:8]}@example.com"
    assert (await _attempt(strict_http, email, random_client_ip())).status_code == 401
    assert (await _attempt(strict_http, email.upper(), random_client_ip())).status_code == 401
    _assert_limited(await _attempt(strict_http, email, random_client_ip()))


async def _refresh(http: httpx.AsyncClient, token: str, ip: str) -> httpx.Response:
    return await http.post(
        "/v1/auth/refresh", json={"refresh_token": token}, headers={"x-forwarded-for": ip}
    )


async def test_refresh_limited_per_client_ip(strict_http: httpx.AsyncClient) -> None:
    ip = random_client_ip()
    for _ in range(2):
        r = await _refresh(strict_http, uuid.uuid4().hex, ip)
        assert r.status_code == 401
        assert r.json()["code"] == "invalid_refresh_token"
    _assert_limited(await _refresh(strict_http, uuid.uuid4().hex, ip))
    # Another client is unaffected, and so is signing in from the limited one: separate budgets.
    assert (await _refresh(strict_http, uuid.uuid4().hex, random_client_ip())).status_code == 401
    assert (
        await _attempt(strict_http, f"n-{uuid.uuid4().hex[:8]}@example.com", ip)
    ).status_code == 401


async def test_refresh_within_the_limit_rotates(
    strict_http: httpx.AsyncClient, tenant: NewTenant
) -> None:
    ip = random_client_ip()
    r = await strict_http.post(
        "/v1/auth/login",
        json={"email": tenant.owner_email, "password": tenant.owner_password},
        headers={"x-forwarded-for": ip},
    )
    assert r.status_code == 200, r.text
    first = await _refresh(strict_http, r.json()["refresh_token"], ip)
    assert first.status_code == 200, first.text
    second = await _refresh(strict_http, first.json()["refresh_token"], ip)
    assert second.status_code == 200, second.text
    # The limit answers before the token is looked at: a good token is refused too, and stays
    # unused (it works from another address).
    token = second.json()["refresh_token"]
    _assert_limited(await _refresh(strict_http, token, ip))
    assert (await _refresh(strict_http, token, random_client_ip())).status_code == 200


async def test_forwarded_for_from_untrusted_peer_is_ignored(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Neither uvicorn nor the app trusts the loopback peer here, so rotating X-Forwarded-For
    # does not buy an attacker fresh buckets.
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "192.0.2.1")
    untrusting = _low_limits(settings, trusted_proxies=["192.0.2.1"])
    async with serve(create_app(untrusting)) as url, httpx.AsyncClient(base_url=url) as http:
        codes = [
            (
                await _attempt(http, f"n-{uuid.uuid4().hex[:8]}@example.com", random_client_ip())
            ).status_code
            for _ in range(3)
        ]
    assert codes == [401, 401, 429]


async def test_api_limited_per_principal(
    strict_http: httpx.AsyncClient, tenant: NewTenant, other_tenant: NewTenant
) -> None:
    for _ in range(3):
        assert (await strict_http.get("/v1/tenant", headers=auth(tenant))).status_code == 200
    _assert_limited(await strict_http.get("/v1/tenant", headers=auth(tenant)), max_seconds=100)
    # Each key has its own budget.
    assert (await strict_http.get("/v1/tenant", headers=auth(other_tenant))).status_code == 200


async def test_limiter_fails_open_without_redis(settings: Settings, tenant: NewTenant) -> None:
    def errors() -> float:
        value = REGISTRY.get_sample_value(
            "voicerelay_ratelimit_decisions_total", {"limiter": "api", "result": "error"}
        )
        return value or 0.0

    before = errors()
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    broken = _low_limits(settings, redis_url=dead_redis, rate_limit_api_burst=0)
    async with serve(create_app(broken)) as url, httpx.AsyncClient(base_url=url) as http:
        for _ in range(3):
            r = await http.get("/v1/tenant", headers=auth(tenant))
            assert r.status_code == 200, r.text
    assert errors() >= before + 3


async def test_api_limited_per_user(
    strict_http: httpx.AsyncClient, tenant: NewTenant, other_tenant: NewTenant
) -> None:
    sessions = [
        await login(strict_http, t.owner_email, t.owner_password) for t in (tenant, other_tenant)
    ]
    first, second = (bearer(s["access_token"]) for s in sessions)
    for _ in range(3):
        assert (await strict_http.get("/v1/tenant", headers=first)).status_code == 200
    _assert_limited(await strict_http.get("/v1/tenant", headers=first), max_seconds=100)
    # Each user has their own budget, and so does their tenant's API key.
    assert (await strict_http.get("/v1/tenant", headers=second)).status_code == 200
    assert (await strict_http.get("/v1/tenant", headers=auth(tenant))).status_code == 200
