"""The asyncpg pool, tenant-scoped transactions and the start-up RLS guardrails."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from voicerelay.settings import Settings

# A plain connection or one borrowed from the pool; every query helper accepts either.
Conn: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

APP_GROUP_ROLE = "voicerelay_app"

# Every table holding tenant data. Start-up refuses to serve if any lacks forced RLS + policy.
TENANT_TABLES = (
    "tenants",
    "users",
    "api_keys",
    "refresh_token_families",
    "refresh_tokens",
    "credentials",
    "agents",
    "phone_numbers",
    "calls",
    "call_events",
)


class UnsafeDatabaseRole(RuntimeError):
    """The service's database role could bypass tenant isolation."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda v: orjson.dumps(v).decode(),
        decoder=orjson.loads,
        format="text",
    )
    await conn.set_type_codec(
        "json",
        schema="pg_catalog",
        encoder=json.dumps,
        decoder=orjson.loads,
        format="text",
    )


async def create_pool(settings: Settings, *, dsn: str | None = None) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn or settings.require("database_url"),
        min_size=settings.database_pool_min_size,
        max_size=settings.database_pool_max_size,
        statement_cache_size=settings.database_statement_cache_size,
        command_timeout=settings.database_command_timeout_seconds,
        init=_init_connection,
    )
    assert pool is not None
    return pool


@asynccontextmanager
async def tenant_tx(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, *, readonly: bool = False
) -> AsyncIterator[Conn]:
    """A transaction in which RLS sees exactly one tenant.

    The tenant is a transaction-local setting, so it is gone at COMMIT/ROLLBACK and cannot leak
    to the next user of the pooled connection (or of a PgBouncer server connection).
    """
    async with pool.acquire() as conn, conn.transaction(readonly=readonly):
        await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(tenant_id))
        yield conn


@asynccontextmanager
async def platform_tx(pool: asyncpg.Pool) -> AsyncIterator[Conn]:
    """A transaction with no tenant: RLS shows nothing; only the SECURITY DEFINER lookups work."""
    async with pool.acquire() as conn, conn.transaction():
        yield conn


async def check_isolation_guardrails(conn: Conn) -> None:
    """Refuse to run when the connected role could read across tenants."""
    role = await conn.fetchrow(
        """
        SELECT r.rolname, r.rolsuper, r.rolbypassrls,
               pg_has_role(current_user, $1, 'MEMBER') AS is_app
        FROM pg_roles r WHERE r.rolname = current_user
        """,
        APP_GROUP_ROLE,
    )
    if role is None:
        raise UnsafeDatabaseRole("cannot read the current role from pg_roles")
    if role["rolsuper"] or role["rolbypassrls"]:
        raise UnsafeDatabaseRole(
            f"database role {role['rolname']!r} is a superuser or has BYPASSRLS; "
            f"connect as a member of {APP_GROUP_ROLE}"
        )
    if not role["is_app"]:
        raise UnsafeDatabaseRole(f"database role {role['rolname']!r} is not in {APP_GROUP_ROLE}")
    rows = await conn.fetch(
        """
        SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity,
               pg_has_role(current_user, c.relowner, 'USAGE') AS owns,
               EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid) AS has_policy
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = current_schema() AND c.relname = ANY($1::text[])
        """,
        list(TENANT_TABLES),
    )
    found = {r["relname"]: r for r in rows}
    problems: list[str] = []
    for table in TENANT_TABLES:
        row = found.get(table)
        if row is None:
            problems.append(f"{table}: missing (run `voicerelay migrate`)")
        elif not (row["relrowsecurity"] and row["relforcerowsecurity"]):
            problems.append(f"{table}: row-level security not enabled and forced")
        elif not row["has_policy"]:
            problems.append(f"{table}: no policy")
        elif row["owns"]:
            problems.append(f"{table}: owned by the service role")
    if problems:
        raise UnsafeDatabaseRole("tenant isolation is not in force: " + "; ".join(problems))


def record_to_dict(record: asyncpg.Record | None) -> dict[str, Any] | None:
    return dict(record) if record is not None else None
