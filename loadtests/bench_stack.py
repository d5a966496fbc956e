"""The benchmark's services, each in its own process on loopback, and their clean-up.

PostgreSQL and Redis are the local ones (as the test suite finds them, embedded otherwise); the
benchmark gets a scratch database and Redis key prefix, removed at the end. The ElevenLabs
emulator, the control API, the relay and the floor relay run as real processes started the way
they are deployed (``voicerelay emulator|api|relay``), so the relay's CPU and memory are its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from loadtests.bench_phone import VOICE_WEBHOOK, PhoneLine
from loadtests.provision import create_greeting_agent, store_twilio_credential
from voicerelay.devstack import bootstrap_database, generate_secrets
from voicerelay.emulators.elevenlabs import DEFAULT_API_KEY
from voicerelay.settings import Settings

# The emulator answers every agent id; this one names the benchmark's agent in call logs.
AGENT_ID = "agent_bench_echo"
# The phone agent (the same emulated agent) greets callers, so their first audio can be timed.
PHONE_GREETING = "Hello, you are through to the benchmark."
AUDIO_FORMAT = "pcm_16000"
# Limits that would otherwise refuse a benchmark's worth of calls from one address.
_BENCH_SETTINGS = {
    "RATE_LIMIT_API_PER_SECOND": "100000",
    "RATE_LIMIT_API_BURST": "100000",
    "RELAY_CONNECT_RATE_PER_MINUTE_PER_IP": "1000000",
    "RELAY_CONNECT_RATE_PER_MINUTE_PER_TENANT": "1000000",
    # Callers have hung up before the relay is stopped; nothing should be left to drain.
    "DRAIN_DEADLINE_SECONDS": "5",
}
_SETTING_VARIABLES = {name.upper() for name in Settings.model_fields}
START_SECONDS = 60.0


class StackError(RuntimeError):
    """A service did not start; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _ready(url: str, path: str | None) -> bool:
    if path is None:
        host, _, port = url.split("//", 1)[1].partition(":")
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex((host, int(port.split("/")[0]))) == 0
    try:
        return httpx.get(url + path, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_service(
    name: str,
    argv: list[str],
    *,
    env: dict[str, str],
    port: int,
    logs: Path,
    ready_path: str | None,
) -> ServiceProcess:
    log_path = logs / f"{name.replace(' ', '-')}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    service = ServiceProcess(name, process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + START_SECONDS
    while not _ready(service.url, ready_path):
        if process.poll() is not None or time.monotonic() > deadline:
            service.stop()
            raise StackError(f"{name} did not start:\n{service.log_tail()}")
        time.sleep(0.1)
    return service


def echo_agent(frame_ms: int, talk_frames: int) -> Any:
    """The benchmark's agent: ends a turn on its last voiced frame (``max_turn_ms`` half a
    frame short of the turn) and echoes it at once, one frame per audio event, in real time."""
    from voicerelay.emulators.elevenlabs import EmulatedAgent

    return EmulatedAgent(
        input_format=AUDIO_FORMAT,
        output_format=AUDIO_FORMAT,
        reply_audio="echo",
        realtime=True,
        chunk_ms=frame_ms,
        max_turn_ms=talk_frames * frame_ms - frame_ms // 2,
    )


def _serve_emulator(port: int, frame_ms: int, talk_frames: int) -> None:
    from voicerelay.emulators.elevenlabs import EmulatorConfig, create_emulator_app
    from voicerelay.logs import configure_logging
    from voicerelay.serving import make_service, run, serve_until_stopped

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    config = EmulatorConfig(
        agents={AGENT_ID: echo_agent(frame_ms, talk_frames)},
        accept_unknown_agents=False,
        keep_conversations=1000,
    )
    service = make_service(
        "emulator",
        create_emulator_app(config),
        host="127.0.0.1",
        port=port,
        settings=settings,
        ws_per_message_deflate=False,
    )
    run(serve_until_stopped([service]))


def relay_command() -> list[str] | None:
    """How the relay is served: `voicerelay relay` once it exists, None before the relay does."""
    import importlib.util

    if importlib.util.find_spec("relay.app") is None:
        return None
    from voicerelay.cli import main as cli

    if "relay" in getattr(cli, "commands", {}):
        return [sys.executable, "-m", "voicerelay", "relay"]
    # The relay app without its command yet: serve it as `voicerelay up` does.
    return [sys.executable, "-m", "loadtests.bench_stack", "serve-relay"]


def _serve_relay() -> None:
    from relay.app import create_app
    from voicerelay.logs import configure_logging
    from voicerelay.serving import make_service, run, serve_until_stopped

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    service = make_service(
        "relay",
        create_app(settings),
        host=settings.relay_host,
        port=settings.relay_port,
        settings=settings,
    )
    run(serve_until_stopped([service]))


@dataclass
class BenchStack:
    """Emulator and control API for the whole run; relay and floor started per measurement."""

    logs: Path
    env: dict[str, str]
    owner_dsn: str
    admin_dsn: str
    database: str
    redis_url: str
    redis_prefix: str
    emulator: ServiceProcess | None = None
    api: ServiceProcess | None = None
    api_key: str = ""
    agent_id: str = ""
    # Phone calls (None when this control API has no Twilio support): see bench_phone.py.
    phone: PhoneLine | None = None
    _stop_services: list[Any] = field(default_factory=list)

    @property
    def emulator_url(self) -> str:
        assert self.emulator is not None
        return self.emulator.url

    def start_relay(self, command: list[str], relay_id: str = "bench-relay") -> ServiceProcess:
        """One replica; several run side by side with distinct ``relay_id``s."""
        port = free_port()
        env = dict(
            self.env,
            RELAY_ID=relay_id,
            RELAY_PORT=str(port),
            RELAY_PUBLIC_URL=f"ws://127.0.0.1:{port}",
        )
        return start_service(
            relay_id, command, env=env, port=port, logs=self.logs, ready_path="/ready"
        )

    def start_floor(self) -> ServiceProcess:
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "loadtests.floor_relay",
            f"--port={port}",
            f"--elevenlabs-url={self.emulator_url}",
            f"--api-key={DEFAULT_API_KEY}",
            f"--agent-id={AGENT_ID}",
        ]
        return start_service(
            "floor", argv, env=self.env, port=port, logs=self.logs, ready_path=None
        )

    async def signed_url(self, http: httpx.AsyncClient) -> str:
        answer = await http.get(
            f"{self.emulator_url}/v1/convai/conversation/get-signed-url",
            params={"agent_id": AGENT_ID},
            headers={"xi-api-key": DEFAULT_API_KEY},
        )
        answer.raise_for_status()
        url: str = answer.json()["signed_url"]
        return url

    async def call_token(self, http: httpx.AsyncClient) -> dict[str, Any]:
        assert self.api is not None
        answer = await http.post(
            f"{self.api.url}/v1/calls",
            json={"agent_id": self.agent_id},
            headers={"authorization": f"Bearer {self.api_key}"},
        )
        if answer.status_code != 201:
            raise StackError(f"POST /v1/calls answered {answer.status_code}: {answer.text}")
        body: dict[str, Any] = answer.json()
        return body


def _service_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.upper() not in _SETTING_VARIABLES}
    env.update(variables)
    return env


async def _provision_tenant(stack: BenchStack) -> None:
    from control_api.bootstrap import create_tenant

    tenant = await create_tenant(
        stack.owner_dsn,
        name="Benchmark",
        owner_email=f"bench-{uuid.uuid4().hex[:8]}@example.com",
        max_concurrent_calls=100_000,
    )
    stack.api_key = tenant.api_key
    assert stack.api is not None
    headers = {"authorization": f"Bearer {tenant.api_key}"}
    async with httpx.AsyncClient(base_url=stack.api.url, headers=headers, timeout=10) as http:
        credential = await http.post(
            "/v1/credentials",
            json={"provider": "elevenlabs", "name": "emulator", "api_key": DEFAULT_API_KEY},
        )
        if credential.status_code != 201:
            raise StackError(f"could not store the credential: {credential.text}")
        agent = await http.post(
            "/v1/agents",
            json={
                "name": "bench echo",
                "elevenlabs_agent_id": AGENT_ID,
                "credential_id": credential.json()["id"],
                "input_audio_format": AUDIO_FORMAT,
                "output_audio_format": AUDIO_FORMAT,
            },
        )
        if agent.status_code != 201:
            raise StackError(f"could not create the agent: {agent.text}")
        stack.agent_id = agent.json()["id"]
        stack.phone = await _provision_phone(http, stack.api.url, credential.json()["id"])


async def _provision_phone(
    http: httpx.AsyncClient, api_url: str, credential_id: str
) -> PhoneLine | None:
    """A Twilio credential and a greeting agent with a phone number; None when this control
    API does not know Twilio credentials or phone webhooks yet."""
    paths = (await http.get("/openapi.json")).json().get("paths", {})
    if VOICE_WEBHOOK not in paths:
        return None
    account_sid, auth_token = await store_twilio_credential(http, "bench")
    _, number = await create_greeting_agent(
        http,
        name="bench phone",
        elevenlabs_agent_id=AGENT_ID,
        credential_id=credential_id,
        greeting=PHONE_GREETING,
    )
    return PhoneLine(api_url, number, account_sid, auth_token)


async def _drop_database(admin_dsn: str, database: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await conn.close()


async def _delete_redis_keys(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        async for key in client.scan_iter(match=prefix + "*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


@contextlib.contextmanager
def bench_stack(logs: Path, *, frame_ms: int, talk_frames: int) -> Iterator[BenchStack]:
    """Database, Redis prefix, emulator and control API; everything removed on exit."""
    from tests.support.services import find_or_start_services

    services = find_or_start_services()
    run_id = uuid.uuid4().hex[:8]
    database = f"vrbench_{run_id}"
    try:
        owner_dsn, app_dsn = asyncio.run(
            bootstrap_database(services.admin_dsn, database, app_login="voicerelay_bench_app")
        )
        try:
            emulator_port, api_port = free_port(), free_port()
            secrets = generate_secrets()
            prefix = f"vrbench:{run_id}:"
            env = _service_env(
                ENVIRONMENT="development",
                LOG_FORMAT="text",
                LOG_LEVEL="WARNING",
                DATABASE_URL=app_dsn,
                MIGRATION_DATABASE_URL=owner_dsn,
                DATABASE_POOL_MAX_SIZE="10",
                REDIS_URL=services.redis_url,
                REDIS_KEY_PREFIX=prefix,
                ELEVENLABS_API_URL=f"http://127.0.0.1:{emulator_port}",
                API_PORT=str(api_port),
                PUBLIC_API_URL=f"http://127.0.0.1:{api_port}",
                CONTROL_API_INTERNAL_URL=f"http://127.0.0.1:{api_port}",
                EMULATOR_PORT=str(emulator_port),
                **secrets,
                **_BENCH_SETTINGS,
            )
            stack = BenchStack(
                logs=logs,
                env=env,
                owner_dsn=owner_dsn,
                admin_dsn=services.admin_dsn,
                database=database,
                redis_url=services.redis_url,
                redis_prefix=prefix,
            )
            try:
                stack.emulator = start_service(
                    "emulator",
                    [
                        sys.executable,
                        "-m",
                        "loadtests.bench_stack",
                        "serve-emulator",
                        f"--port={emulator_port}",
                        f"--frame-ms={frame_ms}",
                        f"--talk-frames={talk_frames}",
                    ],
                    env=env,
                    port=emulator_port,
                    logs=logs,
                    ready_path=None,
                )
                stack.api = start_service(
                    "control-api",
                    [sys.executable, "-m", "voicerelay", "api"],
                    env=env,
                    port=api_port,
                    logs=logs,
                    ready_path="/ready",
                )
                asyncio.run(_provision_tenant(stack))
                yield stack
            finally:
                for service in (stack.api, stack.emulator):
                    if service is not None:
                        service.stop()
                asyncio.run(_delete_redis_keys(services.redis_url, prefix))
        finally:
            asyncio.run(_drop_database(services.admin_dsn, database))
    finally:
        services.stop()


def main(argv: list[str] | None = None) -> None:
    """Serve one of the benchmark's own processes (the parent starts these)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_stack")
    commands = parser.add_subparsers(dest="command", required=True)
    emulator = commands.add_parser("serve-emulator", help="The emulator with the echo agent.")
    emulator.add_argument("--port", type=int, required=True)
    emulator.add_argument("--frame-ms", type=int, required=True)
    emulator.add_argument("--talk-frames", type=int, required=True)
    commands.add_parser("serve-relay", help="relay.app as `voicerelay up` serves it.")
    args = parser.parse_args(argv)
    if args.command == "serve-emulator":
        _serve_emulator(args.port, args.frame_ms, args.talk_frames)
    else:
        _serve_relay()


if __name__ == "__main__":
    main()
