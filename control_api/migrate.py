"""Plain-SQL migrations applied in order under a Postgres advisory lock.

Files live in ``control_api/migrations`` as ``NNNN_name.sql``. Each runs in its own transaction
together with its bookkeeping row, so a failed file leaves nothing half-applied. Applied files are
checksummed; editing one after it shipped is refused rather than silently ignored.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources

import asyncpg

log = logging.getLogger(__name__)

# Fixed key so that every migrator of this schema, on any host, contends for the same lock.
MIGRATION_LOCK_KEY = 0x766F_6963_6572_656C  # "voicerel"


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(RuntimeError):
    pass


def load_migrations() -> list[Migration]:
    folder = resources.files("control_api") / "migrations"
    found: list[Migration] = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        version, _, rest = entry.name.partition("_")
        if not version.isdigit():
            raise MigrationError(f"migration file {entry.name!r} must start with a number")
        found.append(
            Migration(version=version, name=rest.removesuffix(".sql"), sql=entry.read_text())
        )
    found.sort(key=lambda m: int(m.version))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    return found


async def migrate(dsn: str, *, lock_timeout_seconds: float = 60.0) -> list[str]:
    """Apply pending migrations; returns the versions applied by this call."""
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        await _check_owner_role(conn)
        # A session lock on a direct connection: never run migrations through PgBouncer.
        await conn.execute(f"SET lock_timeout = '{int(lock_timeout_seconds * 1000)}ms'")
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            await conn.execute("SET lock_timeout = '15s'")
            return await _apply_pending(conn)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    finally:
        await conn.close()


async def _check_owner_role(conn: asyncpg.Connection) -> None:
    # The SECURITY DEFINER lookups (login by email, API-key lookup, partition maintenance) run as
    # the schema owner and must see every tenant's rows; with FORCE ROW LEVEL SECURITY that only
    # works when the owner bypasses RLS. The services' own role never does.
    row = await conn.fetchrow(
        "SELECT rolsuper OR rolbypassrls AS bypass FROM pg_roles WHERE rolname = current_user"
    )
    if row is None or not row["bypass"]:
        raise MigrationError(
            "run migrations as the schema owner role with BYPASSRLS (or a superuser); "
            "the services connect as a separate member of voicerelay_app"
        )


async def _apply_pending(conn: asyncpg.Connection) -> list[str]:
    await conn.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version    text PRIMARY KEY,
            name       text NOT NULL,
            checksum   text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    await conn.execute("REVOKE ALL ON schema_migrations FROM PUBLIC")
    # Read what is applied only once the lock is held, so two migrators cannot both apply a file.
    applied = {
        r["version"]: r["checksum"]
        for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")
    }
    done: list[str] = []
    for migration in load_migrations():
        recorded = applied.get(migration.version)
        if recorded is not None:
            if recorded != migration.checksum:
                raise MigrationError(
                    f"migration {migration.version}_{migration.name} changed after it was applied"
                )
            continue
        log.info("applying migration", extra={"migration": f"{migration.version}_{migration.name}"})
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
        done.append(migration.version)
    return done


async def pending_versions(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        applied: set[str] = set()
        if exists:
            applied = {
                r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")
            }
        return [m.version for m in load_migrations() if m.version not in applied]
    finally:
        await conn.close()
