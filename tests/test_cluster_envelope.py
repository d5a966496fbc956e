"""The replicas' binary envelope and channel names (pure; no sockets)."""

from __future__ import annotations

import contextlib
import struct

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.cluster import envelope as env
from relay.cluster.channels import (
    Channels,
    replica_tag,
    room_name,
    sid_tag,
    tagged_sid,
)
from relay.cluster.envelope import Envelope, EnvelopeError, Kind
from relay.cluster.pubsub import parse_redis_major

AUDIO = bytes(range(256)) * 13 + b"\x00\xff"


def emit_round_trip(data: object, **overrides: object) -> env.EmitMessage:
    fields: dict[str, object] = {
        "namespace": "/",
        "room": "call:1",
        "skip_sid": None,
        "origin": "replica-a",
    }
    fields.update(overrides)
    raw = env.encode_emit("audio", data, **fields)  # type: ignore[arg-type]
    assert env.peek_kind(raw) is Kind.EMIT
    return env.decode_emit(env.decode(raw))


def test_layout_magic_version_kind_header_length_then_header_then_raw_payload() -> None:
    raw = env.encode(Kind.OWNER, {"a": 1}, b"\x01\x02")
    header = orjson.dumps({"a": 1})
    assert raw[:2] == b"VR"
    assert raw[2] == 1  # version
    assert raw[3] == Kind.OWNER
    assert struct.unpack(">H", raw[4:6])[0] == len(header)
    assert raw[6 : 6 + len(header)] == header
    assert raw[6 + len(header) :] == b"\x01\x02"
    assert env.decode(raw) == Envelope(Kind.OWNER, {"a": 1}, b"\x01\x02")


def test_binary_emit_payload_is_the_raw_bytes() -> None:
    raw = env.encode_emit(
        "audio", AUDIO, namespace="/", room="call:1", skip_sid=None, origin="replica-a"
    )
    assert raw.endswith(AUDIO)  # not base64, not inside JSON
    assert len(raw) < len(AUDIO) + 200
    message = emit_round_trip(AUDIO)
    assert message.data == AUDIO
    assert isinstance(message.data, bytes)
    assert (message.event, message.room, message.namespace, message.origin) == (
        "audio",
        "call:1",
        "/",
        "replica-a",
    )


def test_bytearray_travels_as_bytes() -> None:
    assert emit_round_trip(bytearray(b"abc")).data == b"abc"


@pytest.mark.parametrize(
    "data",
    [
        {"text": "hello", "n": 3, "nested": [1, {"x": None}]},
        "plain string",
        12,
        None,
        ["a", "list", "is", "one", "argument"],
        ("two", {"arguments": True}),
    ],
)
def test_json_emits_round_trip(data: object) -> None:
    assert emit_round_trip(data).data == data


def test_binary_inside_structures_round_trips() -> None:
    data = ({"chunk": AUDIO, "meta": {"seq": 1, "parts": [b"x", b""]}}, b"second")
    message = emit_round_trip(data)
    assert message.data == data
    raw = env.encode_emit("e", data, namespace="/", room=None, skip_sid=None, origin="o")
    assert AUDIO in raw  # attachments stay raw


def test_skip_sid_forms() -> None:
    assert emit_round_trip("x", skip_sid="sid1").skip_sid == ["sid1"]
    assert emit_round_trip("x", skip_sid=["a", "b"]).skip_sid == ["a", "b"]
    assert emit_round_trip("x", skip_sid=[None]).skip_sid is None
    assert emit_round_trip("x", skip_sid=None).skip_sid is None


def test_owner_messages_keep_the_senders_header_and_kind() -> None:
    raw = env.encode_owner("audio", {"sid": "s1", "epoch": 4}, AUDIO, origin="replica-b")
    envelope = env.decode(raw)
    assert envelope.kind is Kind.OWNER
    assert env.owner_kind(envelope) == "audio"
    assert envelope.origin == "replica-b"
    assert envelope.header["sid"] == "s1"
    assert envelope.header["epoch"] == 4
    assert envelope.payload == AUDIO
    with pytest.raises(ValueError):
        env.encode_owner("audio", {"origin": "forged"}, b"", origin="replica-b")
    with pytest.raises(EnvelopeError):
        env.owner_kind(env.decode(env.encode(Kind.EMIT, {"kind": "x"})))


def test_header_too_large_is_refused() -> None:
    with pytest.raises(ValueError):
        env.encode(Kind.OWNER, {"big": "x" * 70_000})


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"VR",
        b"XX\x01\x01\x00\x00",
        b"VR\x02\x01\x00\x00",  # a future version
        b"VR\x01\x63\x00\x00",  # unknown kind
        b"VR\x01\x01\x00\x10{}",  # header length past the end
        b"VR\x01\x01\x00\x03{{{",  # header not JSON
        b"VR\x01\x01\x00\x02[]",  # header not an object
    ],
)
def test_garbage_is_rejected_cleanly(raw: bytes) -> None:
    with pytest.raises(EnvelopeError):
        env.decode(raw)


def test_version_byte_is_checked_before_anything_else() -> None:
    raw = bytearray(env.encode(Kind.EMIT, {"a": 1}))
    raw[2] = 2
    with pytest.raises(EnvelopeError, match="version 2"):
        env.peek_kind(bytes(raw))


@pytest.mark.parametrize(
    "header",
    [
        {},
        {"event": 1, "namespace": "/", "room": None, "origin": "o", "skip_sid": None},
        {"event": "e", "namespace": "/", "room": 5, "origin": "o", "skip_sid": None},
        {"event": "e", "namespace": "/", "room": None, "origin": "o", "skip_sid": [1]},
        {"event": "e", "namespace": "/", "room": None, "origin": "o", "skip_sid": None},
        {"event": "e", "namespace": "/", "room": None, "origin": "o", "format": "zip"},
        {"event": "e", "namespace": "/", "room": None, "origin": "o", "format": "mixed"},
        {
            "event": "e",
            "namespace": "/",
            "room": None,
            "origin": "o",
            "format": "mixed",
            "jl": 2,
            "al": [5],  # more than the payload holds
        },
    ],
)
def test_malformed_emits_are_rejected_cleanly(header: dict[str, object]) -> None:
    with pytest.raises(EnvelopeError):
        env.decode_emit(env.decode(env.encode(Kind.EMIT, header, b"[]")))


def test_emit_data_that_is_not_an_argument_list_is_rejected() -> None:
    header = {"event": "e", "namespace": "/", "room": None, "origin": "o", "format": "json"}
    for payload in (b"{}", b"not json"):
        with pytest.raises(EnvelopeError):
            env.decode_emit(env.decode(env.encode(Kind.EMIT, header, payload)))
    with pytest.raises(EnvelopeError):
        env.decode_emit(env.decode(env.encode(Kind.OWNER, header, b"[]")))


def test_placeholders_without_attachments_are_rejected() -> None:
    template = orjson.dumps([{"_placeholder": True, "num": 3}])
    header = {
        "event": "e",
        "namespace": "/",
        "room": None,
        "origin": "o",
        "format": "mixed",
        "jl": len(template),
        "al": [1],
    }
    with pytest.raises(EnvelopeError):
        env.decode_emit(env.decode(env.encode(Kind.EMIT, header, template + b"x")))


@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_envelope_error(raw: bytes) -> None:
    try:
        envelope = env.decode(raw)
    except EnvelopeError:
        return
    if envelope.kind is Kind.EMIT:
        with contextlib.suppress(EnvelopeError):
            env.decode_emit(envelope)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20) | st.binary(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@given(json_values)
def test_any_socketio_payload_round_trips(data: object) -> None:
    assert emit_round_trip(data).data == data


# --- channels ----------------------------------------------------------------------------------------


def test_channel_and_key_names() -> None:
    channels = Channels(lambda name: "pfx:" + name)
    assert channels.room("/", "call:1") == "pfx:room:call:1"
    assert channels.room("/admin", "r") == "pfx:room:/admin|r"
    assert channels.room_replicas("/", "call:1") == "pfx:room-replicas:{call:1}"
    assert channels.owner("abc") == "pfx:owner:abc"
    assert channels.heartbeat("host-1") == "pfx:replica:host-1"
    assert channels.inbox("0123456789") == "pfx:replica-inbox:0123456789"
    assert room_name("/", "x") == "x"


def test_sids_carry_their_replicas_tag() -> None:
    tag = replica_tag("host-42")
    assert tag == replica_tag("host-42")
    assert tag != replica_tag("host-43")
    assert len(tag) == 10
    sid = tagged_sid("AbCdEf-_1234567890xy", tag)
    assert sid_tag(sid) == tag
    assert sid_tag("call:0190aa2b-1c2d-7e3f-8a9b-0c1d2e3f4a5b") is None
    assert sid_tag("call:1:monitors") is None
    assert sid_tag("plainsid") is None


def test_redis_major_version_from_info() -> None:
    assert parse_redis_major(b"# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n") == 7
    assert parse_redis_major("redis_version:6.2.6\n") == 6
    assert parse_redis_major(b"nothing here") is None
