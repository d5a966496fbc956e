"""CallTokenVerifier against real control API servers: caching, rotation, outages, forgeries."""

from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr

from control_api.app import create_app
from control_api.bootstrap import NewTenant
from control_api.security.signing import SigningKeyring
from relay.jwks import CallTokenVerifier, KeysUnavailable
from tests.support.servers import serve
from tests.support.services import free_port
from tests.test_call_tokens import create_call, insert_agent
from voicerelay.call_token import CallTokenError
from voicerelay.settings import Settings


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingClient:
    """A real httpx client that counts the JWKS requests it sends."""

    def __init__(self) -> None:
        self.fetches = 0

        async def count(request: httpx.Request) -> None:
            if request.url.path.endswith("/jwks.json"):
                self.fetches += 1

        self.http = httpx.AsyncClient(event_hooks={"request": [count]})


@pytest.fixture
async def counting() -> AsyncIterator[CountingClient]:
    client = CountingClient()
    yield client
    await client.http.aclose()


def _seed() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


def claims(settings: Settings, **override: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": settings.jwt_issuer,
        "aud": settings.relay_token_audience,
        "sub": str(uuid.uuid4()),
        "tid": str(uuid.uuid4()),
        "role": "caller",
        "jti": uuid.uuid4().hex,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "cnb": now + 60,
        **override,
    }


def keyring(settings: Settings) -> SigningKeyring:
    return SigningKeyring(settings.signing_keyring())


def verifier(
    http: httpx.AsyncClient, base_url: str, settings: Settings, **kwargs: Any
) -> CallTokenVerifier:
    return CallTokenVerifier(
        http,
        base_url + "/.well-known/jwks.json",
        issuer=settings.jwt_issuer,
        audience=settings.relay_token_audience,
        cache_seconds=kwargs.pop("cache_seconds", 300.0),
        **kwargs,
    )


def rotated(settings: Settings, new_kid: str, *, keep_old: bool = True) -> Settings:
    """Settings whose keyring signs with a new key (and, during rotation, still publishes the old)."""
    old = settings.require("signing_keys")
    keys = f"{new_kid}:{_seed()}" + (f",{old}" if keep_old else "")
    return settings.model_copy(update={"signing_keys": SecretStr(keys)})


def _fetch_errors() -> float:
    return (
        REGISTRY.get_sample_value("voicerelay_relay_jwks_fetches_total", {"result": "error"}) or 0
    )


# --- the happy path -----------------------------------------------------------------------------


async def test_verifies_a_call_token_from_the_api_and_caches_the_keys(
    http: httpx.AsyncClient,
    api_url: str,
    settings: Settings,
    tenant: NewTenant,
    counting: CountingClient,
) -> None:
    agent_id = await insert_agent(http, tenant)
    body = await create_call(http, tenant, agent_id)
    v = verifier(counting.http, api_url, settings)
    got = await v.verify(body["token"])
    assert got.call_id == uuid.UUID(body["call_id"])
    assert got.tenant_id == tenant.tenant_id
    assert got.role == "caller"
    for _ in range(5):
        await v.verify(body["token"])
    assert counting.fetches == 1
    assert v.key_ids == {settings.signing_keyring()[0][0]}


async def test_concurrent_verifications_share_one_fetch(
    api_url: str, settings: Settings, counting: CountingClient
) -> None:
    v = verifier(counting.http, api_url, settings)
    token = keyring(settings).sign(claims(settings), typ="call+jwt")
    results = await asyncio.gather(*(v.verify(token) for _ in range(20)))
    assert len({r.call_id for r in results}) == 1
    assert counting.fetches == 1


async def test_from_settings_uses_the_internal_url(
    api_url: str, settings: Settings, counting: CountingClient
) -> None:
    v = CallTokenVerifier.from_settings(
        counting.http, settings.model_copy(update={"control_api_internal_url": api_url})
    )
    token = keyring(settings).sign(claims(settings), typ="call+jwt")
    assert (await v.verify(token)).role == "caller"


# --- rotation and outages ---------------------------------------------------------------------


async def test_unknown_kid_refreshes_at_most_once_per_interval(
    settings: Settings, counting: CountingClient
) -> None:
    port = free_port()
    clock = ManualClock()
    v = verifier(counting.http, f"http://127.0.0.1:{port}", settings, clock=clock)
    old_token = keyring(settings).sign(claims(settings), typ="call+jwt")
    async with serve(create_app(settings), port=port):
        await v.verify(old_token)
    assert counting.fetches == 1

    # The control API restarts with a new signing key in front of the old one.
    new_settings = rotated(settings, "test-sig-rotated")
    new_token = keyring(new_settings).sign(claims(settings), typ="call+jwt")
    async with serve(create_app(new_settings), port=port):
        clock.now += 1  # well inside the cache lifetime
        # The interval since the last fetch has not passed: no refresh yet, so refused.
        with pytest.raises(CallTokenError, match="unknown signing key"):
            await v.verify(new_token)
        assert counting.fetches == 1

        clock.now += 5
        assert (await v.verify(new_token)).role == "caller"
        assert counting.fetches == 2
        assert v.key_ids == {"test-sig-rotated", settings.signing_keyring()[0][0]}
        await v.verify(old_token)  # still published, still valid

        # Made-up key ids cannot turn into a stream of fetches.
        stranger = SigningKeyring([("made-up-kid", os.urandom(32))])
        for _ in range(10):
            with pytest.raises(CallTokenError, match="unknown signing key"):
                await v.verify(stranger.sign(claims(settings), typ="call+jwt"))
        assert counting.fetches == 2
        clock.now += 5
        with pytest.raises(CallTokenError, match="unknown signing key"):
            await v.verify(stranger.sign(claims(settings), typ="call+jwt"))
        assert counting.fetches == 3


async def test_cached_keys_serve_while_the_api_is_down_and_removed_keys_stop_working(
    settings: Settings, counting: CountingClient
) -> None:
    port = free_port()
    clock = ManualClock()
    v = verifier(counting.http, f"http://127.0.0.1:{port}", settings, clock=clock, cache_seconds=60)
    token = keyring(settings).sign(claims(settings), typ="call+jwt")
    async with serve(create_app(settings), port=port):
        await v.verify(token)

    # The API is down and the cache has expired: the old keys keep working.
    errors = _fetch_errors()
    clock.now += 120
    assert (await v.verify(token)).role == "caller"
    await _settled(v)
    assert _fetch_errors() == errors + 1
    assert (await v.verify(token)).role == "caller"
    # A key it never saw cannot be fetched now; refused, not crashed.
    clock.now += 10
    stranger = SigningKeyring([("made-up-kid", os.urandom(32))])
    with pytest.raises(CallTokenError) as refused:
        await v.verify(stranger.sign(claims(settings), typ="call+jwt"))
    assert not isinstance(refused.value, KeysUnavailable)

    # A verifier that never saw any key says so distinctly.
    fresh = verifier(counting.http, f"http://127.0.0.1:{port}", settings)
    with pytest.raises(KeysUnavailable):
        await fresh.verify(token)

    # The API returns having retired the old key: once refreshed, tokens it signed are refused.
    retired = rotated(settings, "test-sig-only", keep_old=False)
    async with serve(create_app(retired), port=port):
        clock.now += 120
        await v.verify(token)  # answered from the stale cache, refreshing behind
        await _settled(v)
        assert v.key_ids == {"test-sig-only"}
        with pytest.raises(CallTokenError, match="unknown signing key"):
            await v.verify(token)
        assert (await v.verify(keyring(retired).sign(claims(settings), typ="call+jwt"))).role
    await v.aclose()
    await fresh.aclose()


async def _settled(v: CallTokenVerifier) -> None:
    task = v._refresh
    if task is not None:
        await asyncio.wait_for(asyncio.shield(task), timeout=15)


# --- forgeries ----------------------------------------------------------------------------------


async def test_forged_and_malformed_tokens_are_refused(
    api_url: str, settings: Settings, counting: CountingClient
) -> None:
    v = verifier(counting.http, api_url, settings)
    genuine = keyring(settings)
    kid = settings.signing_keyring()[0][0]
    forged = SigningKeyring([(kid, os.urandom(32))])  # the genuine kid, another key
    now = int(time.time())
    cases = {
        "bad signature": forged.sign(claims(settings), typ="call+jwt"),
        "not a call token": genuine.sign(claims(settings), typ="at+jwt"),
        "wrong audience": genuine.sign(
            claims(settings, aud=settings.access_token_audience), typ="call+jwt"
        ),
        "wrong issuer": genuine.sign(claims(settings, iss="someone-else"), typ="call+jwt"),
        "token expired": genuine.sign(
            claims(settings, iat=now - 900, nbf=now - 900, cnb=now - 800, exp=now - 600),
            typ="call+jwt",
        ),
        "unknown role": genuine.sign(claims(settings, role="admin"), typ="call+jwt"),
        "malformed token": "not-a-token",
    }
    for reason, token in cases.items():
        with pytest.raises(CallTokenError, match=reason):
            await v.verify(token)
    # The "none" algorithm and a header-chosen HMAC never get as far as a key.
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"call+jwt","kid":"%s"}' % kid.encode())
    payload = base64.urlsafe_b64encode(b"{}")
    with pytest.raises(CallTokenError, match="algorithm not allowed"):
        await v.verify(header.decode().rstrip("=") + "." + payload.decode().rstrip("=") + ".")
    with pytest.raises(CallTokenError, match="malformed token"):
        await v.verify("x" * 10_000)
    assert counting.fetches == 1
