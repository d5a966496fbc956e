"""The Socket.IO side of the relay: admitting connections and routing client events to bridges.

Admission, in order (each refusal is a ``connect_error`` whose data is ``{code, message}``, and
one log line without the token): not draining → a call token in ``auth`` → its signature and
claims (JWKS) → the connection rate of the client's address and tenant → the call's session from
the control API (settings, upstream URL; refuses ended calls) → not a phone call's caller
(``forbidden``: that caller is the phone line, relay.phone) → the agent's allowed origins →
for a caller: a first connection before the token's connect-by, then a tenant slot. A caller
whose call is already bridged here attaches to it (``resumed: true``); otherwise a new bridge
starts the upstream conversation in the background, and ``call.ready`` follows when the agent
is there. The connect ack itself never waits on the agent.

With several replicas (``runtime.cluster``), where the call lives decides what a connect does:
its bridge is here → attach as above; a live replica owns it → the client becomes a remote
participant (relay.cluster.remote: rooms joined here, traffic forwarded to the owner); nobody
owns it, or its owner is dead → this replica claims the call and starts a bridge, a new upstream
conversation when the call had one before (``call.ready`` {resumed: true}, new conversation id).
Placement decisions for one call are serialized per replica (relay.placement, shared with the
phone streams). A phone call is pinned to its stream's replica: it is never taken over; a
watcher that finds its owner dead ends it.

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
from relay.bridge import EV_RECONNECT
from relay.cluster.registry import CallRecord
from relay.cluster.remote import RemoteCall, reject
from relay.eio_socket import RelaySocketIOServer
from relay.placement import CallPlacer, Placement, Refusal, RemotePlacement
from relay.protocol import client as wire
from relay.registry import Participant
from relay.runtime import RelayRuntime
from relay.sessions import CallSession, SessionError
from voicerelay.client_ip import scope_client_ip

log = logging.getLogger(__name__)

NAMESPACE = "/"
# Socket.IO framing around one binary audio attachment, with room to spare.
FRAME_OVERHEAD_BYTES = 16 * 1024
# How long a just-admitted connection may take to become fully connected (ack sent).
JOIN_WAIT_SECONDS = 5.0


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
        queue = getattr(self._socket(sid), "queue", None)
        return int(queue.qsize()) if queue is not None else 0

    def _socket(self, sid: str) -> Any:
        eio_sid = self._sio.manager.eio_sid_from_sid(sid, NAMESPACE)
        return self._sio.eio.sockets.get(eio_sid) if eio_sid is not None else None

    async def hand_off(self, sid: str, reason: str) -> None:
        await self._sio.emit(EV_RECONNECT, {"reason": reason}, room=sid, namespace=NAMESPACE)
        socket = self._socket(sid)
        queue = getattr(socket, "queue", None)
        if queue is None:
            return  # not connected here
        # End the WebSocket after what is queued, without an Engine.IO CLOSE packet or a
        # Socket.IO DISCONNECT: Socket.IO clients (socket.io-client and python-socketio alike)
        # treat that as a lost transport and reconnect on their own, whereas a server
        # disconnect is final for them. ``None`` is what Engine.IO's writer stops on.
        await queue.put(None)


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


def create_sio_server(
    runtime: RelayRuntime,
) -> tuple[socketio.AsyncServer, SioEmitter, RelayHandlers]:
    settings = runtime.settings
    sio_log, eio_log = _library_loggers()
    sio = RelaySocketIOServer(
        client_manager=runtime.manager,
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
    return sio, emitter, handlers


class RelayHandlers:
    def __init__(self, runtime: RelayRuntime, sio: socketio.AsyncServer) -> None:
        self._runtime = runtime
        self._sio = sio
        self._registry = runtime.registry
        self._max_audio = runtime.settings.relay_max_audio_chunk_bytes
        self._joins: set[asyncio.Task[None]] = set()
        self.placer = CallPlacer(runtime, max_audio_bytes=self._max_audio)

    # --- connect ------------------------------------------------------------------------------
    async def connect(self, sid: str, environ: Mapping[str, Any], auth: Any) -> None:
        scope = environ.get("asgi.scope") or {}
        ip = scope_client_ip(scope, self._runtime.settings.trusted_proxies)
        context: dict[str, str] = {"client_ip": ip}
        try:
            participant, placement = await self._admit(sid, environ, auth, ip, context)
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
        task = asyncio.create_task(self._join_when_connected(participant, placement))
        self._joins.add(task)
        task.add_done_callback(self._joins.discard)

    async def _admit(
        self,
        sid: str,
        environ: Mapping[str, Any],
        auth: Any,
        ip: str,
        context: dict[str, str],
    ) -> tuple[Participant, Placement]:
        runtime = self._runtime
        if runtime.drain.draining:
            raise Refusal("draining", "This relay is shutting down; connect again.")
        token = auth.get("token") if isinstance(auth, Mapping) else None
        if not isinstance(token, str) or not token:
            raise Refusal("unauthorized", "A call token is required: connect with auth {token}.")
        placer = self.placer
        claims = await placer.verify(token)
        context.update(call_id=str(claims.call_id), tenant_id=str(claims.tenant_id))
        context["role"] = claims.role
        retry_after = await runtime.rate_limiter.check(ip, claims.tenant_id)
        if retry_after is not None:
            raise Refusal(
                "rate_limited",
                f"Too many connections; retry in {math.ceil(retry_after)} s.",
            )
        session = await placer.session(token, claims)
        if claims.role == "caller" and session.direction != "browser":
            # A phone call's caller is its phone line (relay.phone); only monitors join here.
            raise Refusal("forbidden", "This call is a phone call; it cannot be joined as caller.")
        self._check_origin(environ, session)
        participant = Participant(
            sid=sid,
            call_id=claims.call_id,
            tenant_id=claims.tenant_id,
            role=claims.role,
            client_ip=ip,
            token=token,
        )
        local = placer.local_bridge(claims.call_id)
        if local is not None:
            return participant, local
        if runtime.cluster is None:
            if claims.role == "monitor":
                raise Refusal("not_ready", "The call is not in progress here; try again shortly.")
            bridge = await placer.new_bridge(claims, session)
            assert bridge is not None  # only a cluster claim can lose a race
            return participant, bridge
        async with placer.placement(claims.call_id):
            placement = await placer.place(claims, session)
        if isinstance(placement, RemotePlacement):
            participant.remote = True
        return participant, placement

    def _check_origin(self, environ: Mapping[str, Any], session: CallSession) -> None:
        allowed = session.agent.allowed_origins
        if not allowed:
            return
        origin = environ.get("HTTP_ORIGIN")
        if origin not in allowed:
            raise Refusal("forbidden", "This origin may not call this agent.")

    async def take_over(self, call: RemoteCall, record: CallRecord | None) -> bool:
        """A watcher found the owner of a call whose clients are here gone (or found the call
        owned here already): run it here. True when the participants are local now."""
        if record is not None and record.pinned:
            # A phone call cannot move: its owner's death ended it (the watcher then lets the
            # participants here go).
            await self.placer.end_orphan(record)
            return False
        async with self.placer.placement(call.call_id):
            bridge = self._registry.get(call.call_id)
            if bridge is None or bridge.ended:
                callers = [p for p in call.participants.values() if p.role == "caller"]
                if not callers or self._runtime.drain.draining:
                    return False  # the caller's replica (or another one) takes the call
                try:
                    session = await self._fresh_session(call, callers[0])
                    bridge = await self.placer.new_bridge(None, session, record)
                except Refusal as refusal:
                    log.warning(
                        "could not take the call over: %s",
                        refusal.code,
                        extra={"call_id": str(call.call_id)},
                    )
                    if refusal.code == "call_ended":
                        for sid in list(call.participants):
                            await self._sio.disconnect(sid, namespace=NAMESPACE)
                    return False
                if bridge is None:
                    return False
            for participant in list(call.participants.values()):
                if self._registry.participant(participant.sid) is participant:
                    participant.remote = False
                    await bridge.join(participant)
            call.participants.clear()
            return True

    async def _fresh_session(self, call: RemoteCall, caller: Participant) -> CallSession:
        """The call's session, fetched again: the upstream URL it holds may have expired."""
        if not caller.token:
            return call.session
        try:
            session = await self._runtime.sessions.fetch(caller.token)
        except SessionError as exc:
            raise Refusal(exc.code, exc.message) from None
        call.session = session
        return session

    async def _join_when_connected(self, participant: Participant, placement: Placement) -> None:
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
            if isinstance(placement, RemotePlacement):
                remotes = self._runtime.remotes
                assert remotes is not None
                await remotes.attach(participant, placement.record, placement.session)
            else:
                await placement.join(participant)
        except Exception:
            log.exception("could not add a participant to its call")

    # --- disconnect ---------------------------------------------------------------------------
    async def disconnect(self, sid: str, reason: Any = None) -> None:
        participant = self._registry.unbind(sid)
        if participant is None:
            return
        if participant.remote:
            if self._runtime.remotes is not None:
                await self._runtime.remotes.detach(participant)
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
        if participant.remote:
            remotes = self._runtime.remotes
            if isinstance(command, wire.EndCall) and participant.role == "monitor":
                await self._sio.disconnect(sid, namespace=NAMESPACE)
            elif remotes is not None:
                await remotes.forward(participant, event, data)
            return
        bridge = self._registry.get(participant.call_id)
        if bridge is None or bridge.ended:
            await self._reject(
                sid, wire.ClientRejection(wire.ErrorCode.call_ended, "This call has ended.")
            )
            return
        rejection = await bridge.handle(sid, participant.role, command)
        if rejection is not None:
            await self._reject(sid, rejection)

    async def _reject(self, sid: str, rejection: wire.ClientRejection) -> None:
        await reject(self._runtime.bridge_services.emitter, sid, rejection)
