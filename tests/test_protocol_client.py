"""Browser client contract: every client event, every rejection code, the server payloads."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.protocol import client
from relay.protocol.client import (
    CLIENT_EVENTS,
    ERROR_CODES,
    MAX_TEXT_CHARS,
    MAX_TOOL_CALL_ID_CHARS,
    MAX_TOOL_RESULT_CHARS,
    ClientAudio,
    ClientRejection,
    ClientToolResult,
    ContextualUpdate,
    EndCall,
    ErrorCode,
    UserActivity,
    UserMessage,
    parse_client_event,
)
from voicerelay.audio_formats import AudioFormat

MAX_AUDIO = 3200


def caller(event: str, data: object = None) -> Any:
    return parse_client_event(event, data, role="caller", max_audio_bytes=MAX_AUDIO)


def monitor(event: str, data: object = None) -> Any:
    return parse_client_event(event, data, role="monitor", max_audio_bytes=MAX_AUDIO)


def rejected(result: object, code: str) -> None:
    assert isinstance(result, ClientRejection), result
    assert result.code == code
    assert result.message


# --- Accepted commands -------------------------------------------------------------------------


def test_audio() -> None:
    frame = bytes(640)
    assert caller("audio", frame) == ClientAudio(frame)
    assert caller("audio", frame).data is frame  # no copy
    assert caller("audio", b"\x01" * MAX_AUDIO) == ClientAudio(b"\x01" * MAX_AUDIO)
    assert caller("audio", b"\x01") == ClientAudio(b"\x01")  # whole samples: the bridge's job


def test_texts() -> None:
    assert caller("user_message", {"text": "Where is my order?"}) == UserMessage(
        "Where is my order?"
    )
    assert caller(
        "contextual_update", {"text": "User opened the billing page"}
    ) == ContextualUpdate("User opened the billing page")
    assert caller("user_message", {"text": "ü" * MAX_TEXT_CHARS}) == UserMessage(
        "ü" * MAX_TEXT_CHARS
    )
    # Unknown keys are ignored so that newer clients keep working.
    assert caller("user_message", {"text": "hi", "client_ts": 5}) == UserMessage("hi")


@pytest.mark.parametrize("data", [None, {}, [], "x"])
def test_user_activity_ignores_its_payload(data: object) -> None:
    assert caller("user_activity", data) == UserActivity()


def test_client_tool_result() -> None:
    assert caller(
        "client_tool_result", {"tool_call_id": "tc_1", "result": "42", "is_error": False}
    ) == ClientToolResult("tc_1", "42", False)
    assert caller("client_tool_result", {"tool_call_id": "tc_2", "result": ""}) == ClientToolResult(
        "tc_2", "", False
    )
    assert caller(
        "client_tool_result", {"tool_call_id": "tc_3", "result": "boom", "is_error": True}
    ) == ClientToolResult("tc_3", "boom", True)


@pytest.mark.parametrize("role", ["caller", "monitor"])
@pytest.mark.parametrize("data", [None, {}, {"reason": "bye"}])
def test_call_end_is_allowed_for_everyone(role: Any, data: object) -> None:
    result = parse_client_event("call.end", data, role=role, max_audio_bytes=MAX_AUDIO)
    assert result == EndCall()


# --- Rejections ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data", ["AAAA", bytearray(4), memoryview(b"abcd"), [1, 2], {"data": b"x"}, None, 5]
)
def test_audio_must_be_binary(data: object) -> None:
    rejected(caller("audio", data), "audio_not_binary")


def test_audio_size_limits() -> None:
    rejected(caller("audio", b"\x00" * (MAX_AUDIO + 1)), "audio_too_large")
    rejected(caller("audio", b""), "invalid_message")


@pytest.mark.parametrize("event", ["user_message", "contextual_update"])
@pytest.mark.parametrize(
    "data",
    [
        None,
        "just a string",
        ["text"],
        {},
        {"text": ""},
        {"text": None},
        {"text": 42},
        {"text": ["a"]},
        {"text": "x" * (MAX_TEXT_CHARS + 1)},
        {"text": "lone \ud800 surrogate"},
    ],
)
def test_invalid_texts(event: str, data: object) -> None:
    rejected(caller(event, data), "invalid_message")


@pytest.mark.parametrize(
    "data",
    [
        None,
        "tc_1",
        {"result": "x"},
        {"tool_call_id": "", "result": "x"},
        {"tool_call_id": 7, "result": "x"},
        {"tool_call_id": "t" * (MAX_TOOL_CALL_ID_CHARS + 1), "result": "x"},
        {"tool_call_id": "tc", "result": {"json": "object"}},
        {"tool_call_id": "tc", "result": None},
        {"tool_call_id": "tc"},
        {"tool_call_id": "tc", "result": "r" * (MAX_TOOL_RESULT_CHARS + 1)},
        {"tool_call_id": "tc", "result": "x", "is_error": "false"},
        {"tool_call_id": "tc", "result": "x", "is_error": 0},
        {"tool_call_id": "tc\udfff", "result": "x"},
    ],
)
def test_invalid_tool_results(data: object) -> None:
    rejected(caller("client_tool_result", data), "invalid_message")


@pytest.mark.parametrize("event", sorted(CLIENT_EVENTS - {"call.end"}))
def test_a_monitor_can_send_nothing_that_reaches_the_agent(event: str) -> None:
    valid: dict[str, object] = {
        "audio": bytes(320),
        "user_message": {"text": "hi"},
        "contextual_update": {"text": "hi"},
        "user_activity": None,
        "client_tool_result": {"tool_call_id": "t", "result": "r"},
    }
    rejected(monitor(event, valid[event]), "monitor_read_only")


@pytest.mark.parametrize(
    "event", ["call.ready", "interruption", "ping", "", "AUDIO", "x" * 10_000, "connect"]
)
@pytest.mark.parametrize("role", ["caller", "monitor"])
def test_unknown_events(event: str, role: Any) -> None:
    result = parse_client_event(event, {}, role=role, max_audio_bytes=MAX_AUDIO)
    rejected(result, "unknown_event")
    assert len(result.message) < 100


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.sampled_from(sorted(CLIENT_EVENTS)), st.text(max_size=20)),
    st.one_of(
        st.none(),
        st.binary(max_size=4000),
        st.text(),
        st.dictionaries(
            st.sampled_from(["text", "tool_call_id", "result", "is_error", "x"]),
            st.one_of(st.none(), st.booleans(), st.integers(), st.text(), st.binary(max_size=8)),
        ),
    ),
    st.sampled_from(["caller", "monitor"]),
)
def test_fuzz_never_raises_and_rejections_use_stable_codes(
    event: str, data: object, role: Any
) -> None:
    result = parse_client_event(event, data, role=role, max_audio_bytes=MAX_AUDIO)
    if isinstance(result, ClientRejection):
        assert result.code in ERROR_CODES
        assert set(result.payload()) == {"code", "message"}
    elif role == "monitor":
        assert result == EndCall()


# --- Server → client payloads --------------------------------------------------------------------


def test_error_codes_are_the_documented_set() -> None:
    assert {
        "unauthorized",
        "forbidden",
        "call_ended",
        "upstream_unavailable",
        "rate_limited",
        "tenant_limit",
        "draining",
        "invalid_message",
        "audio_too_large",
        "audio_not_binary",
        "unknown_event",
        "monitor_read_only",
        "not_ready",
    } == ERROR_CODES


def test_event_names() -> None:
    assert (client.EV_READY, client.EV_ENDED, client.EV_END) == (
        "call.ready",
        "call.ended",
        "call.end",
    )
    assert {
        "call.ready",
        "audio",
        "interruption",
        "agent_response",
        "agent_response_correction",
        "user_transcript",
        "client_tool_call",
        "dtmf",
        "call.ended",
        "error",
    } == client.SERVER_EVENTS
    assert {
        "audio",
        "user_message",
        "contextual_update",
        "user_activity",
        "client_tool_result",
        "call.end",
    } == CLIENT_EVENTS


def test_payloads_are_plain_json() -> None:
    call_id = uuid.uuid4()
    payloads = {
        "ready": client.call_ready(call_id, "conv_1", AudioFormat.pcm_16000, "ulaw_8000", False),
        "ended": client.call_ended("agent_ended", "normal"),
        "error": client.error(ErrorCode.tenant_limit, "too many calls"),
        "interruption": client.interruption(),
        "response": client.agent_response("Hello"),
        "correction": client.agent_response_correction("Hello there", "Hello"),
        "transcript": client.user_transcript("hi"),
        "tool": client.client_tool_call("lookup", "tc_1", {"order": "A-1"}),
    }
    assert payloads == {
        "ready": {
            "call_id": str(call_id),
            "conversation_id": "conv_1",
            "input_format": "pcm_16000",
            "output_format": "ulaw_8000",
            "resumed": False,
        },
        "ended": {"reason": "agent_ended", "code": "normal"},
        "error": {"code": "tenant_limit", "message": "too many calls"},
        "interruption": {},
        "response": {"text": "Hello"},
        "correction": {"original": "Hello there", "corrected": "Hello"},
        "transcript": {"text": "hi"},
        "tool": {"tool_name": "lookup", "tool_call_id": "tc_1", "parameters": {"order": "A-1"}},
    }
    # Exactly plain types: the stdlib encoder (python-socketio's) round-trips them unchanged.
    assert json.loads(json.dumps(payloads)) == payloads
    assert type(payloads["ready"]["input_format"]) is str
    assert type(payloads["error"]["code"]) is str


def test_rejection_payload() -> None:
    rejection = caller("audio", "text")
    assert rejection.payload() == {
        "code": "audio_not_binary",
        "message": "audio must be sent as binary data",
    }
