"""The ElevenLabs emulator's ConvAI conversation: the sans-I/O script, then the real socket."""

from __future__ import annotations

import asyncio
import base64
import json
import warnings
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support.servers import serve
from voicerelay.cli import _EMULATOR_FORMATS, main
from voicerelay.emulators.audio import (
    AUDIO_FORMATS,
    Format,
    parse_format,
    pcm_samples,
    rms,
    tone,
    ulaw_encode,
)
from voicerelay.emulators.convai_script import (
    Close,
    ConvAIScript,
    EmulatedAgent,
    SendText,
    close_reason,
    truncate_words,
)
from voicerelay.emulators.elevenlabs import EmulatorConfig, create_emulator_app

PCM16K = parse_format("pcm_16000")
ULAW = parse_format("ulaw_8000")
INIT = json.dumps({"type": "conversation_initiation_client_data", "dynamic_variables": {}})


def voiced(seconds: float, fmt: Format = PCM16K, seed: int = 1) -> bytes:
    """Loud noise: voiced, and different every time so echoes can be compared byte for byte."""
    samples = np.random.default_rng(seed).integers(-12000, 12000, round(seconds * fmt.sample_rate))
    pcm = samples.astype(np.int16)
    return ulaw_encode(pcm) if fmt.encoding == "ulaw" else pcm.astype("<i2").tobytes()


def quiet(seconds: float, fmt: Format = PCM16K) -> bytes:
    return (b"\xff" if fmt.encoding == "ulaw" else b"\x00") * fmt.nbytes(seconds)


def audio_message(audio: bytes) -> str:
    return json.dumps({"user_audio_chunk": base64.b64encode(audio).decode()})


def user_message(text: str) -> str:
    return json.dumps({"type": "user_message", "text": text})


def script(now: float = 0.0, **fields: Any) -> ConvAIScript:
    fields.setdefault("realtime", False)
    return ConvAIScript(
        EmulatedAgent(**fields), agent_id="agent_t", conversation_id="conv_test", now=now
    )


def started(**fields: Any) -> ConvAIScript:
    s = script(**fields)
    s.receive_text(INIT, 0.0)
    assert [m["type"] for m in out(s)] == ["conversation_initiation_metadata"]
    return s


def out(s: ConvAIScript) -> list[dict[str, Any]]:
    """What the script sends, decoded; a close becomes {"close": code, "reason": reason}."""
    decoded: list[dict[str, Any]] = []
    for item in s.data_to_send():
        if isinstance(item, SendText):
            decoded.append(json.loads(item.text))
        else:
            assert isinstance(item, Close)
            decoded.append({"type": "close", "code": item.code, "reason": item.reason})
    return decoded


def audio_of(messages: list[dict[str, Any]]) -> bytes:
    return b"".join(
        base64.b64decode(m["audio_event"]["audio_base_64"])
        for m in messages
        if m["type"] == "audio"
    )


def assert_error_close(messages: list[dict[str, Any]], error_type: str, code: int) -> None:
    assert [m["type"] for m in messages] == ["error", "close"]
    assert messages[0]["error_event"]["error_type"] == error_type
    assert messages[0]["error_event"]["code"] == code
    assert messages[1]["code"] == code


# --- Audio helpers -------------------------------------------------------------------------------


def test_ulaw_matches_audioop() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop
    samples = np.arange(-32768, 32768, dtype=np.int16)
    assert ulaw_encode(samples) == audioop.lin2ulaw(samples.astype("<i2").tobytes(), 2)
    codes = bytes(range(256))
    assert pcm_samples(codes, ULAW).astype("<i2").tobytes() == audioop.ulaw2lin(codes, 2)


def test_tone_and_loudness() -> None:
    assert len(tone(PCM16K, 0.5)) == 16000
    assert len(tone(ULAW, 0.5)) == 4000
    assert tone(PCM16K, 0.25) == tone(PCM16K, 0.25)  # deterministic
    assert rms(tone(PCM16K, 0.1), PCM16K) > 5000
    assert rms(tone(ULAW, 0.1), ULAW) > 5000
    assert rms(quiet(0.1), PCM16K) == 0
    assert rms(quiet(0.1, ULAW), ULAW) < 10
    assert rms(b"", PCM16K) == 0
    assert rms(b"\x01", PCM16K) == 0  # a lone odd byte is no sample


def test_agent_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="format"):
        EmulatedAgent(output_format="mp3_44100")
    with pytest.raises(ValueError, match="chunk_ms"):
        EmulatedAgent(chunk_ms=1)
    with pytest.raises(ValueError, match="positive"):
        EmulatedAgent(ping_interval_seconds=0)


def test_cli_formats_are_the_emulator_formats() -> None:
    assert set(_EMULATOR_FORMATS) == AUDIO_FORMATS


def test_truncation_helpers() -> None:
    assert truncate_words("one two three four", 0.5) == "one two..."
    assert truncate_words("one two three four", 1.0) == "one two three four"
    assert truncate_words("one two", 0.0) == "..."
    assert len(close_reason("é" * 100).encode()) <= 123


# --- Conversation start --------------------------------------------------------------------------


def test_initiation_then_metadata() -> None:
    s = script(input_format="ulaw_8000", output_format="pcm_22050")
    assert out(s) == []
    assert s.next_deadline() == 3.0  # waits for the optional initiation message
    init = {
        "type": "conversation_initiation_client_data",
        "conversation_config_override": {"agent": {"prompt": {"prompt": "Be brief"}}},
        "custom_llm_extra_body": {},
        "dynamic_variables": {"user_name": "Ada", "age": 36, "vip": True},
        "user_id": "u1",
        "source_info": {"source": "python_sdk", "version": "2"},
    }
    s.receive_text(json.dumps(init), 0.1)
    assert out(s) == [
        {
            "type": "conversation_initiation_metadata",
            "conversation_initiation_metadata_event": {
                "conversation_id": "conv_test",
                "agent_output_audio_format": "pcm_22050",
                "user_input_audio_format": "ulaw_8000",
            },
        }
    ]
    assert s.stats.initiation == init
    assert s.state == "active"


def test_audio_first_starts_the_conversation() -> None:
    s = script()
    s.receive_text(audio_message(quiet(0.02)), 0.0)
    assert [m["type"] for m in out(s)] == ["conversation_initiation_metadata"]
    assert s.stats.audio_chunks_in == 1
    assert s.stats.initiation is None


def test_quiet_client_gets_metadata_after_the_initiation_timeout() -> None:
    s = script(initiation_timeout_seconds=2.0)
    s.tick(1.9)
    assert out(s) == []
    s.tick(2.0)
    assert [m["type"] for m in out(s)] == ["conversation_initiation_metadata"]


def test_first_message_is_spoken_and_can_be_overridden() -> None:
    s = script(first_message="Hello there")
    s.receive_text(INIT, 0.0)
    messages = out(s)
    assert [m["type"] for m in messages[:2]] == [
        "conversation_initiation_metadata",
        "agent_response",
    ]
    assert messages[1]["agent_response_event"]["agent_response"] == "Hello there"
    assert audio_of(messages) == tone(PCM16K, 1.0)

    s = script(first_message="Hello there")
    override = {"agent": {"first_message": "Bonjour"}}
    s.receive_text(
        json.dumps(
            {
                "type": "conversation_initiation_client_data",
                "conversation_config_override": override,
            }
        ),
        0.0,
    )
    assert out(s)[1]["agent_response_event"]["agent_response"] == "Bonjour"


def test_reserved_dynamic_variable_is_refused() -> None:
    s = script()
    s.receive_text(
        json.dumps(
            {
                "type": "conversation_initiation_client_data",
                "dynamic_variables": {"system__time": "now"},
            }
        ),
        0.0,
    )
    messages = out(s)
    assert_error_close(messages, "invalid_message", 1008)
    assert "system__" in messages[0]["error_event"]["message"]
    assert s.closed
    assert s.stats.closed_by == "agent"


def test_missing_required_dynamic_variable() -> None:
    s = script(required_dynamic_variables=frozenset({"user_name"}))
    s.receive_text(INIT, 0.0)
    assert_error_close(out(s), "missing_dynamic_variable", 1008)


def test_overrides_must_be_allowed() -> None:
    allowed = frozenset({"agent.first_message", "tts"})
    ok = {"agent": {"first_message": "Hi"}, "tts": {"voice_id": "v", "speed": 1.1}}
    s = script(allowed_overrides=allowed)
    s.receive_text(
        json.dumps(
            {"type": "conversation_initiation_client_data", "conversation_config_override": ok}
        ),
        0.0,
    )
    assert out(s)[0]["type"] == "conversation_initiation_metadata"

    s = script(allowed_overrides=allowed)
    bad = {"agent": {"prompt": {"prompt": "Be evil"}}}
    s.receive_text(
        json.dumps(
            {"type": "conversation_initiation_client_data", "conversation_config_override": bad}
        ),
        0.0,
    )
    messages = out(s)
    assert_error_close(messages, "override_error", 1008)
    assert "agent.prompt.prompt" in messages[0]["error_event"]["message"]


@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        "[1, 2]",
        '{"type": "bogus"}',
        '{"no_type": 1}',
        '{"user_audio_chunk": "!!not base64!!"}',
        '{"user_audio_chunk": 5}',
        '{"type": "user_message", "text": 5}',
        '{"type": "pong", "event_id": "7"}',
        '{"type": "pong", "event_id": true}',
        '{"type": "client_tool_result", "tool_call_id": "x", "result": "r", "is_error": "no"}',
        '{"type": "conversation_initiation_client_data", "dynamic_variables": []}',
        '{"type": "conversation_initiation_client_data", "dynamic_variables": {"a": [1]}}',
        '{"type": "conversation_initiation_client_data", "conversation_config_override": 3}',
    ],
)
def test_malformed_messages_close_1008(frame: str) -> None:
    s = script()
    s.receive_text(frame, 0.0)
    messages = [m for m in out(s) if m["type"] != "conversation_initiation_metadata"]
    assert_error_close(messages, "invalid_message", 1008)
    s.receive_text(INIT, 0.1)  # nothing more after the close
    assert out(s) == []


def test_binary_frames_are_refused() -> None:
    s = started()
    s.receive_bytes(b"\x00\x01", 0.1)
    assert_error_close(out(s), "invalid_message", 1008)


# --- Echo and turns ------------------------------------------------------------------------------


def test_echo_is_byte_exact_from_first_to_last_voiced_chunk() -> None:
    s = started(chunk_ms=100)
    first, gap, second = voiced(0.3, seed=1), quiet(0.2), voiced(0.25, seed=2)
    s.receive_text(audio_message(quiet(0.1)), 0.0)  # silence before the turn is not echoed
    for chunk in (first, gap, second):
        s.receive_text(audio_message(chunk), 0.1)
    assert out(s) == []  # still the caller's turn
    s.receive_text(audio_message(quiet(0.3)), 0.2)
    assert out(s) == []
    s.receive_text(audio_message(quiet(0.3)), 0.3)  # 0.6 s of silence ends it
    messages = out(s)
    kinds = [m["type"] for m in messages]
    assert kinds[:2] == ["user_transcript", "agent_response"]
    assert set(kinds[2:]) == {"audio"}
    assert messages[0]["user_transcription_event"]["user_transcript"] == "(audio 0.75s)"
    assert audio_of(messages) == first + gap + second
    chunks = [base64.b64decode(m["audio_event"]["audio_base_64"]) for m in messages[2:]]
    assert [len(c) for c in chunks] == [3200] * 7 + [1600]  # 100 ms chunks of PCM16 at 16 kHz
    ids = [
        m.get("audio_event", m.get("agent_response_event", {})).get("event_id")
        for m in messages[1:]
    ]
    assert ids == sorted(set(ids))
    assert s.stats.turns == 1
    assert s.stats.audio_bytes_out == len(first + gap + second)
    assert s.stats.audio_bytes_in == len(first + gap + second) + len(quiet(0.7))


def test_turn_ends_on_the_clock_when_the_caller_stops_sending() -> None:
    s = started(end_of_turn_ms=400)
    speech = voiced(0.2)
    s.receive_text(audio_message(speech), 1.0)
    assert s.next_deadline() == pytest.approx(1.4)
    s.tick(1.3)
    assert out(s) == []
    s.tick(1.4)
    assert audio_of(out(s)) == speech


def test_turn_ends_at_the_maximum_length() -> None:
    s = started(max_turn_ms=500)
    s.receive_text(audio_message(voiced(0.3)), 0.0)
    assert out(s) == []
    s.receive_text(audio_message(voiced(0.3, seed=2)), 0.01)
    messages = out(s)
    assert messages[0]["user_transcription_event"]["user_transcript"] == "(audio 0.60s)"


def test_ulaw_echo() -> None:
    s = started(input_format="ulaw_8000", output_format="ulaw_8000")
    speech = voiced(0.4, ULAW)
    s.receive_text(audio_message(speech), 0.0)
    s.receive_text(audio_message(quiet(0.6, ULAW)), 0.01)
    messages = out(s)
    assert audio_of(messages) == speech
    assert len(base64.b64decode(messages[2]["audio_event"]["audio_base_64"])) == 800


def test_different_formats_get_a_tone_of_the_same_length() -> None:
    s = started(input_format="ulaw_8000", output_format="pcm_24000")
    s.receive_text(audio_message(voiced(0.5, ULAW)), 0.0)
    s.receive_text(audio_message(quiet(0.6, ULAW)), 0.01)
    assert audio_of(out(s)) == tone(parse_format("pcm_24000"), 0.5)


def test_tone_agent_never_echoes() -> None:
    s = started(reply_audio="tone")
    s.receive_text(audio_message(voiced(0.3)), 0.0)
    s.receive_text(audio_message(quiet(0.6)), 0.01)
    assert audio_of(out(s)) == tone(PCM16K, 0.3)


def test_realtime_pacing_follows_the_clock() -> None:
    s = started(realtime=True, chunk_ms=100, ping_interval_seconds=100)
    s.receive_text(user_message("tone:0.35"), 10.0)
    messages = out(s)
    assert [m["type"] for m in messages] == ["user_transcript", "agent_response", "audio"]
    assert s.next_deadline() == pytest.approx(10.1)
    s.tick(10.05)
    assert out(s) == []
    s.tick(10.1)
    assert [m["type"] for m in out(s)] == ["audio"]
    s.tick(10.35)
    rest = out(s)
    assert [m["type"] for m in rest] == ["audio", "audio"]
    assert len(audio_of(messages + rest)) + 3200 == len(tone(PCM16K, 0.35))  # 4 chunks: 3+1
    s.tick(10.4)
    assert audio_of(out(s)) == b""


# --- Barge-in ------------------------------------------------------------------------------------


def _speaking(stale: bool) -> tuple[ConvAIScript, list[dict[str, Any]]]:
    s = started(realtime=True, chunk_ms=100, stale_chunk_after_interruption=stale)
    s.receive_text(user_message("tone:2"), 0.0)
    s.tick(0.1)
    before = out(s)
    assert [m["type"] for m in before].count("audio") == 2
    return s, before


def test_caller_speech_interrupts_with_a_stale_chunk() -> None:
    s, before = _speaking(stale=True)
    last_audio_id = max(m["audio_event"]["event_id"] for m in before if m["type"] == "audio")
    speech = voiced(0.1)
    s.receive_text(audio_message(speech), 0.15)
    messages = out(s)
    assert [m["type"] for m in messages] == ["interruption", "audio", "agent_response_correction"]
    interruption_id = messages[0]["interruption_event"]["event_id"]
    stale_id = messages[1]["audio_event"]["event_id"]
    assert last_audio_id < stale_id < interruption_id  # a client drops audio <= interruption id
    assert (
        base64.b64decode(messages[1]["audio_event"]["audio_base_64"]) == tone(PCM16K, 2)[6400:9600]
    )
    correction = messages[2]["agent_response_correction_event"]
    assert correction["original_agent_response"] == "A tone of 2 seconds."
    assert correction["corrected_agent_response"] == "A..."  # 10% was sent
    assert (s.stats.interruptions, s.stats.stale_chunks_sent) == (1, 1)
    # The old reply is gone; the interrupting speech becomes the next turn, echoed with newer ids.
    s.tick(0.5)
    s.receive_text(audio_message(quiet(0.6)), 0.6)
    s.tick(0.6)
    after = out(s)
    assert audio_of(after) == speech
    assert (
        min(m["audio_event"]["event_id"] for m in after if m["type"] == "audio") > interruption_id
    )


def test_interruption_without_stale_chunk() -> None:
    s, _ = _speaking(stale=False)
    s.receive_text(audio_message(voiced(0.1)), 0.15)
    assert [m["type"] for m in out(s)] == ["interruption", "agent_response_correction"]


def test_quiet_audio_does_not_interrupt() -> None:
    s, _ = _speaking(stale=True)
    s.receive_text(audio_message(quiet(0.1)), 0.15)
    assert out(s) == []
    s.tick(0.2)
    assert [m["type"] for m in out(s)] == ["audio"]


def test_text_interrupts_too() -> None:
    s, _ = _speaking(stale=False)
    s.receive_text(user_message("hello"), 0.15)
    kinds = [m["type"] for m in out(s)]
    assert kinds[:3] == ["interruption", "agent_response_correction", "user_transcript"]
    assert "agent_response" in kinds


# --- Text, tools and scripted behaviour --------------------------------------------------------


def test_user_message_reply() -> None:
    s = started(text_reply_seconds=0.5)
    s.receive_text(user_message("What time is it?"), 0.0)
    messages = out(s)
    assert messages[0]["user_transcription_event"]["user_transcript"] == "What time is it?"
    assert messages[1]["agent_response_event"]["agent_response"] == "You said: What time is it?"
    assert audio_of(messages) == tone(PCM16K, 0.5)
    assert s.stats.user_messages == ["What time is it?"]


def test_client_tool_round_trip() -> None:
    s = started()
    s.receive_text(user_message('tool:get_weather {"city": "Paris"}'), 0.0)
    messages = out(s)
    assert [m["type"] for m in messages] == ["user_transcript", "client_tool_call"]
    call = messages[1]["client_tool_call"]
    assert call["tool_name"] == "get_weather"
    assert call["parameters"] == {"city": "Paris"}
    assert isinstance(call["event_id"], int)
    result = {
        "type": "client_tool_result",
        "tool_call_id": call["tool_call_id"],
        "result": "Sunny",
        "is_error": False,
    }
    s.receive_text(json.dumps(result), 0.1)
    reply = out(s)
    assert reply[0]["agent_response_event"]["agent_response"] == "get_weather returned: Sunny"
    assert audio_of(reply)
    # A second result for the same call, or one for a call never made, is recorded and ignored.
    s.receive_text(json.dumps(result), 0.2)
    assert out(s) == []
    assert [r.result for r in s.stats.tool_results] == ["Sunny", "Sunny"]


def test_client_tool_error_result() -> None:
    s = started()
    s.receive_text(user_message("tool:lookup"), 0.0)
    call = out(s)[1]["client_tool_call"]
    assert call["parameters"] == {}
    s.receive_text(
        json.dumps(
            {
                "type": "client_tool_result",
                "tool_call_id": call["tool_call_id"],
                "result": "boom",
                "is_error": True,
            }
        ),
        0.1,
    )
    assert out(s)[0]["agent_response_event"]["agent_response"] == "lookup failed: boom"


@pytest.mark.parametrize(("script", "closes"), [("end", True), ("end:open", False)])
def test_end_call(script: str, closes: bool) -> None:
    """``end:open`` is an agent that ends the call and leaves its socket open."""
    s = started()
    s.receive_text(user_message(script), 0.0)
    messages = out(s)
    assert [m["type"] for m in messages] == [
        "user_transcript",
        "agent_response",
        "agent_tool_response",
        *(["close"] if closes else []),
    ]
    assert messages[2]["agent_tool_response"]["tool_name"] == "end_call"
    assert s.closed == closes
    if closes:
        assert messages[3]["code"] == 1000
        assert s.next_deadline() is None


def test_text_commands_map_other_texts_to_scripted_commands() -> None:
    keypad = "The caller pressed 9 on the keypad."
    s = started(text_commands={keypad: "end", "transfer me": 'tool:transfer {"to": "+1"}'})
    s.receive_text(user_message("transfer me"), 0.0)
    messages = out(s)
    # The transcript shows what was said; the agent acts on the mapped command.
    assert messages[0]["user_transcription_event"]["user_transcript"] == "transfer me"
    assert messages[1]["client_tool_call"]["tool_name"] == "transfer"
    s.receive_text(user_message(keypad), 0.1)
    assert [m["type"] for m in out(s)][-2:] == ["agent_tool_response", "close"]
    assert s.closed


def test_quota_error_is_flat() -> None:
    s = started()
    s.receive_text(user_message("error:quota"), 0.0)
    messages = out(s)[1:]
    assert messages[0]["type"] == "error"
    assert "error_event" not in messages[0]
    assert "exceeds your quota limit" in messages[0]["message"]
    assert messages[1] == {
        "type": "close",
        "code": 1002,
        "reason": "This request exceeds your quota limit.",
    }


@pytest.mark.parametrize(
    ("error_type", "code"),
    [
        ("override_error", 1008),
        ("missing_dynamic_variable", 1008),
        ("llm_timeout", 1002),
        ("transport_receive_timeout", 1002),
        ("unknown_websocket_crash", 1011),
        ("max_duration_exceeded", 1000),
        ("something_new", 1011),
    ],
)
def test_scripted_errors(error_type: str, code: int) -> None:
    s = started()
    s.receive_text(user_message(f"error:{error_type}"), 0.0)
    messages = out(s)[1:]
    assert_error_close(messages, error_type, code)
    assert messages[1]["reason"] == error_type


@pytest.mark.parametrize("code", [1000, 1002, 1008, 1011, 4001])
def test_scripted_closes(code: int) -> None:
    s = started()
    s.receive_text(user_message(f"close:{code}"), 0.0)
    messages = out(s)
    assert messages[-1] == {"type": "close", "code": code, "reason": "scripted close"}
    assert "error" not in [m["type"] for m in messages]


def test_unsendable_close_code_is_just_text() -> None:
    s = started()
    s.receive_text(user_message("close:1006"), 0.0)
    assert out(s)[1]["agent_response_event"]["agent_response"] == "You said: close:1006"
    assert not s.closed


def test_silence_stops_everything_but_max_duration() -> None:
    s = started(ping_interval_seconds=1, receive_timeout_seconds=5, max_duration_seconds=30)
    s.receive_text(user_message("silence"), 0.5)
    out(s)
    assert s.next_deadline() == 30
    s.tick(20)
    s.receive_text(user_message("hello"), 21)
    s.receive_text(audio_message(voiced(0.5)), 21)
    assert out(s) == []
    s.tick(30)
    assert_error_close(out(s), "max_duration_exceeded", 1000)


def test_contextual_update_and_activity_are_recorded_silently() -> None:
    s = started()
    s.receive_text(
        json.dumps({"type": "contextual_update", "text": "User opened the pricing page"}), 0.0
    )
    s.receive_text(json.dumps({"type": "user_activity"}), 0.0)
    s.receive_text(json.dumps({"type": "feedback", "event_id": 3, "score": "like"}), 0.0)
    assert out(s) == []
    assert s.stats.contextual_updates == ["User opened the pricing page"]
    assert s.stats.user_activity == 1
    assert s.stats.messages_in["feedback"] == 1


def test_unresponsive_agent_never_says_anything() -> None:
    s = script(unresponsive=True)
    s.receive_text(INIT, 0.0)
    s.tick(10_000)
    assert out(s) == []
    assert s.next_deadline() is None


# --- Keep-alive and limits -----------------------------------------------------------------------


def test_pings_pongs_and_round_trip() -> None:
    s = started(ping_interval_seconds=2, max_missed_pongs=2)
    assert s.next_deadline() == 2
    s.tick(2)
    ping = out(s)[0]
    assert ping["type"] == "ping"
    assert ping["ping_event"]["ping_ms"] is None
    s.receive_text(json.dumps({"type": "pong", "event_id": ping["ping_event"]["event_id"]}), 2.05)
    s.receive_text(json.dumps({"type": "pong", "event_id": 999}), 2.06)
    s.tick(4)
    second = out(s)[0]
    assert second["ping_event"]["ping_ms"] == 50
    assert second["ping_event"]["event_id"] > ping["ping_event"]["event_id"]
    assert (s.stats.pongs_received, s.stats.pongs_unmatched) == (1, 1)


def test_missed_pongs_close_1002() -> None:
    s = started(ping_interval_seconds=1, max_missed_pongs=2, receive_timeout_seconds=100)
    s.tick(1)
    s.tick(2)
    assert [m["type"] for m in out(s)] == ["ping", "ping"]
    s.tick(3)
    messages = out(s)
    assert_error_close(messages, "asyncio_timeout", 1002)
    assert messages[1]["reason"] == "ping_timeout"


def test_pongs_keep_the_connection_but_not_the_input_timer() -> None:
    s = started(ping_interval_seconds=1, receive_timeout_seconds=3.5)
    for now in (1, 2, 3):
        s.tick(now)
        ping = out(s)[0]
        s.receive_text(
            json.dumps({"type": "pong", "event_id": ping["ping_event"]["event_id"]}), now
        )
    s.tick(3.5)
    messages = out(s)
    assert_error_close(messages, "transport_receive_timeout", 1002)
    assert "No user input" in messages[0]["error_event"]["message"]


def test_caller_audio_resets_the_input_timer() -> None:
    s = started(ping_interval_seconds=100, receive_timeout_seconds=3)
    s.receive_text(audio_message(quiet(0.02)), 2.0)
    s.tick(4.9)
    assert out(s) == []
    assert s.next_deadline() == 5.0


def test_max_duration() -> None:
    s = started(max_duration_seconds=10, ping_interval_seconds=100, receive_timeout_seconds=100)
    s.receive_text(audio_message(quiet(0.02)), 9.0)
    s.tick(10)
    messages = out(s)
    assert_error_close(messages, "max_duration_exceeded", 1000)
    assert messages[1]["reason"] == "max_duration_exceeded"


def test_client_leaving_is_recorded() -> None:
    s = started()
    s.connection_lost(1000, "User ended conversation")
    assert s.closed
    assert out(s) == []
    assert (s.stats.closed_by, s.stats.close_code) == ("client", 1000)
    assert s.stats.ended_at is not None


# --- End to end: a websockets client against the emulator on a loopback port --------------------

KEY = "sk_convai_test_key"
CONFIG = EmulatorConfig(
    api_keys=frozenset({KEY}),
    agents={
        "public": EmulatedAgent(requires_auth=False, realtime=False, ping_interval_seconds=30),
        "private": EmulatedAgent(requires_auth=True, realtime=False, ping_interval_seconds=30),
        "pinger": EmulatedAgent(
            requires_auth=False, realtime=False, ping_interval_seconds=0.05, max_missed_pongs=2
        ),
        "talker": EmulatedAgent(
            requires_auth=False, realtime=True, chunk_ms=50, ping_interval_seconds=30
        ),
    },
    accept_unknown_agents=False,
)


@pytest.fixture(scope="module")
async def emulator() -> AsyncIterator[tuple[str, Any]]:
    app = create_emulator_app(CONFIG)
    async with serve(app) as url:
        yield url, app


def ws_url(base: str, agent_id: str, **extra: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"agent_id": agent_id, **extra}.items())
    return base.replace("http://", "ws://") + f"/v1/convai/conversation?{query}"


async def receive(ws: ClientConnection) -> dict[str, Any]:
    """The next message that is not a ping (pings are answered, as a client must)."""
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if message["type"] != "ping":
            return message  # type: ignore[no-any-return]
        await ws.send(json.dumps({"type": "pong", "event_id": message["ping_event"]["event_id"]}))


async def closed_with(ws: ClientConnection) -> tuple[list[dict[str, Any]], int | None, str]:
    """Every message until the server closes, and its close code and reason."""
    messages: list[dict[str, Any]] = []
    while True:
        try:
            messages.append(await receive(ws))
        except ConnectionClosed as closed:
            rcvd = closed.rcvd
            return messages, rcvd.code if rcvd else None, rcvd.reason if rcvd else ""


async def start(ws: ClientConnection) -> str:
    await ws.send(INIT)
    metadata = await receive(ws)
    assert metadata["type"] == "conversation_initiation_metadata"
    return str(metadata["conversation_initiation_metadata_event"]["conversation_id"])


async def test_handshake_and_metadata(emulator: tuple[str, Any]) -> None:
    base, app = emulator
    async with connect(ws_url(base, "public"), compression=None, subprotocols=["convai"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "convai"
        await ws.send(INIT)
        metadata = await receive(ws)
        event = metadata["conversation_initiation_metadata_event"]
        assert event["conversation_id"].startswith("conv_")
        assert event["agent_output_audio_format"] == "pcm_16000"
        assert event["user_input_audio_format"] == "pcm_16000"
        await ws.close()
    await asyncio.sleep(0.05)
    stats = app.state.conversations.get(event["conversation_id"])
    assert stats.agent_id == "public"
    assert stats.closed_by == "client"


async def test_signed_url_flow(emulator: tuple[str, Any]) -> None:
    base, _ = emulator
    async with httpx.AsyncClient() as http:
        response = await http.get(
            f"{base}/v1/convai/conversation/get-signed-url",
            params={"agent_id": "private"},
            headers={"xi-api-key": KEY},
        )
    assert response.status_code == 200
    signed_url = response.json()["signed_url"]
    async with connect(signed_url, compression=None) as ws:
        await start(ws)


@pytest.mark.parametrize(
    ("agent_id", "extra", "why"),
    [
        ("private", {}, "signature_required"),
        ("private", {"conversation_signature": "1.2.3"}, "invalid_signature"),
        ("nobody", {}, "agent_not_found"),
    ],
)
async def test_refused_sockets_close_1008(
    emulator: tuple[str, Any], agent_id: str, extra: dict[str, str], why: str
) -> None:
    base, _ = emulator
    async with connect(ws_url(base, agent_id, **extra), compression=None) as ws:
        messages, code, reason = await closed_with(ws)
    assert messages == []
    assert code == 1008
    assert reason.startswith(why)


async def test_signature_for_another_agent_is_refused(emulator: tuple[str, Any]) -> None:
    from voicerelay.emulators.elevenlabs import sign_conversation

    base, _ = emulator
    signature = sign_conversation(CONFIG, "public")
    async with connect(ws_url(base, "private", conversation_signature=signature)) as ws:
        _, code, reason = await closed_with(ws)
    assert (code, reason.split(":")[0]) == (1008, "invalid_signature")


async def test_refusal_as_http_403() -> None:
    config = EmulatorConfig(agents={"private": EmulatedAgent()}, refuse_with="http")
    async with serve(create_emulator_app(config)) as base:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url(base, "private")):
                pass
    assert refused.value.response.status_code == 403


async def test_echo_is_byte_exact(emulator: tuple[str, Any]) -> None:
    base, app = emulator
    speech = voiced(0.45, seed=7)
    async with connect(ws_url(base, "public"), compression=None) as ws:
        conversation_id = await start(ws)
        for offset in range(0, len(speech), 640):  # 20 ms frames, as a browser sends them
            await ws.send(audio_message(speech[offset : offset + 640]))
        await ws.send(audio_message(quiet(0.6)))
        transcript = await receive(ws)
        assert transcript["user_transcription_event"]["user_transcript"] == "(audio 0.45s)"
        assert (await receive(ws))["type"] == "agent_response"
        echoed = b""
        while len(echoed) < len(speech):
            message = await receive(ws)
            assert message["type"] == "audio"
            echoed += base64.b64decode(message["audio_event"]["audio_base_64"])
        assert echoed == speech
    stats = app.state.conversations.get(conversation_id)
    assert stats.audio_bytes_out == len(speech)
    assert stats.audio_bytes_in == len(speech) + len(quiet(0.6))
    async with httpx.AsyncClient() as http:
        counters = (await http.get(f"{base}/_emulator/conversations/{conversation_id}")).json()
    assert counters["audio_bytes_out"] == len(speech)
    assert "initiation" not in counters


async def test_ping_pong_then_missed_pongs(emulator: tuple[str, Any]) -> None:
    base, app = emulator
    async with connect(ws_url(base, "pinger"), compression=None) as ws:
        await ws.send(INIT)
        metadata = json.loads(await ws.recv())
        conversation_id = metadata["conversation_initiation_metadata_event"]["conversation_id"]
        answered = 0
        while answered < 3:
            ping = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert ping["type"] == "ping"
            await ws.send(json.dumps({"type": "pong", "event_id": ping["ping_event"]["event_id"]}))
            answered += 1
        assert app.state.conversations.get(conversation_id).pongs_received >= 2
        # Stop answering: after two unanswered pings the agent gives up like a transport timeout.
        unanswered: list[dict[str, Any]] = []
        while True:
            try:
                unanswered.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            except ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd else None
                break
    assert {m["type"] for m in unanswered[:-1]} <= {"ping"}
    assert unanswered[-1]["error_event"]["code"] == 1002
    assert code == 1002


async def test_interruption_with_a_stale_chunk(emulator: tuple[str, Any]) -> None:
    base, app = emulator
    async with connect(ws_url(base, "talker"), compression=None) as ws:
        conversation_id = await start(ws)
        await ws.send(user_message("tone:30"))  # 30 s in real time: it is still talking below
        assert (await receive(ws))["type"] == "user_transcript"
        assert (await receive(ws))["type"] == "agent_response"
        first = await receive(ws)
        assert first["type"] == "audio"
        await ws.send(audio_message(voiced(0.1)))
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["type"] != "interruption":
            seen.append(await receive(ws))
        interruption_id = seen[-1]["interruption_event"]["event_id"]
        stale = await receive(ws)
        assert stale["type"] == "audio"
        assert stale["audio_event"]["event_id"] < interruption_id
        correction = await receive(ws)
        assert correction["type"] == "agent_response_correction"
        assert (
            correction["agent_response_correction_event"]["original_agent_response"]
            == "A tone of 30 seconds."
        )
        # The interrupting speech is the next turn; its echo carries newer ids.
        await ws.send(audio_message(quiet(0.6)))
        assert (await receive(ws))["type"] == "user_transcript"
        assert (await receive(ws))["type"] == "agent_response"
        echo = await receive(ws)
        assert echo["type"] == "audio"
        assert echo["audio_event"]["event_id"] > interruption_id
    stats = app.state.conversations.get(conversation_id)
    assert (stats.interruptions, stats.stale_chunks_sent) == (1, 1)


async def test_tool_call_round_trip(emulator: tuple[str, Any]) -> None:
    base, app = emulator
    async with connect(ws_url(base, "public"), compression=None) as ws:
        conversation_id = await start(ws)
        await ws.send(user_message('tool:open_door {"door": "front"}'))
        assert (await receive(ws))["type"] == "user_transcript"
        call = (await receive(ws))["client_tool_call"]
        assert (call["tool_name"], call["parameters"]) == ("open_door", {"door": "front"})
        await ws.send(
            json.dumps(
                {
                    "type": "client_tool_result",
                    "tool_call_id": call["tool_call_id"],
                    "result": "opened",
                    "is_error": False,
                }
            )
        )
        response = await receive(ws)
        assert response["agent_response_event"]["agent_response"] == "open_door returned: opened"
    stats = app.state.conversations.get(conversation_id)
    assert stats.tool_calls == [call["tool_call_id"]]


@pytest.mark.parametrize(
    ("text", "code", "last_type"),
    [
        ("end", 1000, "agent_tool_response"),
        ("error:quota", 1002, "error"),
        ("error:llm_timeout", 1002, "error"),
        ("error:override_error", 1008, "error"),
        ("error:unknown_websocket_crash", 1011, "error"),
        ("error:max_duration_exceeded", 1000, "error"),
        ("close:1000", 1000, "user_transcript"),
        ("close:1002", 1002, "user_transcript"),
        ("close:1008", 1008, "user_transcript"),
        ("close:1011", 1011, "user_transcript"),
        ("close:4003", 4003, "user_transcript"),
    ],
)
async def test_scripted_close_codes(
    emulator: tuple[str, Any], text: str, code: int, last_type: str
) -> None:
    base, app = emulator
    async with connect(ws_url(base, "public"), compression=None) as ws:
        conversation_id = await start(ws)
        await ws.send(user_message(text))
        messages, received_code, _ = await closed_with(ws)
    assert received_code == code
    assert messages[-1]["type"] == last_type
    assert app.state.conversations.get(conversation_id).close_code == code


async def test_garbage_frame_closes_1008(emulator: tuple[str, Any]) -> None:
    base, _ = emulator
    async with connect(ws_url(base, "public"), compression=None) as ws:
        await start(ws)
        await ws.send(b"\x00garbage")
        messages, code, reason = await closed_with(ws)
    assert (code, reason) == (1008, "invalid_message")
    assert messages[-1]["error_event"]["error_type"] == "invalid_message"


def test_emulator_command_options() -> None:
    result = CliRunner().invoke(main, ["emulator", "--help"])
    assert result.exit_code == 0
    for option in ("--input-format", "--output-format", "--pacing", "--ping-interval", "--public"):
        assert option in result.output
