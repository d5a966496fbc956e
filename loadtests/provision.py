"""A load-test tenant on a local stack (`make run`'s, or the one `make loadtest` starts).

    python -m loadtests.provision [--state-dir .voicerelay] [--out FILE]

Reads the running stack from ``<state dir>/stack.env`` (written by `voicerelay up`) and creates,
once, a tenant of its own for load tests (so the demo tenant's call cap, logs and password stay
untouched): an owner with a known password (the control-API user), the emulator's ElevenLabs key
as a credential, an agent that greets callers (the emulator speaks its first message, so callers
can time the first agent audio) and echoes them, one phone number routed to that agent, and a
Twilio credential whose auth token the phone callers use to sign webhooks as Twilio would.
Everything is kept in ``<state dir>/loadtest-target.json`` (mode 0600) and reused while the
stack still knows its API key. Prints the file's path.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from pathlib import Path
from typing import Any

import httpx

from loadtests.load_target import VOICE_WEBHOOK_PATH, LoadTarget, PhoneTarget, save_target
from loadtests.load_target import load_target_file as _load
from relay.demo import EMULATOR_API_KEY, read_env_file
from voicerelay.emulators.twilio_media import twilio_sid

TARGET_FILE = "loadtest-target.json"
AGENT_NAME = "load test echo"
GREETING = "Hello, this is the load-test agent."
AUDIO_FORMAT = "pcm_16000"
MAX_CONCURRENT_CALLS = 1000
_NUMBER_ATTEMPTS = 20


class ProvisionError(RuntimeError):
    """The stack cannot be provisioned; the message says why."""


def _check(response: httpx.Response, what: str, expected: int = 200) -> dict[str, Any]:
    if response.status_code != expected:
        raise ProvisionError(f"{what}: {response.status_code} {response.text[:300]}")
    body: dict[str, Any] = response.json()
    return body


async def _usable(target: LoadTarget) -> bool:
    """The saved tenant still works for every user: its API key, its agent, and its owner's
    sign-in (a target saved before one-time passwords were enforced fails here and is redone)."""
    headers = {"authorization": f"Bearer {target.api_key}"}
    async with httpx.AsyncClient(base_url=target.api_url, headers=headers, timeout=10) as http:
        try:
            me = await http.get("/v1/me")
            agent = await http.get(f"/v1/agents/{target.agent_id}")
            login = await http.post(
                "/v1/auth/login",
                json={"email": target.user_email, "password": target.user_password},
            )
            if login.status_code != 200:
                return False
            token = login.json().get("access_token", "")
            calls = await http.get(
                "/v1/calls", params={"limit": 1}, headers={"authorization": f"Bearer {token}"}
            )
        except (httpx.HTTPError, ValueError, AttributeError):
            return False
    return me.status_code == 200 and agent.status_code == 200 and calls.status_code == 200


async def create_greeting_agent(
    http: httpx.AsyncClient,
    *,
    name: str,
    elevenlabs_agent_id: str,
    credential_id: str,
    greeting: str,
) -> tuple[str, str]:
    """An agent that greets callers, with a phone number of its own (numbers are unique across
    tenants: a taken one is drawn again). Returns the agent's id and its number."""
    for _ in range(_NUMBER_ATTEMPTS):
        number = f"+1415555{secrets.randbelow(10_000):04d}"
        answer = await http.post(
            "/v1/agents",
            json={
                "name": name,
                "elevenlabs_agent_id": elevenlabs_agent_id,
                "credential_id": credential_id,
                "input_audio_format": AUDIO_FORMAT,
                "output_audio_format": AUDIO_FORMAT,
                "phone_numbers": [number],
                "conversation_overrides": {"agent": {"first_message": greeting}},
            },
        )
        if answer.status_code != 409:
            return _check(answer, f"creating the agent {name!r}", 201)["id"], number
    raise ProvisionError(f"no free phone number found for the agent {name!r}")


async def store_twilio_credential(http: httpx.AsyncClient, name: str) -> tuple[str, str]:
    """A Twilio credential with a fresh account SID and auth token; returns both (the API never
    shows the token again, and phone callers sign webhooks with it)."""
    account_sid, auth_token = twilio_sid("AC"), secrets.token_hex(16)
    _check(
        await http.post(
            "/v1/credentials",
            json={
                "provider": "twilio",
                "name": name,
                "account_sid": account_sid,
                "auth_token": auth_token,
            },
        ),
        "storing the Twilio credential",
        201,
    )
    return account_sid, auth_token


async def _replace_one_time_password(
    http: httpx.AsyncClient, email: str, one_time_password: str
) -> str:
    """A one-time password is good only for choosing a new one (as a person does at first
    sign-in); the chosen one is what the control-API users sign in with."""
    session = _check(
        await http.post("/v1/auth/login", json={"email": email, "password": one_time_password}),
        "signing in as the load-test owner",
    )
    password = secrets.token_urlsafe(18)
    _check(
        await http.post(
            "/v1/users/me/password",
            json={"current_password": one_time_password, "new_password": password},
            headers={"authorization": f"Bearer {session['access_token']}"},
        ),
        "choosing the load-test owner's password",
    )
    return password


async def provision(api_url: str, owner_dsn: str) -> LoadTarget:
    from control_api.bootstrap import create_tenant

    tenant = await create_tenant(
        owner_dsn,
        name="Load test",
        owner_email=f"loadtest-{secrets.token_hex(4)}@example.com",
        max_concurrent_calls=MAX_CONCURRENT_CALLS,
    )
    headers = {"authorization": f"Bearer {tenant.api_key}"}
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=30) as http:
        password = await _replace_one_time_password(http, tenant.owner_email, tenant.owner_password)
        credential = _check(
            await http.post(
                "/v1/credentials",
                json={"provider": "elevenlabs", "name": "emulator", "api_key": EMULATOR_API_KEY},
            ),
            "storing the emulator's ElevenLabs key",
            201,
        )
        agent_id, number = await create_greeting_agent(
            http,
            name=AGENT_NAME,
            elevenlabs_agent_id="agent_loadtest_echo",
            credential_id=credential["id"],
            greeting=GREETING,
        )
        account_sid, auth_token = await store_twilio_credential(http, "load test")
    return LoadTarget(
        api_url=api_url,
        api_key=tenant.api_key,
        agent_id=agent_id,
        user_email=tenant.owner_email,
        user_password=password,
        phone=PhoneTarget(number, account_sid, auth_token, api_url + VOICE_WEBHOOK_PATH),
    )


async def ensure_target(state_dir: Path, out: Path | None = None) -> Path:
    """The target file for the stack described by ``state_dir``, created when needed."""
    stack_env = state_dir / "stack.env"
    try:
        env = read_env_file(stack_env)
    except OSError:
        raise ProvisionError(f"cannot read {stack_env}: is the stack running?") from None
    api_url = env.get("PUBLIC_API_URL", "").rstrip("/")
    owner_dsn = env.get("MIGRATION_DATABASE_URL")
    if not api_url or not owner_dsn:
        raise ProvisionError(f"{stack_env} lacks PUBLIC_API_URL or MIGRATION_DATABASE_URL")
    path = out or state_dir / TARGET_FILE
    if path.exists():
        saved = _load(path)
        if saved.api_url == api_url and await _usable(saved):
            return path
    save_target(path, await provision(api_url, owner_dsn))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.provision", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--state-dir", type=Path, default=Path(".voicerelay"))
    parser.add_argument("--out", type=Path, default=None, help="Target file to write.")
    args = parser.parse_args(argv)
    try:
        path = asyncio.run(ensure_target(args.state_dir, args.out))
    except ProvisionError as exc:
        print(f"loadtests.provision: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
