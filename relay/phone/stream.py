"""``/twilio/stream``: the Twilio Media Streams WebSocket of phone calls (plain ASGI).

Twilio connects (any replica; the URL has no query string), sends ``connected`` and ``start``.
Admission, in order, each refusal a close with a documented code (relay.phone.closes) and one
log line without the token: not draining → ``start`` within RELAY_TWILIO_START_TIMEOUT_SECONDS
(frames before it must be valid) → ``customParameters.token`` → its signature and claims (a
caller's token) → the tenant's connection rate (not the address's: every tenant's streams come
from Twilio's media servers) → the call's session (a phone call whose Twilio CallSid is
``start.callSid``) → the tenant slot and a bridge started **here** at once, upstream included,
while Twilio is still sending the first audio (relay.placement.CallPlacer.place_pinned).

Then every frame goes through relay.protocol.twilio: caller audio to the leg (held until the
agent is ready), mark echoes to its playback tracker, key presses to the agent; ``stop`` or the
socket closing is the caller hanging up; a protocol violation ends the call and closes the stream
with its code. When the call ends for any other reason than the caller or a transfer, the
control API is asked to hang the phone call up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from relay import metrics
from relay.bridge import CallBridge
from relay.phone.closes import close_code_for
from relay.phone.control import PhoneControl
from relay.phone.leg import PhoneLeg
from relay.placement import CallPlacer, Refusal
from relay.protocol.twilio import (
    Dtmf,
    Ignored,
    Mark,
    Media,
    Start,
    Stop,
    TwilioStreamProtocol,
    Violation,
)
from relay.runtime import RelayRuntime
from voicerelay.client_ip import scope_client_ip

log = logging.getLogger(__name__)

STREAM_PATH = "/twilio/stream"
_DISCONNECTED = None


class AsgiSocket:
    """The few WebSocket operations the stream needs, over raw ASGI messages. Sends after the
    peer left raise (the writer treats that as the caller gone)."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self.disconnected = False
        self._closed = False

    async def accept(self) -> bool:
        message = await self._receive()
        if message["type"] != "websocket.connect":
            return False
        await self._send({"type": "websocket.accept"})
        return True

    async def receive(self) -> str | bytes | None:
        """The next frame; None once the peer is gone."""
        if self.disconnected:
            return _DISCONNECTED
        message: Message = await self._receive()
        if message["type"] == "websocket.receive":
            text = message.get("text")
            if text is not None:
                return str(text)
            data = message.get("bytes")
            return bytes(data) if data is not None else b""
        self.disconnected = True
        return _DISCONNECTED

    async def send_text(self, text: str) -> None:
        await self._send({"type": "websocket.send", "text": text})

    async def close(self, code: int, reason: str) -> None:
        if self._closed or self.disconnected:
            return
        self._closed = True
        await self._send({"type": "websocket.close", "code": code, "reason": reason[:120]})


class StreamRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TwilioStreamEndpoint:
    def __init__(self, runtime: RelayRuntime, placer: CallPlacer) -> None:
        self._runtime = runtime
        self._placer = placer
        self._settings = runtime.settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        socket = AsgiSocket(receive, send)
        if not await socket.accept():
            return
        settings = self._settings
        ip = scope_client_ip(scope, settings.trusted_proxies)
        context: dict[str, str] = {"client_ip": ip}
        protocol = TwilioStreamProtocol(max_message_bytes=settings.relay_twilio_max_message_bytes)
        leg: PhoneLeg | None = None
        try:
            if self._runtime.drain.draining:
                raise StreamRefused("draining", "This relay is shutting down.")
            start = await self._await_start(socket, protocol)
            context["call_sid"] = start.call_sid
            leg = self._new_leg(socket, protocol, start)
            bridge = await self._admit(start, leg, context)
        except StreamRefused as refusal:
            if leg is not None:
                leg.discard()
            await self._refuse(socket, refusal, context)
            return
        except Exception:
            if leg is not None:
                leg.discard()
            log.exception("phone stream failed inside the relay", extra=context)
            await self._refuse(
                socket, StreamRefused("internal_error", "internal error"), context, logged=True
            )
            return
        metrics.PHONE_STREAMS.labels("accepted").inc()
        log.info("phone stream connected", extra=context)
        await self._serve(socket, protocol, bridge, leg, context)

    async def _refuse(
        self,
        socket: AsgiSocket,
        refusal: StreamRefused,
        context: dict[str, str],
        *,
        logged: bool = False,
    ) -> None:
        metrics.PHONE_STREAMS.labels(refusal.code).inc()
        if not logged:
            log.info(
                "phone stream refused: %s (%s)",
                refusal.code,
                refusal.message,
                extra={**context, "code": refusal.code},
            )
        # The peer may be gone already; there is nothing left to tell it then.
        with contextlib.suppress(Exception):
            await socket.close(close_code_for(refusal.code), refusal.code)

    async def _await_start(self, socket: AsgiSocket, protocol: TwilioStreamProtocol) -> Start:
        try:
            async with asyncio.timeout(self._settings.relay_twilio_start_timeout_seconds):
                while True:
                    frame = await socket.receive()
                    if frame is None:
                        raise StreamRefused("missing_start", "closed before start")
                    event = protocol.receive(frame)
                    if isinstance(event, Start):
                        return event
                    if isinstance(event, Violation):
                        metrics.PHONE_STREAM_VIOLATIONS.labels(event.code).inc()
                        raise StreamRefused(event.code, event.detail)
                    if isinstance(event, Ignored):
                        metrics.PHONE_IGNORED_EVENTS.inc()
        except TimeoutError:
            raise StreamRefused("start_timeout", "no start in time") from None

    def _new_leg(
        self, socket: AsgiSocket, protocol: TwilioStreamProtocol, start: Start
    ) -> PhoneLeg:
        runtime, settings = self._runtime, self._settings
        return PhoneLeg(
            protocol=protocol,
            send=socket.send_text,
            close=socket.close,
            control=PhoneControl.from_settings(runtime.http, settings),
            token=start.custom_parameters.get("token", ""),
            transfer_tool=settings.twilio_transfer_tool_name,
            prebuffer_ms=settings.relay_phone_prebuffer_ms,
            max_queued_chunks=settings.relay_client_queue_chunks,
        )

    async def _admit(self, start: Start, leg: PhoneLeg, context: dict[str, str]) -> CallBridge:
        runtime, placer = self._runtime, self._placer
        token = start.custom_parameters.get("token")
        if not token:
            raise StreamRefused("unauthorized", "no token parameter")
        try:
            claims = await placer.verify(token)
            context.update(call_id=str(claims.call_id), tenant_id=str(claims.tenant_id))
            if claims.role != "caller":
                raise StreamRefused("forbidden", "not a caller's token")
            retry_after = await runtime.rate_limiter.check_tenant(claims.tenant_id)
            if retry_after is not None:
                raise StreamRefused("rate_limited", "too many connections")
            session = await placer.session(token, claims)
            telephony = session.telephony
            if not session.is_phone or telephony is None:
                raise StreamRefused("not_a_phone_call", "the call is not a phone call")
            if start.call_sid != telephony.call_sid or start.account_sid != telephony.account_sid:
                raise StreamRefused("call_mismatch", "callSid is not the call's")
            bridge = await placer.place_pinned(claims, session, leg.attach)
        except Refusal as refusal:
            raise StreamRefused(refusal.code, refusal.message) from None
        if bridge.phone is not leg:
            raise StreamRefused("call_in_progress", "the call already has its stream")
        return bridge

    async def _serve(
        self,
        socket: AsgiSocket,
        protocol: TwilioStreamProtocol,
        bridge: CallBridge,
        leg: PhoneLeg,
        context: dict[str, Any],
    ) -> None:
        ignored = protocol.ignored_events
        try:
            while True:
                frame = await socket.receive()
                if frame is None:
                    break
                event = protocol.receive(frame)
                if isinstance(event, Media):
                    await leg.caller_audio(event.payload, event.encoded)
                elif isinstance(event, Mark):
                    leg.mark_echoed(event.name)
                elif isinstance(event, Dtmf):
                    await leg.dtmf(event.digit)
                elif isinstance(event, Stop):
                    leg.hung_up()
                elif isinstance(event, Violation):
                    metrics.PHONE_STREAM_VIOLATIONS.labels(event.code).inc()
                    log.warning(
                        "phone stream broke the protocol: %s (%s)",
                        event.code,
                        event.detail,
                        extra={**context, "code": event.code},
                    )
                    leg.protocol_error(event.code, close_code_for(event.code))
                    break
                if protocol.ignored_events != ignored:
                    metrics.PHONE_IGNORED_EVENTS.inc(protocol.ignored_events - ignored)
                    ignored = protocol.ignored_events
        finally:
            if not bridge.ended:
                leg.hung_up()
            await bridge.wait_ended()
            await leg.close()
        await leg.hang_up_if_needed()
