"""Twilio's side of a bidirectional Media Stream (``<Connect><Stream>``), for tests, benchmarks
and load tests.

Two layers:

- A sans-I/O core: ``StreamMessages`` builds what Twilio sends (exact shapes: numeric-looking
  fields are strings, ``streamSid`` on every message, ``mediaFormat`` always μ-law 8 kHz mono),
  ``parse_server_message`` reads what a server sends Twilio (``media``, ``mark``, ``clear``) and
  ``PlaybackClock`` plays received audio at 8000 bytes/s to know when Twilio would echo each
  ``mark`` (after the audio sent before it has played; all pending marks at once on ``clear``).
  Nothing here touches a socket or a clock: times are passed in.
- ``MediaStreamsCaller``: a real WebSocket client (``websockets``, compression off) that sends
  ``connected`` and ``start``, streams audio in 20 ms ``media`` messages on a real-time schedule,
  collects what the server sends and echoes marks as playback reaches them.

Importable without locust or gevent; the locust phone user reuses the core with its own socket.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

import websockets
from websockets.asyncio.client import ClientConnection, connect

SAMPLE_RATE: Final = 8000
# μ-law is one byte per sample: 8000 bytes are one second of audio.
BYTES_PER_SECOND: Final = SAMPLE_RATE
FRAME_MS: Final = 20
FRAME_BYTES: Final = BYTES_PER_SECOND * FRAME_MS // 1000
ULAW_SILENCE: Final = b"\xff"
MEDIA_FORMAT: Final = {"encoding": "audio/x-mulaw", "sampleRate": SAMPLE_RATE, "channels": 1}
DTMF_DIGITS: Final = frozenset("0123456789*#ABCD")


def twilio_sid(prefix: str) -> str:
    """A fresh identifier shaped like Twilio's: two letters and 32 hex digits."""
    return prefix + uuid.uuid4().hex


# --- Messages Twilio sends ----------------------------------------------------------------------


class StreamMessages:
    """Builds the messages of one stream, in order, numbering them as Twilio does.

    ``sequenceNumber`` counts every message from 1; ``media.chunk`` counts media messages from 1;
    ``media.timestamp`` is the position of the chunk in the stream in milliseconds.
    """

    def __init__(
        self,
        *,
        stream_sid: str | None = None,
        call_sid: str | None = None,
        account_sid: str | None = None,
    ) -> None:
        self.stream_sid = stream_sid or twilio_sid("MZ")
        self.call_sid = call_sid or twilio_sid("CA")
        self.account_sid = account_sid or twilio_sid("AC")
        self._sequence = 0
        self._chunk = 0
        self._media_bytes = 0

    @property
    def media_bytes(self) -> int:
        """Audio bytes sent so far in ``media`` messages."""
        return self._media_bytes

    def _next(self) -> str:
        self._sequence += 1
        return str(self._sequence)

    def connected(self) -> dict[str, Any]:
        # The one message without streamSid or sequenceNumber: the stream does not exist yet.
        return {"event": "connected", "protocol": "Call", "version": "1.0.0"}

    def start(self, custom_parameters: Mapping[str, str]) -> dict[str, Any]:
        return {
            "event": "start",
            "sequenceNumber": self._next(),
            "start": {
                "accountSid": self.account_sid,
                "streamSid": self.stream_sid,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "mediaFormat": dict(MEDIA_FORMAT),
                "customParameters": dict(custom_parameters),
            },
            "streamSid": self.stream_sid,
        }

    def media(self, ulaw: bytes) -> dict[str, Any]:
        self._chunk += 1
        timestamp_ms = self._media_bytes * 1000 // BYTES_PER_SECOND
        self._media_bytes += len(ulaw)
        return {
            "event": "media",
            "sequenceNumber": self._next(),
            "media": {
                "track": "inbound",
                "chunk": str(self._chunk),
                "timestamp": str(timestamp_ms),
                "payload": base64.b64encode(ulaw).decode("ascii"),
            },
            "streamSid": self.stream_sid,
        }

    def dtmf(self, digit: str) -> dict[str, Any]:
        if digit not in DTMF_DIGITS:
            raise ValueError(f"not a DTMF digit: {digit!r}")
        return {
            "event": "dtmf",
            "streamSid": self.stream_sid,
            "sequenceNumber": self._next(),
            "dtmf": {"track": "inbound_track", "digit": digit},
        }

    def mark(self, name: str) -> dict[str, Any]:
        """The echo of a mark the server sent (its audio has played, or it was cleared)."""
        return {
            "event": "mark",
            "sequenceNumber": self._next(),
            "streamSid": self.stream_sid,
            "mark": {"name": name},
        }

    def stop(self) -> dict[str, Any]:
        return {
            "event": "stop",
            "sequenceNumber": self._next(),
            "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
            "streamSid": self.stream_sid,
        }


def encode(message: Mapping[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


def frames(ulaw: bytes, frame_bytes: int = FRAME_BYTES) -> list[bytes]:
    """Audio cut into media payloads; the last one keeps whatever is left (not padded, so
    what arrives at the agent is byte for byte what was sent)."""
    return [ulaw[i : i + frame_bytes] for i in range(0, len(ulaw), frame_bytes)]


# --- Messages a server sends Twilio -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerMedia:
    payload: bytes


@dataclass(frozen=True, slots=True)
class ServerMark:
    name: str


@dataclass(frozen=True, slots=True)
class ServerClear:
    pass


@dataclass(frozen=True, slots=True)
class InvalidServerMessage:
    """Something Twilio would not accept; ``reason`` says why."""

    reason: str
    raw: str | bytes


ServerMessage: TypeAlias = ServerMedia | ServerMark | ServerClear | InvalidServerMessage


def parse_server_message(raw: str | bytes, stream_sid: str) -> ServerMessage:
    """One WebSocket message from the server, checked against Twilio's rules. Never raises."""
    if isinstance(raw, bytes):
        return InvalidServerMessage("binary frame (Twilio takes JSON text only)", raw)
    try:
        message = json.loads(raw)
    except ValueError:
        return InvalidServerMessage("not JSON", raw)
    if not isinstance(message, dict):
        return InvalidServerMessage("not a JSON object", raw)
    event = message.get("event")
    if message.get("streamSid") != stream_sid:
        return InvalidServerMessage(f"{event}: streamSid is not this stream's", raw)
    if event == "media":
        media = message.get("media")
        payload = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(payload, str):
            return InvalidServerMessage("media without media.payload", raw)
        try:
            return ServerMedia(base64.b64decode(payload, validate=True))
        except binascii.Error:
            return InvalidServerMessage("media.payload is not base64", raw)
    if event == "mark":
        mark = message.get("mark")
        name = mark.get("name") if isinstance(mark, dict) else None
        if not isinstance(name, str):
            return InvalidServerMessage("mark without mark.name", raw)
        return ServerMark(name)
    if event == "clear":
        return ServerClear()
    return InvalidServerMessage(f"unknown event {event!r}", raw)


# --- Playback -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cleared:
    """What a ``clear`` did: marks echoed at once, and the audio it cut off."""

    marks: list[str]
    discarded_bytes: int


class PlaybackClock:
    """Twilio's playback buffer, in time: received audio plays back to back at 8000 bytes/s.

    A mark is due when all audio received before it has played. ``clear`` drops what has not
    played yet and makes every pending mark due at once. Times are seconds on any monotonic clock.
    """

    def __init__(self) -> None:
        self._busy_until = 0.0
        self._pending: deque[tuple[float, str]] = deque()
        self.received_bytes = 0
        self.discarded_bytes = 0

    def audio(self, nbytes: int, now: float) -> None:
        self._busy_until = max(self._busy_until, now) + nbytes / BYTES_PER_SECOND
        self.received_bytes += nbytes

    def mark(self, name: str, now: float) -> None:
        self._pending.append((max(self._busy_until, now), name))

    def due(self, now: float) -> list[str]:
        """Marks whose audio has played by ``now``, in the order they were received."""
        names: list[str] = []
        while self._pending and self._pending[0][0] <= now:
            names.append(self._pending.popleft()[1])
        return names

    def next_due(self) -> float | None:
        return self._pending[0][0] if self._pending else None

    def clear(self, now: float) -> Cleared:
        unplayed = round(max(0.0, self._busy_until - now) * BYTES_PER_SECOND)
        self.discarded_bytes += unplayed
        self._busy_until = min(self._busy_until, now)
        marks = [name for _, name in self._pending]
        self._pending.clear()
        return Cleared(marks, unplayed)

    def played_bytes(self, now: float) -> int:
        """Audio the caller has heard by ``now``."""
        unplayed = round(max(0.0, self._busy_until - now) * BYTES_PER_SECOND)
        return self.received_bytes - self.discarded_bytes - unplayed

    @property
    def pending_marks(self) -> int:
        return len(self._pending)


# --- The WebSocket client -----------------------------------------------------------------------

EventKind: TypeAlias = Literal["media", "mark", "clear", "invalid"]


@dataclass(frozen=True, slots=True)
class ReceivedEvent:
    """One message from the server, with its arrival time (``time.monotonic()``)."""

    kind: EventKind
    at: float
    payload: bytes = b""
    name: str = ""
    reason: str = ""


@dataclass
class CallerStats:
    media_sent: int = 0
    marks_received: int = 0
    marks_echoed: int = 0
    clears: int = 0
    invalid: int = 0
    echoed_marks: list[str] = field(default_factory=list)


class MediaStreamsCaller:
    """Twilio's WebSocket to a Media Streams server, for one call.

    Use ``async with MediaStreamsCaller.connect(url, custom_parameters={"token": ...}) as c:``.
    ``playback=False`` never echoes marks (a caller whose audio never finishes playing).
    """

    def __init__(
        self, ws: ClientConnection, messages: StreamMessages, *, playback: bool = True
    ) -> None:
        self.ws = ws
        self.messages = messages
        self.playback = PlaybackClock()
        self.stats = CallerStats()
        self.events: list[ReceivedEvent] = []
        # Kept as it arrives: waits re-check received_audio() after every message.
        self._audio = bytearray()
        self.started_at: float | None = None
        self.first_audio_at: float | None = None
        self._echo_marks = playback
        self._send_lock = asyncio.Lock()
        self._changed = asyncio.Condition()
        self._playback_wakeup = asyncio.Event()
        self._next_frame_at: float | None = None
        self._receiving_done = False
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        url: str,
        *,
        custom_parameters: Mapping[str, str] | None = None,
        call_sid: str | None = None,
        stream_sid: str | None = None,
        account_sid: str | None = None,
        playback: bool = True,
        handshake: bool = True,
        additional_headers: Mapping[str, str] | None = None,
        open_timeout: float = 10.0,
    ) -> AsyncIterator[MediaStreamsCaller]:
        """Open the socket and (``handshake=True``) send ``connected`` and ``start`` at once,
        as Twilio does. ``handshake=False`` sends nothing, for tests of a missing ``start``."""
        ws = await connect(
            url,
            compression=None,
            open_timeout=open_timeout,
            additional_headers=dict(additional_headers or {}),
            max_size=1024 * 1024,
        )
        messages = StreamMessages(stream_sid=stream_sid, call_sid=call_sid, account_sid=account_sid)
        caller = cls(ws, messages, playback=playback)
        caller._tasks = [
            asyncio.create_task(caller._receive()),
            asyncio.create_task(caller._play()),
        ]
        try:
            if handshake:
                await caller.send_message(messages.connected())
                await caller.send_start(custom_parameters or {})
            yield caller
        finally:
            await caller.close()

    # --- Sending ---

    async def send_message(self, message: Mapping[str, Any]) -> None:
        await self.ws.send(encode(message))

    async def send_raw(self, data: str | bytes) -> None:
        """Anything at all, for tests of bad input."""
        await self.ws.send(data)

    async def send_start(self, custom_parameters: Mapping[str, str]) -> None:
        self.started_at = time.monotonic()
        await self.send_message(self.messages.start(custom_parameters))

    async def send_audio(self, ulaw: bytes, *, pace: bool = True) -> None:
        """μ-law 8 kHz audio in 20 ms ``media`` messages. Paced, they follow an absolute
        real-time schedule that continues across calls (a late frame goes out at once and the
        schedule carries on, so there is no drift); after a pause the schedule restarts now."""
        period = FRAME_MS / 1000
        now = time.monotonic()
        if self._next_frame_at is None or self._next_frame_at < now - period:
            self._next_frame_at = now
        for payload in frames(ulaw):
            if pace:
                delay = self._next_frame_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                self._next_frame_at += period
            async with self._send_lock:
                await self.send_message(self.messages.media(payload))
            self.stats.media_sent += 1

    async def send_silence(self, seconds: float, *, pace: bool = True) -> None:
        await self.send_audio(ULAW_SILENCE * round(seconds * BYTES_PER_SECOND), pace=pace)

    async def send_dtmf(self, digit: str) -> None:
        async with self._send_lock:
            await self.send_message(self.messages.dtmf(digit))

    async def stop(self) -> None:
        """The caller hangs up: ``stop``, then the socket closes."""
        with contextlib.suppress(websockets.ConnectionClosed):
            async with self._send_lock:
                await self.send_message(self.messages.stop())
        await self.ws.close()

    async def close(self) -> None:
        await self.ws.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- Receiving ---

    async def _receive(self) -> None:
        try:
            async for raw in self.ws:
                await self._handle(raw)
        except websockets.ConnectionClosed:
            pass
        finally:
            self._receiving_done = True
            async with self._changed:
                self._changed.notify_all()

    async def _handle(self, raw: str | bytes) -> None:
        now = time.monotonic()
        message = parse_server_message(raw, self.messages.stream_sid)
        if isinstance(message, ServerMedia):
            event = ReceivedEvent("media", now, payload=message.payload)
            if self.first_audio_at is None:
                self.first_audio_at = now
            self._audio += message.payload
            self.playback.audio(len(message.payload), now)
        elif isinstance(message, ServerMark):
            event = ReceivedEvent("mark", now, name=message.name)
            self.stats.marks_received += 1
            if self._echo_marks:
                self.playback.mark(message.name, now)
        elif isinstance(message, ServerClear):
            event = ReceivedEvent("clear", now)
            self.stats.clears += 1
            await self._echo(self.playback.clear(now).marks)
        else:
            event = ReceivedEvent("invalid", now, reason=message.reason)
            self.stats.invalid += 1
        self.events.append(event)
        self._playback_wakeup.set()
        async with self._changed:
            self._changed.notify_all()

    async def _play(self) -> None:
        """Echo each mark once the audio before it has played."""
        while True:
            self._playback_wakeup.clear()
            await self._echo(self.playback.due(time.monotonic()))
            due = self.playback.next_due()
            timeout = None if due is None else max(0.0, due - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._playback_wakeup.wait(), timeout)

    async def _echo(self, names: list[str]) -> None:
        for name in names:
            try:
                async with self._send_lock:
                    await self.send_message(self.messages.mark(name))
            except websockets.ConnectionClosed:
                return
            self.stats.marks_echoed += 1
            self.stats.echoed_marks.append(name)
        if names:
            async with self._changed:
                self._changed.notify_all()

    # --- Waiting and results ---

    async def wait_for(self, predicate: Callable[[], bool], within: float) -> None:
        """Until ``predicate()`` holds, re-checked after every message, echo and close;
        TimeoutError after ``within`` seconds."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(predicate)

    async def wait_for_audio(self, nbytes: int, within: float) -> bytes:
        await self.wait_for(lambda: len(self._audio) >= nbytes, within)
        return self.received_audio()

    async def wait_closed(self, within: float) -> None:
        await self.wait_for(lambda: self.closed, within)

    def received_audio(self) -> bytes:
        """Every agent audio byte received, in order (including audio a ``clear`` cut off)."""
        return bytes(self._audio)

    def events_of(self, kind: EventKind) -> list[ReceivedEvent]:
        return [e for e in self.events if e.kind == kind]

    @property
    def first_audio_seconds(self) -> float | None:
        """Time from sending ``start`` to the first agent audio received."""
        if self.first_audio_at is None or self.started_at is None:
            return None
        return self.first_audio_at - self.started_at

    @property
    def closed(self) -> bool:
        return self._receiving_done or self.ws.close_code is not None

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    @property
    def close_reason(self) -> str | None:
        return self.ws.close_reason
