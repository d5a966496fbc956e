"""Sans-I/O server side of Twilio Media Streams (bidirectional ``<Connect><Stream>``).

The relay owns the socket: it feeds every received frame to ``TwilioStreamProtocol.receive`` and
gets back one event, or a ``Violation`` after which the stream must be closed (the violation's
``code`` is the stable reason logged and put in the close frame). Outgoing builders return the
exact text frames Twilio expects. Nothing here does I/O or logs; nothing raises on peer input.

Rules (see ../shared/reference/elevenlabs-twilio-protocols.md §2):

* ``connected`` may come first and is informational. ``start`` must precede ``media``, ``mark``,
  ``dtmf`` and ``stop`` (else ``missing_start``); a second ``start`` is ``invalid_message``.
* Every message after ``start`` must name the stream's ``streamSid`` (else ``unknown_stream``).
* ``mediaFormat`` must be ``audio/x-mulaw`` at 8000 Hz, mono (else ``unsupported_format``).
  Twilio documents those values as the only ones; anything else would be misread as audio.
* ``media.payload`` must be strict base64 (else ``bad_payload``); its frame size is not assumed
  (20 ms is usual, not contractual).
* A frame larger than ``max_message_bytes`` is ``message_too_large`` before it is parsed.
* Unknown event names are ignored and counted (``ignored_events``): Twilio may add some.
* After ``stop`` every frame is ignored.

Outgoing ``media`` is the per-frame hot path: the stream's JSON prefix is serialized once at
``start`` and each frame is that prefix, the base64 payload and a constant suffix.

``PlaybackTracker`` does the mark accounting: each batch of agent audio sent is followed by a
mark; Twilio echoes a mark once the audio before it has played, and echoes every pending mark at
once when the relay sends ``clear``. So an echo of a mark that was pending at a ``clear`` says
nothing about playback: that audio counts as cut off.
"""

from __future__ import annotations

import binascii
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias, get_args

import orjson

MULAW_ENCODING: Final = "audio/x-mulaw"
MULAW_RATE: Final = 8000
MULAW_BYTES_PER_MS: Final = 8  # 8000 one-byte samples a second
DTMF_DIGITS: Final = frozenset("0123456789*#ABCDabcd")
# Peer strings that end up in events, logs or our own frames are bounded.
MAX_ID_CHARS: Final = 128
MAX_MARK_NAME_CHARS: Final = 256
MAX_PARAMETERS: Final = 64
MAX_PARAMETER_CHARS: Final = 1024
_MAX_EVENT_NAME_CHARS: Final = 32

ViolationCode: TypeAlias = Literal[
    "invalid_json",
    "invalid_message",
    "missing_start",
    "unknown_stream",
    "bad_payload",
    "unsupported_format",
    "message_too_large",
]
VIOLATION_CODES: Final[frozenset[str]] = frozenset(get_args(ViolationCode))
State: TypeAlias = Literal["awaiting_start", "streaming", "stopped"]

# --- Events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    protocol: str
    version: str


@dataclass(frozen=True, slots=True)
class MediaFormat:
    encoding: str
    sample_rate: int
    channels: int


@dataclass(frozen=True, slots=True)
class Start:
    stream_sid: str
    call_sid: str
    account_sid: str
    custom_parameters: dict[str, str] = field(repr=False)  # holds the call token
    media_format: MediaFormat
    tracks: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Media:
    payload: bytes  # raw μ-law 8 kHz
    # The payload as Twilio sent it (base64), so a μ-law agent can be fed without re-encoding.
    encoded: str = field(repr=False, compare=False)
    chunk: int | None
    timestamp: int | None


@dataclass(frozen=True, slots=True)
class Mark:
    name: str


@dataclass(frozen=True, slots=True)
class Dtmf:
    digit: str


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class Ignored:
    """An event Twilio may send that the relay has no use for (or one after ``stop``)."""

    event: str


@dataclass(frozen=True, slots=True)
class Violation:
    """The peer broke the protocol: close the stream. ``detail`` holds no peer payload."""

    code: ViolationCode
    detail: str


StreamEvent: TypeAlias = Connected | Start | Media | Mark | Dtmf | Stop | Ignored | Violation

_STOP: Final = Stop()


class _Invalid(Exception):
    def __init__(self, code: ViolationCode, detail: str) -> None:
        super().__init__(detail)
        self.code: ViolationCode = code
        self.detail = detail


def _object(message: dict[str, Any], key: str) -> dict[str, Any]:
    value = message.get(key)
    if not isinstance(value, dict):
        raise _Invalid("invalid_message", f"{message['event']} without an object {key}")
    return value


def _identifier(payload: dict[str, Any], key: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise _Invalid("invalid_message", f"{key} must be a non-empty string")
    return value


def _number(value: object) -> int | None:
    """Twilio sends numbers as JSON strings ("5"); accept both, None when absent or odd."""
    if type(value) is int:
        return value
    if isinstance(value, str) and value.isdigit() and len(value) <= 18:
        return int(value)
    return None


def _short(name: str) -> str:
    return name if len(name) <= _MAX_EVENT_NAME_CHARS else name[:_MAX_EVENT_NAME_CHARS] + "…"


# --- Protocol --------------------------------------------------------------------------------


class TwilioStreamProtocol:
    """One Media Streams connection, server side. Not thread-safe."""

    def __init__(self, *, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self.state: State = "awaiting_start"
        self.stream_sid: str | None = None
        self.ignored_events = 0
        self._media_prefix = ""
        self._mark_prefix = ""
        self._clear = ""

    # --- Incoming ---

    def receive(self, frame: str | bytes) -> StreamEvent:
        """The event in one received frame. Never raises on peer input."""
        if len(frame) > self.max_message_bytes or self._too_many_bytes(frame):
            return Violation("message_too_large", f"message over {self.max_message_bytes} bytes")
        if self.state == "stopped":
            self.ignored_events += 1
            return Ignored("after_stop")
        try:
            message = orjson.loads(frame)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return Violation("invalid_json", "frame is not valid JSON")
        if not isinstance(message, dict):
            return Violation("invalid_json", "frame is not a JSON object")
        event = message.get("event")
        if not isinstance(event, str):
            return Violation("invalid_message", "message without a string event")
        try:
            return self._dispatch(event, message)
        except _Invalid as invalid:
            return Violation(invalid.code, invalid.detail)

    def _too_many_bytes(self, frame: str | bytes) -> bool:
        # Only a long text can hold more UTF-8 bytes than characters beyond the limit.
        limit = self.max_message_bytes
        return (
            isinstance(frame, str)
            and len(frame) * 4 > limit
            and len(frame.encode("utf-8", "surrogatepass")) > limit
        )

    def _dispatch(self, event: str, message: dict[str, Any]) -> StreamEvent:
        if event == "media":
            self._check_stream(message)
            return self._media(message)
        if event == "connected":
            protocol, version = message.get("protocol"), message.get("version")
            return Connected(
                protocol if isinstance(protocol, str) else "",
                version if isinstance(version, str) else "",
            )
        if event == "start":
            return self._start(message)
        if event == "mark":
            self._check_stream(message)
            name = _object(message, "mark").get("name")
            if not isinstance(name, str) or len(name) > MAX_MARK_NAME_CHARS:
                raise _Invalid("invalid_message", "mark.name must be a string")
            return Mark(name)
        if event == "dtmf":
            self._check_stream(message)
            digit = _object(message, "dtmf").get("digit")
            if not isinstance(digit, str) or len(digit) != 1 or digit not in DTMF_DIGITS:
                raise _Invalid("invalid_message", "dtmf.digit must be one keypad digit")
            return Dtmf(digit.upper())
        if event == "stop":
            self._check_stream(message)
            self.state = "stopped"
            return _STOP
        self.ignored_events += 1
        return Ignored(_short(event))

    def _check_stream(self, message: dict[str, Any]) -> None:
        if self.state == "awaiting_start":
            raise _Invalid("missing_start", f"{message['event']} before start")
        if message.get("streamSid") != self.stream_sid:
            raise _Invalid("unknown_stream", "streamSid does not match the stream's")

    def _media(self, message: dict[str, Any]) -> Media:
        media = _object(message, "media")
        encoded = media.get("payload")
        if not isinstance(encoded, str):
            raise _Invalid("bad_payload", "media.payload must be a base64 string")
        try:
            payload = binascii.a2b_base64(encoded, strict_mode=True)
        except ValueError:  # binascii.Error, or non-ASCII text
            raise _Invalid("bad_payload", "media.payload is not base64") from None
        return Media(payload, encoded, _number(media.get("chunk")), _number(media.get("timestamp")))

    def _start(self, message: dict[str, Any]) -> Start:
        if self.state != "awaiting_start":
            raise _Invalid("invalid_message", "duplicate start")
        start = _object(message, "start")
        stream_sid = _identifier(start, "streamSid")
        if message.get("streamSid", stream_sid) != stream_sid:
            raise _Invalid("unknown_stream", "start names two different streamSids")
        call_sid = _identifier(start, "callSid")
        account_sid = _identifier(start, "accountSid")
        media_format = self._media_format(start.get("mediaFormat"))
        tracks = start.get("tracks", [])
        if not isinstance(tracks, list) or not all(isinstance(t, str) for t in tracks):
            raise _Invalid("invalid_message", "start.tracks must be a list of strings")
        parameters = start.get("customParameters", {})
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, dict) or len(parameters) > MAX_PARAMETERS:
            raise _Invalid("invalid_message", "start.customParameters must be a small object")
        for name, value in parameters.items():
            if not isinstance(value, str) or len(name) + len(value) > MAX_PARAMETER_CHARS:
                raise _Invalid("invalid_message", "customParameters values must be short strings")
        self.state = "streaming"
        self.stream_sid = stream_sid
        sid = orjson.dumps(stream_sid).decode()
        self._media_prefix = '{"event":"media","streamSid":' + sid + ',"media":{"payload":"'
        self._mark_prefix = '{"event":"mark","streamSid":' + sid + ',"mark":{"name":'
        self._clear = '{"event":"clear","streamSid":' + sid + "}"
        return Start(
            stream_sid=stream_sid,
            call_sid=call_sid,
            account_sid=account_sid,
            custom_parameters=dict(parameters),
            media_format=media_format,
            tracks=tuple(tracks),
        )

    @staticmethod
    def _media_format(value: object) -> MediaFormat:
        if not isinstance(value, dict):
            raise _Invalid("unsupported_format", "start without a mediaFormat")
        encoding = value.get("encoding")
        rate, channels = _number(value.get("sampleRate")), _number(value.get("channels", 1))
        if encoding != MULAW_ENCODING or rate != MULAW_RATE or channels != 1:
            raise _Invalid("unsupported_format", "only audio/x-mulaw 8000 Hz mono is supported")
        return MediaFormat(MULAW_ENCODING, MULAW_RATE, 1)

    # --- Outgoing (after start; pure builders) ---

    def media(self, audio: bytes) -> str:
        """A ``media`` frame carrying raw μ-law ``audio``."""
        return (
            self._media_prefix + binascii.b2a_base64(audio, newline=False).decode("ascii") + '"}}'
        )

    def media_encoded(self, encoded: str) -> str:
        """A ``media`` frame for audio already in base64 (μ-law passthrough, no re-encoding)."""
        return self._media_prefix + encoded + '"}}'

    def mark(self, name: str) -> str:
        return self._mark_prefix + orjson.dumps(name).decode() + "}}"

    def clear(self) -> str:
        return self._clear


# --- Playback accounting -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlaybackReport:
    played_out_ms: int
    cut_off_ms: int
    marks_sent: int
    marks_echoed: int

    def fields(self) -> dict[str, int]:
        return {
            "played_out_ms": self.played_out_ms,
            "cut_off_ms": self.cut_off_ms,
            "marks_sent": self.marks_sent,
            "marks_echoed": self.marks_echoed,
        }


class PlaybackTracker:
    """What the caller heard of the agent's audio, from marks and their echoes (μ-law bytes)."""

    def __init__(self, *, bytes_per_ms: int = MULAW_BYTES_PER_MS) -> None:
        self._bytes_per_ms = bytes_per_ms
        self._unmarked = 0  # sent after the last mark
        self._pending: deque[tuple[str, int]] = deque()  # (mark name, bytes before it)
        self._cleared: set[str] = set()  # pending at a clear: their echoes carry no news
        self._counter = 0
        self.played_bytes = 0
        self.cut_off_bytes = 0
        self.marks_sent = 0
        self.marks_echoed = 0
        self.unknown_echoes = 0

    def sent(self, nbytes: int) -> None:
        self._unmarked += nbytes

    def mark(self) -> str | None:
        """Name of a mark to send now (covering audio sent since the last one); None if none."""
        if not self._unmarked:
            return None
        self._counter += 1
        name = str(self._counter)
        self._pending.append((name, self._unmarked))
        self._unmarked = 0
        self.marks_sent += 1
        return name

    def echoed(self, name: str) -> bool:
        """Twilio echoed ``name``; False for a name this tracker never sent."""
        if name in self._cleared:
            self._cleared.discard(name)
            self.marks_echoed += 1
            return True
        if not any(pending == name for pending, _ in self._pending):
            self.unknown_echoes += 1
            return False
        # Twilio plays in order: an echo means every earlier mark's audio has played too.
        while self._pending:
            pending, nbytes = self._pending.popleft()
            self.played_bytes += nbytes
            if pending == name:
                break
        self.marks_echoed += 1
        return True

    def discarded(self, nbytes: int) -> None:
        """Agent audio dropped before it was sent (barge-in, a full queue): never heard."""
        self.cut_off_bytes += nbytes

    def cleared(self) -> None:
        """The relay sent ``clear``: whatever Twilio had not played is cut off."""
        for name, nbytes in self._pending:
            self.cut_off_bytes += nbytes
            self._cleared.add(name)
        self._pending.clear()
        self.cut_off_bytes += self._unmarked
        self._unmarked = 0

    @property
    def pending_ms(self) -> int:
        """Audio sent and not yet confirmed played (or cut off)."""
        return (sum(n for _, n in self._pending) + self._unmarked) // self._bytes_per_ms

    def report(self) -> PlaybackReport:
        per_ms = self._bytes_per_ms
        return PlaybackReport(
            played_out_ms=self.played_bytes // per_ms,
            cut_off_ms=self.cut_off_bytes // per_ms,
            marks_sent=self.marks_sent,
            marks_echoed=self.marks_echoed,
        )
