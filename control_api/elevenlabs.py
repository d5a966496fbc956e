"""ElevenLabs Conversational AI: the conversation URLs the relay connects to.

Public agents are reached at ``wss://<api host>/v1/convai/conversation?agent_id=...``. Private
agents need a signed URL, fetched with the tenant's API key from
``GET /v1/convai/conversation/get-signed-url``; it is valid for 15 minutes for starting a
conversation. The API key is sent only in the ``xi-api-key`` header and never put into an
exception, a log line or a return value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx

log = logging.getLogger(__name__)

CONVERSATION_PATH = "/v1/convai/conversation"
SIGNED_URL_PATH = "/v1/convai/conversation/get-signed-url"
# ElevenLabs documents 15 minutes; report a little less so nobody starts on the last second.
SIGNED_URL_VALIDITY = timedelta(minutes=15) - timedelta(seconds=30)
MAX_SIGNED_URL_LENGTH = 4096


class ElevenLabsError(Exception):
    """ElevenLabs did not give us a conversation URL. Messages never contain the API key."""


class ElevenLabsAuthError(ElevenLabsError):
    """ElevenLabs rejected the API key (or the key may not use this agent)."""


class ElevenLabsUnavailable(ElevenLabsError):
    """ElevenLabs could not be reached in time, or answered with a server error."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class ElevenLabsAgentNotFound(ElevenLabsError):
    """ElevenLabs does not know the agent id."""


@dataclass(frozen=True)
class ConversationUrl:
    url: str
    expires_at: datetime | None


def public_conversation_url(api_url: str, agent_id: str) -> str:
    """The WebSocket URL of a public agent: the API's base URL with https→wss (http→ws)."""
    parts = urlsplit(api_url.rstrip("/"))
    scheme = {"https": "wss", "http": "ws", "wss": "wss", "ws": "ws"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError("the ElevenLabs API URL must be an http(s) URL")
    path = parts.path.rstrip("/") + CONVERSATION_PATH
    return urlunsplit((scheme, parts.netloc, path, urlencode({"agent_id": agent_id}), ""))


async def fetch_signed_url(
    http: httpx.AsyncClient,
    api_url: str,
    *,
    api_key: str,
    agent_id: str,
    timeout_seconds: float,
    now: datetime | None = None,
) -> ConversationUrl:
    """Ask ElevenLabs for a signed conversation URL for a private agent."""
    fetched_at = now or datetime.now(UTC)
    try:
        response = await http.get(
            api_url.rstrip("/") + SIGNED_URL_PATH,
            params={"agent_id": agent_id},
            headers={"xi-api-key": api_key, "accept": "application/json"},
            timeout=timeout_seconds,
            follow_redirects=False,
        )
    except httpx.TimeoutException:
        raise ElevenLabsUnavailable("ElevenLabs did not answer in time", timed_out=True) from None
    except httpx.HTTPError as exc:
        # The exception text may carry the request; log only its class.
        log.warning("ElevenLabs unreachable", extra={"error": type(exc).__name__})
        raise ElevenLabsUnavailable("ElevenLabs could not be reached") from None
    status = response.status_code
    if status in (401, 403):
        raise ElevenLabsAuthError(f"ElevenLabs rejected the API key (HTTP {status})")
    if status == 404:
        raise ElevenLabsAgentNotFound("ElevenLabs does not know this agent")
    if status >= 500 or status == 429:
        raise ElevenLabsUnavailable(f"ElevenLabs answered HTTP {status}")
    if status != 200:
        raise ElevenLabsError(f"ElevenLabs answered HTTP {status}")
    signed_url = _signed_url_from(response)
    return ConversationUrl(url=signed_url, expires_at=fetched_at + SIGNED_URL_VALIDITY)


def _signed_url_from(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        raise ElevenLabsError("ElevenLabs answered with something other than JSON") from None
    url = body.get("signed_url") if isinstance(body, dict) else None
    if not isinstance(url, str) or len(url) > MAX_SIGNED_URL_LENGTH:
        raise ElevenLabsError("ElevenLabs answered without a signed URL")
    parts = urlsplit(url)
    if parts.scheme not in ("wss", "ws") or not parts.netloc:
        raise ElevenLabsError("ElevenLabs answered with a signed URL that is not a WebSocket URL")
    return url
