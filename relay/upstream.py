"""One call's WebSocket to its ElevenLabs agent, driven through the sans-I/O protocol.

``Upstream.open`` connects, sends the conversation initiation and waits for the conversation
metadata, all inside one deadline (a server that accepts TCP and then says nothing must not hold
a caller forever). ``events()`` then yields protocol events; after every received frame the
protocol's queued replies (pongs) are sent before anything else happens, so pings are answered at
once. When the socket closes, ``end()`` maps the close code and the last error message to how
the call ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from relay import metrics
from relay.protocol.close_codes import (
    UPSTREAM_PROTOCOL_ERROR,
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNAVAILABLE,
    CallEnd,
    end_from_upstream_close,
)
from relay.protocol.elevenlabs import (
    ConversationStarted,
    ElevenLabsProtocol,
    ProtocolViolation,
    UpstreamError,
    UpstreamEvent,
)

log = logging.getLogger(__name__)

# ElevenLabs' own SDK accepts frames this large; agent audio chunks are far smaller.
MAX_FRAME_BYTES = 16 * 1024 * 1024
CLOSE_TIMEOUT_SECONDS = 2.0


class UpstreamFailed(Exception):
    """The conversation could not be started; ``end`` says how the call ends."""

    def __init__(self, end: CallEnd, detail: str) -> None:
        super().__init__(detail)
        self.end = end
        self.detail = detail


class Upstream:
    def __init__(self, protocol: ElevenLabsProtocol) -> None:
        self.protocol = protocol
        self.last_error: UpstreamError | None = None
        # monotonic time the frame of the event being handled arrived (for the latency metric)
        self.received_at = 0.0
        self._ws: ClientConnection | None = None
        self._pending: list[UpstreamEvent] = []

    @classmethod
    async def open(
        cls, url: str, protocol: ElevenLabsProtocol, initiation: str, *, connect_timeout: float
    ) -> tuple[Upstream, ConversationStarted]:
        """Connect and start the conversation, or raise ``UpstreamFailed``."""
        upstream = cls(protocol)
        try:
            async with asyncio.timeout(connect_timeout):
                upstream._ws = await connect(
                    url,
                    compression=None,  # audio gains nothing from deflate, and it costs CPU
                    max_size=MAX_FRAME_BYTES,
                    open_timeout=None,  # the surrounding deadline covers the whole start
                    user_agent_header="voicerelay",
                )
                await upstream._ws.send(initiation)
                started = await upstream._await_metadata()
            return upstream, started
        except TimeoutError:
            upstream.abort()
            raise UpstreamFailed(UPSTREAM_TIMEOUT, "no conversation metadata in time") from None
        except ConnectionClosed as exc:
            upstream.abort()
            code = exc.rcvd.code if exc.rcvd is not None else None
            reason = exc.rcvd.reason if exc.rcvd is not None else ""
            raise UpstreamFailed(
                end_from_upstream_close(code, reason, upstream.last_error),
                "closed before the conversation started",
            ) from None
        except (OSError, InvalidHandshake, InvalidURI) as exc:
            upstream.abort()
            raise UpstreamFailed(UPSTREAM_UNAVAILABLE, type(exc).__name__) from None
        except BaseException:
            upstream.abort()
            raise

    @property
    def ws(self) -> ClientConnection:
        if self._ws is None:
            raise RuntimeError("the upstream is not connected")
        return self._ws

    async def _await_metadata(self) -> ConversationStarted:
        while True:
            frame = await self.ws.recv()
            events = self.protocol.receive_text(frame)
            await self._flush()
            for index, event in enumerate(events):
                if isinstance(event, ConversationStarted):
                    self._pending = events[index + 1 :]
                    return event
                if isinstance(event, UpstreamError):
                    self.last_error = event
                elif isinstance(event, ProtocolViolation):
                    raise UpstreamFailed(UPSTREAM_PROTOCOL_ERROR, event.detail)

    async def events(self) -> AsyncIterator[UpstreamEvent]:
        """Events until the socket closes (then see ``end``)."""
        pending, self._pending = self._pending, []
        for event in pending:
            yield event
        while True:
            try:
                frame = await self.ws.recv()
                received_at = time.monotonic()
                stale_before = self.protocol.stale_audio_dropped
                events = self.protocol.receive_text(frame)
                await self._flush()
            except ConnectionClosed:
                self.protocol.connection_closed()
                return
            if self.protocol.stale_audio_dropped != stale_before:
                metrics.STALE_AUDIO_DROPPED.inc(self.protocol.stale_audio_dropped - stale_before)
            for event in events:
                if isinstance(event, UpstreamError):
                    self.last_error = event
                self.received_at = received_at
                yield event

    def end(self) -> CallEnd:
        """How the call ends now that the socket has closed."""
        code = self.ws.close_code
        reason = self.ws.close_reason or ""
        return end_from_upstream_close(code, reason, self.last_error)

    async def send(self, text: str) -> bool:
        """Send one message; False if the socket is already closed (``events`` will end)."""
        try:
            await self.ws.send(text)
        except ConnectionClosed:
            return False
        return True

    async def close(self) -> None:
        """Close normally, waiting briefly for the agent's side of the closing handshake."""
        if self._ws is None:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                await self._ws.close(1000, "call ended")
        except (TimeoutError, OSError, ConnectionClosed):
            self.abort()

    def abort(self) -> None:
        if self._ws is not None:
            self._ws.transport.abort()

    async def _flush(self) -> None:
        for message in self.protocol.data_to_send():
            await self.ws.send(message)
