"""The control API through a real PgBouncer in transaction mode (config/README.md, "PgBouncer").

PgBouncer runs with default_pool_size=2 while the API's pool holds 6 connections, so the API's
transactions from two tenants take turns on the same two server connections. With
DATABASE_STATEMENT_CACHE_SIZE=0 every request succeeds and each tenant sees only its own rows;
with asyncpg's default cache the same setup fails with "prepared statement ... does not exist",
so the setting is what makes it work."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from pydantic import SecretStr

from control_api.app import create_app
from control_api.bootstrap import NewTenant
from tests.conftest import APP_LOGIN, TestDatabase
from tests.support.pgbouncer import PgBouncer, find_pgbouncer, run_pgbouncer
from tests.support.servers import serve
from tests.support.tenants import auth
from voicerelay.settings import Settings

PGBOUNCER = find_pgbouncer()
SERVER_CONNECTIONS = 2
API_POOL_SIZE = 6
AGENTS_PER_TENANT = 8

pytestmark = pytest.mark.skipif(
    PGBOUNCER is None,
    reason=(
        "pgbouncer not installed: tests/test_pgbouncer_mode.py still checks that no prepared"
        " statement, tenant setting or advisory lock outlives a transaction"
    ),
)


@pytest.fixture(scope="module")
def bouncer_since(database: TestDatabase) -> Any:
    """The database's clock just before PgBouncer starts: every server connection it opens
    starts later."""
    return asyncio.run(_database_clock(database.admin_dsn))


@pytest.fixture(scope="module")
def bouncer(database: TestDatabase, bouncer_since: Any) -> Iterator[PgBouncer]:
    assert PGBOUNCER is not None
    with run_pgbouncer(PGBOUNCER, database.app_dsn, pool_size=SERVER_CONNECTIONS) as running:
        yield running


def _through(bouncer: PgBouncer, settings: Settings, *, cache_size: int) -> Settings:
    return settings.model_copy(
        update={
            "database_url": SecretStr(bouncer.dsn(APP_LOGIN)),
            "database_statement_cache_size": cache_size,
            "database_pool_min_size": API_POOL_SIZE,
            "database_pool_max_size": API_POOL_SIZE,
            # The burst below is the point of the test, not something to throttle.
            "rate_limit_api_per_second": 10_000.0,
            "rate_limit_api_burst": 10_000,
        }
    )


Exchange = tuple[NewTenant, str, httpx.Response]


async def _burst(
    client: httpx.AsyncClient, path: str, writes: list[tuple[NewTenant, dict[str, Any]]]
) -> list[Exchange]:
    """POST every write to ``path`` at once, each alongside both listings for its tenant."""

    async def send(tenant: NewTenant, method: str, url: str, body: Any) -> Exchange:
        response = await client.request(method, url, headers=auth(tenant), json=body)
        return tenant, f"{method} {url}", response

    return list(
        await asyncio.gather(
            *(
                send(*request)
                for tenant, body in writes
                for request in (
                    (tenant, "POST", path, body),
                    (tenant, "GET", "/v1/agents?limit=100", None),
                    (tenant, "GET", "/v1/calls?limit=100", None),
                )
            )
        )
    )


def _created(exchanges: list[Exchange], what: str, key: str) -> dict[uuid.UUID, set[str]]:
    created: dict[uuid.UUID, set[str]] = {}
    for tenant, sent, response in exchanges:
        if sent == what:
            assert response.status_code == 201, (what, response.text)
            created.setdefault(tenant.tenant_id, set()).add(response.json()[key])
    return created


def _ids(response: httpx.Response) -> set[str]:
    return {item["id"] for item in response.json()["items"]}


async def _database_clock(admin_dsn: str) -> Any:
    conn = await asyncpg.connect(admin_dsn)
    try:
        return await conn.fetchval("SELECT clock_timestamp()")
    finally:
        await conn.close()


async def _server_connections(admin_dsn: str, database: str, since: Any) -> int:
    """Backends of the services' login opened since ``since``: in a full run, other tests'
    long-lived pools hold connections of the same login to the same database."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = $1 AND usename = $2 AND backend_start >= $3",
                database,
                APP_LOGIN,
                since,
            )
        )
    finally:
        await conn.close()


async def test_tenants_share_server_connections_without_seeing_each_other(
    settings: Settings,
    database: TestDatabase,
    bouncer: PgBouncer,
    bouncer_since: Any,
    tenant: NewTenant,
    other_tenant: NewTenant,
) -> None:
    tenants = (tenant, other_tenant)
    app = create_app(_through(bouncer, settings, cache_size=0))
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        first = await _burst(
            client,
            "/v1/agents",
            [
                (t, {"name": f"{t.slug}-{i}", "elevenlabs_agent_id": "a"})
                for t in tenants
                for i in range(AGENTS_PER_TENANT)
            ],
        )
        agents = _created(first, "POST /v1/agents", "id")
        second = await _burst(
            client,
            "/v1/calls",
            [(t, {"agent_id": a}) for t in tenants for a in sorted(agents[t.tenant_id])],
        )
        calls = _created(second, "POST /v1/calls", "call_id")
        for t, what, response in first + second:
            assert response.status_code in (200, 201), (what, response.status_code, response.text)
            if what.startswith("GET /v1/agents"):
                assert _ids(response) <= agents[t.tenant_id], what
            elif what.startswith("GET /v1/calls"):
                assert _ids(response) <= calls[t.tenant_id], what
        for t in tenants:
            listed = await client.get("/v1/agents?limit=100", headers=auth(t))
            assert _ids(listed) == agents[t.tenant_id]
            listed = await client.get("/v1/calls?limit=100", headers=auth(t))
            assert _ids(listed) == calls[t.tenant_id]
        assert app.state.api.pool.get_size() == API_POOL_SIZE
    # PgBouncer ran all of the pool's transactions on at most SERVER_CONNECTIONS backends.
    assert (
        1
        <= await _server_connections(database.admin_dsn, database.name, bouncer_since)
        <= SERVER_CONNECTIONS
    )


async def test_pooled_server_connections_carry_no_tenant(
    bouncer: PgBouncer, tenant: NewTenant
) -> None:
    """After tenant transactions, a fresh client on the same server connections sees no rows."""
    pool = await asyncpg.create_pool(
        bouncer.dsn(APP_LOGIN),
        min_size=API_POOL_SIZE,
        max_size=API_POOL_SIZE,
        statement_cache_size=0,
    )
    try:

        async def look() -> tuple[str | None, int]:
            async with pool.acquire() as conn, conn.transaction():
                return (
                    await conn.fetchval("SELECT current_setting('app.tenant_id', true)"),
                    await conn.fetchval("SELECT count(*) FROM agents"),
                )

        seen = await asyncio.gather(*(look() for _ in range(40)))
    finally:
        await pool.close()
    assert set(seen) <= {(None, 0), ("", 0)}, seen


async def test_default_statement_cache_fails_through_pgbouncer(
    settings: Settings, bouncer: PgBouncer, tenant: NewTenant, caplog: pytest.LogCaptureFixture
) -> None:
    """The control: the same API and PgBouncer with asyncpg's default cache of 100."""
    app = create_app(_through(bouncer, settings, cache_size=100))
    with caplog.at_level(logging.ERROR, logger="control_api"):
        async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            responses = await asyncio.gather(
                *(client.get("/v1/agents", headers=auth(tenant)) for _ in range(40))
            )
    assert any(r.status_code == 500 for r in responses), [r.status_code for r in responses]
    # A statement prepared on one server connection is executed on another (or its name is
    # prepared twice on one), so the 500s are asyncpg's prepared-statement errors.
    failures = {
        type(record.exc_info[1])
        for record in caplog.records
        if record.exc_info and record.exc_info[1] is not None
    }
    assert failures, "no unhandled error was logged"
    assert failures <= {
        asyncpg.InvalidSQLStatementNameError,
        asyncpg.DuplicatePreparedStatementError,
    }, failures
