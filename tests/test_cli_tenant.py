"""`voicerelay tenant create` and `tenant update`, run through click against the test database.

The command runs its own event loop, so it is invoked in a worker thread while the test's loop
keeps serving the API the printed credentials are then tried against.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator

import asyncpg
import httpx
import pytest
from click.testing import CliRunner, Result

from tests.conftest import TestDatabase
from tests.support.sessions import bearer, login
from voicerelay.cli import main
from voicerelay.settings import get_settings


@pytest.fixture
def cli_env(database: TestDatabase) -> Iterator[dict[str, str | None]]:
    get_settings.cache_clear()
    yield {
        "MIGRATION_DATABASE_URL": database.owner_dsn,
        "LOG_FORMAT": "text",
        "LOG_LEVEL": "WARNING",
    }
    get_settings.cache_clear()


async def _invoke(env: dict[str, str | None], *args: str) -> Result:
    def run() -> Result:
        get_settings.cache_clear()
        return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)

    return await asyncio.to_thread(run)


def _field(output: str, label: str) -> str:
    match = re.search(rf"^\s*{re.escape(label)}:\s+(\S+)", output, re.MULTILINE)
    assert match, f"{label!r} missing from:\n{output}"
    return match.group(1)


async def test_create_prints_working_credentials(
    cli_env: dict[str, str | None], http: httpx.AsyncClient, owner_conn: asyncpg.Connection
) -> None:
    email = f"Founder-{uuid.uuid4().hex[:8]}@Example.com"
    result = await _invoke(
        cli_env,
        "tenant",
        "create",
        "--name",
        "Acme Voice",
        "--owner-email",
        email,
        "--max-concurrent-calls",
        "25",
        "--retention-days",
        "30",
    )
    assert result.exit_code == 0, result.output
    out = result.output
    tenant_id = _field(out, "tenant id")
    slug = _field(out, "slug")
    password = _field(out, "owner password")
    api_key = _field(out, "API key")
    assert _field(out, "owner email") == email.lower()
    assert slug.startswith("acme-voice-")
    assert api_key.startswith("vr_live_")
    assert "never shown again" in out

    row = await owner_conn.fetchrow("SELECT * FROM tenants WHERE id = $1::uuid", tenant_id)
    assert (row["name"], row["slug"]) == ("Acme Voice", slug)
    assert (row["max_concurrent_calls"], row["call_log_retention_days"]) == (25, 30)

    r = await http.get("/v1/tenant", headers=bearer(api_key))
    assert r.status_code == 200
    assert r.json()["id"] == tenant_id
    session = await login(http, email, password)
    assert session["user"]["role"] == "owner"
    assert session["user"]["must_change_password"] is True


async def test_create_with_slug_and_duplicate(cli_env: dict[str, str | None]) -> None:
    slug = f"acme-{uuid.uuid4().hex[:8]}"
    args = ("tenant", "create", "--name", "Acme", "--owner-email", "a@example.com", "--slug", slug)
    first = await _invoke(cli_env, *args)
    assert first.exit_code == 0, first.output
    assert _field(first.output, "slug") == slug
    again = await _invoke(cli_env, *args)
    assert again.exit_code == 1
    assert "already exists" in again.output
    assert "Traceback" not in again.output


@pytest.mark.parametrize(
    "args",
    [
        ("--name", "X", "--owner-email", "not-an-email"),
        ("--name", "X", "--owner-email", "a@example.com", "--slug", "Bad Slug"),
        ("--name", "X", "--owner-email", "a@example.com", "--max-concurrent-calls", "0"),
        ("--name", "", "--owner-email", "a@example.com"),
        ("--owner-email", "a@example.com"),
    ],
)
async def test_create_rejects_bad_input(
    cli_env: dict[str, str | None], args: tuple[str, ...]
) -> None:
    result = await _invoke(cli_env, "tenant", "create", *args)
    assert result.exit_code == 2, result.output


async def test_create_needs_the_owner_database_url(database: TestDatabase) -> None:
    result = await _invoke(
        {"MIGRATION_DATABASE_URL": None},  # unset
        "tenant",
        "create",
        "--name",
        "X",
        "--owner-email",
        "a@example.com",
    )
    get_settings.cache_clear()
    assert result.exit_code != 0
    assert "MIGRATION_DATABASE_URL" in result.output


async def test_update_platform_caps(
    cli_env: dict[str, str | None], http: httpx.AsyncClient
) -> None:
    created = await _invoke(
        cli_env, "tenant", "create", "--name", "Capped", "--owner-email", "c@example.com"
    )
    slug = _field(created.output, "slug")
    api_key = _field(created.output, "API key")
    result = await _invoke(
        cli_env, "tenant", "update", "--slug", slug, "--max-concurrent-calls", "75"
    )
    assert result.exit_code == 0, result.output
    assert "max concurrent calls 75" in result.output
    body = (await http.get("/v1/tenant", headers=bearer(api_key))).json()
    assert body["max_concurrent_calls"] == 75
    assert body["call_log_retention_days"] == 90

    missing = await _invoke(
        cli_env, "tenant", "update", "--slug", "no-such-tenant", "--retention-days", "5"
    )
    assert missing.exit_code == 1
    assert "no tenant" in missing.output
    nothing = await _invoke(cli_env, "tenant", "update", "--slug", slug)
    assert nothing.exit_code == 2


def test_help_mentions_one_time_display() -> None:
    result = CliRunner().invoke(main, ["tenant", "create", "--help"])
    assert result.exit_code == 0
    assert "only time" in result.output
