"""relay.protocol.twilio without sockets: Twilio's documented message shapes, every violation code,
the outgoing frames, mark accounting, and garbage that must never raise."""

from __future__ import annotations

import base64
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.protocol.twilio import (
    VIOLATION_CODES,
    Connected,
    Dtmf,
    Ignored,
    Mark,
    Media,
    MediaFormat,
    PlaybackTracker,
    Start,
    Stop,
    TwilioStreamProtocol,
    Violation,
)

SID = "MZ18ad3ab5a668481ce02b83e7395059f0"
CALL = "CA0123456789abcdef0123456789abcdef"
ACCOUNT = "AC0123456789abcdef0123456789abcdef"
LIMIT = 64 * 1024


def frame(message: dict[str, Any]) -> str:
    return json.dumps(message)


# Exactly Twilio's documented shapes (numbers as JSON strings).
CONNECTED = frame({"event": "connected", "protocol": "Call", "version": "1.0.0"})


def start_frame(**changes: Any) -> str:
    start: dict[str, Any] = {
        "accountSid": ACCOUNT,
        "streamSid": SID,
        "callSid": CALL,
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"token": "t0ken", "from": "+15550001111"},
    }
    start.update(changes)
    return frame({"event": "start", "sequenceNumber": "1", "start": start, "streamSid": SID})


def media_frame(payload: bytes, *, chunk: int = 1, sid: str = SID) -> str:
    return frame(
        {
            "event": "media",
            "sequenceNumber": str(chunk + 1),
            "media": {
                "track": "inbound",
                "chunk": str(chunk),
                "timestamp": str(20 * (chunk - 1)),
                "payload": base64.b64encode(payload).decode(),
            },
            "streamSid": sid,
        }
    )


def started() -> TwilioStreamProtocol:
    protocol = TwilioStreamProtocol(max_message_bytes=LIMIT)
    assert isinstance(protocol.receive(CONNECTED), Connected)
    assert isinstance(protocol.receive(start_frame()), Start)
    return protocol


def violation(event: object) -> str:
    assert isinstance(event, Violation), event
    assert event.code in VIOLATION_CODES
    return event.code


# --- incoming ----------------------------------------------------------------------------------


def test_connected_then_start() -> None:
    protocol = TwilioStreamProtocol(max_message_bytes=LIMIT)
    assert protocol.receive(CONNECTED) == Connected("Call", "1.0.0")
    event = protocol.receive(start_frame())
    assert event == Start(
        stream_sid=SID,
        call_sid=CALL,
        account_sid=ACCOUNT,
        custom_parameters={"token": "t0ken", "from": "+15550001111"},
        media_format=MediaFormat("audio/x-mulaw", 8000, 1),
        tracks=("inbound",),
    )
    assert "t0ken" not in repr(event)
    assert protocol.state == "streaming"
    assert protocol.stream_sid == SID


def test_media_mark_dtmf_stop() -> None:
    protocol = started()
    audio = bytes(range(160))
    event = protocol.receive(media_frame(audio, chunk=2))
    assert event == Media(audio, "", 2, 20)
    assert isinstance(event, Media)
    assert base64.b64decode(event.encoded) == audio
    mark = {"event": "mark", "sequenceNumber": "4", "streamSid": SID, "mark": {"name": "7"}}
    assert protocol.receive(frame(mark)) == Mark("7")
    dtmf = {
        "event": "dtmf",
        "streamSid": SID,
        "sequenceNumber": "5",
        "dtmf": {"track": "inbound_track", "digit": "#"},
    }
    assert protocol.receive(frame(dtmf)) == Dtmf("#")
    stop = {
        "event": "stop",
        "sequenceNumber": "6",
        "stop": {"accountSid": ACCOUNT, "callSid": CALL},
        "streamSid": SID,
    }
    assert protocol.receive(frame(stop)) == Stop()
    # After stop nothing counts, not even garbage.
    assert isinstance(protocol.receive(media_frame(audio)), Ignored)
    assert isinstance(protocol.receive("not json"), Ignored)


def test_numbers_may_be_integers_and_start_may_come_without_connected() -> None:
    protocol = TwilioStreamProtocol(max_message_bytes=LIMIT)
    fmt = {"encoding": "audio/x-mulaw", "sampleRate": "8000", "channels": "1"}
    assert isinstance(protocol.receive(start_frame(mediaFormat=fmt)), Start)
    message = orjson.loads(media_frame(b"\xff" * 10))
    message["media"]["chunk"] = 3
    del message["media"]["timestamp"]
    assert protocol.receive(orjson.dumps(message)) == Media(b"\xff" * 10, "", 3, None)


def test_unknown_events_are_ignored_and_counted() -> None:
    protocol = started()
    assert protocol.receive(frame({"event": "something_new", "streamSid": SID})) == Ignored(
        "something_new"
    )
    protocol.receive(frame({"event": "x" * 100}))
    assert protocol.ignored_events == 2


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("not json", "invalid_json"),
        ("[1, 2]", "invalid_json"),
        ('{"event": 5}', "invalid_message"),
        (media_frame(b"\x00" * 160), "missing_start"),
        (frame({"event": "dtmf", "streamSid": SID, "dtmf": {"digit": "1"}}), "missing_start"),
        (frame({"event": "stop", "streamSid": SID}), "missing_start"),
    ],
)
def test_violations_before_start(text: str, code: str) -> None:
    assert violation(TwilioStreamProtocol(max_message_bytes=LIMIT).receive(text)) == code


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"mediaFormat": {"encoding": "audio/l16", "sampleRate": 8000, "channels": 1}}, "unsupported_format"),
        ({"mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 16000, "channels": 1}}, "unsupported_format"),
        ({"mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 2}}, "unsupported_format"),
        ({"mediaFormat": None}, "unsupported_format"),
        ({"streamSid": ""}, "invalid_message"),
        ({"callSid": 12}, "invalid_message"),
        ({"accountSid": "A" * 500}, "invalid_message"),
        ({"customParameters": {"token": 5}}, "invalid_message"),
        ({"customParameters": ["token"]}, "invalid_message"),
        ({"tracks": "inbound"}, "invalid_message"),
    ],
)  # fmt: skip
def test_bad_start(changes: dict[str, Any], code: str) -> None:
    protocol = TwilioStreamProtocol(max_message_bytes=LIMIT)
    assert violation(protocol.receive(start_frame(**changes))) == code
    assert protocol.state == "awaiting_start"


def test_violations_after_start() -> None:
    protocol = started()
    assert violation(protocol.receive(start_frame())) == "invalid_message"  # a second start
    assert violation(protocol.receive(media_frame(b"\x00", sid="MZother"))) == "unknown_stream"
    no_sid = orjson.loads(media_frame(b"\x00"))
    del no_sid["streamSid"]
    assert violation(protocol.receive(orjson.dumps(no_sid))) == "unknown_stream"
    bad = orjson.loads(media_frame(b"\x00"))
    for payload in ("***", "AAA", "AA==AA==", 17, None):
        bad["media"]["payload"] = payload
        assert violation(protocol.receive(orjson.dumps(bad))) == "bad_payload"
    assert violation(protocol.receive(frame({"event": "media", "streamSid": SID}))) == (
        "invalid_message"
    )
    for digit in ("12", "x", 1, ""):
        dtmf = {"event": "dtmf", "streamSid": SID, "dtmf": {"digit": digit}}
        assert violation(protocol.receive(frame(dtmf))) == "invalid_message"
    mark = {"event": "mark", "streamSid": SID, "mark": {"name": ["a"]}}
    assert violation(protocol.receive(frame(mark))) == "invalid_message"
    # Violations change nothing: the stream goes on if the caller chooses to.
    assert isinstance(protocol.receive(media_frame(b"\x01")), Media)


def test_message_too_large_before_parsing() -> None:
    protocol = TwilioStreamProtocol(max_message_bytes=1024)
    assert violation(protocol.receive("x" * 1025)) == "message_too_large"
    assert violation(protocol.receive(b"{" * 1025)) == "message_too_large"
    # Characters are not bytes: 300 three-byte characters are 900 bytes.
    assert violation(protocol.receive("€" * 400)) == "message_too_large"
    assert violation(protocol.receive("€" * 300)) == "invalid_json"


# --- outgoing ----------------------------------------------------------------------------------


def test_outgoing_frames_are_twilios_shapes() -> None:
    protocol = started()
    audio = bytes(range(256))
    encoded = base64.b64encode(audio).decode()
    expected_media = {"event": "media", "streamSid": SID, "media": {"payload": encoded}}
    assert json.loads(protocol.media(audio)) == expected_media
    assert protocol.media_encoded(encoded) == protocol.media(audio)
    assert json.loads(protocol.mark('12 "q"')) == {
        "event": "mark",
        "streamSid": SID,
        "mark": {"name": '12 "q"'},
    }
    assert json.loads(protocol.clear()) == {"event": "clear", "streamSid": SID}


def test_a_stream_sid_cannot_break_our_frames() -> None:
    protocol = TwilioStreamProtocol(max_message_bytes=LIMIT)
    sid = 'MZ"},"x":"'
    message = orjson.loads(start_frame(streamSid=sid))
    message["streamSid"] = sid
    assert isinstance(protocol.receive(orjson.dumps(message)), Start)
    assert json.loads(protocol.clear()) == {"event": "clear", "streamSid": sid}
    assert json.loads(protocol.media(b"\x00"))["streamSid"] == sid


# --- playback accounting -----------------------------------------------------------------------


def test_marks_echoed_in_order_count_as_played() -> None:
    tracker = PlaybackTracker()
    assert tracker.mark() is None  # nothing sent, nothing to mark
    tracker.sent(800)
    first = tracker.mark()
    tracker.sent(400)
    tracker.sent(400)
    second = tracker.mark()
    assert (first, second) == ("1", "2")
    assert tracker.pending_ms == 200
    assert tracker.echoed("1")
    assert tracker.report().fields() == {
        "played_out_ms": 100,
        "cut_off_ms": 0,
        "marks_sent": 2,
        "marks_echoed": 1,
    }
    assert tracker.echoed("2")
    assert tracker.report().played_out_ms == 200
    assert tracker.pending_ms == 0


def test_a_later_echo_covers_earlier_marks() -> None:
    tracker = PlaybackTracker()
    for _ in range(3):
        tracker.sent(160)
        tracker.mark()
    assert tracker.echoed("3")
    report = tracker.report()
    assert (report.played_out_ms, report.marks_echoed) == (60, 1)
    assert not tracker.echoed("1")  # already accounted for
    assert tracker.unknown_echoes == 1


def test_clear_cuts_off_everything_pending_and_their_echoes_add_nothing() -> None:
    tracker = PlaybackTracker()
    tracker.sent(1600)
    tracker.mark()
    assert tracker.echoed("1")
    tracker.sent(800)
    tracker.mark()
    tracker.sent(800)
    tracker.mark()
    tracker.sent(80)  # not marked yet
    tracker.cleared()
    assert tracker.pending_ms == 0
    # Twilio echoes the pending marks after a clear.
    assert tracker.echoed("2")
    assert tracker.echoed("3")
    assert not tracker.echoed("3")
    assert tracker.report().fields() == {
        "played_out_ms": 200,
        "cut_off_ms": 210,
        "marks_sent": 3,
        "marks_echoed": 3,
    }


# --- garbage -----------------------------------------------------------------------------------

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
_messages = st.fixed_dictionaries(
    {"event": st.sampled_from(["connected", "start", "media", "mark", "dtmf", "stop", "other"])},
    optional={
        "streamSid": st.sampled_from([SID, "MZx", 3, None]),
        "start": _json_values,
        "media": st.fixed_dictionaries({}, optional={"payload": st.text(max_size=12)})
        | _json_values,
        "mark": _json_values,
        "dtmf": _json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.binary(max_size=200) | st.text(max_size=200), max_size=8))
def test_random_bytes_never_raise(frames: list[bytes | str]) -> None:
    protocol = started()
    for data in frames:
        protocol.receive(data)


@settings(max_examples=400, deadline=None)
@given(messages=st.lists(_messages, max_size=8), begin=st.booleans())
def test_random_messages_never_raise_and_violations_have_codes(
    messages: list[dict[str, Any]], begin: bool
) -> None:
    protocol = started() if begin else TwilioStreamProtocol(max_message_bytes=LIMIT)
    for message in messages:
        event = protocol.receive(orjson.dumps(message))
        if isinstance(event, Violation):
            assert event.code in VIOLATION_CODES
            assert len(event.detail) < 200
