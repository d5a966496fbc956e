"""Backup and restore of the control database with pg_dump / pg_restore (custom format).

Both run as the schema owner (MIGRATION_DATABASE_URL), a role that bypasses row-level security:
anything else would dump or restore only what RLS lets it see. The connection's password never
reaches a command line: the programs get the URL without it, and the password through
PGPASSWORD in their environment. Messages name databases by their redacted URL.

What a dump holds: every table (tenants, users, API keys, refresh tokens, encrypted credentials,
agents, phone numbers, calls, call events) with its row-level security, policies, functions and
the grants to ``voicerelay_app``. What it does not: roles (cluster-global; ``restore`` creates
``voicerelay_app`` if missing, the login roles are the deployment's), the encryption keys
(ENCRYPTION_KEYS: without them the credentials cannot be decrypted, by design) and Redis
(ephemeral: call ownership, rate limits, the call-log stream not yet written).

A restore goes into an empty database (create one first); ownership goes to the restoring role,
which must bypass RLS just like the owner it replaces.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import asyncpg

from voicerelay.dsn import redact
from voicerelay.pgtools import PgTool, ToolNotFound, find_tool

APP_GROUP_ROLE = "voicerelay_app"


class BackupError(RuntimeError):
    """A backup or restore could not be done; the message holds no secret."""


@dataclass(frozen=True)
class BackupResult:
    path: Path
    size_bytes: int
    server_major: int
    tool: PgTool


@dataclass(frozen=True)
class RestoreResult:
    tenants: int
    calls: int
    credentials: int
    server_major: int
    tool: PgTool


def libpq_target(dsn: str) -> tuple[str, dict[str, str]]:
    """``dsn`` without its password, and the environment that supplies the password."""
    parts = urlsplit(dsn)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    password: str | None = None
    if at and ":" in userinfo:
        user, _, raw = userinfo.partition(":")
        password = unquote(raw)
        netloc = f"{user}@{hostport}"
    else:
        netloc = parts.netloc
    query = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "password":
            password = value
        else:
            query.append((key, value))
    bare = urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), parts.fragment))
    env = {"PGPASSWORD": password} if password is not None else {}
    return bare, env


async def _connect(dsn: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(dsn, statement_cache_size=0, timeout=30)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise BackupError(f"cannot connect to {redact(dsn)}: {type(exc).__name__}: {exc}") from None


async def _owner_checks(conn: asyncpg.Connection, dsn: str) -> int:
    """The server's major version, after checking the role sees every tenant's rows."""
    bypass = await conn.fetchval(
        "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user"
    )
    if not bypass:
        raise BackupError(
            f"{redact(dsn)} connects as a role subject to row-level security; back up and "
            "restore as the schema owner (MIGRATION_DATABASE_URL), a superuser or BYPASSRLS role"
        )
    return int(await conn.fetchval("SHOW server_version_num")) // 10_000


def _tool(name: str, server_major: int) -> PgTool:
    try:
        return find_tool(name, server_major)
    except ToolNotFound as exc:
        raise BackupError(str(exc)) from None


async def _run(tool: PgTool, args: list[str], extra_env: dict[str, str]) -> None:
    env = {**os.environ, **extra_env}
    process = await asyncio.create_subprocess_exec(
        str(tool.path),
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        detail = stderr.decode(errors="replace").strip()[-2000:]
        raise BackupError(f"{tool.path.name} failed (exit {process.returncode}): {detail}")


async def backup(dsn: str, output: Path) -> BackupResult:
    """Dump the database at ``dsn`` (the schema owner) to ``output`` (custom format, mode 0600).

    The file appears only when the dump is complete: pg_dump writes a temporary file beside it.
    """
    conn = await _connect(dsn)
    try:
        server_major = await _owner_checks(conn, dsn)
    finally:
        await conn.close()
    tool = _tool("pg_dump", server_major)
    target, env = libpq_target(dsn)
    output, partial = await asyncio.to_thread(_partial_file, output)
    try:
        await _run(
            tool,
            [
                "--format=custom",
                "--no-password",
                "--lock-wait-timeout=60s",
                f"--file={partial}",
                f"--dbname={target}",
            ],
            env,
        )
        size = await asyncio.to_thread(_publish, partial, output)
    finally:
        await asyncio.to_thread(partial.unlink, missing_ok=True)
    return BackupResult(output, size, server_major, tool)


def _partial_file(output: Path) -> tuple[Path, Path]:
    """The absolute output path, and the private temporary file pg_dump writes first (the dump
    holds password hashes, encrypted credentials and call transcripts)."""
    output = output.resolve()
    partial = output.with_name(f".{output.name}.partial")
    partial.unlink(missing_ok=True)
    partial.touch(mode=0o600)
    return output, partial


def _publish(partial: Path, output: Path) -> int:
    partial.replace(output)
    return output.stat().st_size


async def _ensure_empty(conn: asyncpg.Connection, dsn: str) -> None:
    tables = await conn.fetchval(
        """
        SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
          AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
        """
    )
    if tables:
        raise BackupError(
            f"{redact(dsn)} is not empty ({tables} relations): restore into a freshly created "
            "database (CREATE DATABASE ...) and point the services at it afterwards"
        )


async def _ensure_app_role(conn: asyncpg.Connection) -> None:
    """Roles are not in a dump; the grants in it need ``voicerelay_app`` (as migration 0001)."""
    if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", APP_GROUP_ROLE):
        return
    try:
        await conn.execute(
            f"CREATE ROLE {APP_GROUP_ROLE} NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE"
        )
    except asyncpg.PostgresError as exc:
        raise BackupError(
            f"role {APP_GROUP_ROLE} does not exist on the target server and could not be "
            f"created ({exc}); create it as in control_api/migrations/0001_init.sql"
        ) from None


async def restore(dump: Path, dsn: str) -> RestoreResult:
    """Restore ``dump`` (a file) into the empty database at ``dsn``, owned by ``dsn``'s role."""
    conn = await _connect(dsn)
    try:
        server_major = await _owner_checks(conn, dsn)
        await _ensure_empty(conn, dsn)
        await _ensure_app_role(conn)
    finally:
        await conn.close()
    tool = _tool("pg_restore", server_major)
    target, env = libpq_target(dsn)
    await _run(
        tool,
        [
            "--no-password",
            "--single-transaction",
            "--exit-on-error",
            # The restoring role owns everything, as the role that ran the migrations did.
            "--no-owner",
            f"--dbname={target}",
            str(dump),
        ],
        env,
    )
    conn = await _connect(dsn)
    try:
        # A dump carries no planner statistics.
        await conn.execute("ANALYZE")
        counts = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM tenants) AS tenants,"
            " (SELECT count(*) FROM calls) AS calls,"
            " (SELECT count(*) FROM credentials) AS credentials"
        )
    finally:
        await conn.close()
    assert counts is not None
    return RestoreResult(
        tenants=counts["tenants"],
        calls=counts["calls"],
        credentials=counts["credentials"],
        server_major=server_major,
        tool=tool,
    )
