"""The call-log event contract between the relay (producer) and the control API (consumer).

The relay appends one Redis Stream entry per call lifecycle event; the control API's consumer
decodes, validates and writes them to Postgres. Both sides import this module, so the wire format
lives in exactly one place.

Wire format (stream entry fields, all strings): ``v`` (format version, ``1``), ``event_id``,
``tenant_id``, ``call_id``, ``type``, ``occurred_at`` (ISO 8601, UTC), ``seq`` and ``data``
(compact JSON object).

Semantics the consumer relies on:

- ``event_id`` is minted by the producer once per event (UUIDv7) and reused on every retry, so a
  duplicated or replayed entry is recognised and changes nothing.
- ``occurred_at`` is the producer's clock when the event happened; it decides the event's
  partition, so a retried event always lands in the same place.
- ``seq`` increases per call on the producer; it orders events that share a timestamp.
- ``usage`` carries **cumulative** totals since the call started, not deltas: a lost or
  reordered usage event then costs nothing, because the call keeps the largest value seen. A
  producer that takes a call over from another must continue from the last reported totals.
- ``ended`` is the single terminal event; ``failed: true`` marks calls that ended because
  something broke (rather than a normal hang-up by either side).
- ``telephony`` records what the phone network said or was told, appended by the control API:
  Twilio's status callbacks, and the hang-ups and transfers it made (``action``, ``to``). It is
  kept in the log but changes no call field: the relay's own events know better who ended the
  call and why.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import orjson
import uuid_utils
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

WIRE_VERSION = "1"
# An entry larger than this is refused on both sides: transcripts are lines, not documents.
MAX_DATA_BYTES = 32 * 1024

CallStatus = Literal["created", "connecting", "active", "ended", "failed"]
EndedBy = Literal["caller", "agent", "relay"]


class _Data(BaseModel):
    # Unknown fields are kept (and stored): an older consumer must not dead-letter events from a
    # newer relay during a rolling deploy.
    model_config = ConfigDict(extra="allow", frozen=True)


class EmptyData(_Data):
    pass


class CreatedData(_Data):
    agent_id: uuid.UUID | None = None


class ConnectedData(_Data):
    resumed: bool = False


class UpstreamConnectedData(_Data):
    conversation_id: str = Field(min_length=1, max_length=200)


class TranscriptData(_Data):
    role: Literal["user", "agent"]
    text: str = Field(max_length=16_000)
    # The upstream (ElevenLabs) event id of the line, when it has one.
    event_id: int | None = Field(default=None, ge=0)


class UsageData(_Data):
    """Cumulative totals since the call started (see the module docstring)."""

    audio_in_seconds: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    audio_out_seconds: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    frames_in: int = Field(default=0, ge=0)
    frames_out: int = Field(default=0, ge=0)
    bytes_in: int = Field(default=0, ge=0)
    bytes_out: int = Field(default=0, ge=0)


class EndedData(_Data):
    reason: str = Field(min_length=1, max_length=100)
    code: str | None = Field(default=None, max_length=100)
    ended_by: EndedBy | None = None
    duration_ms: int | None = Field(default=None, ge=0)
    failed: bool = False

    @field_validator("code", mode="before")
    @classmethod
    def _code_as_text(cls, value: Any) -> Any:
        # WebSocket close codes arrive as integers; the call log stores codes as text.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value


class StatusData(_Data):
    status: CallStatus
    detail: str | None = Field(default=None, max_length=500)


class ErrorData(_Data):
    code: str = Field(min_length=1, max_length=100)
    message: str | None = Field(default=None, max_length=1000)


class TelephonyData(_Data):
    """What the phone network reported about the call (Twilio's status callback), or what the
    control API asked of it (extra fields ``action``: hangup|transfer, ``to``)."""

    provider: Literal["twilio"]
    call_status: str = Field(pattern=r"^[a-z][a-z-]{0,39}$")
    call_sid: str = Field(min_length=1, max_length=64)
    duration_seconds: int | None = Field(default=None, ge=0)
    # The provider's own ordering of its callbacks for the call, when it sends one.
    sequence: int | None = Field(default=None, ge=0)


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: uuid.UUID
    tenant_id: uuid.UUID
    call_id: uuid.UUID
    occurred_at: AwareDatetime
    seq: int = Field(ge=0, le=2**62)


class CreatedEvent(_Event):
    type: Literal["created"] = "created"
    data: CreatedData = CreatedData()


class ConnectingEvent(_Event):
    type: Literal["connecting"] = "connecting"
    data: EmptyData = EmptyData()


class ConnectedEvent(_Event):
    type: Literal["connected"] = "connected"
    data: ConnectedData = ConnectedData()


class UpstreamConnectedEvent(_Event):
    type: Literal["upstream_connected"] = "upstream_connected"
    data: UpstreamConnectedData


class TranscriptEvent(_Event):
    type: Literal["transcript"] = "transcript"
    data: TranscriptData


class UsageEvent(_Event):
    type: Literal["usage"] = "usage"
    data: UsageData


class EndedEvent(_Event):
    type: Literal["ended"] = "ended"
    data: EndedData


class StatusEvent(_Event):
    type: Literal["status"] = "status"
    data: StatusData


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    data: ErrorData


class TelephonyEvent(_Event):
    type: Literal["telephony"] = "telephony"
    data: TelephonyData


CallEvent = Annotated[
    CreatedEvent
    | ConnectingEvent
    | ConnectedEvent
    | UpstreamConnectedEvent
    | TranscriptEvent
    | UsageEvent
    | EndedEvent
    | StatusEvent
    | ErrorEvent
    | TelephonyEvent,
    Field(discriminator="type"),
]
EVENT_TYPES: tuple[str, ...] = (
    "created",
    "connecting",
    "connected",
    "upstream_connected",
    "transcript",
    "usage",
    "ended",
    "status",
    "error",
    "telephony",
)
_ADAPTER: TypeAdapter[CallEvent] = TypeAdapter(CallEvent)
_FIELDS = ("event_id", "tenant_id", "call_id", "type", "occurred_at", "seq", "data")


class InvalidCallEvent(ValueError):
    """A stream entry that is not a valid call event. ``reason`` never echoes field values."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def new_event_id() -> uuid.UUID:
    return uuid.UUID(str(uuid_utils.uuid7()))


def make_event(
    type: str,
    *,
    tenant_id: uuid.UUID,
    call_id: uuid.UUID,
    seq: int,
    data: Mapping[str, Any] | None = None,
    occurred_at: datetime | None = None,
    event_id: uuid.UUID | None = None,
) -> CallEvent:
    """Build and validate an event; the producer keeps it (and its id) until it is appended."""
    try:
        return _ADAPTER.validate_python(
            {
                "event_id": event_id or new_event_id(),
                "tenant_id": tenant_id,
                "call_id": call_id,
                "type": type,
                "occurred_at": occurred_at or datetime.now(UTC),
                "seq": seq,
                "data": dict(data or {}),
            }
        )
    except ValidationError as exc:
        raise InvalidCallEvent(_describe(exc)) from None


def event_data(event: CallEvent) -> dict[str, Any]:
    """The event's data as a JSON-ready dict (what is stored in ``call_events.data``)."""
    return event.data.model_dump(mode="json", exclude_none=True)


def encode_event(event: CallEvent) -> dict[str, str]:
    """Stream entry fields for ``event``."""
    data = orjson.dumps(event_data(event))
    if len(data) > MAX_DATA_BYTES:
        raise InvalidCallEvent("data_too_large")
    return {
        "v": WIRE_VERSION,
        "event_id": str(event.event_id),
        "tenant_id": str(event.tenant_id),
        "call_id": str(event.call_id),
        "type": event.type,
        "occurred_at": event.occurred_at.astimezone(UTC).isoformat(),
        "seq": str(event.seq),
        "data": data.decode(),
    }


def decode_event(fields: Mapping[bytes | str, bytes | str]) -> CallEvent:
    """Validate a stream entry's fields into an event, or raise ``InvalidCallEvent``."""
    text: dict[str, str] = {}
    try:
        for key, value in fields.items():
            name = key.decode() if isinstance(key, bytes) else key
            text[name] = value.decode() if isinstance(value, bytes) else value
    except UnicodeDecodeError:
        raise InvalidCallEvent("not_utf8") from None
    version = text.get("v")
    if version != WIRE_VERSION:
        raise InvalidCallEvent("unsupported_version")
    missing = [name for name in _FIELDS if name not in text]
    if missing:
        raise InvalidCallEvent("missing_fields: " + ",".join(missing))
    if text["type"] not in EVENT_TYPES:
        raise InvalidCallEvent("unknown_type")
    if len(text["data"]) > MAX_DATA_BYTES:
        raise InvalidCallEvent("data_too_large")
    try:
        data = orjson.loads(text["data"])
    except orjson.JSONDecodeError:
        raise InvalidCallEvent("data_not_json") from None
    if not isinstance(data, dict):
        raise InvalidCallEvent("data_not_object")
    try:
        return _ADAPTER.validate_python(
            {
                "event_id": text["event_id"],
                "tenant_id": text["tenant_id"],
                "call_id": text["call_id"],
                "type": text["type"],
                "occurred_at": text["occurred_at"],
                "seq": text["seq"],
                "data": data,
            }
        )
    except ValidationError as exc:
        raise InvalidCallEvent(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    # Locations and error types only: values may be transcript text or anything else.
    parts = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False)[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}:{err.get('type', 'invalid')}")
    return "invalid: " + "; ".join(parts)


async def append_call_event(redis: Redis, stream_key: str, event: CallEvent, *, maxlen: int) -> str:
    """XADD the event, trimming the stream to about ``maxlen`` entries; returns the entry id.

    ``maxlen`` must comfortably exceed what the consumer can fall behind by during an outage:
    trimmed entries that were never consumed are lost to the call log.
    """
    entry_id = await redis.xadd(
        stream_key,
        encode_event(event),  # type: ignore[arg-type]
        maxlen=maxlen,
        approximate=True,
    )
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
