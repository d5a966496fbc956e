"""`voicerelay up`: local defaults, the demo tenant, and whole runs as real processes."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from control_api.routes import all_endpoints
from tests.conftest import TestDatabase
from tests.support.ports import subprocess_port
from voicerelay.settings import Environment, MissingSetting, Settings
from voicerelay.up import (
    DEMO_FILE,
    DemoTenant,
    UpError,
    UpOptions,
    apply_options,
    ensure_demo_tenant,
    load_demo_tenant,
    optional_factory,
    run_up,
    save_demo_tenant,
    try_commands,
)

BANNER_END = "Ctrl-C stops everything."
API_KEY = re.compile(r"API key\s+(vr_live_\S+)")


# --- Pure parts -------------------------------------------------------------------------------


def test_options_fill_local_defaults_without_overriding_configured_values() -> None:
    base = Settings(public_api_url="https://api.example.com")
    settings = apply_options(
        base,
        UpOptions(api_port=9001, relay_port=9002, state_dir=Path("/tmp/x")),
        frozenset({"PUBLIC_API_URL"}),
    )
    assert settings.environment is Environment.development
    assert settings.log_format == "text"
    assert (settings.api_port, settings.relay_port) == (9001, 9002)
    assert settings.emulator_port == base.emulator_port
    assert settings.state_dir == Path("/tmp/x")
    assert settings.public_api_url == "https://api.example.com"  # configured: kept
    assert settings.control_api_internal_url == "http://127.0.0.1:9001"
    assert settings.relay_public_url == "ws://127.0.0.1:9002"


def test_explicit_production_environment_is_kept() -> None:
    settings = apply_options(
        Settings(environment=Environment.production, log_format="json"),
        UpOptions(),
        frozenset({"ENVIRONMENT", "LOG_FORMAT"}),
    )
    assert settings.environment is Environment.production
    assert settings.log_format == "json"


async def test_production_starts_nothing_embedded(tmp_path: Path) -> None:
    with pytest.raises(MissingSetting, match="DATABASE_URL"):
        await run_up(
            Settings(environment=Environment.production),
            UpOptions(state_dir=tmp_path),
            environ={"ENVIRONMENT": "production"},
            echo=print,
        )
    assert not (tmp_path / "postgres").exists()


async def test_migration_url_alone_is_refused(tmp_path: Path, database: TestDatabase) -> None:
    with pytest.raises(UpError, match="DATABASE_URL"):
        await run_up(
            Settings(migration_database_url=database.owner_dsn),
            UpOptions(state_dir=tmp_path),
            environ={},
            echo=print,
        )


def _demo() -> DemoTenant:
    return DemoTenant(
        tenant_id="0190a0a0-0000-7000-8000-000000000001",
        slug="demo-abc123",
        owner_email="demo-owner@example.com",
        owner_password="pw",
        api_key_id="0190a0a0-0000-7000-8000-000000000002",
        api_key="vr_live_x",
    )


def test_demo_tenant_file_is_private_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "state" / DEMO_FILE
    save_demo_tenant(path, _demo())
    save_demo_tenant(path, _demo())  # replacing keeps the permissions
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_demo_tenant(path) == _demo()


def test_unreadable_demo_file_means_no_demo_tenant(tmp_path: Path) -> None:
    assert load_demo_tenant(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert load_demo_tenant(tmp_path / "bad.json") is None
    (tmp_path / "old.json").write_text('{"tenant_id": "x"}')
    assert load_demo_tenant(tmp_path / "old.json") is None


def test_try_commands_show_only_existing_endpoints() -> None:
    base = "http://127.0.0.1:8080"
    assert try_commands(base, "vr_live_k", set()) == [
        f"curl -s {base}/ready",
        f"curl -s {base}/openapi.json",
    ]
    commands = try_commands(base, "vr_live_k", {("GET", "/v1/agents"), ("GET", "/v1/calls")})
    assert len(commands) == 3
    assert all("Bearer vr_live_k" in c for c in commands[1:])
    assert commands[1].endswith("/v1/agents")


def test_optional_factory_skips_absent_modules_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert optional_factory("voicerelay_no_such_module", "create_app") is None
    (tmp_path / "vr_broken_service.py").write_text("import vr_missing_dependency\n")
    (tmp_path / "vr_no_factory.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError):
        optional_factory("vr_broken_service", "create_app")
    assert optional_factory("vr_no_factory", "create_app") is None


# --- Demo tenant against the database ---------------------------------------------------------


async def test_demo_tenant_is_reused_and_recreated_when_lost(
    database: TestDatabase, owner_conn: asyncpg.Connection, tmp_path: Path
) -> None:
    first, created = await ensure_demo_tenant(database.owner_dsn, tmp_path)
    assert created
    again, created = await ensure_demo_tenant(database.owner_dsn, tmp_path)
    assert (again, created) == (first, False)
    await owner_conn.execute("DELETE FROM tenants WHERE id = $1::uuid", first.tenant_id)
    replaced, created = await ensure_demo_tenant(database.owner_dsn, tmp_path)
    assert created
    assert replaced.tenant_id != first.tenant_id
    assert load_demo_tenant(tmp_path / DEMO_FILE) == replaced


# --- Whole runs -------------------------------------------------------------------------------

_SETTING_VARIABLES = {name.upper() for name in Settings.model_fields}


def clean_env(**variables: str) -> dict[str, str]:
    """This process' environment without any voicerelay setting, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in _SETTING_VARIABLES}
    env.update(variables)
    return env


@dataclass
class UpRun:
    process: subprocess.Popen[bytes]
    api_url: str
    emulator_url: str
    banner: str

    @property
    def api_key(self) -> str:
        found = API_KEY.search(self.banner)
        assert found, self.banner
        return found.group(1)


@contextmanager
def voicerelay_up(env: dict[str, str], state_dir: Path, logs: Path) -> Iterator[UpRun]:
    api_port, relay_port, emulator_port = subprocess_port(), subprocess_port(), subprocess_port()
    stdout, stderr = logs / "up.out", logs / "up.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "voicerelay",
                "up",
                f"--api-port={api_port}",
                f"--relay-port={relay_port}",
                f"--emulator-port={emulator_port}",
                f"--state-dir={state_dir}",
            ],
            env=env,
            stdout=out,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 90
        while BANNER_END not in stdout.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`voicerelay up` did not come up:\n{stderr.read_text()}")
            time.sleep(0.1)
        yield UpRun(
            process=process,
            api_url=f"http://127.0.0.1:{api_port}",
            emulator_url=f"http://127.0.0.1:{emulator_port}",
            banner=stdout.read_text(),
        )
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("`voicerelay up` did not stop within 30 seconds of SIGTERM")
        assert process.returncode == 0, stderr.read_text()
        assert "Traceback" not in stderr.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def _an_authenticated_endpoint() -> str | None:
    for endpoint in all_endpoints():
        if endpoint.auth and endpoint.method == "GET" and "{" not in endpoint.path:
            return endpoint.path
    return None


def check_running(run: UpRun) -> None:
    with httpx.Client(base_url=run.api_url, timeout=10) as client:
        ready = client.get("/ready")
        assert ready.status_code == 200, ready.text
        path = _an_authenticated_endpoint()
        if path is not None:
            assert client.get(path).status_code == 401
            answer = client.get(path, headers={"authorization": f"Bearer {run.api_key}"})
            assert answer.status_code == 200, answer.text
    if "ElevenLabs emulator" in run.banner:
        assert f"{run.emulator_url}" in run.banner
        assert (
            httpx.get(f"{run.emulator_url}/v1/convai/conversation/get-signed-url").status_code < 500
        )


def test_up_uses_configured_services_and_keeps_its_demo_tenant(
    settings: Settings, database: TestDatabase, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    env = clean_env(
        DATABASE_URL=database.app_dsn,
        MIGRATION_DATABASE_URL=database.owner_dsn,
        REDIS_URL=settings.require("redis_url"),
        REDIS_KEY_PREFIX=settings.redis_key_prefix,
        DATABASE_POOL_MAX_SIZE="2",
    )
    with voicerelay_up(env, state, tmp_path) as first:
        check_running(first)
        assert "created now" in first.banner
        assert "DATABASE_URL (migrated with MIGRATION_DATABASE_URL)" in first.banner
    assert stat.S_IMODE((state / DEMO_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "dev-secrets.env").stat().st_mode) == 0o600
    assert not (state / "postgres").exists()
    with voicerelay_up(env, state, tmp_path) as second:
        check_running(second)
        assert second.api_key == first.api_key
        assert f"from {state / DEMO_FILE}" in second.banner


def test_up_on_a_fresh_machine_runs_embedded_postgres_and_redis(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with voicerelay_up(clean_env(), state, tmp_path) as run:
        check_running(run)
        assert "embedded, data in" in run.banner
        assert (state / "postgres" / "postmaster.pid").exists()
    # Stopped with the services, not left running for the next run.
    assert not (state / "postgres" / "postmaster.pid").exists()


def _up_until_it_exits(ports: dict[str, int], state: Path) -> subprocess.CompletedProcess[str]:
    """`voicerelay up` on embedded PostgreSQL and Redis (nothing configured), expected to end."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "voicerelay",
            "up",
            *(f"--{name}-port={port}" for name, port in ports.items()),
            f"--state-dir={state}",
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("taken", "setting", "option"),
    [
        ("api", "API_PORT", "--api-port"),
        ("relay", "RELAY_PORT", "--relay-port"),
        ("emulator", "EMULATOR_PORT", "--emulator-port"),
    ],
)
def test_up_fails_fast_when_a_port_is_taken(
    tmp_path: Path, taken: str, setting: str, option: str
) -> None:
    ports = {name: subprocess_port() for name in ("api", "relay", "emulator")}
    state = tmp_path / "state"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", ports[taken]))
        squatter.listen()
        process = _up_until_it_exits(ports, state)
    assert process.returncode != 0
    assert f"port {ports[taken]}" in process.stderr
    assert setting in process.stderr
    assert option in process.stderr
    assert "Traceback" not in process.stderr
    assert BANNER_END not in process.stdout
    # Failed before starting anything: no embedded PostgreSQL or Redis was left behind.
    assert not (state / "postgres").exists()
    assert not (state / "redis").exists()


def test_up_refuses_one_port_for_two_services(tmp_path: Path) -> None:
    port = subprocess_port()
    ports = {"api": port, "relay": port, "emulator": subprocess_port()}
    process = _up_until_it_exits(ports, tmp_path / "state")
    assert process.returncode != 0
    assert f"API_PORT and RELAY_PORT are both {port}" in process.stderr
    assert "Traceback" not in process.stderr
