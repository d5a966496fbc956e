"""`voicerelay migrate`: plain SQL files applied once, under an advisory lock, as the owner."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from control_api.migrate import MIGRATION_LOCK_KEY, MigrationError, load_migrations, migrate
from tests.conftest import TestDatabase
from voicerelay.dsn import with_user_and_database


async def test_migrate_waits_for_the_advisory_lock(
    database: TestDatabase, owner_conn: asyncpg.Connection
) -> None:
    await owner_conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        # Another migrator holds the lock: this one waits for it and gives up at its timeout.
        with pytest.raises(asyncpg.LockNotAvailableError):
            await migrate(database.owner_dsn, lock_timeout_seconds=0.2)
    finally:
        await owner_conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    assert await migrate(database.owner_dsn) == []


async def test_concurrent_migrators_apply_each_file_once(database: TestDatabase) -> None:
    name = f"vrt_mig_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database.admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = with_user_and_database(database.owner_dsn, database=name)
        runs = await asyncio.gather(migrate(dsn), migrate(dsn), migrate(dsn))
        applied = sorted(v for run in runs for v in run)
        assert applied == sorted(m.version for m in load_migrations())
        assert await migrate(dsn) == []
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_migrate_refuses_the_services_role(database: TestDatabase) -> None:
    with pytest.raises(MigrationError, match="BYPASSRLS"):
        await migrate(database.app_dsn)
