"""The call session: what the relay needs for one call, asked of the control API at connect time.

``POST /internal/v1/call-sessions`` (service token + the caller's call token) answers with the
call's agent, formats, initiation data and a fresh upstream URL. See control_api.call_sessions
for why this is an internal endpoint rather than a Redis record.

The upstream URL of a private agent is an ElevenLabs *signed* URL, a credential in its own
right: it is kept out of reprs and never logged, and neither is the call token.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any, Literal, Self

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from relay.metrics import SESSION_FETCHES
from voicerelay.settings import Settings

log = logging.getLogger(__name__)

SESSION_PATH = "/internal/v1/call-sessions"

SessionErrorCode = Literal[
    "unauthorized", "forbidden", "call_ended", "upstream_unavailable", "internal_error"
]


class _Model(BaseModel):
    # Unknown fields are ignored: a newer control API may add some during a rolling deploy.
    model_config = ConfigDict(extra="ignore", frozen=True)


class SessionAgent(_Model):
    id: uuid.UUID
    elevenlabs_agent_id: str
    input_audio_format: str
    output_audio_format: str
    allowed_origins: list[str]


class ConversationInitiation(_Model):
    conversation_config_override: dict[str, Any]
    dynamic_variables: dict[str, Any] = Field(repr=False)


class Telephony(_Model):
    """The phone leg's provider ids; the relay checks them against the stream's ``start``."""

    provider: Literal["twilio"] = "twilio"
    call_sid: str
    account_sid: str


Direction = Literal["browser", "phone_inbound", "phone_outbound"]
PHONE_DIRECTIONS: frozenset[str] = frozenset({"phone_inbound", "phone_outbound"})


class CallSession(_Model):
    """Mirrors control_api.call_sessions.CallSession (the endpoint's response).

    ``direction`` and ``telephony`` have defaults so a relay and a control API of different
    versions work together during a rolling deploy (an older API's calls are browser calls).
    """

    call_id: uuid.UUID
    tenant_id: uuid.UUID
    role: Literal["caller", "monitor"]
    status: str
    agent: SessionAgent
    client_audio_format: str
    conversation_initiation: ConversationInitiation
    upstream_url: str = Field(repr=False)
    upstream_url_expires_at: datetime | None
    max_duration_seconds: int
    tenant_max_concurrent_calls: int
    conversation_ids: list[str]
    direction: Direction = "browser"
    telephony: Telephony | None = None

    @property
    def is_phone(self) -> bool:
        return self.direction in PHONE_DIRECTIONS


class SessionError(Exception):
    """The session could not be had. ``code`` is a client-facing connect_error code.

    ``status`` and ``problem`` (the control API's own error code, e.g. ``upstream_auth_failed``)
    are for logs; none of the three ever holds a token or a URL.
    """

    def __init__(
        self, code: SessionErrorCode, message: str, *, status: int | None = None, problem: str = ""
    ) -> None:
        super().__init__(message)
        self.code: SessionErrorCode = code
        self.message = message
        self.status = status
        self.problem = problem


class InternalClient:
    """The relay's side of the control API's internal endpoints (service token auth)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        service_token: str | SecretStr,
        *,
        timeout: float = 10.0,
    ) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        secret = (
            service_token.get_secret_value()
            if isinstance(service_token, SecretStr)
            else service_token
        )
        self._headers = {"authorization": f"Bearer {secret}"}
        self._timeout = timeout

    @classmethod
    def from_settings(cls, http: httpx.AsyncClient, settings: Settings) -> Self:
        return cls(
            http,
            settings.control_api_internal_url,
            settings.require("internal_service_token"),
            timeout=settings.control_api_timeout_seconds,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._base!r})"

    async def _post(self, path: str, body: dict[str, str]) -> httpx.Response:
        """POST ``body`` as JSON; raises httpx errors."""
        return await self._http.post(
            self._base + path, json=body, headers=self._headers, timeout=self._timeout
        )


class SessionClient(InternalClient):
    async def fetch(self, token: str) -> CallSession:
        try:
            session = await self._fetch(token)
        except SessionError as exc:
            SESSION_FETCHES.labels(exc.code).inc()
            raise
        SESSION_FETCHES.labels("ok").inc()
        return session

    async def _fetch(self, token: str) -> CallSession:
        try:
            response = await self._post(SESSION_PATH, {"token": token})
        except httpx.TimeoutException:
            log.warning("the control API did not answer the call-session request in time")
            raise SessionError(
                "upstream_unavailable", "The control API did not answer in time."
            ) from None
        except httpx.TransportError as exc:
            log.warning(
                "the control API could not be reached for a call session",
                extra={"error": type(exc).__name__},
            )
            raise SessionError(
                "upstream_unavailable", "The control API could not be reached."
            ) from None
        if response.status_code == 200:
            try:
                return CallSession.model_validate_json(response.content)
            except ValidationError as exc:
                # Field locations only; values could be the upstream URL.
                where = sorted({".".join(map(str, e["loc"])) for e in exc.errors()})[:5]
                log.error(
                    "the control API sent an unreadable call session", extra={"fields": where}
                )
                raise SessionError(
                    "internal_error", "The call session could not be read.", status=200
                ) from None
        raise _error_for(response)


def _error_for(response: httpx.Response) -> SessionError:
    status = response.status_code
    problem = problem_code(response)
    if status in (401, 404):
        if problem != "invalid_call_token":
            # Not the caller's fault: the relay's own service token was refused.
            log.error(
                "the control API refused the relay's service token",
                extra={"status": status, "problem": problem},
            )
        return SessionError(
            "unauthorized", "The call token was not accepted.", status=status, problem=problem
        )
    if status == 409 and problem == "call_ended":
        return SessionError("call_ended", "This call has ended.", status=status, problem=problem)
    if status == 409:
        return SessionError(
            "forbidden", "This call cannot be joined now.", status=status, problem=problem
        )
    if status in (502, 504):
        log.warning(
            "the control API could not prepare the upstream",
            extra={"status": status, "problem": problem},
        )
        return SessionError(
            "upstream_unavailable",
            "The voice agent could not be reached; try again shortly.",
            status=status,
            problem=problem,
        )
    log.error(
        "the control API refused a call session unexpectedly",
        extra={"status": status, "problem": problem},
    )
    return SessionError(
        "internal_error", "The call session could not be prepared.", status=status, problem=problem
    )


def problem_code(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    code = body.get("code") if isinstance(body, dict) else None
    # A short identifier or nothing: never echo arbitrary text into logs.
    if isinstance(code, str) and len(code) <= 64 and code.replace("_", "").isalnum():
        return code
    return ""
