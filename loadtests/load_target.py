"""What the locust users load: the control API, a tenant's credentials, an agent and (optionally)
what a phone caller needs to be Twilio for that tenant.

Read from a JSON file written by ``loadtests.provision`` (``LOADTEST_TARGET_FILE``, what
`make loadtest` uses against a local stack), or from environment variables for a real
deployment (see loadtests/README.md):

- ``LOADTEST_API_URL``: the control API's public URL (``https://api.example.com``).
- ``LOADTEST_API_KEY``: an admin API key of a tenant set aside for load tests.
- ``LOADTEST_AGENT_ID``: the agent browser callers call (the control API's agent id).
- ``LOADTEST_USER_EMAIL``, ``LOADTEST_USER_PASSWORD``: an admin user of that tenant for the
  control-API user (login, list calls, create call tokens).
- Phone callers (all four, or none): ``LOADTEST_PHONE_NUMBER`` (a number of the agent, E.164),
  ``LOADTEST_TWILIO_ACCOUNT_SID`` and ``LOADTEST_TWILIO_AUTH_TOKEN`` (the tenant's Twilio
  credential, to sign webhooks as Twilio does), and optionally ``LOADTEST_TWILIO_VOICE_URL`` (the
  webhook URL exactly as Twilio is configured to call it; default: the API URL +
  ``/v1/twilio/voice``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TARGET_FILE_VARIABLE = "LOADTEST_TARGET_FILE"
VOICE_WEBHOOK_PATH = "/v1/twilio/voice"


class TargetError(RuntimeError):
    """The load test does not know what to load; the message says what to set."""


@dataclass(frozen=True)
class PhoneTarget:
    number: str
    account_sid: str
    auth_token: str
    voice_url: str


@dataclass(frozen=True)
class LoadTarget:
    api_url: str
    api_key: str
    agent_id: str
    user_email: str
    user_password: str
    phone: PhoneTarget | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LoadTarget:
        phone = data.get("phone")
        return cls(
            api_url=str(data["api_url"]).rstrip("/"),
            api_key=str(data["api_key"]),
            agent_id=str(data["agent_id"]),
            user_email=str(data["user_email"]),
            user_password=str(data["user_password"]),
            phone=PhoneTarget(**phone) if isinstance(phone, dict) else None,
        )


def save_target(path: Path, target: LoadTarget) -> None:
    """Readable by its owner only: it holds an API key, a password and an auth token."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    scratch = path.with_name(path.name + ".tmp")
    scratch.unlink(missing_ok=True)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(target.to_json(), f, indent=2)
        f.write("\n")
    os.replace(scratch, path)


def load_target_file(path: Path) -> LoadTarget:
    try:
        return LoadTarget.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TargetError(f"cannot read the load-test target {path}: {exc}") from None


def target_from_env(environ: Mapping[str, str]) -> LoadTarget:
    """``LOADTEST_TARGET_FILE`` if set, else the ``LOADTEST_*`` variables."""
    path = environ.get(TARGET_FILE_VARIABLE)
    if path:
        return load_target_file(Path(path))
    required = (
        "LOADTEST_API_URL",
        "LOADTEST_API_KEY",
        "LOADTEST_AGENT_ID",
        "LOADTEST_USER_EMAIL",
        "LOADTEST_USER_PASSWORD",
    )
    missing = [name for name in required if not environ.get(name)]
    if missing:
        raise TargetError(
            f"set {TARGET_FILE_VARIABLE} (see `make loadtest`) or {', '.join(missing)}"
            " (loadtests/README.md, 'Against a real deployment')"
        )
    api_url = environ["LOADTEST_API_URL"].rstrip("/")
    phone_variables = (
        "LOADTEST_PHONE_NUMBER",
        "LOADTEST_TWILIO_ACCOUNT_SID",
        "LOADTEST_TWILIO_AUTH_TOKEN",
    )
    phone_values = [environ.get(name, "") for name in phone_variables]
    phone = None
    if all(phone_values):
        number, account_sid, auth_token = phone_values
        voice_url = environ.get("LOADTEST_TWILIO_VOICE_URL") or api_url + VOICE_WEBHOOK_PATH
        phone = PhoneTarget(number, account_sid, auth_token, voice_url)
    elif any(phone_values):
        raise TargetError(f"phone callers need all of {', '.join(phone_variables)}")
    return LoadTarget(
        api_url=api_url,
        api_key=environ["LOADTEST_API_KEY"],
        agent_id=environ["LOADTEST_AGENT_ID"],
        user_email=environ["LOADTEST_USER_EMAIL"],
        user_password=environ["LOADTEST_USER_PASSWORD"],
        phone=phone,
    )
