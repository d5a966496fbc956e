"""Sans-I/O ElevenLabs ConvAI protocol: every message type, every malformed input, barge-in, pongs."""

from __future__ import annotations

import base64
import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.protocol.elevenlabs import (
    MAX_ERROR_MESSAGE_CHARS,
    SOURCE_INFO,
    AgentAudio,
    AgentResponse,
    AgentResponseCorrection,
    AgentToolResponse,
    ClientToolCall,
    ConversationStarted,
    ElevenLabsProtocol,
    IgnoredEvent,
    Interruption,
    Ping,
    ProtocolViolation,
    UpstreamError,
    UpstreamEvent,
    UserTranscript,
)
from voicerelay.audio_formats import AudioFormat


def frame(message: Any) -> str:
    # The stdlib encoder: it writes what orjson refuses to (ints over 64 bits, NaN), like a peer might.
    return json.dumps(message)


def metadata(
    conversation_id: str = "conv_1",
    output: str | None = "pcm_16000",
    input_: str | None = "pcm_16000",
) -> str:
    event: dict[str, Any] = {"conversation_id": conversation_id}
    if output is not None:
        event["agent_output_audio_format"] = output
    if input_ is not None:
        event["user_input_audio_format"] = input_
    return frame(
        {
            "type": "conversation_initiation_metadata",
            "conversation_initiation_metadata_event": event,
        }
    )


def audio(event_id: int, data: bytes = b"\x01\x02\x03\x04") -> str:
    return frame(
        {
            "type": "audio",
            "audio_event": {"audio_base_64": base64.b64encode(data).decode(), "event_id": event_id},
        }
    )


def interruption(event_id: int) -> str:
    return frame({"type": "interruption", "interruption_event": {"event_id": event_id}})


def ping(event_id: Any, ping_ms: Any = None) -> str:
    return frame({"type": "ping", "ping_event": {"event_id": event_id, "ping_ms": ping_ms}})


def streaming() -> ElevenLabsProtocol:
    protocol = ElevenLabsProtocol()
    [started] = protocol.receive_text(metadata())
    assert isinstance(started, ConversationStarted)
    return protocol


def one(events: list[UpstreamEvent]) -> UpstreamEvent:
    assert len(events) == 1, events
    return events[0]


# --- Outgoing ------------------------------------------------------------------------------------


def test_initiation_message_carries_overrides_variables_and_source() -> None:
    protocol = ElevenLabsProtocol()
    override = {"agent": {"first_message": "Hi {{customer}}", "language": "en"}}
    text = protocol.initiation_message(
        conversation_config_override=override, dynamic_variables={"customer": "Ada", "n": 3}
    )
    assert ": " not in text
    assert ", " not in text
    assert orjson.loads(text) == {
        "type": "conversation_initiation_client_data",
        "conversation_config_override": override,
        "custom_llm_extra_body": {},
        "dynamic_variables": {"customer": "Ada", "n": 3},
        "source_info": {"source": "voicerelay", "version": SOURCE_INFO["version"]},
    }
    assert SOURCE_INFO["version"]
    with_user = orjson.loads(
        protocol.initiation_message(
            conversation_config_override={},
            dynamic_variables={},
            custom_llm_extra_body={"temperature": 0.2},
            user_id="user-7",
        )
    )
    assert with_user["user_id"] == "user-7"
    assert with_user["custom_llm_extra_body"] == {"temperature": 0.2}


@pytest.mark.parametrize("data", [b"", b"\x00", bytes(range(256)) * 3, bytes(640)])
def test_user_audio_chunk_is_base64_without_a_type(data: bytes) -> None:
    text = ElevenLabsProtocol.user_audio(data)
    assert orjson.loads(text) == {"user_audio_chunk": base64.b64encode(data).decode()}
    assert "\n" not in text


def test_text_builders() -> None:
    p = ElevenLabsProtocol()
    tricky = 'say "hi"\n\\ — ünïcode 🎧'
    assert orjson.loads(p.user_message(tricky)) == {"type": "user_message", "text": tricky}
    assert orjson.loads(p.contextual_update(tricky)) == {
        "type": "contextual_update",
        "text": tricky,
    }
    assert orjson.loads(p.user_activity()) == {"type": "user_activity"}
    assert orjson.loads(p.client_tool_result("call_1", "42", False)) == {
        "type": "client_tool_result",
        "tool_call_id": "call_1",
        "result": "42",
        "is_error": False,
    }
    assert orjson.loads(p.client_tool_result("call_2", "boom", True))["is_error"] is True


# --- Start of the conversation -----------------------------------------------------------------


def test_metadata_starts_the_conversation() -> None:
    protocol = ElevenLabsProtocol(
        expected_input_format="ulaw_8000", expected_output_format="pcm_22050"
    )
    assert protocol.state == "awaiting_metadata"
    event = one(protocol.receive_text(metadata("conv_9", "pcm_22050", "ulaw_8000")))
    assert event == ConversationStarted(
        "conv_9", AudioFormat.pcm_22050, AudioFormat.ulaw_8000, formats_as_expected=True
    )
    assert protocol.state == "streaming"
    assert protocol.conversation_id == "conv_9"
    assert (protocol.agent_output_format, protocol.user_input_format) == (
        AudioFormat.pcm_22050,
        AudioFormat.ulaw_8000,
    )


def test_metadata_formats_win_over_expectations_and_default_when_missing() -> None:
    protocol = ElevenLabsProtocol(
        expected_input_format="pcm_16000", expected_output_format="pcm_16000"
    )
    event = one(protocol.receive_text(metadata(output="ulaw_8000")))
    assert isinstance(event, ConversationStarted)
    assert event.agent_output_format == AudioFormat.ulaw_8000
    assert not event.formats_as_expected

    missing = ElevenLabsProtocol(expected_output_format="pcm_24000")
    event = one(missing.receive_text(metadata(output=None, input_=None)))
    assert isinstance(event, ConversationStarted)
    assert (event.agent_output_format, event.user_input_format) == (
        AudioFormat.pcm_24000,
        AudioFormat.pcm_16000,  # ElevenLabs' default
    )
    assert event.formats_as_expected


@pytest.mark.parametrize(
    "bad",
    [
        metadata(output="mp3_44100"),
        metadata(input_="PCM_16000"),
        metadata(conversation_id=""),
        frame({"type": "conversation_initiation_metadata"}),
        frame(
            {
                "type": "conversation_initiation_metadata",
                "conversation_initiation_metadata_event": [],
            }
        ),
        frame(
            {
                "type": "conversation_initiation_metadata",
                "conversation_initiation_metadata_event": {"conversation_id": 7},
            }
        ),
        frame(
            {
                "type": "conversation_initiation_metadata",
                "conversation_initiation_metadata_event": {
                    "conversation_id": "c",
                    "agent_output_audio_format": 16000,
                },
            }
        ),
    ],
)
def test_bad_metadata_is_a_violation_and_does_not_start(bad: str) -> None:
    protocol = ElevenLabsProtocol()
    assert isinstance(one(protocol.receive_text(bad)), ProtocolViolation)
    assert protocol.state == "awaiting_metadata"
    assert isinstance(one(protocol.receive_text(metadata())), ConversationStarted)


def test_anything_but_metadata_first_is_a_violation_and_not_acted_on() -> None:
    protocol = ElevenLabsProtocol()
    for early in (
        audio(5),
        interruption(9),
        frame({"type": "agent_response"}),
        frame({"type": "x"}),
    ):
        event = one(protocol.receive_text(early))
        assert isinstance(event, ProtocolViolation)
        assert "conversation_initiation_metadata" in event.detail
    assert protocol.last_interrupt_id == -1  # the early interruption did nothing
    assert protocol.state == "awaiting_metadata"
    one(protocol.receive_text(metadata()))
    assert one(protocol.receive_text(audio(1))) == AgentAudio(b"\x01\x02\x03\x04", 1)


def test_error_and_ping_are_handled_before_metadata() -> None:
    protocol = ElevenLabsProtocol()
    assert one(protocol.receive_text(ping(1, 20))) == Ping(1, 20)
    assert protocol.data_to_send() == ['{"type":"pong","event_id":1}']
    rejected = frame(
        {
            "type": "error",
            "error_event": {"code": 1008, "error_type": "override_error", "message": "no"},
        }
    )
    assert one(protocol.receive_text(rejected)) == UpstreamError("no", 1008, "override_error")
    assert protocol.state == "awaiting_metadata"


def test_a_second_metadata_is_a_violation() -> None:
    protocol = streaming()
    assert isinstance(one(protocol.receive_text(metadata("conv_2"))), ProtocolViolation)
    assert protocol.conversation_id == "conv_1"


# --- Ping / pong ---------------------------------------------------------------------------------


def test_ping_queues_a_pong_with_the_same_event_id_at_once() -> None:
    protocol = streaming()
    assert protocol.data_to_send() == []
    assert one(protocol.receive_text(ping(12345, 87))) == Ping(12345, 87)
    assert one(protocol.receive_text(ping(12346))) == Ping(12346, None)
    assert protocol.data_to_send() == [
        '{"type":"pong","event_id":12345}',
        '{"type":"pong","event_id":12346}',
    ]
    assert protocol.data_to_send() == []  # drained
    assert protocol.pings_answered == 2
    assert protocol.last_ping_ms == 87  # a ping without ping_ms keeps the last measurement


@pytest.mark.parametrize("ping_ms", ["87", True, -1, [1], {"a": 1}, 1e12])
def test_a_malformed_ping_ms_is_not_a_reason_to_skip_the_pong(ping_ms: Any) -> None:
    protocol = streaming()
    assert one(protocol.receive_text(ping(3, ping_ms))) == Ping(3, None)
    assert protocol.data_to_send() == ['{"type":"pong","event_id":3}']
    assert protocol.last_ping_ms is None


def test_float_ping_ms_is_rounded() -> None:
    protocol = streaming()
    assert one(protocol.receive_text(ping(3, 41.6))) == Ping(3, 42)


@pytest.mark.parametrize("event_id", [None, "7", 7.0, True, -3, [7]])
def test_a_ping_without_a_usable_event_id_gets_no_pong(event_id: Any) -> None:
    protocol = streaming()
    assert isinstance(one(protocol.receive_text(ping(event_id))), ProtocolViolation)
    assert protocol.data_to_send() == []


# --- Audio and barge-in --------------------------------------------------------------------------


def test_agent_audio_is_decoded_once() -> None:
    protocol = streaming()
    data = bytes(range(256)) * 5
    event = one(protocol.receive_text(audio(4, data)))
    assert event == AgentAudio(data, 4)
    assert isinstance(event, AgentAudio)
    assert type(event.audio) is bytes


def test_barge_in_drops_audio_at_or_below_the_interruption() -> None:
    protocol = streaming()
    ids = [e.event_id for t in (audio(1), audio(2), audio(3)) for e in protocol.receive_text(t)]
    assert ids == [1, 2, 3]
    assert one(protocol.receive_text(interruption(2))) == Interruption(2)
    assert protocol.last_interrupt_id == 2
    assert protocol.receive_text(audio(2)) == []  # late audio of the interrupted turn
    assert protocol.receive_text(audio(1)) == []
    assert one(protocol.receive_text(audio(3))) == AgentAudio(b"\x01\x02\x03\x04", 3)
    assert protocol.stale_audio_dropped == 2
    # An older interruption never lowers the threshold.
    assert one(protocol.receive_text(interruption(1))) == Interruption(1)
    assert protocol.last_interrupt_id == 2
    assert protocol.receive_text(audio(2)) == []
    assert protocol.stale_audio_dropped == 3
    one(protocol.receive_text(interruption(10)))
    assert protocol.receive_text(audio(10)) == []
    assert one(protocol.receive_text(audio(11))).event_id == 11  # type: ignore[union-attr]


def test_audio_with_event_id_zero_plays_when_nothing_was_interrupted() -> None:
    protocol = streaming()
    assert one(protocol.receive_text(audio(0))) == AgentAudio(b"\x01\x02\x03\x04", 0)
    one(protocol.receive_text(interruption(0)))
    assert protocol.receive_text(audio(0)) == []


def test_stale_audio_is_dropped_even_when_its_base64_is_broken() -> None:
    protocol = streaming()
    one(protocol.receive_text(interruption(5)))
    broken = frame({"type": "audio", "audio_event": {"audio_base_64": "@@@", "event_id": 4}})
    assert protocol.receive_text(broken) == []
    assert protocol.stale_audio_dropped == 1


def test_empty_audio_emits_nothing() -> None:
    assert streaming().receive_text(audio(1, b"")) == []


# --- Text, tools, errors -------------------------------------------------------------------------


def test_agent_response_and_correction() -> None:
    protocol = streaming()
    response = frame(
        {
            "type": "agent_response",
            "agent_response_event": {"agent_response": "Hello!", "event_id": 3},
        }
    )
    assert one(protocol.receive_text(response)) == AgentResponse("Hello!", 3)
    correction = frame(
        {
            "type": "agent_response_correction",
            "agent_response_correction_event": {
                "original_agent_response": "Hello! How can I help you today?",
                "corrected_agent_response": "Hello! How can",
                "event_id": 3,
            },
        }
    )
    assert one(protocol.receive_text(correction)) == AgentResponseCorrection(
        "Hello! How can I help you today?", "Hello! How can", 3
    )
    no_id = frame({"type": "agent_response", "agent_response_event": {"agent_response": ""}})
    assert one(protocol.receive_text(no_id)) == AgentResponse("", None)


def test_user_transcript() -> None:
    message = frame(
        {
            "type": "user_transcript",
            "user_transcription_event": {"user_transcript": "I need help", "event_id": 2},
        }
    )
    assert one(streaming().receive_text(message)) == UserTranscript("I need help", 2)


def test_client_tool_call() -> None:
    protocol = streaming()
    call = {
        "type": "client_tool_call",
        "client_tool_call": {
            "tool_name": "lookup_order",
            "tool_call_id": "tc_1",
            "parameters": {"order": "A-17", "nested": {"x": [1, 2]}},
            "event_id": 8,
        },
    }
    assert one(protocol.receive_text(frame(call))) == ClientToolCall(
        "lookup_order", "tc_1", {"order": "A-17", "nested": {"x": [1, 2]}}, 8
    )
    del call["client_tool_call"]["parameters"]  # type: ignore[attr-defined]
    assert one(protocol.receive_text(frame(call))) == ClientToolCall("lookup_order", "tc_1", {}, 8)


def test_agent_tool_response_detects_end_call() -> None:
    protocol = streaming()
    ended = frame(
        {
            "type": "agent_tool_response",
            "agent_tool_response": {
                "tool_name": "end_call",
                "tool_call_id": "t9",
                "tool_type": "system",
                "is_error": False,
                "is_called": True,
                "event_id": 40,
            },
        }
    )
    event = one(protocol.receive_text(ended))
    assert event == AgentToolResponse("end_call", "t9", False)
    assert isinstance(event, AgentToolResponse)
    assert event.ends_call
    other = frame({"type": "agent_tool_response", "agent_tool_response": {"tool_name": "transfer"}})
    event = one(protocol.receive_text(other))
    assert event == AgentToolResponse("transfer", "", False)
    assert isinstance(event, AgentToolResponse)
    assert not event.ends_call


def test_error_with_error_event() -> None:
    protocol = streaming()
    message = frame(
        {
            "type": "error",
            "error_event": {
                "code": 1002,
                "error_type": "llm_timeout",
                "message": "LLM response took over 20 seconds",
                "debug_message": "internal detail",
            },
        }
    )
    error = one(protocol.receive_text(message))
    assert error == UpstreamError("LLM response took over 20 seconds", 1002, "llm_timeout")
    assert protocol.last_error == error
    reason_only = frame({"type": "error", "error_event": {"code": 1008, "reason": "missing x"}})
    assert one(protocol.receive_text(reason_only)) == UpstreamError("missing x", 1008, None)
    type_only = frame(
        {"type": "error", "error_event": {"code": 1000, "error_type": "max_duration_exceeded"}}
    )
    assert one(protocol.receive_text(type_only)) == UpstreamError(
        "max_duration_exceeded", 1000, "max_duration_exceeded"
    )


def test_flat_error_without_error_event() -> None:
    protocol = streaming()
    quota = (
        "received 1002 (protocol error) This request exceeds your quota limit.; "
        "then sent 1002 (protocol error) This request exceeds your quota limit."
    )
    error = one(protocol.receive_text(frame({"type": "error", "message": quota})))
    assert error == UpstreamError(quota, None, None)
    assert protocol.last_error == error
    bare = one(protocol.receive_text(frame({"type": "error"})))
    assert bare == UpstreamError("upstream error", None, None)


@pytest.mark.parametrize(
    "payload",
    [
        {"error_event": "boom"},  # not an object: falls back to the flat fields
        {"error_event": {"code": True, "message": 5, "error_type": ["x"]}},
        {"error_event": {"code": 99999}},
        {"error_event": None, "message": None},
    ],
)
def test_malformed_errors_still_surface_as_errors(payload: dict[str, Any]) -> None:
    error = one(streaming().receive_text(frame({"type": "error", **payload})))
    assert error == UpstreamError("upstream error", None, None)


def test_error_text_is_bounded() -> None:
    error = one(streaming().receive_text(frame({"type": "error", "message": "x" * 10_000})))
    assert isinstance(error, UpstreamError)
    assert len(error.message) == MAX_ERROR_MESSAGE_CHARS


@pytest.mark.parametrize(
    "kind",
    [
        "vad_score",
        "tentative_user_transcript",
        "internal_turn_probability",
        "agent_tool_request",
        "brand_new",
    ],
)
def test_unknown_and_unused_types_are_ignored(kind: str) -> None:
    protocol = streaming()
    assert one(protocol.receive_text(frame({"type": kind, "whatever": {"x": 1}}))) == IgnoredEvent(
        kind
    )


def test_ignored_type_names_are_truncated() -> None:
    event = one(streaming().receive_text(frame({"type": "t" * 1000})))
    assert isinstance(event, IgnoredEvent)
    assert len(event.type) <= 65


# --- Malformed input: one violation, no state change, no exception ------------------------------

MALFORMED: list[str | bytes] = [
    "",
    "not json",
    "{",
    '{"type": "audio"',
    b"\xff\xfe\x00",
    "[]",
    '"audio"',
    "42",
    "null",
    "{}",
    '{"type": 5}',
    '{"type": null}',
    '{"type": ["audio"]}',
    '{"type": "audio"}',
    '{"type": "audio", "audio_event": []}',
    '{"type": "audio", "audio_event": {"event_id": 9}}',
    '{"type": "audio", "audio_event": {"audio_base_64": "AAAA"}}',
    '{"type": "audio", "audio_event": {"audio_base_64": "AAAA", "event_id": "9"}}',
    '{"type": "audio", "audio_event": {"audio_base_64": "AAAA", "event_id": true}}',
    '{"type": "audio", "audio_event": {"audio_base_64": "AAAA", "event_id": 9.5}}',
    '{"type": "audio", "audio_event": {"audio_base_64": "AAAA", "event_id": -9}}',
    '{"type": "audio", "audio_event": {"audio_base_64": 1234, "event_id": 9}}',
    '{"type": "audio", "audio_event": {"audio_base_64": "AAA", "event_id": 9}}',
    '{"type": "audio", "audio_event": {"audio_base_64": "ü€", "event_id": 9}}',
    '{"type": "interruption"}',
    '{"type": "interruption", "interruption_event": {"reason": "user spoke"}}',
    '{"type": "interruption", "interruption_event": {"event_id": "12"}}',
    '{"type": "ping", "ping_event": "x"}',
    '{"type": "agent_response", "agent_response_event": {"event_id": 1}}',
    '{"type": "agent_response", "agent_response_event": {"agent_response": 7}}',
    '{"type": "agent_response", "agent_response_event": {"agent_response": "hi", "event_id": "1"}}',
    '{"type": "agent_response_correction", "agent_response_correction_event": {"original_agent_response": "a"}}',
    '{"type": "user_transcript", "user_transcription_event": {"text": "wrong key"}}',
    '{"type": "client_tool_call", "client_tool_call": {"tool_name": "t", "tool_call_id": ""}}',
    '{"type": "client_tool_call", "client_tool_call": {"tool_name": "t", "tool_call_id": "c", "parameters": [1]}}',
    '{"type": "agent_tool_response", "agent_tool_response": {"tool_call_id": "c"}}',
    '{"type": "agent_tool_response", "agent_tool_response": {"tool_name": "end_call", "is_error": "no"}}',
    '{"type": "audio", "audio_event": {"audio_base_64": "AAAA", "event_id": 1e400}}',
    "[" * 5000 + "]" * 5000,
]


@pytest.mark.parametrize("bad", MALFORMED)
def test_malformed_frames_are_violations_without_side_effects(bad: str | bytes) -> None:
    protocol = streaming()
    one(protocol.receive_text(interruption(3)))
    event = one(protocol.receive_text(bad))
    assert isinstance(event, ProtocolViolation)
    assert len(event.detail) < 200
    assert protocol.state == "streaming"
    assert protocol.last_interrupt_id == 3
    assert protocol.data_to_send() == []
    assert protocol.last_error is None


def test_violation_details_do_not_echo_payloads() -> None:
    secret = "sk_live_should_never_be_logged"
    event = one(
        streaming().receive_text(
            frame({"type": "agent_response", "agent_response_event": {"agent_response": [secret]}})
        )
    )
    assert isinstance(event, ProtocolViolation)
    assert secret not in event.detail


def test_bytes_frames_are_accepted() -> None:
    protocol = ElevenLabsProtocol()
    assert isinstance(one(protocol.receive_text(metadata().encode())), ConversationStarted)
    assert one(protocol.receive_text(audio(1).encode())) == AgentAudio(b"\x01\x02\x03\x04", 1)


def test_after_close_frames_are_ignored_and_pongs_discarded() -> None:
    protocol = streaming()
    protocol.receive_text(ping(1))
    protocol.connection_closed()
    assert protocol.state == "closed"
    assert protocol.data_to_send() == []
    assert protocol.receive_text(audio(5)) == []
    assert protocol.receive_text(ping(2)) == []
    assert protocol.data_to_send() == []


# --- Fuzzing -------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)
# Cheap stand-ins for "any JSON value" inside near-valid messages (drawing full trees is slow).
odd_values = st.sampled_from(
    [None, True, False, 0, -1, 2**64, 1.5, "", "x", "end_call", [], [1, "a"], {}, {"k": [None]}]
)
event_ids = st.one_of(
    st.integers(min_value=-2, max_value=40),
    st.sampled_from([None, "3", True, 2.5, [1], 2**63]),
)
b64_texts = st.one_of(
    st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    st.text(max_size=12),
    st.integers(),
)
TYPES = [
    "conversation_initiation_metadata",
    "audio",
    "interruption",
    "ping",
    "agent_response",
    "agent_response_correction",
    "user_transcript",
    "client_tool_call",
    "agent_tool_response",
    "error",
    "vad_score",
]


@st.composite
def near_valid_messages(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(TYPES))
    payload: dict[str, Any] = {
        "event_id": draw(event_ids),
        "audio_base_64": draw(b64_texts),
        "ping_ms": draw(st.one_of(st.none(), st.integers(), st.floats())),
        "conversation_id": draw(st.one_of(st.just("c1"), odd_values)),
        "agent_output_audio_format": draw(st.sampled_from(["pcm_16000", "ulaw_8000", "bad", None])),
        "agent_response": draw(st.one_of(st.text(max_size=8), odd_values)),
        "tool_name": draw(st.sampled_from(["end_call", "t", "", 5])),
        "tool_call_id": draw(st.sampled_from(["c", "", None])),
        "parameters": draw(odd_values),
        "code": draw(st.one_of(st.integers(), odd_values)),
        "message": draw(st.one_of(st.text(max_size=8), odd_values)),
    }
    # Drop a random subset of fields so that every "missing" path is reached too.
    keep = draw(st.sets(st.sampled_from(sorted(payload)), max_size=len(payload)))
    payload = {k: v for k, v in payload.items() if k in keep}
    key = {
        "conversation_initiation_metadata": "conversation_initiation_metadata_event",
        "audio": "audio_event",
        "interruption": "interruption_event",
        "ping": "ping_event",
        "agent_response": "agent_response_event",
        "agent_response_correction": "agent_response_correction_event",
        "user_transcript": "user_transcription_event",
        "client_tool_call": "client_tool_call",
        "agent_tool_response": "agent_tool_response",
        "error": "error_event",
        "vad_score": "vad_score_event",
    }[kind]
    container = draw(st.sampled_from(["object", "flat", "wrong"]))
    if container == "object":
        return frame({"type": kind, key: payload})
    if container == "flat":
        return frame({"type": kind, **payload})
    return frame({"type": kind, key: draw(odd_values)})


def _check_invariants(protocol: ElevenLabsProtocol, texts: list[str | bytes]) -> None:
    highest_interruption = -1
    for text in texts:
        events = protocol.receive_text(text)
        assert isinstance(events, list)
        for event in events:
            if isinstance(event, Interruption):
                highest_interruption = max(highest_interruption, event.event_id)
            if isinstance(event, AgentAudio):
                assert event.event_id > highest_interruption
                assert event.event_id > protocol.last_interrupt_id
                assert event.audio
        for pong in protocol.data_to_send():
            parsed = orjson.loads(pong)
            assert parsed["type"] == "pong"
            assert type(parsed["event_id"]) is int
    assert protocol.last_interrupt_id == highest_interruption


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.one_of(st.text(), st.binary()), max_size=10))
def test_fuzz_arbitrary_text_never_raises(texts: list[str | bytes]) -> None:
    protocol = ElevenLabsProtocol()
    _check_invariants(protocol, [metadata(), *texts])


@FUZZ
@given(st.lists(json_values.map(frame), max_size=5))
def test_fuzz_arbitrary_json_never_raises(texts: list[str | bytes]) -> None:
    protocol = ElevenLabsProtocol()
    _check_invariants(protocol, [*texts[:1], metadata(), *texts[1:]])


@FUZZ
@given(
    st.lists(
        st.one_of(
            near_valid_messages(),
            st.integers(min_value=0, max_value=40).map(audio),
            st.integers(min_value=0, max_value=40).map(interruption),
        ),
        max_size=20,
    ),
    st.booleans(),
)
def test_fuzz_near_valid_messages_never_emit_stale_audio(texts: list[str], start: bool) -> None:
    protocol = ElevenLabsProtocol()
    _check_invariants(protocol, [metadata(), *texts] if start else texts)
