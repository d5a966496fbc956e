"""Development and test bootstrap: a database with the app role, and generated dev secrets."""

from __future__ import annotations

import base64
import os
import re
import secrets
from pathlib import Path

import asyncpg

from control_api.migrate import migrate
from voicerelay.dsn import with_user_and_database

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


async def bootstrap_database(
    admin_dsn: str, database: str, *, app_login: str, app_password: str | None = None
) -> tuple[str, str]:
    """Create ``database`` if needed, migrate it, and make ``app_login`` a member of voicerelay_app.

    Returns ``(owner_dsn, app_dsn)``. ``admin_dsn`` must be a role allowed to create databases
    and roles (the local superuser in development and tests).
    """
    if not _IDENTIFIER.match(database) or not _IDENTIFIER.match(app_login):
        raise ValueError("database and role names must be simple identifiers")
    if app_password is not None and "'" in app_password:
        raise ValueError("the app password must not contain quotes")
    conn = await asyncpg.connect(admin_dsn, statement_cache_size=0)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()
    owner_dsn = with_user_and_database(admin_dsn, database=database)
    await migrate(owner_dsn)
    conn = await asyncpg.connect(owner_dsn, statement_cache_size=0)
    try:
        await conn.execute(
            f"""
            DO $$
            BEGIN
                IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{app_login}') THEN
                    CREATE ROLE "{app_login}" LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB
                        NOCREATEROLE IN ROLE voicerelay_app;
                END IF;
            EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
            END
            $$
            """
        )
        await conn.execute(f'GRANT voicerelay_app TO "{app_login}"')
        if app_password:
            await conn.execute(f"ALTER ROLE \"{app_login}\" PASSWORD '{app_password}'")
        await conn.execute(f'GRANT CONNECT ON DATABASE "{database}" TO "{app_login}"')
    finally:
        await conn.close()
    app_dsn = with_user_and_database(
        admin_dsn, user=app_login, database=database, password=app_password
    )
    return owner_dsn, app_dsn


def generate_secrets() -> dict[str, str]:
    def key() -> str:
        return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")

    return {
        "SIGNING_KEYS": f"dev-sig-1:{key()}",
        "ENCRYPTION_KEYS": f"dev-enc-1:{key()}",
        "INTERNAL_SERVICE_TOKEN": secrets.token_urlsafe(32),
    }


def load_or_create_dev_secrets(state_dir: Path) -> dict[str, str]:
    """Dev secrets persist in the state dir so stored credentials stay decryptable across runs."""
    path = state_dir / "dev-secrets.env"
    if path.exists():
        values = {}
        for line in path.read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and not name.startswith("#"):
                values[name.strip()] = value.strip()
        if set(generate_secrets()) <= set(values):
            return values
    state_dir.mkdir(parents=True, exist_ok=True)
    values = generate_secrets()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# Generated for local development by `voicerelay up`. Never use in production.\n")
        for name, value in values.items():
            f.write(f"{name}={value}\n")
    return values
