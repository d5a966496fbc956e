"""The binary envelope replicas exchange over Redis pub/sub (sans-I/O).

Layout: ``b"VR" + u8 version (1) + u8 kind + u16 header length (big-endian) + header + payload``.
The header is a small orjson object; the payload is raw bytes. Audio travels as the payload
as-is: never base64, never inside JSON. The kind sits at a fixed offset so a receiver can drop
an envelope it has no use for without decoding anything (``peek_kind``).

Emits (``Kind.EMIT``) carry the Socket.IO event arguments in one of three data formats:

- ``bin``: a single bytes argument (an audio chunk), which is the payload itself;
- ``json``: no binary anywhere, the argument list as orjson in the payload;
- ``mixed``: binary inside structures: the argument list with Socket.IO placeholders
  (``{"_placeholder": true, "num": i}``) as orjson, then each attachment, back to back; the
  header gives the JSON length (``jl``) and each attachment's length (``al``).

Owner messages (``Kind.OWNER``, ``send_to_owner``) carry the sender's own header fields next to
the reserved ``kind`` (the sender's message kind, a string) and ``origin`` (the sending replica).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

import orjson
from socketio.packet import Packet

MAGIC: Final = b"VR"
VERSION: Final = 1
_PREFIX = struct.Struct(">2sBBH")
PREFIX_SIZE: Final = _PREFIX.size
MAX_HEADER_BYTES: Final = 0xFFFF
_JSON_OPTIONS: Final = orjson.OPT_NON_STR_KEYS

# Header fields of an owner message that belong to the envelope, not to the sender.
OWNER_RESERVED: Final = frozenset({"kind", "origin"})


class Kind(IntEnum):
    EMIT = 1  # a Socket.IO emit to a room (or to a sid held by the receiving replica)
    MEMBERSHIP = 2  # a replica gained its first / lost its last local member of a room
    OWNER = 3  # client -> owner traffic for one call
    DISCONNECT = 4  # disconnect a sid held by the receiving replica
    ENTER_ROOM = 5  # put a sid held by the receiving replica into a room
    LEAVE_ROOM = 6  # take a sid held by the receiving replica out of a room


_KINDS: Final = frozenset(int(k) for k in Kind)


class EnvelopeError(ValueError):
    """Bytes that are not a valid envelope (or not one this version understands)."""


@dataclass(frozen=True, slots=True)
class Envelope:
    kind: Kind
    header: Mapping[str, Any]
    payload: bytes = b""

    @property
    def origin(self) -> str | None:
        origin = self.header.get("origin")
        return origin if isinstance(origin, str) else None


def encode(kind: Kind, header: Mapping[str, Any], payload: bytes = b"") -> bytes:
    raw = orjson.dumps(header, option=_JSON_OPTIONS)
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(f"envelope header too large ({len(raw)} bytes)")
    return b"".join((_PREFIX.pack(MAGIC, VERSION, int(kind), len(raw)), raw, payload))


def peek_kind(data: bytes) -> Kind:
    """The envelope's kind, checking only the fixed prefix (cheap; no header decode)."""
    if len(data) < PREFIX_SIZE:
        raise EnvelopeError("envelope shorter than its prefix")
    magic, version, kind, _ = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise EnvelopeError("not an envelope (bad magic)")
    if version != VERSION:
        raise EnvelopeError(f"unsupported envelope version {version}")
    if kind not in _KINDS:
        raise EnvelopeError(f"unknown envelope kind {kind}")
    return Kind(kind)


def decode(data: bytes) -> Envelope:
    kind = peek_kind(data)
    header_len = _PREFIX.unpack_from(data)[3]
    end = PREFIX_SIZE + header_len
    if end > len(data):
        raise EnvelopeError("envelope header runs past the end")
    try:
        header = orjson.loads(data[PREFIX_SIZE:end])
    except orjson.JSONDecodeError:
        raise EnvelopeError("envelope header is not JSON") from None
    if not isinstance(header, dict):
        raise EnvelopeError("envelope header is not an object")
    return Envelope(kind, header, bytes(data[end:]))


# --- emits ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EmitMessage:
    event: str
    data: Any  # as given to emit: None, one argument, or a tuple of arguments
    namespace: str
    room: str | None
    skip_sid: list[str] | None
    origin: str


def _arguments(data: Any) -> list[Any]:
    # python-socketio's rule: a tuple is several arguments, None is none, anything else is one.
    if isinstance(data, tuple):
        return list(data)
    return [] if data is None else [data]


def _from_arguments(args: list[Any]) -> Any:
    if not args:
        return None
    return args[0] if len(args) == 1 else tuple(args)


def _skip_list(skip_sid: Any) -> list[str] | None:
    if skip_sid is None:
        return None
    skips = skip_sid if isinstance(skip_sid, list | tuple) else [skip_sid]
    return [s for s in skips if s is not None] or None


def encode_emit(
    event: str,
    data: Any,
    *,
    namespace: str,
    room: str | None,
    skip_sid: Any,
    origin: str,
) -> bytes:
    args = _arguments(data)
    header: dict[str, Any] = {
        "event": event,
        "namespace": namespace,
        "room": room,
        "skip_sid": _skip_list(skip_sid),
        "origin": origin,
    }
    if len(args) == 1 and isinstance(args[0], bytes | bytearray):
        header["format"] = "bin"
        return encode(Kind.EMIT, header, bytes(args[0]))
    if not Packet.data_is_binary(args):
        header["format"] = "json"
        return encode(Kind.EMIT, header, orjson.dumps(args, option=_JSON_OPTIONS))
    template, attachments = Packet.deconstruct_binary(args)
    raw = orjson.dumps(template, option=_JSON_OPTIONS)
    header.update(format="mixed", jl=len(raw), al=[len(a) for a in attachments])
    return encode(Kind.EMIT, header, b"".join([raw, *(bytes(a) for a in attachments)]))


def _field(header: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = header.get(name)
    if not isinstance(value, kind):
        raise EnvelopeError(f"emit envelope field {name!r} is missing or malformed")
    return value


def decode_emit(envelope: Envelope) -> EmitMessage:
    if envelope.kind is not Kind.EMIT:
        raise EnvelopeError(f"not an emit envelope ({envelope.kind.name})")
    h = envelope.header
    event = _field(h, "event", str)
    namespace = _field(h, "namespace", str)
    room = _field(h, "room", (str, type(None)))
    origin = _field(h, "origin", str)
    skip = _field(h, "skip_sid", (list, type(None)))
    if skip is not None and not all(isinstance(s, str) for s in skip):
        raise EnvelopeError("emit envelope field 'skip_sid' is malformed")
    fmt = h.get("format")
    payload = envelope.payload
    if fmt == "bin":
        data: Any = payload
    elif fmt == "json":
        data = _from_arguments(_json_list(payload))
    elif fmt == "mixed":
        data = _from_arguments(_mixed(h, payload))
    else:
        raise EnvelopeError("emit envelope field 'format' is missing or malformed")
    return EmitMessage(event, data, namespace, room, skip, origin)


def _json_list(raw: bytes) -> list[Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise EnvelopeError("emit data is not JSON") from None
    if not isinstance(value, list):
        raise EnvelopeError("emit data is not an argument list")
    return value


def _mixed(header: Mapping[str, Any], payload: bytes) -> list[Any]:
    json_len = _field(header, "jl", int)
    lengths = _field(header, "al", list)
    if json_len < 0 or not all(isinstance(n, int) and n >= 0 for n in lengths):
        raise EnvelopeError("emit envelope lengths are malformed")
    if json_len + sum(lengths) != len(payload):
        raise EnvelopeError("emit envelope lengths do not match its payload")
    template = _json_list(payload[:json_len])
    attachments, offset = [], json_len
    for n in lengths:
        attachments.append(payload[offset : offset + n])
        offset += n
    try:
        return list(Packet.reconstruct_binary(template, attachments))
    except (IndexError, KeyError, TypeError):
        raise EnvelopeError("emit envelope placeholders do not match its attachments") from None


# --- owner messages ------------------------------------------------------------------------------


def encode_owner(kind: str, header: Mapping[str, Any], payload: bytes, *, origin: str) -> bytes:
    clash = OWNER_RESERVED.intersection(header)
    if clash:
        raise ValueError(f"owner message header may not set {sorted(clash)}")
    return encode(Kind.OWNER, {**header, "kind": kind, "origin": origin}, payload)


def owner_kind(envelope: Envelope) -> str:
    """The sender's message kind of an owner envelope (``send_to_owner``'s ``kind``)."""
    kind = envelope.header.get("kind")
    if envelope.kind is not Kind.OWNER or not isinstance(kind, str):
        raise EnvelopeError("not an owner envelope")
    return kind
