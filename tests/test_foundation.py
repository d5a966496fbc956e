"""The foundation: migrations, RLS guardrails, problem documents and OpenAPI."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from control_api import db
from control_api.migrate import migrate
from tests.conftest import APP_LOGIN, TestDatabase


async def test_migrations_are_idempotent(database: TestDatabase) -> None:
    assert await migrate(database.owner_dsn) == []


async def test_app_role_passes_guardrails(app_conn: asyncpg.Connection) -> None:
    await db.check_isolation_guardrails(app_conn)


async def test_owner_role_is_refused(owner_conn: asyncpg.Connection) -> None:
    with pytest.raises(db.UnsafeDatabaseRole):
        await db.check_isolation_guardrails(owner_conn)


@pytest.mark.parametrize(
    ("statement", "refusal"),
    [
        ("ALTER TABLE agents NO FORCE ROW LEVEL SECURITY", "agents: row-level security not"),
        ("ALTER TABLE credentials DISABLE ROW LEVEL SECURITY", "credentials: row-level security"),
        ("DROP POLICY tenant_isolation ON users", "users: no policy"),
        (f'ALTER TABLE api_keys OWNER TO "{APP_LOGIN}"', "api_keys: owned by the service role"),
        ("ALTER TABLE phone_numbers RENAME TO phone_numbers_gone", "phone_numbers: missing"),
        (f'REVOKE voicerelay_app FROM "{APP_LOGIN}"', "is not in voicerelay_app"),
        (f'ALTER ROLE "{APP_LOGIN}" BYPASSRLS', "has BYPASSRLS"),
    ],
)
async def test_a_weakened_database_is_refused(
    owner_conn: asyncpg.Connection, statement: str, refusal: str
) -> None:
    """The start-up check, run as the service's own role against a schema weakened in one way.

    The weakening is made inside a transaction that is rolled back, so nothing else sees it;
    the check runs in that transaction under the app login (SET LOCAL ROLE)."""
    tx = owner_conn.transaction()
    await tx.start()
    try:
        await owner_conn.execute("SET LOCAL lock_timeout = '10s'")
        await owner_conn.execute(statement)
        await owner_conn.execute(f'SET LOCAL ROLE "{APP_LOGIN}"')
        with pytest.raises(db.UnsafeDatabaseRole, match=refusal):
            await db.check_isolation_guardrails(owner_conn)
    finally:
        await tx.rollback()


async def test_no_tenant_set_sees_nothing(app_conn: asyncpg.Connection) -> None:
    for table in db.TENANT_TABLES:
        assert await app_conn.fetchval(f"SELECT count(*) FROM {table}") == 0


async def test_health_and_openapi(http: httpx.AsyncClient) -> None:
    r = await http.get("/health")
    assert r.status_code == 200
    assert r.headers["x-content-type-options"] == "nosniff"
    r = await http.get("/openapi.json")
    assert r.status_code == 200
    assert r.json()["openapi"] == "3.1.0"


async def test_unknown_route_is_problem_json(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/nope")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "not_found"


async def test_ready(http: httpx.AsyncClient) -> None:
    r = await http.get("/ready")
    assert r.status_code == 200, r.text
