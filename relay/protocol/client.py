"""The browser client contract (Socket.IO v5, default namespace), without any Socket.IO code.

``parse_client_event`` turns one received event into a command for the call, or a rejection with a
stable error code; the payload builders produce exactly what each server → client event carries.

Server → client: ``call.ready`` {call_id, conversation_id, input_format, output_format, resumed};
``audio`` (binary); ``interruption`` {}; ``agent_response`` {text}; ``agent_response_correction``
{original, corrected}; ``user_transcript`` {text}; ``client_tool_call`` {tool_name, tool_call_id,
parameters}; ``dtmf`` {digit} (a phone caller pressed a key; the agent got it as the user
message ``dtmf_text(digit)``); ``call.ended`` {reason, code}; ``error`` {code, message}.

Client → server: ``audio`` (binary, in the client's declared format); ``user_message`` {text};
``contextual_update`` {text}; ``user_activity``; ``client_tool_result`` {tool_call_id, result,
is_error}; ``call.end``. A ``monitor`` may send only ``call.end`` (it leaves; the call goes on).
Unknown keys in payload objects are ignored, so clients can be newer than the relay.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Literal, TypeAlias
from uuid import UUID

from voicerelay.audio_formats import AudioFormat

Role: TypeAlias = Literal["caller", "monitor"]

# Server → client event names.
EV_READY: Final = "call.ready"
EV_AUDIO: Final = "audio"
EV_INTERRUPTION: Final = "interruption"
EV_AGENT_RESPONSE: Final = "agent_response"
EV_AGENT_RESPONSE_CORRECTION: Final = "agent_response_correction"
EV_USER_TRANSCRIPT: Final = "user_transcript"
EV_CLIENT_TOOL_CALL: Final = "client_tool_call"
EV_DTMF: Final = "dtmf"
EV_ENDED: Final = "call.ended"
EV_ERROR: Final = "error"
# Client → server event names (``audio`` is both ways).
EV_USER_MESSAGE: Final = "user_message"
EV_CONTEXTUAL_UPDATE: Final = "contextual_update"
EV_USER_ACTIVITY: Final = "user_activity"
EV_CLIENT_TOOL_RESULT: Final = "client_tool_result"
EV_END: Final = "call.end"

SERVER_EVENTS: Final = frozenset(
    {
        EV_READY,
        EV_AUDIO,
        EV_INTERRUPTION,
        EV_AGENT_RESPONSE,
        EV_AGENT_RESPONSE_CORRECTION,
        EV_USER_TRANSCRIPT,
        EV_CLIENT_TOOL_CALL,
        EV_DTMF,
        EV_ENDED,
        EV_ERROR,
    }
)
CLIENT_EVENTS: Final = frozenset(
    {
        EV_AUDIO,
        EV_USER_MESSAGE,
        EV_CONTEXTUAL_UPDATE,
        EV_USER_ACTIVITY,
        EV_CLIENT_TOOL_RESULT,
        EV_END,
    }
)

# Bounds on what a client may send upstream (ElevenLabs forwards texts to the LLM).
MAX_TEXT_CHARS: Final = 4000
MAX_TOOL_CALL_ID_CHARS: Final = 256
MAX_TOOL_RESULT_CHARS: Final = 16_000
_MAX_ECHOED_EVENT_CHARS: Final = 64


class ErrorCode(StrEnum):
    """Stable codes of ``error`` events and ``connect_error`` data; clients switch on them."""

    unauthorized = "unauthorized"
    forbidden = "forbidden"
    call_ended = "call_ended"
    upstream_unavailable = "upstream_unavailable"
    rate_limited = "rate_limited"
    tenant_limit = "tenant_limit"
    draining = "draining"
    invalid_message = "invalid_message"
    audio_too_large = "audio_too_large"
    audio_not_binary = "audio_not_binary"
    unknown_event = "unknown_event"
    monitor_read_only = "monitor_read_only"
    not_ready = "not_ready"


ERROR_CODES: Final = frozenset(code.value for code in ErrorCode)

# --- Commands (what a client asked for, validated) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientAudio:
    data: bytes


@dataclass(frozen=True, slots=True)
class UserMessage:
    text: str


@dataclass(frozen=True, slots=True)
class ContextualUpdate:
    text: str


@dataclass(frozen=True, slots=True)
class UserActivity:
    pass


@dataclass(frozen=True, slots=True)
class ClientToolResult:
    tool_call_id: str
    result: str
    is_error: bool


@dataclass(frozen=True, slots=True)
class EndCall:
    pass


ClientCommand: TypeAlias = (
    ClientAudio | UserMessage | ContextualUpdate | UserActivity | ClientToolResult | EndCall
)


@dataclass(frozen=True, slots=True)
class ClientRejection:
    code: ErrorCode
    message: str

    def payload(self) -> dict[str, str]:
        """The ``error`` event's data for this rejection."""
        return error(self.code, self.message)


_USER_ACTIVITY: Final = UserActivity()
_END_CALL: Final = EndCall()


def parse_client_event(
    event: str, data: object, *, role: Role, max_audio_bytes: int
) -> ClientCommand | ClientRejection:
    """Validate one client → server event. Never raises on client input.

    Whether PCM audio holds whole samples is the bridge's concern (it knows the format).
    """
    if event not in CLIENT_EVENTS:
        shown = event[:_MAX_ECHOED_EVENT_CHARS] if isinstance(event, str) else "?"
        return ClientRejection(ErrorCode.unknown_event, f"unknown event {shown!r}")
    if event == EV_END:
        return _END_CALL
    if role != "caller":
        return ClientRejection(ErrorCode.monitor_read_only, "a monitor can only listen")
    if event == EV_AUDIO:
        return _audio(data, max_audio_bytes)
    if event == EV_USER_ACTIVITY:
        return _USER_ACTIVITY
    if not isinstance(data, dict):
        return _invalid(f"{event} needs an object payload")
    if event == EV_CLIENT_TOOL_RESULT:
        return _tool_result(data)
    text = _bounded_text(data.get("text"), MAX_TEXT_CHARS, allow_empty=False)
    if text is None:
        return _invalid(f"{event}.text must be 1 to {MAX_TEXT_CHARS} characters")
    return UserMessage(text) if event == EV_USER_MESSAGE else ContextualUpdate(text)


def _audio(data: object, max_audio_bytes: int) -> ClientAudio | ClientRejection:
    if type(data) is not bytes:
        return ClientRejection(ErrorCode.audio_not_binary, "audio must be sent as binary data")
    if len(data) > max_audio_bytes:
        return ClientRejection(
            ErrorCode.audio_too_large, f"audio frames are limited to {max_audio_bytes} bytes"
        )
    if not data:
        return _invalid("audio frame is empty")
    return ClientAudio(data)


def _tool_result(data: dict[Any, Any]) -> ClientToolResult | ClientRejection:
    tool_call_id = _bounded_text(
        data.get("tool_call_id"), MAX_TOOL_CALL_ID_CHARS, allow_empty=False
    )
    if tool_call_id is None:
        return _invalid(f"tool_call_id must be 1 to {MAX_TOOL_CALL_ID_CHARS} characters")
    result = _bounded_text(data.get("result"), MAX_TOOL_RESULT_CHARS, allow_empty=True)
    if result is None:
        return _invalid(f"result must be a string of at most {MAX_TOOL_RESULT_CHARS} characters")
    is_error = data.get("is_error", False)
    if not isinstance(is_error, bool):
        return _invalid("is_error must be a boolean")
    return ClientToolResult(tool_call_id, result, is_error)


def _bounded_text(value: object, max_chars: int, *, allow_empty: bool) -> str | None:
    if not isinstance(value, str) or len(value) > max_chars or (not value and not allow_empty):
        return None
    if not value.isascii():
        try:
            # JSON decoders accept lone surrogates ("\ud800"); they cannot be sent on as UTF-8.
            value.encode("utf-8")
        except UnicodeEncodeError:
            return None
    return value


def _invalid(message: str) -> ClientRejection:
    return ClientRejection(ErrorCode.invalid_message, message)


# --- Server → client payloads -------------------------------------------------------------------


def call_ready(
    call_id: UUID | str,
    conversation_id: str,
    input_format: AudioFormat | str,
    output_format: AudioFormat | str,
    resumed: bool,
) -> dict[str, Any]:
    """``input_format``/``output_format`` are the client's: what it sends and what it receives."""
    return {
        "call_id": str(call_id),
        "conversation_id": conversation_id,
        "input_format": _format_name(input_format),
        "output_format": _format_name(output_format),
        "resumed": resumed,
    }


def call_ended(reason: str, code: str) -> dict[str, str]:
    return {"reason": reason, "code": code}


def error(code: ErrorCode | str, message: str) -> dict[str, str]:
    """Data of an ``error`` event, and of a refused connection's ``connect_error``."""
    return {"code": str(code), "message": message}


def interruption() -> dict[str, Any]:
    return {}


def agent_response(text: str) -> dict[str, str]:
    return {"text": text}


def agent_response_correction(original: str, corrected: str) -> dict[str, str]:
    return {"original": original, "corrected": corrected}


def user_transcript(text: str) -> dict[str, str]:
    return {"text": text}


def client_tool_call(
    tool_name: str, tool_call_id: str, parameters: dict[str, Any]
) -> dict[str, Any]:
    return {"tool_name": tool_name, "tool_call_id": tool_call_id, "parameters": parameters}


def dtmf(digit: str) -> dict[str, str]:
    return {"digit": digit}


def dtmf_text(digit: str) -> str:
    """What the agent is told when the caller presses a key: a user turn it should answer (a
    menu choice, a confirmation), so a ``user_message`` rather than a silent contextual update."""
    return f"The caller pressed {digit} on the keypad."


def _format_name(value: AudioFormat | str) -> str:
    # A plain str: the JSON encoder on the Socket.IO side need not know the enum.
    return value.value if isinstance(value, AudioFormat) else str(value)
