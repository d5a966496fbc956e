"""The conversation logic of an emulated ElevenLabs ConvAI agent, without any I/O.

``ConvAIScript`` is fed what the client sends (``receive_text``/``receive_bytes``) and clock ticks
(``tick(now)``); it queues what the server sends (``data_to_send()`` returns ``SendText`` frames
and at most one final ``Close``) and says when it next needs a tick (``next_deadline()``). The
WebSocket handler in ``elevenlabs.py`` only moves frames and drives the clock, so every behaviour
below is unit-tested without sockets. Times are seconds on any monotonic clock.

What the agent does (each part configurable per ``EmulatedAgent``):

- Waits for ``conversation_initiation_client_data`` and validates it (``system__`` dynamic
  variables, required variables, overrides the agent does not allow are refused with an ``error``
  event and close 1008). The message is optional, as with ElevenLabs: any other valid first message
  (e.g. audio) starts the conversation with defaults, and so does ``initiation_timeout_seconds`` of
  quiet. Then it sends ``conversation_initiation_metadata`` with the agent's formats, and the agent's
  first message (or the ``agent.first_message`` override) as a spoken reply, if it has one.
- Caller audio: a chunk is "voiced" when its RMS (of PCM16 samples, μ-law decoded) reaches
  ``silence_threshold``. A turn starts at the first voiced chunk and ends after ``end_of_turn_ms``
  of silence (measured both in received audio and on the clock, so a client that simply stops
  sending also ends its turn) or at ``max_turn_ms`` of audio. The agent then sends
  ``user_transcript`` "(audio 1.20s)", ``agent_response`` and the reply audio: the caller's audio
  from its first to its last voiced chunk, byte for byte, when input and output formats are equal
  (``reply_audio="echo"``), else a 440 Hz tone of the same length in the output format. Audio goes
  out in ``chunk_ms`` chunks as ``audio`` events with increasing ``event_id``s, paced in real time
  (``realtime=True``) or all at once.
- Barge-in: voiced caller audio (or a text message) while reply audio remains unsent sends
  ``interruption`` with a fresh event id and drops the rest of the reply; with
  ``stale_chunk_after_interruption`` one more chunk of the old reply follows, with an older event
  id, as if it had been in flight; then ``agent_response_correction`` with the truncated text.
- Keep-alive: ``ping`` {event_id, ping_ms} every ``ping_interval_seconds`` (ping_ms is the last
  measured round trip); a ``pong`` must echo the ping's event id. When ``max_missed_pongs`` pings
  are unanswered at the next ping time, it sends ``error`` (1002, ``asyncio_timeout``) and closes
  1002.
- Limits: ``max_duration_seconds`` after connecting → ``error`` (1000, ``max_duration_exceeded``) and
  close 1000 ``max_duration_exceeded``; no client input (audio, text, activity, tool results; pongs
  do not count) for ``receive_timeout_seconds`` → ``error`` (1002, ``transport_receive_timeout``)
  and close 1002.
- Anything malformed (not JSON, not an object, unknown type, bad field types, bad base64, binary
  frames) → ``error`` (1008, ``invalid_message``) and close 1008.
- ``contextual_update``, ``user_activity``, ``feedback``, ``mcp_tool_approval_result`` and
  ``multimodal_message`` are accepted silently and recorded in the stats.
- ``unresponsive=True`` agents accept the socket and never send anything (not even metadata).

Scripted ``user_message`` texts (``EmulatedAgent.text_commands`` can map any other text to one of
them; anything else gets ``user_transcript`` + ``agent_response``
"You said: <text>" + ``text_reply_seconds`` of tone):

- ``tool:<name> {json}`` → ``client_tool_call`` {tool_name, tool_call_id, parameters, event_id};
  the matching ``client_tool_result`` is answered with ``agent_response``
  "<name> returned: <result>" (or "<name> failed: <result>" when ``is_error``) and a tone.
- ``tone:<seconds>`` → a reply with that much tone (at most 120 s), e.g. to talk over.
- ``end`` → ``agent_response`` "Goodbye!", ``agent_tool_response`` (end_call) and close 1000.
- ``end:open`` → the same without the close: an agent that ends the call and leaves its socket
  open.
- ``error:quota`` → the flat ``{"type": "error", "message": "...quota..."}`` seen from ElevenLabs,
  then close 1002.
- ``error:<error_type>`` → ``{"type": "error", "error_event": {code, error_type, message}}`` and a
  close with that type's code (1000/1002/1008/1011 as ElevenLabs documents them; unknown types
  1011).
- ``close:<code>`` → close with that code (reason "scripted close"), no error message; codes a
  close frame cannot carry (e.g. 1006) are answered like ordinary text.
- ``silence`` → the agent goes quiet: no more replies, pings or timeouts (only max duration),
  so the client's own timeout path is exercised.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from voicerelay.emulators.audio import AUDIO_FORMATS, parse_format, rms, tone

MAX_TONE_SECONDS = 120.0
MAX_CLOSE_REASON_BYTES = 123
QUOTA_MESSAGE = "This request exceeds your quota limit."

# Close code of each ElevenLabs error type (their AsyncAPI ErrorType / WebSocketCloseCode).
ERROR_CLOSE_CODES: dict[str, int] = {
    "max_duration_exceeded": 1000,
    **dict.fromkeys(
        (
            "safety_violation",
            "llm_timeout",
            "transport_receive_timeout",
            "asyncio_timeout",
            "http_exception",
            "llm_error",
            "custom_llm_error",
            "cascade_brain_error",
            "asr_transcription_error",
            "vad_error",
            "turn_probability_error",
            "tts_cascade_error",
            "redis_timeout_error",
        ),
        1002,
    ),
    **dict.fromkeys(
        (
            "invalid_message",
            "telephony_agent_error",
            "mcp_tool_error",
            "mcp_https_error",
            "value_error",
            "missing_fields",
            "override_error",
            "missing_dynamic_variable",
            "missing_dynamic_variable_transfer",
        ),
        1008,
    ),
    "unknown_websocket_crash": 1011,
}

# Client messages ElevenLabs accepts that the emulated agent only records.
_RECORDED_ONLY = frozenset({"feedback", "mcp_tool_approval_result", "multimodal_message"})


@dataclass(frozen=True)
class EmulatedAgent:
    """How one emulated agent behaves. Defaults suit `make run`, tests and load tests."""

    input_format: str = "pcm_16000"
    output_format: str = "pcm_16000"
    # A private agent must be reached through a signed URL; a public one by agent_id alone.
    requires_auth: bool = True
    # Replies
    reply_audio: Literal["echo", "tone"] = "echo"
    first_message: str | None = None
    realtime: bool = True
    chunk_ms: int = 100
    text_reply_seconds: float = 1.0
    # Turn taking (RMS of PCM16 samples; 500 is about -36 dBFS)
    silence_threshold: int = 500
    end_of_turn_ms: int = 500
    max_turn_ms: int = 8000
    stale_chunk_after_interruption: bool = True
    # Keep-alive and limits
    ping_interval_seconds: float = 5.0
    max_missed_pongs: int = 3
    max_duration_seconds: float = 600.0
    receive_timeout_seconds: float = 60.0
    initiation_timeout_seconds: float = 3.0
    # Contract checks on conversation_initiation_client_data
    required_dynamic_variables: frozenset[str] = frozenset()
    # Dotted override paths the agent allows (a prefix allows everything below it); None = all.
    allowed_overrides: frozenset[str] | None = None
    unresponsive: bool = False
    # A user_message with exactly this text runs that scripted command instead (e.g.
    # {"The caller pressed 9 on the keypad.": "end"}): how a test makes an agent react to what a
    # phone caller can send, DTMF, the way a real agent's LLM would decide to.
    text_commands: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for fmt in (self.input_format, self.output_format):
            if fmt not in AUDIO_FORMATS:
                raise ValueError(f"unknown audio format {fmt!r}")
        if self.reply_audio not in ("echo", "tone"):
            raise ValueError("reply_audio must be 'echo' or 'tone'")
        if not 10 <= self.chunk_ms <= 5000:
            raise ValueError("chunk_ms must be between 10 and 5000")
        if self.max_missed_pongs < 1 or self.end_of_turn_ms < 1 or self.max_turn_ms < 1:
            raise ValueError("max_missed_pongs, end_of_turn_ms and max_turn_ms must be positive")
        positive = (
            self.ping_interval_seconds,
            self.max_duration_seconds,
            self.receive_timeout_seconds,
            self.initiation_timeout_seconds,
        )
        if min(positive) <= 0 or self.text_reply_seconds < 0:
            raise ValueError("intervals and timeouts must be positive")


# --- What the script hands to the I/O layer -------------------------------------------------


@dataclass(frozen=True)
class SendText:
    text: str


@dataclass(frozen=True)
class Close:
    code: int
    reason: str


Outgoing = SendText | Close


@dataclass(frozen=True)
class ToolResult:
    tool_call_id: str
    result: str
    is_error: bool


@dataclass
class ConversationStats:
    """What happened in one conversation, for tests and load tests to assert on."""

    conversation_id: str
    agent_id: str
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    messages_in: Counter[str] = field(default_factory=Counter)
    messages_out: Counter[str] = field(default_factory=Counter)
    audio_chunks_in: int = 0
    audio_bytes_in: int = 0
    audio_chunks_out: int = 0
    audio_bytes_out: int = 0
    pings_sent: int = 0
    pongs_received: int = 0
    pongs_unmatched: int = 0
    last_ping_ms: int | None = None
    turns: int = 0
    interruptions: int = 0
    stale_chunks_sent: int = 0
    initiation: dict[str, Any] | None = None
    user_messages: list[str] = field(default_factory=list)
    contextual_updates: list[str] = field(default_factory=list)
    user_activity: int = 0
    tool_calls: list[str] = field(default_factory=list)
    tool_results: list[ToolResult] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str | None = None
    closed_by: Literal["agent", "client"] | None = None

    def counters(self) -> dict[str, Any]:
        """The numbers only (no message texts or initiation data, which may hold secrets)."""
        return {
            "conversation_id": self.conversation_id,
            "agent_id": self.agent_id,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "messages_in": dict(self.messages_in),
            "messages_out": dict(self.messages_out),
            "audio_chunks_in": self.audio_chunks_in,
            "audio_bytes_in": self.audio_bytes_in,
            "audio_chunks_out": self.audio_chunks_out,
            "audio_bytes_out": self.audio_bytes_out,
            "pings_sent": self.pings_sent,
            "pongs_received": self.pongs_received,
            "pongs_unmatched": self.pongs_unmatched,
            "last_ping_ms": self.last_ping_ms,
            "turns": self.turns,
            "interruptions": self.interruptions,
            "stale_chunks_sent": self.stale_chunks_sent,
            "user_activity": self.user_activity,
            "close_code": self.close_code,
            "close_reason": self.close_reason,
            "closed_by": self.closed_by,
        }


class InvalidMessage(ValueError):
    """A client message ElevenLabs would refuse with invalid_message."""


class ConversationRefused(ValueError):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


@dataclass
class _Turn:
    audio: bytearray
    voiced_bytes: int
    silence_seconds: float
    last_voice_at: float


@dataclass
class _Reply:
    text: str
    audio: bytes
    response_event_id: int
    started_at: float
    offset: int = 0


State = Literal["waiting", "active", "silent", "closed"]


class ConvAIScript:
    def __init__(
        self,
        agent: EmulatedAgent,
        *,
        agent_id: str,
        conversation_id: str,
        now: float,
        stats: ConversationStats | None = None,
    ) -> None:
        self.agent = agent
        self.conversation_id = conversation_id
        self.input_format = parse_format(agent.input_format)
        self.output_format = parse_format(agent.output_format)
        self.stats = stats or ConversationStats(conversation_id=conversation_id, agent_id=agent_id)
        self.state: State = "waiting"
        self._outbox: list[Outgoing] = []
        self._event_id = 0
        self._connected_at = now
        self._last_input_at = now
        self._next_ping_at: float | None = None
        self._outstanding_pings: dict[int, float] = {}
        self._last_rtt_ms: int | None = None
        self._turn: _Turn | None = None
        self._reply: _Reply | None = None
        self._pending_tools: dict[str, str] = {}
        self._tool_counter = 0
        chunk = self.output_format.nbytes(agent.chunk_ms / 1000)
        self._chunk_bytes = max(self.output_format.sample_width, chunk)

    # --- The I/O layer's interface -------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    def data_to_send(self) -> list[Outgoing]:
        out, self._outbox = self._outbox, []
        return out

    def next_deadline(self) -> float | None:
        if self.state == "closed" or (self.state == "waiting" and self.agent.unresponsive):
            return None
        deadlines = [self._connected_at + self.agent.max_duration_seconds]
        if self.state == "waiting":
            deadlines.append(self._connected_at + self.agent.initiation_timeout_seconds)
        elif self.state == "active":
            deadlines.append(self._last_input_at + self.agent.receive_timeout_seconds)
            if self._next_ping_at is not None:
                deadlines.append(self._next_ping_at)
            if self._turn is not None:
                deadlines.append(self._turn.last_voice_at + self.agent.end_of_turn_ms / 1000)
            if self._reply is not None:
                deadlines.append(self._chunk_due(self._reply))
        return min(deadlines)

    def tick(self, now: float) -> None:
        if self.state == "closed" or (self.state == "waiting" and self.agent.unresponsive):
            return
        if now >= self._connected_at + self.agent.max_duration_seconds:
            self._fail(
                "max_duration_exceeded",
                "Conversation exceeded the maximum duration.",
                reason="max_duration_exceeded",
            )
            return
        if self.state == "waiting":
            if now >= self._connected_at + self.agent.initiation_timeout_seconds:
                self._start(None, now)
            return
        if self.state != "active":
            return
        if now >= self._last_input_at + self.agent.receive_timeout_seconds:
            seconds = self.agent.receive_timeout_seconds
            self._fail("transport_receive_timeout", f"No user input for {seconds:g} seconds")
            return
        if self._next_ping_at is not None and now >= self._next_ping_at:
            if len(self._outstanding_pings) >= self.agent.max_missed_pongs:
                self._fail(
                    "asyncio_timeout",
                    f"No pong for the last {len(self._outstanding_pings)} pings",
                    reason="ping_timeout",
                )
                return
            self._ping(now)
        turn = self._turn
        if turn is not None and now >= turn.last_voice_at + self.agent.end_of_turn_ms / 1000:
            self._end_turn(now)
        self._pump_reply(now)

    def receive_bytes(self, data: bytes, now: float) -> None:
        self.stats.messages_in["binary"] += 1
        if self.state in ("closed", "silent") or self.agent.unresponsive:
            return
        self._fail("invalid_message", "Binary frames are not supported; send JSON text")

    def receive_text(self, text: str, now: float) -> None:
        if self.state in ("closed", "silent") or self.agent.unresponsive:
            self.stats.messages_in["ignored"] += 1
            return
        try:
            message = json.loads(text)
            if not isinstance(message, dict):
                raise InvalidMessage("a message must be a JSON object")
            kind = _message_type(message)
        except (ValueError, InvalidMessage) as exc:
            # json.JSONDecodeError and InvalidMessage are both ValueErrors.
            self.stats.messages_in["invalid"] += 1
            self._fail("invalid_message", f"Invalid message: {_short(str(exc))}")
            return
        self.stats.messages_in[kind] += 1
        try:
            if self.state == "waiting":
                if kind == "conversation_initiation_client_data":
                    self._start(message, now)
                    return
                self._start(None, now)
            if self.state == "active":
                self._handle(kind, message, now)
        except ConversationRefused as exc:
            self._fail(exc.error_type, str(exc))
        except InvalidMessage as exc:
            self._fail("invalid_message", f"Invalid message: {_short(str(exc))}")

    def connection_lost(self, code: int | None, reason: str | None = None) -> None:
        """The client closed (or vanished); nothing more will be sent."""
        if self.state == "closed":
            return
        self.state = "closed"
        self.stats.close_code = code
        self.stats.close_reason = reason
        self.stats.closed_by = "client"
        self.stats.ended_at = time.time()

    # --- Conversation start --------------------------------------------------------------

    def _start(self, initiation: dict[str, Any] | None, now: float) -> None:
        first_message = self.agent.first_message
        if initiation is not None:
            first_message = self._validate_initiation(initiation, first_message)
            self.stats.initiation = initiation
        self.state = "active"
        self._last_input_at = now
        self._next_ping_at = now + self.agent.ping_interval_seconds
        self._send(
            "conversation_initiation_metadata",
            conversation_initiation_metadata_event={
                "conversation_id": self.conversation_id,
                "agent_output_audio_format": self.output_format.name,
                "user_input_audio_format": self.input_format.name,
            },
        )
        if first_message:
            self._reply_with(first_message, tone(self.output_format, self._text_seconds()), now)

    def _validate_initiation(
        self, message: dict[str, Any], first_message: str | None
    ) -> str | None:
        for key in ("conversation_config_override", "custom_llm_extra_body", "source_info"):
            if message.get(key) is not None and not isinstance(message[key], dict):
                raise InvalidMessage(f"{key} must be an object")
        override = message.get("conversation_config_override") or {}
        if "user_id" in message and not isinstance(message["user_id"], str | None):
            raise InvalidMessage("user_id must be a string")
        variables = message.get("dynamic_variables")
        if variables is None:
            variables = {}
        if not isinstance(variables, dict):
            raise InvalidMessage("dynamic_variables must be an object")
        for name, value in variables.items():
            if name.startswith("system__"):
                raise ConversationRefused(
                    "invalid_message",
                    f"Dynamic variable {name!r} uses the reserved 'system__' prefix",
                )
            if value is not None and not isinstance(value, str | int | float | bool):
                raise InvalidMessage(f"dynamic variable {name!r} must be a string or number")
        missing = sorted(self.agent.required_dynamic_variables - variables.keys())
        if missing:
            raise ConversationRefused(
                "missing_dynamic_variable",
                f"Missing required dynamic variables in first message: {missing}",
            )
        if self.agent.allowed_overrides is not None:
            for path in _leaf_paths(override):
                if not _allowed(path, self.agent.allowed_overrides):
                    raise ConversationRefused(
                        "override_error",
                        f"Override for field '{path}' is not allowed by config.",
                    )
        agent_override = override.get("agent")
        if isinstance(agent_override, dict) and "first_message" in agent_override:
            value = agent_override["first_message"]
            if value is not None and not isinstance(value, str):
                raise InvalidMessage("agent.first_message must be a string")
            return value
        return first_message

    # --- Client messages -----------------------------------------------------------------

    def _handle(self, kind: str, message: dict[str, Any], now: float) -> None:
        if kind == "pong":
            self._pong(message, now)
            return
        self._last_input_at = now
        if kind == "user_audio_chunk":
            self._audio(_base64_field(message, "user_audio_chunk"), now)
        elif kind == "user_message":
            self._user_message(_text_field(message, "text"), now)
        elif kind == "contextual_update":
            self.stats.contextual_updates.append(_text_field(message, "text"))
        elif kind == "user_activity":
            self.stats.user_activity += 1
        elif kind == "client_tool_result":
            self._tool_result(message, now)
        # conversation_initiation_client_data after the start and _RECORDED_ONLY: counted only.

    def _pong(self, message: dict[str, Any], now: float) -> None:
        event_id = message.get("event_id")
        if not isinstance(event_id, int) or isinstance(event_id, bool):
            raise InvalidMessage("pong.event_id must be an integer")
        sent_at = self._outstanding_pings.pop(event_id, None)
        if sent_at is None:
            self.stats.pongs_unmatched += 1
            return
        self.stats.pongs_received += 1
        self._last_rtt_ms = round((now - sent_at) * 1000)

    def _audio(self, audio: bytes, now: float) -> None:
        self.stats.audio_chunks_in += 1
        self.stats.audio_bytes_in += len(audio)
        voiced = rms(audio, self.input_format) >= self.agent.silence_threshold
        if voiced and self._reply is not None:
            self._interrupt(now)
        turn = self._turn
        if turn is None:
            if voiced:
                self._turn = _Turn(bytearray(audio), len(audio), 0.0, now)
                self._check_turn_length(now)
            return
        turn.audio += audio
        if voiced:
            turn.voiced_bytes = len(turn.audio)
            turn.silence_seconds = 0.0
            turn.last_voice_at = now
        else:
            turn.silence_seconds += self.input_format.seconds(len(audio))
            if turn.silence_seconds * 1000 >= self.agent.end_of_turn_ms:
                self._end_turn(now)
                return
        self._check_turn_length(now)

    def _check_turn_length(self, now: float) -> None:
        turn = self._turn
        if (
            turn is not None
            and self.input_format.seconds(turn.voiced_bytes) * 1000 >= self.agent.max_turn_ms
        ):
            self._end_turn(now)

    def _end_turn(self, now: float) -> None:
        turn, self._turn = self._turn, None
        if turn is None:
            return
        self.stats.turns += 1
        heard = bytes(turn.audio[: turn.voiced_bytes])
        seconds = self.input_format.seconds(len(heard))
        transcript = f"(audio {seconds:.2f}s)"
        self._send(
            "user_transcript",
            user_transcription_event={"user_transcript": transcript, "event_id": self._next_id()},
        )
        if self.agent.reply_audio == "echo" and self.input_format == self.output_format:
            audio = heard
        else:
            audio = tone(self.output_format, seconds)
        self._reply_with(f"Echo of {transcript}", audio, now)

    def _user_message(self, text: str, now: float) -> None:
        self.stats.user_messages.append(text)
        if self._reply is not None:
            self._interrupt(now)
        self._send(
            "user_transcript",
            user_transcription_event={"user_transcript": text, "event_id": self._next_id()},
        )
        text = self.agent.text_commands.get(text.strip(), text)
        command, _, argument = text.strip().partition(":")
        if text.strip() in ("end", "end:open"):
            self._end_call(close=text.strip() == "end")
        elif text.strip() == "silence":
            self.state = "silent"
            self._reply = None
            self._turn = None
        elif command == "error" and argument:
            self._scripted_error(argument.strip())
        elif command == "close" and _sendable_close_code(argument.strip()):
            self._close(int(argument.strip()), "scripted close")
        elif command == "tool" and argument.strip():
            self._tool_call(argument.strip())
        elif command == "tone" and _is_seconds(argument.strip()):
            seconds = min(float(argument.strip()), MAX_TONE_SECONDS)
            self._reply_with(
                f"A tone of {seconds:g} seconds.", tone(self.output_format, seconds), now
            )
        else:
            self._reply_with(
                f"You said: {text}", tone(self.output_format, self._text_seconds()), now
            )

    def _scripted_error(self, error_type: str) -> None:
        if error_type == "quota":
            flat = f"received 1002 (protocol error) {QUOTA_MESSAGE}; then sent 1002 (protocol error) {QUOTA_MESSAGE}"
            self._send("error", message=flat)
            self._close(1002, QUOTA_MESSAGE)
            return
        self._fail(error_type, f"Scripted error {error_type}")

    def _tool_call(self, argument: str) -> None:
        name, _, raw = argument.partition(" ")
        try:
            parameters = json.loads(raw) if raw.strip() else {}
        except ValueError:
            parameters = {"text": raw}
        if not isinstance(parameters, dict):
            parameters = {"value": parameters}
        self._tool_counter += 1
        tool_call_id = f"toolu_{self.conversation_id[-8:]}_{self._tool_counter}"
        self._pending_tools[tool_call_id] = name
        self.stats.tool_calls.append(tool_call_id)
        self._send(
            "client_tool_call",
            client_tool_call={
                "tool_name": name,
                "tool_call_id": tool_call_id,
                "parameters": parameters,
                "event_id": self._next_id(),
            },
        )

    def _tool_result(self, message: dict[str, Any], now: float) -> None:
        tool_call_id = _text_field(message, "tool_call_id")
        is_error = message.get("is_error", False)
        if not isinstance(is_error, bool):
            raise InvalidMessage("is_error must be a boolean")
        raw = message.get("result", "")
        result = raw if isinstance(raw, str) else json.dumps(raw)
        self.stats.tool_results.append(ToolResult(tool_call_id, result, is_error))
        name = self._pending_tools.pop(tool_call_id, None)
        if name is None:
            return  # not a call we made: ElevenLabs ignores it too
        verb = "failed" if is_error else "returned"
        self._reply_with(
            f"{name} {verb}: {result}", tone(self.output_format, self._text_seconds()), now
        )

    def _end_call(self, *, close: bool) -> None:
        self._send(
            "agent_response",
            agent_response_event={"agent_response": "Goodbye!", "event_id": self._next_id()},
        )
        self._send(
            "agent_tool_response",
            agent_tool_response={
                "tool_name": "end_call",
                "tool_call_id": f"end_call_{self.conversation_id[-8:]}",
                "tool_type": "system",
                "is_error": False,
                "is_called": True,
                "event_id": self._next_id(),
            },
        )
        if close:
            self._close(1000, "end_call")

    # --- Agent speech --------------------------------------------------------------------

    def _text_seconds(self) -> float:
        return self.agent.text_reply_seconds

    def _reply_with(self, text: str, audio: bytes, now: float) -> None:
        response_id = self._next_id()
        self._send(
            "agent_response",
            agent_response_event={"agent_response": text, "event_id": response_id},
        )
        self._reply = _Reply(text, audio, response_id, started_at=now)
        self._pump_reply(now)

    def _chunk_due(self, reply: _Reply) -> float:
        if not self.agent.realtime:
            return reply.started_at
        return reply.started_at + self.output_format.seconds(reply.offset)

    def _pump_reply(self, now: float) -> None:
        reply = self._reply
        if reply is None:
            return
        while reply.offset < len(reply.audio) and self._chunk_due(reply) <= now:
            chunk = reply.audio[reply.offset : reply.offset + self._chunk_bytes]
            reply.offset += len(chunk)
            self._send_audio(chunk, self._next_id())
        if reply.offset >= len(reply.audio):
            self._reply = None

    def _send_audio(self, chunk: bytes, event_id: int) -> None:
        self.stats.audio_chunks_out += 1
        self.stats.audio_bytes_out += len(chunk)
        self._send(
            "audio",
            audio_event={"audio_base_64": base64.b64encode(chunk).decode(), "event_id": event_id},
        )

    def _interrupt(self, now: float) -> None:
        reply, self._reply = self._reply, None
        if reply is None:
            return
        self.stats.interruptions += 1
        remaining = reply.audio[reply.offset : reply.offset + self._chunk_bytes]
        # The in-flight chunk was produced before the interruption, so its id is older.
        stale_id = (
            self._next_id() if remaining and self.agent.stale_chunk_after_interruption else None
        )
        self._send("interruption", interruption_event={"event_id": self._next_id()})
        if stale_id is not None:
            self.stats.stale_chunks_sent += 1
            self._send_audio(remaining, stale_id)
        fraction = reply.offset / len(reply.audio) if reply.audio else 1.0
        self._send(
            "agent_response_correction",
            agent_response_correction_event={
                "original_agent_response": reply.text,
                "corrected_agent_response": truncate_words(reply.text, fraction),
                "event_id": reply.response_event_id,
            },
        )

    # --- Keep-alive, errors, closing -----------------------------------------------------

    def _ping(self, now: float) -> None:
        event_id = self._next_id()
        self._outstanding_pings[event_id] = now
        self.stats.pings_sent += 1
        self.stats.last_ping_ms = self._last_rtt_ms
        self._send("ping", ping_event={"event_id": event_id, "ping_ms": self._last_rtt_ms})
        self._next_ping_at = now + self.agent.ping_interval_seconds

    def _fail(self, error_type: str, message: str, *, reason: str | None = None) -> None:
        code = ERROR_CLOSE_CODES.get(error_type, 1011)
        self._send(
            "error",
            error_event={"code": code, "error_type": error_type, "message": message},
        )
        self._close(code, reason or error_type)

    def _close(self, code: int, reason: str) -> None:
        if self.state == "closed":
            return
        reason = close_reason(reason)
        self._outbox.append(Close(code, reason))
        self.state = "closed"
        self._reply = None
        self.stats.close_code = code
        self.stats.close_reason = reason
        self.stats.closed_by = "agent"
        self.stats.ended_at = time.time()

    def _send(self, kind: str, **payload: Any) -> None:
        self.stats.messages_out[kind] += 1
        self._outbox.append(SendText(json.dumps({"type": kind, **payload}, separators=(",", ":"))))

    def _next_id(self) -> int:
        self._event_id += 1
        return self._event_id


# --- Helpers ------------------------------------------------------------------------------------


_CLIENT_TYPES = frozenset(
    {
        "conversation_initiation_client_data",
        "pong",
        "user_message",
        "contextual_update",
        "user_activity",
        "client_tool_result",
        *_RECORDED_ONLY,
    }
)


def _message_type(message: dict[str, Any]) -> str:
    kind = message.get("type")
    if "user_audio_chunk" in message and kind in (None, "user_audio_chunk"):
        return "user_audio_chunk"
    if not isinstance(kind, str):
        raise InvalidMessage("missing type")
    if kind not in _CLIENT_TYPES:
        raise InvalidMessage(f"unknown message type {kind!r}")
    return kind


def _text_field(message: dict[str, Any], name: str) -> str:
    value = message.get(name)
    if not isinstance(value, str):
        raise InvalidMessage(f"{name} must be a string")
    return value


def _base64_field(message: dict[str, Any], name: str) -> bytes:
    try:
        return base64.b64decode(_text_field(message, name), validate=True)
    except binascii.Error:
        raise InvalidMessage(f"{name} is not valid base64") from None


def _leaf_paths(value: object, prefix: str = "") -> list[str]:
    if isinstance(value, dict) and value:
        paths: list[str] = []
        for key, inner in value.items():
            paths += _leaf_paths(inner, f"{prefix}.{key}" if prefix else str(key))
        return paths
    return [prefix] if prefix else []


def _allowed(path: str, allowed: frozenset[str]) -> bool:
    parts = path.split(".")
    return any(".".join(parts[:n]) in allowed for n in range(1, len(parts) + 1))


def _sendable_close_code(text: str) -> bool:
    if not text.isdigit():
        return False
    code = int(text)
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


_SECONDS = re.compile(r"^\d+(\.\d+)?$")


def _is_seconds(text: str) -> bool:
    return bool(_SECONDS.match(text))


def truncate_words(text: str, fraction: float) -> str:
    """The part of ``text`` spoken when ``fraction`` of its audio was sent, ElevenLabs-style."""
    words = text.split()
    keep = math.ceil(len(words) * max(0.0, min(1.0, fraction)))
    if keep >= len(words):
        return text
    return " ".join(words[:keep]) + "..."


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def close_reason(text: str) -> str:
    """``text`` cut to what a close frame can carry (123 bytes of UTF-8)."""
    encoded = text.encode()
    if len(encoded) <= MAX_CLOSE_REASON_BYTES:
        return text
    return encoded[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore")
