"""An ElevenLabs Conversational AI emulator: the signed-URL endpoint (and, later, the ConvAI socket).

``create_emulator_app(config)`` returns a Starlette app. It answers
``GET /v1/convai/conversation/get-signed-url`` (and the ``get_signed_url`` alias) the way
ElevenLabs does: the ``xi-api-key`` header must be one of the configured keys, and the answer is
``{"signed_url": "ws://<this host>/v1/convai/conversation?agent_id=...&conversation_signature=..."}``.
The signature is an HMAC under a per-process secret, so the same app can check it when the
conversation WebSocket is opened.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

CONVERSATION_PATH = "/v1/convai/conversation"
# The key `voicerelay emulator` accepts when started without --api-key (local runs only).
DEFAULT_API_KEY = "sk_emulator_local_development_key"
AUDIO_FORMATS = frozenset(
    {"pcm_8000", "pcm_16000", "pcm_22050", "pcm_24000", "pcm_44100", "pcm_48000", "ulaw_8000"}
)


@dataclass(frozen=True)
class EmulatedAgent:
    input_format: str = "pcm_16000"
    output_format: str = "pcm_16000"
    # A private agent must be reached through a signed URL; a public one by agent_id alone.
    requires_auth: bool = True

    def __post_init__(self) -> None:
        for fmt in (self.input_format, self.output_format):
            if fmt not in AUDIO_FORMATS:
                raise ValueError(f"unknown audio format {fmt!r}")


@dataclass
class EmulatorConfig:
    api_keys: frozenset[str] = frozenset({DEFAULT_API_KEY})
    agents: dict[str, EmulatedAgent] = field(default_factory=dict)
    # Local runs accept any agent id with default settings; tests list their agents exactly.
    accept_unknown_agents: bool = True
    signed_url_ttl_seconds: int = 15 * 60
    signing_secret: bytes = field(default_factory=lambda: os.urandom(32))
    # Base of the signed URLs (e.g. "wss://emulator.example"); by default the request's own host.
    public_ws_url: str | None = None

    def agent(self, agent_id: str) -> EmulatedAgent | None:
        found = self.agents.get(agent_id)
        if found is None and self.accept_unknown_agents:
            return EmulatedAgent()
        return found

    def accepts_key(self, presented: str | None) -> bool:
        if not presented:
            return False
        # Compare against every key so timing does not reveal which one was close.
        matched = False
        for key in self.api_keys:
            matched |= hmac.compare_digest(presented.encode(), key.encode())
        return matched


# --- Conversation signatures (pure) ------------------------------------------------------------


def sign_conversation(config: EmulatorConfig, agent_id: str, *, now: float | None = None) -> str:
    expires = int((time.time() if now is None else now) + config.signed_url_ttl_seconds)
    nonce = secrets.token_urlsafe(12)
    return f"{expires}.{nonce}.{_mac(config, agent_id, expires, nonce)}"


def verify_conversation_signature(
    config: EmulatorConfig, agent_id: str, signature: str, *, now: float | None = None
) -> bool:
    """True when ``signature`` was issued by this emulator for ``agent_id`` and has not expired."""
    expires_text, _, rest = signature.partition(".")
    nonce, _, mac = rest.partition(".")
    if not expires_text.isdigit() or not nonce or not mac:
        return False
    expires = int(expires_text)
    if expires < (time.time() if now is None else now):
        return False
    return hmac.compare_digest(mac, _mac(config, agent_id, expires, nonce))


def _mac(config: EmulatorConfig, agent_id: str, expires: int, nonce: str) -> str:
    message = f"{agent_id}\n{expires}\n{nonce}".encode()
    digest = hmac.new(config.signing_secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


# --- HTTP endpoints ----------------------------------------------------------------------------


def _error(status: int, code: str, message: str) -> JSONResponse:
    # ElevenLabs shapes its errors as {"detail": {"status": ..., "message": ...}}.
    return JSONResponse({"detail": {"status": code, "message": message}}, status_code=status)


def _ws_base(config: EmulatorConfig, request: Request) -> str:
    if config.public_ws_url:
        return config.public_ws_url.rstrip("/")
    scheme = "wss" if request.url.scheme == "https" else "ws"
    return f"{scheme}://{request.url.netloc}"


async def get_signed_url(request: Request) -> JSONResponse:
    config: EmulatorConfig = request.app.state.emulator
    if not config.accepts_key(request.headers.get("xi-api-key")):
        return _error(401, "invalid_api_key", "Invalid API key")
    agent_id = request.query_params.get("agent_id")
    if not agent_id:
        # FastAPI's shape for a missing query parameter, as ElevenLabs answers it.
        return JSONResponse(
            {
                "detail": [
                    {
                        "type": "missing",
                        "loc": ["query", "agent_id"],
                        "msg": "Field required",
                        "input": None,
                    }
                ]
            },
            status_code=422,
        )
    if config.agent(agent_id) is None:
        return _error(404, "agent_not_found", f"Agent {agent_id} not found")
    query = urlencode(
        {"agent_id": agent_id, "conversation_signature": sign_conversation(config, agent_id)}
    )
    return JSONResponse({"signed_url": f"{_ws_base(config, request)}{CONVERSATION_PATH}?{query}"})


def routes() -> list[BaseRoute]:
    return [
        Route(f"{CONVERSATION_PATH}/get-signed-url", get_signed_url, methods=["GET"]),
        Route(f"{CONVERSATION_PATH}/get_signed_url", get_signed_url, methods=["GET"]),
    ]


def create_emulator_app(config: EmulatorConfig | None = None) -> Starlette:
    app = Starlette(routes=routes())
    app.state.emulator = config or EmulatorConfig()
    return app
