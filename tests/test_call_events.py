"""The call-event wire contract: encode/decode round trips and refusal of bad entries (pure),
plus the producer helper against a real Redis stream."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from voicerelay.call_events import (
    EVENT_TYPES,
    MAX_DATA_BYTES,
    EndedEvent,
    InvalidCallEvent,
    TranscriptEvent,
    UsageEvent,
    append_call_event,
    decode_event,
    encode_event,
    make_event,
)

TENANT = uuid.UUID("018f0000-0000-7000-8000-000000000001")
CALL = uuid.UUID("018f0000-0000-7000-8000-000000000002")

SAMPLE_DATA: dict[str, dict[str, object]] = {
    "created": {"agent_id": str(uuid.UUID(int=7))},
    "connecting": {},
    "connected": {"resumed": True},
    "upstream_connected": {"conversation_id": "conv_123"},
    "transcript": {"role": "agent", "text": "Hello there, how can I help?", "event_id": 4},
    "usage": {
        "audio_in_seconds": 1.5,
        "audio_out_seconds": 2.25,
        "frames_in": 75,
        "frames_out": 90,
        "bytes_in": 48000,
        "bytes_out": 72000,
    },
    "ended": {"reason": "caller_hangup", "code": 1000, "ended_by": "caller", "duration_ms": 5123},
    "status": {"status": "failed", "detail": "upstream refused"},
    "error": {"code": "upstream_unavailable", "message": "connect timeout"},
    "telephony": {
        "provider": "twilio",
        "call_status": "completed",
        "call_sid": "CA" + "0" * 32,
        "duration_seconds": 42,
        "sequence": 3,
    },
}


def _event(type_: str, data: dict[str, object] | None = None, **kw: object):  # type: ignore[no-untyped-def]
    return make_event(
        type_,
        tenant_id=TENANT,
        call_id=CALL,
        seq=3,
        data=SAMPLE_DATA[type_] if data is None else data,
        **kw,  # type: ignore[arg-type]
    )


def _bytes_fields(fields: dict[str, str]) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in fields.items()}


@pytest.mark.parametrize("type_", EVENT_TYPES)
def test_every_event_type_round_trips_through_stream_fields(type_: str) -> None:
    event = _event(type_)
    fields = encode_event(event)
    assert all(isinstance(v, str) for v in fields.values())
    assert decode_event(_bytes_fields(fields)) == event
    assert decode_event(fields) == event


def test_encoding_is_utc_and_keeps_the_producer_event_id() -> None:
    occurred = datetime(2026, 3, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    event = _event("connected", occurred_at=occurred)
    fields = encode_event(event)
    assert fields["occurred_at"] == "2026-03-01T10:00:00+00:00"
    assert fields["event_id"] == str(event.event_id)
    assert decode_event(fields).occurred_at == occurred
    assert event.event_id.version == 7


def test_close_code_integers_become_text_and_unknown_data_fields_are_kept() -> None:
    event = _event("ended", {"reason": "upstream_closed", "code": 1011, "extra_field": "x"})
    assert isinstance(event, EndedEvent)
    assert event.data.code == "1011"
    decoded = decode_event(encode_event(event))
    assert orjson.loads(encode_event(decoded)["data"])["extra_field"] == "x"


def test_usage_defaults_missing_counters_to_zero() -> None:
    event = _event("usage", {"audio_in_seconds": 3})
    assert isinstance(event, UsageEvent)
    assert event.data.frames_out == 0
    assert event.data.audio_in_seconds == 3.0


def _valid_fields() -> dict[str, str]:
    return encode_event(_event("transcript"))


@pytest.mark.parametrize(
    ("change", "reason_part"),
    [
        ({"v": "2"}, "unsupported_version"),
        ({"type": "teleported"}, "unknown_type"),
        ({"data": "{not json"}, "data_not_json"),
        ({"data": "[1, 2]"}, "data_not_object"),
        (
            {"data": orjson.dumps({"role": "user", "text": "x" * MAX_DATA_BYTES}).decode()},
            "data_too_large",
        ),
        ({"event_id": "not-a-uuid"}, ".event_id:"),
        ({"tenant_id": ""}, ".tenant_id:"),
        ({"occurred_at": "2026-03-01T10:00:00"}, ".occurred_at:"),
        ({"occurred_at": "yesterday"}, ".occurred_at:"),
        ({"seq": "-1"}, ".seq:"),
        ({"data": '{"role": "narrator", "text": "secret words"}'}, "transcript.data.role:"),
    ],
)
def test_bad_entries_are_refused_with_a_reason(change: dict[str, str], reason_part: str) -> None:
    fields = _valid_fields() | change
    with pytest.raises(InvalidCallEvent) as info:
        decode_event(fields)
    assert reason_part in info.value.reason
    # Reasons name fields, never their contents.
    assert "secret words" not in info.value.reason


def test_missing_fields_and_non_utf8_are_refused() -> None:
    fields = _valid_fields()
    del fields["call_id"]
    with pytest.raises(InvalidCallEvent, match="missing_fields: call_id"):
        decode_event(fields)
    raw = _bytes_fields(_valid_fields())
    raw[b"data"] = b"\xff\xfe"
    with pytest.raises(InvalidCallEvent, match="not_utf8"):
        decode_event(raw)


def test_type_specific_data_is_validated() -> None:
    with pytest.raises(InvalidCallEvent):
        _event("upstream_connected", {})
    with pytest.raises(InvalidCallEvent):
        _event("usage", {"bytes_in": -5})
    with pytest.raises(InvalidCallEvent):
        _event("usage", {"audio_in_seconds": float("nan")})
    with pytest.raises(InvalidCallEvent):
        _event("ended", {"reason": ""})
    with pytest.raises(InvalidCallEvent):
        _event("status", {"status": "dancing"})


async def test_append_call_event_writes_a_decodable_entry(redis_client, settings) -> None:  # type: ignore[no-untyped-def]
    key = settings.redis_key("test-call-events", uuid.uuid4().hex)
    try:
        events = [_event("transcript", {"role": "user", "text": f"line {i}"}) for i in range(30)]
        ids = [await append_call_event(redis_client, key, e, maxlen=10) for e in events]
        assert len(set(ids)) == 30
        assert all(isinstance(i, str) for i in ids)
        entries = await redis_client.xrange(key)
        # MAXLEN ~ trims in whole nodes: never below the bound, and the newest entries stay.
        assert 10 <= len(entries) <= 30
        last_id, last_fields = entries[-1]
        assert last_id.decode() == ids[-1]
        decoded = decode_event(last_fields)
        assert isinstance(decoded, TranscriptEvent)
        assert decoded == events[-1]
    finally:
        await redis_client.delete(key)


def test_make_event_defaults_to_now() -> None:
    before = datetime.now(UTC)
    event = _event("connecting")
    assert before <= event.occurred_at <= datetime.now(UTC)
