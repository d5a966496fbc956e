"""`voicerelay backup` / `restore`: a dump restored into a fresh database has everything back.

Tenants are populated through the real API (users, keys, credentials, agents with numbers, a
call whose events went through the call-log consumer), dumped by the real CLI with pg_dump and
restored by the real CLI with pg_restore into a new database on the same server. The restored
database is then read as the application's own role, under row-level security, tenant by
tenant: every row is identical to the source, every credential decrypts with the vault keys,
the start-up isolation guardrails pass, and no tenant sees another's rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from control_api.credential_store import load_credential_secret
from control_api.db import TENANT_TABLES, check_isolation_guardrails
from control_api.vault import Vault
from tests.conftest import TestDatabase
from tests.support.attack import Populated, populate, snapshot, tenant_column
from tests.support.tenants import make_tenant
from voicerelay.backup import BackupError, libpq_target
from voicerelay.dsn import with_user_and_database
from voicerelay.pgtools import ToolNotFound, find_tool
from voicerelay.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, migration_url: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env.update(ENVIRONMENT="development", LOG_FORMAT="text")
    if migration_url is not None:
        env["MIGRATION_DATABASE_URL"] = migration_url
    return subprocess.run(
        [sys.executable, "-m", "voicerelay", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
async def fresh_database(database: TestDatabase) -> AsyncIterator[str]:
    """A new, empty database on the same server (dropped afterwards); yields its name."""
    name = f"vrt_restore_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(database.admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield name
    finally:
        admin = await asyncpg.connect(database.admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def _populated(
    database: TestDatabase, http: httpx.AsyncClient, redis: Redis, settings: Settings
) -> list[Populated]:
    tenants = [await make_tenant(database.owner_dsn) for _ in range(3)]
    return [await populate(http, redis, settings, tenant) for tenant in tenants]


async def _secret(
    conn: asyncpg.Connection, vault: Vault, tenant_id: uuid.UUID, cid: uuid.UUID
) -> Any:
    async with conn.transaction(readonly=True):
        await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(tenant_id))
        return await load_credential_secret(conn, tenant_id, cid, vault=vault)


async def _visible(conn: asyncpg.Connection, tenant_id: uuid.UUID) -> dict[str, list[str]]:
    """Every row the app role sees in each tenant table with ``tenant_id`` set."""
    rows: dict[str, list[str]] = {}
    async with conn.transaction(readonly=True):
        await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(tenant_id))
        for table in TENANT_TABLES:
            found = await conn.fetch(f"SELECT to_jsonb(t)::text AS row FROM {table} t ORDER BY 1")
            rows[table] = [r["row"] for r in found]
    return rows


@pytest.mark.timeout(300)
async def test_backup_restores_every_tenant_credential_and_call_log(
    database: TestDatabase,
    settings: Settings,
    http: httpx.AsyncClient,
    redis_client: Redis,
    fresh_database: str,
    tmp_path: Path,
) -> None:
    populated = await _populated(database, http, redis_client, settings)
    dump = tmp_path / "control.dump"

    done = _cli("backup", "--output", str(dump), migration_url=database.owner_dsn)
    assert done.returncode == 0, done.stderr
    assert dump.stat().st_size > 0
    assert dump.stat().st_mode & 0o077 == 0  # private: hashes, ciphertexts, transcripts
    assert not list(tmp_path.glob(".*.partial"))

    target_owner = with_user_and_database(database.owner_dsn, database=fresh_database)
    done = _cli(
        "restore",
        "--input",
        str(dump),
        "--target-database-url",
        target_owner,
        migration_url=database.owner_dsn,
    )
    assert done.returncode == 0, done.stderr
    assert "restored" in done.stdout

    source_owner = await asyncpg.connect(database.owner_dsn)
    restored_owner = await asyncpg.connect(target_owner)
    # The app role is cluster-global: the same login works on the restored database.
    restored_app = await asyncpg.connect(
        with_user_and_database(database.app_dsn, database=fresh_database)
    )
    source_app = await asyncpg.connect(database.app_dsn)
    vault = Vault(settings.encryption_keyring())
    try:
        await check_isolation_guardrails(restored_app)
        for item in populated:
            tenant_id = item.tenant.tenant_id
            # Row for row, byte for byte, as the schema owner...
            assert await snapshot(restored_owner, tenant_id) == await snapshot(
                source_owner, tenant_id
            )
            # ...and as the application role under RLS: the tenant's rows, and only those.
            visible = await _visible(restored_app, tenant_id)
            assert visible == await _visible(source_app, tenant_id)
            assert len(visible["tenants"]) == 1
            assert len(visible["calls"]) == 1
            assert len(visible["call_events"]) == 5
            assert str(item.agent_id) in "".join(visible["agents"])
            assert item.phone_number in "".join(visible["phone_numbers"])
            for table in TENANT_TABLES:
                column = tenant_column(table)
                others = await restored_app.fetchval(
                    f"SELECT count(*) FROM {table} WHERE {column} <> $1", tenant_id
                )
                assert others == 0  # no tenant set outside a transaction: RLS shows nothing
            restored_secret = await _secret(restored_app, vault, tenant_id, item.credential_id)
            source_secret = await _secret(source_app, vault, tenant_id, item.credential_id)
            assert restored_secret.secret["api_key"].startswith("sk_")
            assert dict(restored_secret.secret) == dict(source_secret.secret)
    finally:
        for conn in (source_owner, restored_owner, restored_app, source_app):
            await conn.close()

    # A database that already has tables is never restored into.
    again = _cli(
        "restore",
        "--input",
        str(dump),
        "--target-database-url",
        target_owner,
        migration_url=database.owner_dsn,
    )
    assert again.returncode != 0
    assert "not empty" in again.stderr


async def test_backup_refuses_a_role_under_row_level_security(
    database: TestDatabase, tmp_path: Path
) -> None:
    done = _cli("backup", "--output", str(tmp_path / "x.dump"), migration_url=database.app_dsn)
    assert done.returncode != 0
    assert "row-level security" in done.stderr
    assert not (tmp_path / "x.dump").exists()


def test_backup_without_migration_url_is_a_clear_error(tmp_path: Path) -> None:
    done = _cli("backup", "--output", str(tmp_path / "x.dump"), migration_url=None)
    assert done.returncode != 0
    assert "MIGRATION_DATABASE_URL" in done.stderr


def test_password_goes_to_the_environment_not_the_command_line() -> None:
    bare, env = libpq_target(
        "postgresql://owner:p%40ss%3Aw@db.internal:5432/voicerelay?sslmode=require"
    )
    assert bare == "postgresql://owner@db.internal:5432/voicerelay?sslmode=require"
    assert env == {"PGPASSWORD": "p@ss:w"}
    bare, env = libpq_target("postgresql://owner@/voicerelay?host=/run/pg&password=s3cret")
    assert "s3cret" not in bare
    assert "host=%2Frun%2Fpg" in bare
    assert env == {"PGPASSWORD": "s3cret"}
    assert libpq_target("postgresql://owner@db/voicerelay") == (
        "postgresql://owner@db/voicerelay",
        {},
    )


def test_tools_are_chosen_by_the_server_major_version() -> None:
    tool = find_tool("pg_dump", 13)
    assert tool.major >= 13
    with pytest.raises(ToolNotFound, match="PostgreSQL 99 client programs"):
        find_tool("pg_dump", 99)
    assert issubclass(BackupError, RuntimeError)
