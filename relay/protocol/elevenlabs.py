"""Sans-I/O client side of the ElevenLabs Conversational AI WebSocket protocol.

Like ``websockets.protocol``: the caller owns the socket. It sends ``initiation_message(...)`` when
the socket opens, feeds every text frame it receives to ``receive_text()``, which returns events,
and sends whatever ``data_to_send()`` returns (pongs are queued there the moment a ping is parsed,
so the caller should drain it after every ``receive_text``). Outgoing builders return compact JSON
text frames. Nothing here does I/O, logs or raises on peer input: a frame that cannot be
understood becomes a ``ProtocolViolation`` event and changes no state.

Rules (see ../shared/reference/elevenlabs-twilio-protocols.md §1):

* The first message must be ``conversation_initiation_metadata``; until it arrives other messages
  are violations, except ``error`` (the server rejects a bad initiation with an error and a close)
  and ``ping`` (answering costs nothing and keeps the connection alive).
* ``ping`` is answered at once with ``{"type":"pong","event_id":<same int>}`` — never delayed by
  ``ping_ms``, which only measures latency (kept in ``last_ping_ms``).
* Barge-in: agent audio whose ``event_id`` is at or below the highest interruption id seen so far
  is stale and never emitted (``stale_audio_dropped`` counts it). Interruption ids only move the
  threshold up.
* ``error`` arrives with an ``error_event`` object or flat (``{"type":"error","message":...}``, as
  observed for quota exhaustion); both become ``UpstreamError`` and are kept in ``last_error`` for
  mapping the close that follows (relay/protocol/close_codes.py).
* Unknown message types are ``IgnoredEvent`` (the server adds types over time).
"""

from __future__ import annotations

import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Final, Literal, TypeAlias

import orjson

from voicerelay.audio_formats import DEFAULT_AUDIO_FORMAT, AudioFormat, audio_format_or_none

State: TypeAlias = Literal["awaiting_metadata", "streaming", "closed"]


def _package_version() -> str:
    try:
        return metadata.version("voicerelay")
    except metadata.PackageNotFoundError:
        return "0+unknown"


SOURCE_INFO: Final = {"source": "voicerelay", "version": _package_version()}
# Upstream text is relayed to clients and logs; keep it to a sane size.
MAX_ERROR_MESSAGE_CHARS: Final = 500
_MAX_TYPE_CHARS: Final = 64

# --- Events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConversationStarted:
    conversation_id: str
    agent_output_format: AudioFormat
    user_input_format: AudioFormat
    # False when the metadata's formats differ from the ones the protocol was told to expect;
    # the metadata wins (it describes the bytes on the wire).
    formats_as_expected: bool = True


@dataclass(frozen=True, slots=True)
class AgentAudio:
    audio: bytes  # decoded, in ConversationStarted.agent_output_format
    event_id: int
    # As received (base64): a peer in the same format gets it without re-encoding.
    encoded: str = field(default="", repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Interruption:
    event_id: int


@dataclass(frozen=True, slots=True)
class AgentResponse:
    text: str
    event_id: int | None


@dataclass(frozen=True, slots=True)
class AgentResponseCorrection:
    original: str
    corrected: str
    event_id: int | None


@dataclass(frozen=True, slots=True)
class UserTranscript:
    text: str
    event_id: int | None


@dataclass(frozen=True, slots=True)
class ClientToolCall:
    tool_name: str
    tool_call_id: str
    parameters: dict[str, Any]
    event_id: int | None


@dataclass(frozen=True, slots=True)
class Ping:
    """Already answered: the pong is waiting in data_to_send()."""

    event_id: int
    ping_ms: int | None


@dataclass(frozen=True, slots=True)
class AgentToolResponse:
    tool_name: str
    tool_call_id: str
    is_error: bool

    @property
    def ends_call(self) -> bool:
        """The agent ran its built-in end_call tool: the conversation is over."""
        return self.tool_name == "end_call"


@dataclass(frozen=True, slots=True)
class UpstreamError:
    message: str
    code: int | None  # a WebSocket close code (1002, 1008, ...) when the server gave one
    error_type: str | None  # e.g. "override_error", "max_duration_exceeded"


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    detail: str  # never contains peer payload beyond a truncated type name


@dataclass(frozen=True, slots=True)
class IgnoredEvent:
    type: str


UpstreamEvent: TypeAlias = (
    ConversationStarted
    | AgentAudio
    | Interruption
    | AgentResponse
    | AgentResponseCorrection
    | UserTranscript
    | ClientToolCall
    | Ping
    | AgentToolResponse
    | UpstreamError
    | ProtocolViolation
    | IgnoredEvent
)

_Message: TypeAlias = dict[str, Any]
_Handler: TypeAlias = Callable[["ElevenLabsProtocol", _Message], list[UpstreamEvent]]


class _Invalid(Exception):
    """Internal: a message failed validation (becomes a ProtocolViolation, never escapes)."""


def _violation(detail: str) -> list[UpstreamEvent]:
    return [ProtocolViolation(detail)]


def _payload(message: _Message, key: str) -> _Message:
    value = message.get(key)
    if not isinstance(value, dict):
        raise _Invalid(f"{message['type']} without an object {key}")
    return value


def _text(payload: _Message, key: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str):
        raise _Invalid(f"{key} must be a string")
    return value


def _event_id(payload: _Message) -> int:
    value = payload.get("event_id")
    # bool is an int subclass; ids are non-negative integers.
    if type(value) is not int or value < 0:
        raise _Invalid("event_id must be a non-negative integer")
    return value


def _optional_event_id(payload: _Message) -> int | None:
    return None if payload.get("event_id") is None else _event_id(payload)


def _short_type(value: str) -> str:
    return value if len(value) <= _MAX_TYPE_CHARS else value[:_MAX_TYPE_CHARS] + "…"


# --- Protocol --------------------------------------------------------------------------------


class ElevenLabsProtocol:
    """One conversation's protocol state. Not thread-safe; one per upstream connection."""

    def __init__(
        self,
        *,
        expected_input_format: str | None = None,
        expected_output_format: str | None = None,
    ) -> None:
        self.state: State = "awaiting_metadata"
        self.expected_input_format = audio_format_or_none(expected_input_format)
        self.expected_output_format = audio_format_or_none(expected_output_format)
        self.conversation_id: str | None = None
        self.agent_output_format: AudioFormat | None = None
        self.user_input_format: AudioFormat | None = None
        # -1 until the first interruption: audio ids start at 0 or 1, and none is stale yet.
        self.last_interrupt_id = -1
        self.stale_audio_dropped = 0
        self.pings_answered = 0
        self.last_ping_ms: int | None = None
        self.last_error: UpstreamError | None = None
        self._outgoing: list[str] = []

    # --- Incoming ---

    def receive_text(self, text: str | bytes) -> list[UpstreamEvent]:
        """Events for one received frame. Never raises on peer input."""
        if self.state == "closed":
            return []
        try:
            message = orjson.loads(text)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return _violation("frame is not valid JSON")
        if not isinstance(message, dict):
            return _violation("frame is not a JSON object")
        kind = message.get("type")
        if not isinstance(kind, str):
            return _violation("message without a string type")
        handler = _HANDLERS.get(kind)
        if self.state == "awaiting_metadata" and kind not in _ALLOWED_BEFORE_METADATA:
            return _violation(
                f"expected conversation_initiation_metadata first, got {_short_type(kind)}"
            )
        if handler is None:
            return [IgnoredEvent(_short_type(kind))]
        try:
            return handler(self, message)
        except _Invalid as invalid:
            return _violation(str(invalid))

    def data_to_send(self) -> list[str]:
        """Text frames to send now (pongs), oldest first; empties the queue."""
        if not self._outgoing:
            return []
        frames, self._outgoing = self._outgoing, []
        return frames

    def connection_closed(self) -> None:
        """The socket is gone: later frames are ignored and queued pongs discarded."""
        self.state = "closed"
        self._outgoing.clear()

    # --- Handlers (one per message type) ---

    def _on_metadata(self, message: _Message) -> list[UpstreamEvent]:
        if self.state != "awaiting_metadata":
            raise _Invalid("duplicate conversation_initiation_metadata")
        payload = _payload(message, "conversation_initiation_metadata_event")
        conversation_id = _text(payload, "conversation_id")
        if not conversation_id:
            raise _Invalid("conversation_id is empty")
        output_format = self._format(
            payload, "agent_output_audio_format", self.expected_output_format
        )
        input_format = self._format(payload, "user_input_audio_format", self.expected_input_format)
        as_expected = self.expected_output_format in (None, output_format) and (
            self.expected_input_format in (None, input_format)
        )
        self.state = "streaming"
        self.conversation_id = conversation_id
        self.agent_output_format = output_format
        self.user_input_format = input_format
        return [ConversationStarted(conversation_id, output_format, input_format, as_expected)]

    @staticmethod
    def _format(payload: _Message, key: str, expected: AudioFormat | None) -> AudioFormat:
        value = payload.get(key)
        if value is None:
            # Required by the AsyncAPI schema; if a server omits it, ElevenLabs' default applies.
            return expected or DEFAULT_AUDIO_FORMAT
        parsed = audio_format_or_none(value)
        if parsed is None:
            raise _Invalid(f"unsupported {key}")
        return parsed

    def _on_audio(self, message: _Message) -> list[UpstreamEvent]:
        payload = _payload(message, "audio_event")
        event_id = _event_id(payload)
        if event_id <= self.last_interrupt_id:
            # Checked before decoding: stale audio costs nothing but the JSON parse.
            self.stale_audio_dropped += 1
            return []
        encoded = _text(payload, "audio_base_64")
        try:
            # Lenient like the official SDKs (base64.b64decode): bad padding still fails.
            audio = binascii.a2b_base64(encoded)
        except ValueError:  # binascii.Error, or non-ASCII text
            raise _Invalid("audio_base_64 is not base64") from None
        if not audio:
            return []
        return [AgentAudio(audio, event_id, encoded)]

    def _on_interruption(self, message: _Message) -> list[UpstreamEvent]:
        event_id = _event_id(_payload(message, "interruption_event"))
        if event_id > self.last_interrupt_id:
            self.last_interrupt_id = event_id
        return [Interruption(event_id)]

    def _on_ping(self, message: _Message) -> list[UpstreamEvent]:
        payload = _payload(message, "ping_event")
        event_id = _event_id(payload)
        self._outgoing.append(f'{{"type":"pong","event_id":{event_id}}}')
        self.pings_answered += 1
        ping_ms = _latency_ms(payload.get("ping_ms"))
        if ping_ms is not None:
            self.last_ping_ms = ping_ms
        return [Ping(event_id, ping_ms)]

    def _on_agent_response(self, message: _Message) -> list[UpstreamEvent]:
        payload = _payload(message, "agent_response_event")
        return [AgentResponse(_text(payload, "agent_response"), _optional_event_id(payload))]

    def _on_agent_response_correction(self, message: _Message) -> list[UpstreamEvent]:
        payload = _payload(message, "agent_response_correction_event")
        return [
            AgentResponseCorrection(
                _text(payload, "original_agent_response"),
                _text(payload, "corrected_agent_response"),
                _optional_event_id(payload),
            )
        ]

    def _on_user_transcript(self, message: _Message) -> list[UpstreamEvent]:
        payload = _payload(message, "user_transcription_event")
        return [UserTranscript(_text(payload, "user_transcript"), _optional_event_id(payload))]

    def _on_client_tool_call(self, message: _Message) -> list[UpstreamEvent]:
        payload = _payload(message, "client_tool_call")
        tool_name = _text(payload, "tool_name")
        tool_call_id = _text(payload, "tool_call_id")
        if not tool_name or not tool_call_id:
            raise _Invalid("client_tool_call needs tool_name and tool_call_id")
        parameters = payload.get("parameters", {})
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, dict):
            raise _Invalid("client_tool_call parameters must be an object")
        return [ClientToolCall(tool_name, tool_call_id, parameters, _optional_event_id(payload))]

    def _on_agent_tool_response(self, message: _Message) -> list[UpstreamEvent]:
        payload = _payload(message, "agent_tool_response")
        tool_name = _text(payload, "tool_name")
        tool_call_id = payload.get("tool_call_id", "")
        is_error = payload.get("is_error", False)
        if not isinstance(tool_call_id, str) or not isinstance(is_error, bool):
            raise _Invalid("agent_tool_response has mistyped fields")
        return [AgentToolResponse(tool_name, tool_call_id, is_error)]

    def _on_error(self, message: _Message) -> list[UpstreamEvent]:
        nested = message.get("error_event")
        sources = (nested, message) if isinstance(nested, dict) else (message,)
        code = _first(sources, ("code",), _is_close_code)
        error_type = _first(sources, ("error_type",), _is_str)
        text = _first(sources, ("message", "reason"), _is_str) or error_type or "upstream error"
        error = UpstreamError(text[:MAX_ERROR_MESSAGE_CHARS], code, error_type)
        self.last_error = error
        return [error]

    # --- Outgoing (pure builders: the caller sends what they return) ---

    def initiation_message(
        self,
        *,
        conversation_config_override: dict[str, Any],
        dynamic_variables: dict[str, Any],
        custom_llm_extra_body: dict[str, Any] | None = None,
        user_id: str | None = None,
    ) -> str:
        message: dict[str, Any] = {
            "type": "conversation_initiation_client_data",
            "conversation_config_override": conversation_config_override,
            "custom_llm_extra_body": custom_llm_extra_body or {},
            "dynamic_variables": dynamic_variables,
            "source_info": SOURCE_INFO,
        }
        if user_id is not None:
            message["user_id"] = user_id
        return orjson.dumps(message).decode()

    @staticmethod
    def user_audio(audio: bytes) -> str:
        """``{"user_audio_chunk":"<base64>"}`` (no type field, by design of the API).

        The per-frame hot path: one base64 encode, one ASCII decode, one concatenation
        (≈1.5 µs for a 20 ms PCM 16 kHz frame, mostly the base64 encode; parsing a received
        audio frame of that size is ≈4 µs).
        """
        return _AUDIO_PREFIX + binascii.b2a_base64(audio, newline=False).decode("ascii") + '"}'

    @staticmethod
    def user_audio_base64(encoded: str) -> str:
        """``user_audio_chunk`` for audio that is already base64 (e.g. μ-law from Twilio, which
        the agent takes as is): no decode and re-encode on the per-frame path."""
        return _AUDIO_PREFIX + encoded + '"}'

    @staticmethod
    def user_message(text: str) -> str:
        return orjson.dumps({"type": "user_message", "text": text}).decode()

    @staticmethod
    def contextual_update(text: str) -> str:
        return orjson.dumps({"type": "contextual_update", "text": text}).decode()

    @staticmethod
    def user_activity() -> str:
        return '{"type":"user_activity"}'

    @staticmethod
    def client_tool_result(tool_call_id: str, result: str, is_error: bool) -> str:
        return orjson.dumps(
            {
                "type": "client_tool_result",
                "tool_call_id": tool_call_id,
                "result": result,
                "is_error": is_error,
            }
        ).decode()


_AUDIO_PREFIX: Final = '{"user_audio_chunk":"'


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_close_code(value: object) -> bool:
    return type(value) is int and 1000 <= value <= 4999


def _first(
    sources: tuple[_Message, ...], keys: tuple[str, ...], ok: Callable[[object], bool]
) -> Any:
    for source in sources:
        for key in keys:
            value = source.get(key)
            if value is not None and ok(value):
                return value
    return None


def _latency_ms(value: object) -> int | None:
    # Only a metric: a malformed value must not stop the pong.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not 0 <= value < 3_600_000:  # also rejects NaN
        return None
    return round(value)


_HANDLERS: Final[dict[str, _Handler]] = {
    "conversation_initiation_metadata": ElevenLabsProtocol._on_metadata,
    "audio": ElevenLabsProtocol._on_audio,
    "interruption": ElevenLabsProtocol._on_interruption,
    "ping": ElevenLabsProtocol._on_ping,
    "agent_response": ElevenLabsProtocol._on_agent_response,
    "agent_response_correction": ElevenLabsProtocol._on_agent_response_correction,
    "user_transcript": ElevenLabsProtocol._on_user_transcript,
    "client_tool_call": ElevenLabsProtocol._on_client_tool_call,
    "agent_tool_response": ElevenLabsProtocol._on_agent_tool_response,
    "error": ElevenLabsProtocol._on_error,
}
_ALLOWED_BEFORE_METADATA: Final = frozenset({"conversation_initiation_metadata", "error", "ping"})
