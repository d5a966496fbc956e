"""Indexes: every tenant-scoped query the API runs is served by an index that starts with
tenant_id, so one tenant's volume never makes another tenant's queries scan."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import orjson
import pytest

from control_api.bootstrap import NewTenant
from control_api.db import TENANT_TABLES

# Secondary indexes that do not start with tenant_id, each serving a platform-wide lookup that
# runs before the tenant is known (or across tenants, as the schema owner).
PLATFORM_LOOKUPS = {
    "api_keys_key_hash_key": "API key authentication by hash (auth_api_key)",
    "refresh_tokens_token_hash_key": "refresh by token hash",
    "credentials_key_id": "credentials rewrap: rows still under an old key",
    "calls_provider_call_id": "Twilio callbacks find their call by CallSid",
    "calls_open_created": "the stale-call reaper, across tenants",
    "calls_unconnected_created": "the unconnected-call expiry, across tenants",
    "tenants_slug_key": "login by tenant slug",
    "phone_numbers_pkey": "E.164 numbers are unique across the platform; inbound routing",
}

# The tenant-scoped queries behind the list, filter, timeline, usage and retention paths, as the
# app role runs them (RLS adds tenant_id = current_tenant_id()).
QUERIES = {
    "agents list": "SELECT * FROM agents ORDER BY created_at DESC, id DESC LIMIT 50",
    "agents page": "SELECT * FROM agents WHERE (created_at, id) < (now(), $1::uuid)"
    " ORDER BY created_at DESC, id DESC LIMIT 50",
    "credentials list": "SELECT * FROM credentials ORDER BY created_at DESC, id DESC LIMIT 50",
    "api keys list": "SELECT * FROM api_keys ORDER BY created_at DESC, id",
    "users list": "SELECT * FROM users ORDER BY created_at, id",
    "phone numbers of agents": "SELECT e164 FROM phone_numbers WHERE agent_id = ANY($1::uuid[])"
    " ORDER BY e164",
    "calls list": "SELECT * FROM calls ORDER BY created_at DESC, id DESC LIMIT 50",
    "calls by agent": "SELECT * FROM calls WHERE agent_id = $1"
    " ORDER BY created_at DESC, id DESC LIMIT 50",
    "calls in a range": "SELECT * FROM calls WHERE created_at >= now() - interval '7 days'"
    " AND created_at < now() ORDER BY created_at DESC, id DESC LIMIT 50",
    "active calls": "SELECT * FROM calls WHERE status IN ('created', 'connecting', 'active')"
    " ORDER BY created_at DESC LIMIT 50",
    "call timeline": "SELECT * FROM call_events WHERE call_id = $1"
    " ORDER BY occurred_at, seq, event_id LIMIT 500",
    "usage": "SELECT date_trunc('day', created_at), count(*) FROM calls"
    " WHERE created_at >= now() - interval '30 days' GROUP BY 1",
    "refresh families of a user": "SELECT id FROM refresh_token_families WHERE user_id = $1",
    "tokens of a family": "SELECT id FROM refresh_tokens WHERE family_id = $1",
}


async def _indexes(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(
        """
        SELECT t.relname AS tbl, i.relname AS idx, x.indisprimary AS pk,
               (SELECT a.attname FROM pg_attribute a
                WHERE a.attrelid = t.oid AND a.attnum = x.indkey[0]) AS first_col
        FROM pg_index x
        JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_class t ON t.oid = x.indrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace
        WHERE n.nspname = 'public' AND NOT t.relispartition AND t.relname = ANY($1::text[])
        """,
        list(TENANT_TABLES),
    )


async def test_tenant_tables_have_tenant_first_indexes(owner_conn: asyncpg.Connection) -> None:
    rows = await _indexes(owner_conn)
    for table in TENANT_TABLES:
        if table == "tenants":
            continue
        assert any(r["tbl"] == table and r["first_col"] == "tenant_id" for r in rows), table
    others = {
        r["idx"]
        for r in rows
        if r["first_col"] != "tenant_id" and not (r["pk"] and r["first_col"] in ("id", "event_id"))
    }
    # A new index that leads with something else is either a reviewed platform lookup or a bug.
    assert others == set(PLATFORM_LOOKUPS)


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


@pytest.mark.parametrize("name", sorted(QUERIES))
async def test_tenant_scoped_queries_use_a_tenant_first_index(
    app_conn: asyncpg.Connection, tenant: NewTenant, name: str
) -> None:
    query = QUERIES[name]
    args: list[object] = []
    if "$1::uuid[]" in query:
        args = [[uuid.uuid4()]]
    elif "$1" in query:
        args = [uuid.uuid4()]
    async with app_conn.transaction():
        await app_conn.execute(
            "SELECT set_config('app.tenant_id', $1, true)", str(tenant.tenant_id)
        )
        # Tables are small in tests; forbid sequential scans so the plan shows which index
        # the planner can use at all.
        await app_conn.execute("SET LOCAL enable_seqscan = off")
        raw = await app_conn.fetchval(f"EXPLAIN (FORMAT JSON) {query}", *args)
    plan = (orjson.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    nodes = list(_plan_nodes(plan))
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], (name, raw)
    conditions = [str(n.get("Index Cond", "")) for n in nodes]
    assert any("tenant_id" in c for c in conditions), (name, raw)
