"""Shared fixtures: real Postgres and Redis (local or embedded), a fresh database and Redis key
prefix per test run, and a control API served by uvicorn on a loopback port."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from control_api.db import create_pool
from tests.support.relay_stack import RelayStack, relay_stack
from tests.support.servers import serve
from tests.support.services import Services, find_or_start_services
from voicerelay.devstack import bootstrap_database
from voicerelay.dsn import with_user_and_database
from voicerelay.settings import Environment, Settings

RUN_ID = uuid.uuid4().hex[:10]
APP_LOGIN = "voicerelay_test_app"


@dataclass(frozen=True)
class TestDatabase:
    __test__ = False

    name: str
    admin_dsn: str
    owner_dsn: str
    app_dsn: str


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    found = find_or_start_services()
    yield found
    found.stop()


@pytest.fixture(scope="session")
def database(services: Services) -> Iterator[TestDatabase]:
    name = f"vrt_{RUN_ID}"
    owner_dsn, app_dsn = asyncio.run(
        bootstrap_database(services.admin_dsn, name, app_login=APP_LOGIN)
    )
    yield TestDatabase(
        name=name, admin_dsn=services.admin_dsn, owner_dsn=owner_dsn, app_dsn=app_dsn
    )

    async def drop() -> None:
        conn = await asyncpg.connect(services.admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())


def _key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


@pytest.fixture(scope="session")
def settings(database: TestDatabase, services: Services) -> Iterator[Settings]:
    prefix = f"vrt:{RUN_ID}:"
    yield Settings(
        environment=Environment.development,
        log_format="text",
        database_url=database.app_dsn,
        migration_database_url=database.owner_dsn,
        redis_url=services.redis_url,
        redis_key_prefix=prefix,
        signing_keys=f"test-sig-1:{_key()}",
        encryption_keys=f"test-enc-1:{_key()}",
        internal_service_token=secrets.token_urlsafe(32),
        database_pool_max_size=5,
    )

    async def cleanup() -> None:
        client = aioredis.Redis.from_url(services.redis_url)
        try:
            async for key in client.scan_iter(match=prefix + "*", count=500):
                await client.delete(key)
        finally:
            await client.aclose()

    asyncio.run(cleanup())


@pytest.fixture(scope="session")
async def api_url(settings: Settings) -> AsyncIterator[str]:
    from control_api.app import create_app

    async with serve(create_app(settings)) as url:
        yield url


@pytest.fixture
async def http(api_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api_url, timeout=10) as client:
        yield client


@pytest.fixture
async def app_conn(database: TestDatabase) -> AsyncIterator[asyncpg.Connection]:
    """A connection as the application's own database role, for attacker-style tests."""
    conn = await asyncpg.connect(database.app_dsn)
    yield conn
    await conn.close()


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """The services' own pool (their database role, row-level security on)."""
    p = await create_pool(settings)
    yield p
    await p.close()


@pytest.fixture
async def owner_conn(database: TestDatabase) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database.owner_dsn)
    yield conn
    await conn.close()


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.require("redis_url"))
    yield client
    await client.aclose()


__all__ = ["TestDatabase", "with_user_and_database"]


@pytest.fixture
async def tenant(database: TestDatabase):  # type: ignore[no-untyped-def]
    """A fresh tenant (owner user + admin API key) for one test."""
    from tests.support.tenants import make_tenant

    return await make_tenant(database.owner_dsn)


@pytest.fixture
async def other_tenant(database: TestDatabase):  # type: ignore[no-untyped-def]
    """A second tenant, the 'attacker' or 'victim' in isolation tests."""
    from tests.support.tenants import make_tenant

    return await make_tenant(database.owner_dsn)


@pytest.fixture(scope="module")
async def stack(settings: Settings) -> AsyncIterator[RelayStack]:
    """The emulator, a control API and one relay, for a test module (a module may define its own)."""
    async with relay_stack(settings) as running:
        yield running


@pytest.fixture
async def api(stack: RelayStack) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``stack``'s control API."""
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=10) as client:
        yield client
