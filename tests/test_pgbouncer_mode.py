"""What PgBouncer in transaction mode needs from the API's pool (config/README.md, "PgBouncer").

PgBouncer may run each transaction on a different server connection, so nothing may outlive a
transaction on a connection: no named prepared statements (DATABASE_STATEMENT_CACHE_SIZE=0), no
session-level tenant setting, no session advisory lock. This checks the server side of every
pool connection after real requests; with the default cache the same check finds prepared
statements, so it is not vacuous."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from control_api.app import create_app
from control_api.bootstrap import NewTenant
from tests.support.servers import serve
from tests.support.tenants import auth
from voicerelay.settings import Settings


async def _exercise(url: str, tenant: NewTenant) -> None:
    headers = auth(tenant)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(3):
            for path in ("/v1/agents", "/v1/credentials", "/v1/calls", "/v1/usage", "/v1/me"):
                r = await client.get(path, headers=headers)
                assert r.status_code == 200, (path, r.text)
        r = await client.post(
            "/v1/agents",
            headers=headers,
            json={"name": "pgbouncer", "elevenlabs_agent_id": "agent_pgbouncer"},
        )
        assert r.status_code == 201, r.text
        r = await client.post("/v1/calls", headers=headers, json={"agent_id": r.json()["id"]})
        assert r.status_code == 201, r.text


async def _session_state(pool: asyncpg.Pool) -> list[tuple[int, str | None, int]]:
    """(named prepared statements, app.tenant_id, advisory locks) of every pool connection."""
    held = [await pool.acquire(timeout=30) for _ in range(pool.get_max_size())]
    try:
        return [
            (
                await conn.fetchval("SELECT count(*) FROM pg_prepared_statements"),
                await conn.fetchval("SELECT current_setting('app.tenant_id', true)"),
                await conn.fetchval(
                    "SELECT count(*) FROM pg_locks"
                    " WHERE pid = pg_backend_pid() AND locktype = 'advisory'"
                ),
            )
            for conn in held
        ]
    finally:
        for conn in held:
            await pool.release(conn)


@pytest.mark.parametrize("cache_size", [0, 100])
async def test_no_session_state_outlives_a_transaction(
    settings: Settings, tenant: NewTenant, cache_size: int
) -> None:
    configured = settings.model_copy(
        update={
            "database_statement_cache_size": cache_size,
            "database_pool_min_size": 2,
            "database_pool_max_size": 2,
        }
    )
    app = create_app(configured)
    async with serve(app) as url:
        await _exercise(url, tenant)
        # The inspection's own statements are unnamed with a zero cache and named otherwise.
        states = await _session_state(app.state.api.pool)
    for _, tenant_setting, advisory_locks in states:
        assert tenant_setting in (None, "")
        assert advisory_locks == 0
    prepared = sum(count for count, _, _ in states)
    if cache_size == 0:
        assert prepared == 0, states
    else:
        assert prepared > 0, states
