"""The Socket.IO side of the relay: admitting connections and routing client events to bridges.

Admission, in order (each refusal is a ``connect_error`` whose data is ``{code, message}``, and
one log line without the token): not draining → a call token in ``auth`` → its signature and
claims (JWKS) → the connection rate of the client's address and tenant → the call's session from
the control API (settings, upstream URL; refuses ended calls) → the agent's allowed origins →
for a caller: a first connection before the token's connect-by, then a tenant slot. A caller
whose call is already bridged here attaches to it (``resumed: true``); otherwise a new bridge
starts the upstream conversation in the background, and ``call.ready`` follows when the agent
is there. The connect ack itself never waits on the agent.

Handlers run inline per connection (``async_handlers=False``): a client's audio frames reach the
agent in the order they were sent, and a slow upstream slows only its own call.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import socketio

from relay import metrics
from relay.admission import AdmissionUnavailable
from relay.bridge import CallBridge
from relay.jwks import KeysUnavailable
from relay.protocol import client as wire
from relay.protocol.close_codes import CALLER_HANGUP
from relay.registry import Participant
from relay.runtime import RelayRuntime
from relay.sessions import CallSession, SessionError
from voicerelay.call_token import CallTokenClaims, CallTokenError
from voicerelay.client_ip import scope_client_ip

log = logging.getLogger(__name__)

NAMESPACE = "/"
# Socket.IO framing around one binary audio attachment, with room to spare.
FRAME_OVERHEAD_BYTES = 16 * 1024
# How long a just-admitted connection may take to become fully connected (ack sent).
JOIN_WAIT_SECONDS = 5.0


class Refusal(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SioEmitter:
    """``relay.bridge.Emitter`` over python-socketio. Emits go to rooms through the manager, so
    a Redis-backed manager can route them to other replicas later."""

    def __init__(self, sio: socketio.AsyncServer) -> None:
        self._sio = sio

    async def emit(self, event: str, data: Any, *, room: str) -> None:
        await self._sio.emit(event, data, room=room, namespace=NAMESPACE)

    async def enter_room(self, sid: str, room: str) -> None:
        await self._sio.enter_room(sid, room, namespace=NAMESPACE)

    async def disconnect(self, sid: str) -> None:
        await self._sio.disconnect(sid, namespace=NAMESPACE)

    def backlog(self, sid: str) -> int:
        eio_sid = self._sio.manager.eio_sid_from_sid(sid, NAMESPACE)
        socket = self._sio.eio.sockets.get(eio_sid) if eio_sid is not None else None
        queue = getattr(socket, "queue", None)
        return int(queue.qsize()) if queue is not None else 0


class MalformedPacketLogFilter(logging.Filter):
    """Engine.IO logs a full traceback at ERROR for every undecodable packet a client sends;
    anyone could fill the logs that way. Those become one warning line, at most one a second."""

    MESSAGES = frozenset({"message async handler error", "Unknown receive error"})

    def __init__(self) -> None:
        super().__init__()
        self._last = -math.inf
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in self.MESSAGES:
            return True
        now = time.monotonic()
        if now - self._last < 1.0:
            self._suppressed += 1
            return False
        kind = type(record.exc_info[1]).__name__ if record.exc_info and record.exc_info[1] else "?"
        record.msg = "malformed Socket.IO packet from a client (%s); %d more not logged"
        record.args = (kind, self._suppressed)
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        self._last, self._suppressed = now, 0
        return True


def _library_loggers() -> tuple[logging.Logger, logging.Logger]:
    """Loggers for python-socketio and python-engineio: through our handlers (JSON), warnings
    and up (their INFO lines are per packet), malformed-packet tracebacks reduced to a line."""
    loggers = logging.getLogger("relay.socketio"), logging.getLogger("relay.engineio")
    for logger in loggers:
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
        if not any(isinstance(f, MalformedPacketLogFilter) for f in logger.filters):
            logger.addFilter(MalformedPacketLogFilter())
    return loggers


def create_sio_server(runtime: RelayRuntime) -> tuple[socketio.AsyncServer, SioEmitter]:
    settings = runtime.settings
    sio_log, eio_log = _library_loggers()
    sio = socketio.AsyncServer(
        async_mode="asgi",
        transports=["websocket"],
        # Origins are checked per agent in the connect handler ([] turns Engine.IO's check off).
        cors_allowed_origins=[],
        max_http_buffer_size=settings.relay_max_audio_chunk_bytes + FRAME_OVERHEAD_BYTES,
        async_handlers=False,
        logger=sio_log,
        engineio_logger=eio_log,
    )
    emitter = SioEmitter(sio)
    handlers = RelayHandlers(runtime, sio)
    sio.on("connect", handlers.connect, namespace=NAMESPACE)
    sio.on("disconnect", handlers.disconnect, namespace=NAMESPACE)
    sio.on("*", handlers.event, namespace=NAMESPACE)
    return sio, emitter


class RelayHandlers:
    def __init__(self, runtime: RelayRuntime, sio: socketio.AsyncServer) -> None:
        self._runtime = runtime
        self._sio = sio
        self._registry = runtime.registry
        self._max_audio = runtime.settings.relay_max_audio_chunk_bytes
        self._joins: set[asyncio.Task[None]] = set()

    # --- connect ------------------------------------------------------------------------------
    async def connect(self, sid: str, environ: Mapping[str, Any], auth: Any) -> None:
        scope = environ.get("asgi.scope") or {}
        ip = scope_client_ip(scope, self._runtime.settings.trusted_proxies)
        context: dict[str, str] = {"client_ip": ip}
        try:
            participant, bridge = await self._admit(sid, environ, auth, ip, context)
        except Refusal as refusal:
            metrics.CONNECT_REJECTED.labels(refusal.code).inc()
            log.info(
                "connection refused: %s (%s)",
                refusal.code,
                refusal.message,
                extra={**context, "code": refusal.code},
            )
            raise socketio.exceptions.ConnectionRefusedError(
                refusal.message, {"code": refusal.code, "message": refusal.message}
            ) from None
        except Exception:
            metrics.CONNECT_REJECTED.labels("internal_error").inc()
            log.exception("connection failed inside the relay", extra=context)
            message = "The relay could not take this connection; try again."
            raise socketio.exceptions.ConnectionRefusedError(
                message, {"code": "internal_error", "message": message}
            ) from None
        self._registry.bind(participant)
        task = asyncio.create_task(self._join_when_connected(participant, bridge))
        self._joins.add(task)
        task.add_done_callback(self._joins.discard)

    async def _admit(
        self,
        sid: str,
        environ: Mapping[str, Any],
        auth: Any,
        ip: str,
        context: dict[str, str],
    ) -> tuple[Participant, CallBridge]:
        runtime = self._runtime
        if runtime.drain.draining:
            raise Refusal("draining", "This relay is shutting down; connect again.")
        token = auth.get("token") if isinstance(auth, Mapping) else None
        if not isinstance(token, str) or not token:
            raise Refusal("unauthorized", "A call token is required: connect with auth {token}.")
        claims = await self._verify(token)
        context.update(call_id=str(claims.call_id), tenant_id=str(claims.tenant_id))
        context["role"] = claims.role
        retry_after = await runtime.rate_limiter.check(ip, claims.tenant_id)
        if retry_after is not None:
            raise Refusal(
                "rate_limited",
                f"Too many connections; retry in {math.ceil(retry_after)} s.",
            )
        session = await self._session(token, claims)
        self._check_origin(environ, session)
        participant = Participant(
            sid=sid,
            call_id=claims.call_id,
            tenant_id=claims.tenant_id,
            role=claims.role,
            client_ip=ip,
        )
        bridge = self._registry.get(claims.call_id)
        if self._registry.recently_ended(claims.call_id) or (bridge is not None and bridge.ended):
            raise Refusal("call_ended", "This call has ended.")
        if bridge is not None:
            return participant, bridge
        if claims.role == "monitor":
            raise Refusal("not_ready", "The call is not in progress here; try again shortly.")
        return participant, await self._new_bridge(claims, session)

    async def _verify(self, token: str) -> CallTokenClaims:
        try:
            return await self._runtime.verifier.verify(token)
        except KeysUnavailable:
            raise Refusal(
                "upstream_unavailable", "Call tokens cannot be checked right now; try again."
            ) from None
        except CallTokenError as exc:
            raise Refusal("unauthorized", f"The call token is not valid: {exc}.") from None

    async def _session(self, token: str, claims: CallTokenClaims) -> CallSession:
        try:
            session = await self._runtime.sessions.fetch(token)
        except SessionError as exc:
            raise Refusal(exc.code, exc.message) from None
        if session.call_id != claims.call_id or session.tenant_id != claims.tenant_id:
            raise Refusal("unauthorized", "The call token does not match its call.")
        return session

    def _check_origin(self, environ: Mapping[str, Any], session: CallSession) -> None:
        allowed = session.agent.allowed_origins
        if not allowed:
            return
        origin = environ.get("HTTP_ORIGIN")
        if origin not in allowed:
            raise Refusal("forbidden", "This origin may not call this agent.")

    async def _new_bridge(self, claims: CallTokenClaims, session: CallSession) -> CallBridge:
        runtime = self._runtime
        if session.status == "created" and not claims.may_first_connect():
            raise Refusal("unauthorized", "The call token's time to connect has passed.")
        try:
            held = await runtime.cap.acquire(
                claims.tenant_id, claims.call_id, session.tenant_max_concurrent_calls
            )
        except AdmissionUnavailable:
            raise Refusal(
                "upstream_unavailable", "The relay cannot admit calls right now; try again."
            ) from None
        if not held:
            raise Refusal("tenant_limit", "The tenant's limit of concurrent calls is reached.")
        # Everything below is synchronous: no other connect can slip in between the check and
        # the registration.
        existing = self._registry.get(claims.call_id)
        if existing is not None and not existing.ended:
            return existing  # another connection of this caller won the race
        if existing is not None or self._registry.recently_ended(claims.call_id):
            # The call ended meanwhile; its own release may have run before our acquire.
            await runtime.cap.release(claims.tenant_id, claims.call_id)
            raise Refusal("call_ended", "This call has ended.")
        if runtime.drain.draining:
            await runtime.cap.release(claims.tenant_id, claims.call_id)
            raise Refusal("draining", "This relay is shutting down; connect again.")
        bridge = CallBridge(runtime.bridge_services, session)
        self._registry.add(bridge)
        bridge.start()
        return bridge

    async def _join_when_connected(self, participant: Participant, bridge: CallBridge) -> None:
        # Events must not reach a client before its connect ack, and python-socketio sends the
        # ack only after this handler returns: wait until the manager marks the sid connected.
        loop = asyncio.get_running_loop()
        give_up = loop.time() + JOIN_WAIT_SECONDS
        delay = 0.0
        while not self._sio.manager.is_connected(participant.sid, NAMESPACE):
            if self._registry.participant(participant.sid) is not participant:
                return  # gone already
            if loop.time() > give_up:
                log.warning("connection never completed; dropping it")
                self._registry.unbind(participant.sid)
                return
            await asyncio.sleep(delay)
            delay = min(0.01, delay + 0.001)
        try:
            await bridge.join(participant)
        except Exception:
            log.exception("could not add a participant to its call")

    # --- disconnect ---------------------------------------------------------------------------
    async def disconnect(self, sid: str, reason: Any = None) -> None:
        participant = self._registry.unbind(sid)
        if participant is None:
            return
        bridge = self._registry.get(participant.call_id)
        if bridge is not None:
            bridge.leave(sid)

    # --- client events ------------------------------------------------------------------------
    async def event(self, event: Any, sid: str, *args: Any) -> None:
        participant = self._registry.participant(sid)
        if participant is None:
            return
        if not isinstance(event, str):
            await self._reject(
                sid, wire.ClientRejection(wire.ErrorCode.unknown_event, "Unknown event.")
            )
            return
        data: object = args[0] if len(args) == 1 else (args or None)
        command = wire.parse_client_event(
            event, data, role=participant.role, max_audio_bytes=self._max_audio
        )
        if isinstance(command, wire.ClientRejection):
            await self._reject(sid, command)
            return
        bridge = self._registry.get(participant.call_id)
        if bridge is None or bridge.ended:
            await self._reject(
                sid, wire.ClientRejection(wire.ErrorCode.call_ended, "This call has ended.")
            )
            return
        rejection: wire.ClientRejection | None
        if isinstance(command, wire.ClientAudio):
            rejection = await bridge.caller_audio(command.data)
        elif isinstance(command, wire.EndCall):
            rejection = None
            if participant.role == "monitor":
                await self._sio.disconnect(sid, namespace=NAMESPACE)
            else:
                bridge.end(CALLER_HANGUP)
        else:
            rejection = await bridge.caller_command(command)
        if rejection is not None:
            await self._reject(sid, rejection)

    async def _reject(self, sid: str, rejection: wire.ClientRejection) -> None:
        metrics.ERRORS.labels(rejection.code).inc()
        await self._sio.emit(
            wire.EV_ERROR,
            wire.error(rejection.code, rejection.message),
            room=sid,
            namespace=NAMESPACE,
        )
