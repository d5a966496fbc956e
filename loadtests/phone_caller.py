"""A phone caller for load tests, reaching the agent the way Twilio does.

1. The voice webhook: ``POST /v1/twilio/voice`` with Twilio's form and a valid
   ``X-Twilio-Signature`` (the tenant's auth token); the TwiML answer names the stream URL and
   its ``<Parameter>``s (the call token among them).
2. The Media Stream: a WebSocket (websocket-client, blocking; gevent makes it cooperative under
   locust) speaking Twilio's messages, built and parsed by the sans-I/O core of
   ``voicerelay.emulators.twilio_media`` (``connected``, ``start``, 20 ms μ-law ``media`` in real
   time, mark echoes after playback at 8000 bytes/s, ``stop``).

Reports: ``stream_open`` (WebSocket handshake), ``first_agent_audio`` (from ``start`` to the
first agent ``media``), ``round_trip`` and ``turn_echo`` per turn (the echo counted in 20 ms of
μ-law, since the relay transcodes for a PCM agent), ``call`` (failed when the relay ended the
stream or sent something Twilio would reject). The webhook POST is the caller's HTTP request.
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time

import websocket

from loadtests.bench_audio import Frame
from loadtests.call_metrics import ByteEcho, Greeting, TurnTimer
from loadtests.call_report import CallOptions, Report, report_echo
from loadtests.conversation import converse
from loadtests.twilio_webhook import StreamInstruction
from voicerelay.emulators.audio import parse_format, tone
from voicerelay.emulators.twilio_media import (
    FRAME_BYTES,
    FRAME_MS,
    ULAW_SILENCE,
    InvalidServerMessage,
    PlaybackClock,
    ServerClear,
    ServerMark,
    ServerMedia,
    StreamMessages,
    encode,
    parse_server_message,
)

_ULAW = parse_format("ulaw_8000")


class UlawTalk:
    """conversation.Pattern in μ-law 8 kHz: ``talk_frames`` of a tone, then silence."""

    def __init__(self, *, talk_frames: int, silence_frames: int) -> None:
        self.frame_ms = FRAME_MS
        self.talk_frames = talk_frames
        self.silence_frames = silence_frames
        voice = tone(_ULAW, talk_frames * FRAME_MS / 1000)
        self._voice = [voice[i : i + FRAME_BYTES] for i in range(0, len(voice), FRAME_BYTES)]
        self._silence = ULAW_SILENCE * FRAME_BYTES

    @property
    def cycle(self) -> int:
        return self.talk_frames + self.silence_frames

    def frame(self, index: int) -> Frame:
        position = index % self.cycle
        if position >= self.talk_frames:
            return Frame(self._silence, None, False)
        return Frame(self._voice[position], None, position == self.talk_frames - 1)


def _close_status(data: bytes) -> tuple[int | None, str]:
    if len(data) < 2:
        return None, ""
    return struct.unpack("!H", data[:2])[0], data[2:].decode(errors="replace")


class PhoneCall:
    """One call's Media Stream; ``run`` blocks until it is over."""

    def __init__(
        self, report: Report, options: CallOptions, *, call_sid: str, account_sid: str
    ) -> None:
        self._report = report
        self._options = options
        self._pattern = UlawTalk(
            talk_frames=options.talk_ms // FRAME_MS,
            silence_frames=options.silence_frames(FRAME_MS),
        )
        self._messages = StreamMessages(call_sid=call_sid, account_sid=account_sid)
        self._playback = PlaybackClock()
        self._lock = threading.Lock()
        self._echoes: list[str] = []
        self._timer = TurnTimer()
        self._echo = ByteEcho(FRAME_BYTES)
        self._greeting = Greeting(time.monotonic(), timeout=options.greeting_timeout)
        self._ws: websocket.WebSocket | None = None
        self._closed = threading.Event()
        self._close_status: tuple[int | None, str] | None = None
        self._errors: list[str] = []

    # --- The relay's messages (a reader thread; a greenlet under locust) ---

    def _read(self) -> None:
        ws = self._ws
        assert ws is not None
        try:
            while True:
                opcode, data = ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    self._close_status = _close_status(data)
                    return
                self._handle(data if opcode == websocket.ABNF.OPCODE_BINARY else data.decode())
        except (websocket.WebSocketException, OSError):
            pass
        finally:
            self._closed.set()

    def _handle(self, raw: str | bytes) -> None:
        now = time.monotonic()
        message = parse_server_message(raw, self._messages.stream_sid)
        with self._lock:
            if isinstance(message, ServerMedia):
                self._playback.audio(len(message.payload), now)
            elif isinstance(message, ServerMark):
                self._playback.mark(message.name, now)
            elif isinstance(message, ServerClear):
                self._echoes += self._playback.clear(now).marks
        if isinstance(message, ServerMedia):
            self._on_agent_audio(len(message.payload), now)
        elif isinstance(message, InvalidServerMessage):
            self._errors.append(f"relay sent {message.reason}")

    def _on_agent_audio(self, nbytes: int, now: float) -> None:
        first = self._greeting.first_audio_at is None
        self._greeting.agent_audio(now)
        if first:
            self._report("first_agent_audio", self._greeting.first_audio_seconds or 0.0)
        round_trip = self._timer.agent_audio(now)
        if round_trip is not None:
            self._report("round_trip", round_trip)
        self._echo.agent_audio(nbytes)

    # --- conversation.Line and conversation.Turns ---

    @property
    def alive(self) -> bool:
        return not self._closed.is_set()

    def _send(self, message: dict[str, object]) -> None:
        assert self._ws is not None
        try:
            self._ws.send(encode(message))
        except (websocket.WebSocketException, OSError):
            self._closed.set()

    def send_audio(self, audio: bytes) -> None:
        self._send(self._messages.media(audio))

    def tick(self, now: float) -> None:
        with self._lock:
            names = self._echoes + self._playback.due(now)
            self._echoes = []
        for name in names:
            self._send(self._messages.mark(name))

    def turn_ended(self, turn: int, at: float) -> None:
        self._timer.turn_ended(at)
        self._echo.turn_ended(self._pattern.talk_frames)

    def turn_settled(self, turn: int) -> None:
        echo = self._echo.settle()
        if echo is not None:
            report_echo(self._report, echo, "20 ms frames")

    # --- The call ---

    def run(self, stream: StreamInstruction) -> bool:
        """The call; False (nothing reported) when the relay has no Media Streams endpoint,
        i.e. answers the WebSocket handshake with HTTP 404."""
        options = self._options
        opened = time.monotonic()
        try:
            # websocket-client never offers permessage-deflate: compression is off, as Twilio's.
            self._ws = websocket.create_connection(stream.url, timeout=options.connect_timeout)
        except websocket.WebSocketBadStatusException as exc:
            if exc.status_code == 404:
                return False
            self._report("stream_open", time.monotonic() - opened, error=f"{exc}")
            return True
        except (websocket.WebSocketException, OSError) as exc:
            self._report("stream_open", time.monotonic() - opened, error=f"{exc}")
            return True
        self._report("stream_open", time.monotonic() - opened)
        self._ws.settimeout(None)
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        self._send(self._messages.connected())
        started = time.monotonic()
        self._greeting = Greeting(started, timeout=options.greeting_timeout)
        self._send(self._messages.start(stream.parameters))
        try:
            converse(self, self._pattern, self._greeting, self, options.turns)
        finally:
            ended_by_relay = self._closed.is_set()
            self._hang_up(reader)
        error = "; ".join(sorted(set(self._errors))) or None
        if ended_by_relay:
            code, reason = self._close_status or (None, "")
            error = f"the relay closed the stream ({code} {reason})".strip()
        self._report("call", time.monotonic() - started, error=error)
        return True

    def _hang_up(self, reader: threading.Thread) -> None:
        """``stop``, then the closing handshake; only the reader receives (two receivers on one
        socket is an error under gevent), so it sees the relay's close frame."""
        ws = self._ws
        assert ws is not None
        if not self._closed.is_set():
            self._send(self._messages.stop())
            with contextlib.suppress(websocket.WebSocketException, OSError):
                ws.send_close()
        reader.join(self._options.hangup_timeout)
        self._closed.set()
        with contextlib.suppress(websocket.WebSocketException, OSError):
            ws.shutdown()  # type: ignore[no-untyped-call]
