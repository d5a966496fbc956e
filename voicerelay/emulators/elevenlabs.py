"""An ElevenLabs Conversational AI emulator: the signed-URL endpoint and the ConvAI WebSocket.

``create_emulator_app(config)`` returns a Starlette app serving:

- ``GET /v1/convai/conversation/get-signed-url`` (and the ``get_signed_url`` alias), the way
  ElevenLabs does: the ``xi-api-key`` header must be one of the configured keys, and the answer is
  ``{"signed_url": "ws://<this host>/v1/convai/conversation?agent_id=...&conversation_signature=..."}``.
  The signature is an HMAC under a per-process secret, valid ``signed_url_ttl_seconds``.
- ``/v1/convai/conversation?agent_id=...[&conversation_signature=...]``, the ConvAI WebSocket.
  A private agent (``requires_auth``) needs a valid, unexpired signature for that agent; a public
  one needs none. A refused socket is accepted and closed at once with 1008 and the reason
  ``"<why>: <message>"``, ``<why>`` being ``missing_agent_id``, ``agent_not_found``,
  ``signature_required`` or ``invalid_signature`` (invalid or expired); with
  ``EmulatorConfig.refuse_with="http"`` the handshake is answered HTTP 403 instead. A client
  offering the ``convai`` subprotocol (the JS SDK) gets it.
  What the agent says and does is in ``convai_script.py``; this module only moves frames.
- ``GET /_emulator/conversations/{conversation_id}``: that conversation's counters (no texts).

Each conversation's ``ConversationStats`` stays in ``app.state.conversations`` (the most recent
``EmulatorConfig.keep_conversations``) so tests can assert on them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from voicerelay.emulators import twilio_rest
from voicerelay.emulators.audio import AUDIO_FORMATS
from voicerelay.emulators.convai_script import (
    Close,
    ConvAIScript,
    ConversationStats,
    EmulatedAgent,
    SendText,
    close_reason,
)
from voicerelay.emulators.twilio_rest import TwilioRestConfig

__all__ = [
    "AUDIO_FORMATS",
    "CONVERSATION_PATH",
    "DEFAULT_API_KEY",
    "ConversationLog",
    "EmulatedAgent",
    "EmulatorConfig",
    "create_emulator_app",
    "sign_conversation",
    "verify_conversation_signature",
]

CONVERSATION_PATH = "/v1/convai/conversation"
# The key `voicerelay emulator` accepts when started without --api-key (local runs only).
DEFAULT_API_KEY = "sk_emulator_local_development_key"


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
    # What an agent id not listed in ``agents`` gets when ``accept_unknown_agents`` is on.
    default_agent: EmulatedAgent = field(default_factory=EmulatedAgent)
    keep_conversations: int = 10_000
    # How a conversation socket is refused (no agent, unknown agent, missing or bad signature):
    # "close" accepts it and closes 1008 with "<why>: <message>"; "http" answers the handshake
    # with HTTP 403 and no body.
    refuse_with: Literal["close", "http"] = "close"

    def agent(self, agent_id: str) -> EmulatedAgent | None:
        found = self.agents.get(agent_id)
        if found is None and self.accept_unknown_agents:
            return self.default_agent
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


# --- Conversations ----------------------------------------------------------------------------


class ConversationLog:
    """The most recent conversations' stats, by conversation id (bounded for load tests)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._items: OrderedDict[str, ConversationStats] = OrderedDict()

    def add(self, stats: ConversationStats) -> None:
        self._items[stats.conversation_id] = stats
        while len(self._items) > self._limit:
            self._items.popitem(last=False)

    def get(self, conversation_id: str) -> ConversationStats | None:
        return self._items.get(conversation_id)

    def latest(self) -> ConversationStats | None:
        return next(reversed(self._items.values()), None)

    def __iter__(self) -> Iterator[ConversationStats]:
        return iter(list(self._items.values()))

    def __len__(self) -> int:
        return len(self._items)


def new_conversation_id() -> str:
    return "conv_" + secrets.token_hex(13)


def _refusal(config: EmulatorConfig, websocket: WebSocket) -> tuple[str, str] | None:
    """Why the handshake is refused, as (status, message), or None to accept it."""
    agent_id = websocket.query_params.get("agent_id")
    if not agent_id:
        return "missing_agent_id", "agent_id is required"
    agent = config.agent(agent_id)
    if agent is None:
        return "agent_not_found", f"Agent {agent_id} not found"
    if not agent.requires_auth:
        return None
    signature = websocket.query_params.get("conversation_signature")
    if not signature:
        return "signature_required", "This agent requires a signed URL (conversation_signature)"
    if not verify_conversation_signature(config, agent_id, signature):
        return "invalid_signature", "The conversation signature is invalid or expired"
    return None


# Incoming frames queued between the reader task and the conversation loop; a full queue stops
# reading, so a flooding client is slowed down by TCP instead of growing memory.
_INBOX_SIZE = 256


@dataclass(frozen=True)
class _Disconnected:
    code: int | None
    reason: str | None


async def _read_frames(
    websocket: WebSocket, inbox: asyncio.Queue[str | bytes | _Disconnected]
) -> None:
    while True:
        try:
            message = await websocket.receive()
        except (OSError, RuntimeError):
            # Whatever broke the socket, the conversation loop must hear that it is over.
            await inbox.put(_Disconnected(None, "receive failed"))
            return
        if message["type"] == "websocket.disconnect":
            await inbox.put(_Disconnected(message.get("code"), message.get("reason")))
            return
        text = message.get("text")
        await inbox.put(text if text is not None else message.get("bytes") or b"")


async def _send_outgoing(websocket: WebSocket, script: ConvAIScript) -> bool:
    """Send what the script queued; False once the connection is gone."""
    for item in script.data_to_send():
        try:
            if isinstance(item, SendText):
                await websocket.send_text(item.text)
            elif isinstance(item, Close):
                await websocket.close(item.code, item.reason)
                return False
        except (OSError, RuntimeError):
            # The client went away while we were talking (uvicorn raises ClientDisconnected,
            # an OSError; Starlette a RuntimeError once the socket is closed).
            script.connection_lost(None, "send failed")
            return False
    return True


async def conversation_socket(websocket: WebSocket) -> None:
    config: EmulatorConfig = websocket.app.state.emulator
    refusal = _refusal(config, websocket)
    if refusal is not None:
        status, message = refusal
        if config.refuse_with == "http":
            await websocket.close(1008)  # before accept: the server answers HTTP 403
            return
        await websocket.accept()
        await websocket.close(1008, close_reason(f"{status}: {message}"))
        return
    agent_id = websocket.query_params["agent_id"]
    agent = config.agent(agent_id)
    assert agent is not None  # checked by _refusal
    offered = websocket.scope.get("subprotocols") or []
    await websocket.accept(subprotocol="convai" if "convai" in offered else None)
    loop = asyncio.get_running_loop()
    script = ConvAIScript(
        agent, agent_id=agent_id, conversation_id=new_conversation_id(), now=loop.time()
    )
    websocket.app.state.conversations.add(script.stats)
    inbox: asyncio.Queue[str | bytes | _Disconnected] = asyncio.Queue(_INBOX_SIZE)
    reader = asyncio.create_task(_read_frames(websocket, inbox))
    try:
        await _converse(websocket, script, inbox, loop)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader


async def _converse(
    websocket: WebSocket,
    script: ConvAIScript,
    inbox: asyncio.Queue[str | bytes | _Disconnected],
    loop: asyncio.AbstractEventLoop,
) -> None:
    now = loop.time()
    while True:
        script.tick(now)
        if not await _send_outgoing(websocket, script) or script.closed:
            return
        if inbox.empty():
            deadline = script.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                item = await asyncio.wait_for(inbox.get(), timeout)
            except TimeoutError:
                # asyncio may wake a timer a clock tick early; for the script it has passed.
                now = max(loop.time(), deadline or 0.0)
                continue
        else:
            item = inbox.get_nowait()
        now = loop.time()
        if isinstance(item, _Disconnected):
            script.connection_lost(item.code, item.reason)
            return
        if isinstance(item, str):
            script.receive_text(item, now)
        else:
            script.receive_bytes(item, now)


async def conversation_counters(request: Request) -> JSONResponse:
    found = request.app.state.conversations.get(request.path_params["conversation_id"])
    if found is None:
        return _error(404, "conversation_not_found", "No such conversation")
    return JSONResponse(found.counters())


def routes() -> list[BaseRoute]:
    return [
        Route(f"{CONVERSATION_PATH}/get-signed-url", get_signed_url, methods=["GET"]),
        Route(f"{CONVERSATION_PATH}/get_signed_url", get_signed_url, methods=["GET"]),
        WebSocketRoute(CONVERSATION_PATH, conversation_socket),
        Route("/_emulator/conversations/{conversation_id}", conversation_counters, methods=["GET"]),
    ]


def create_emulator_app(
    config: EmulatorConfig | None = None, *, twilio: TwilioRestConfig | None = None
) -> Starlette:
    """ElevenLabs, plus Twilio's REST Calls resource (``twilio_rest.py``) on the same server."""
    app = Starlette(routes=[*routes(), *twilio_rest.routes()])
    app.state.twilio_rest = twilio or TwilioRestConfig(accept_unknown_calls=True)
    app.state.emulator = config or EmulatorConfig()
    app.state.conversations = ConversationLog(app.state.emulator.keep_conversations)
    return app
