"""Endpoints: reading the call log (list, active calls, one call with its timeline and transcript).

Rows come from the call-log consumer, which folds the relay's lifecycle events into ``calls``;
everything here is a read under the caller's tenant.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import asyncpg
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, model_validator

from control_api.db import tenant_tx
from control_api.endpoints import ApiCall, EndpointGroup, QueryModel
from control_api.keyset_cursor import decode_cursor, encode_cursor
from control_api.problems import Problem

group = EndpointGroup("calls")

CallStatus = Literal["created", "connecting", "active", "ended", "failed"]
OPEN_STATUSES = ("created", "connecting", "active")
MAX_TIMELINE_EVENTS = 5000
# Slack on top of the longest a call can live (connect window + maximum duration).
ACTIVE_GRACE = timedelta(minutes=1)


EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2999, 12, 31, tzinfo=UTC)


def _as_utc(value: datetime) -> datetime:
    # ISO 8601 without an offset is read as UTC rather than refused. The bounds keep range
    # arithmetic (and Postgres) far from datetime's year 1..9999 overflow.
    try:
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise ValueError("timestamp out of range") from None
    if not EARLIEST <= value <= LATEST:
        raise ValueError("timestamp must be between 1970 and 2999")
    return value


Instant = Annotated[datetime, AfterValidator(_as_utc)]

_COLUMNS = """
    id, agent_id, direction, status, created_at, started_at, ended_at, duration_ms, end_reason,
    end_code, ended_by, conversation_ids, from_number, to_number, metadata, last_event_at,
    audio_in_seconds, audio_out_seconds, frames_in, frames_out, bytes_in, bytes_out
"""


class CallUsage(BaseModel):
    audio_in_seconds: float = Field(description="Caller audio received by the relay, in seconds.")
    audio_out_seconds: float = Field(description="Agent audio sent to the caller, in seconds.")
    frames_in: int
    frames_out: int
    bytes_in: int
    bytes_out: int


class CallSummary(BaseModel):
    id: uuid.UUID
    agent_id: uuid.UUID | None
    direction: str
    status: CallStatus
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    duration_ms: int | None
    end_reason: str | None
    end_code: str | None
    ended_by: str | None
    conversation_ids: list[str]
    from_number: str | None
    to_number: str | None
    metadata: dict[str, JsonValue]
    last_event_at: datetime | None
    usage: CallUsage


class CallPage(BaseModel):
    items: list[CallSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at end.")


class TimelineEvent(BaseModel):
    event_id: uuid.UUID
    type: str
    occurred_at: datetime
    seq: int
    data: dict[str, JsonValue]


class TranscriptLine(BaseModel):
    role: Literal["user", "agent"]
    text: str
    occurred_at: datetime
    event_id: int | None = Field(description="The upstream conversation's event id, if any.")


class CallDetail(CallSummary):
    client_audio_format: str
    dynamic_variables: dict[str, JsonValue]
    provider_call_id: str | None
    timeline: list[TimelineEvent] = Field(description="Every lifecycle event, in order.")
    timeline_truncated: bool = Field(
        description=f"True when the call has more than {MAX_TIMELINE_EVENTS} events."
    )
    transcript: list[TranscriptLine]


class CallListQuery(QueryModel):
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True)

    status: CallStatus | None = None
    agent_id: uuid.UUID | None = None
    from_: Instant | None = Field(
        default=None, alias="from", description="Calls created at or after (ISO 8601)."
    )
    to: Instant | None = Field(default=None, description="Calls created before (ISO 8601).")
    cursor: str | None = Field(default=None, max_length=200)
    limit: int = Field(default=50, ge=1, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> CallListQuery:
        if self.from_ is not None and self.to is not None and self.from_ >= self.to:
            raise ValueError("'from' must be before 'to'")
        return self


class ActiveQuery(QueryModel):
    cursor: str | None = Field(default=None, max_length=200)
    limit: int = Field(default=50, ge=1, le=100)


def _summary(row: asyncpg.Record) -> dict[str, Any]:
    fields = dict(row)
    fields["usage"] = CallUsage(
        audio_in_seconds=row["audio_in_seconds"],
        audio_out_seconds=row["audio_out_seconds"],
        frames_in=row["frames_in"],
        frames_out=row["frames_out"],
        bytes_in=row["bytes_in"],
        bytes_out=row["bytes_out"],
    )
    return fields


async def _page(
    call: ApiCall[Any, Any],
    conditions: list[str],
    args: list[Any],
    cursor: str | None,
    limit: int,
) -> CallPage:
    tenant_id = call.tenant_id
    where = ["tenant_id = $1", *conditions]
    params: list[Any] = [tenant_id, *args]
    if cursor:
        created_at, call_id = decode_cursor(cursor)
        try:
            created_at = _as_utc(created_at)
        except ValueError:
            # A forged position near datetime's limits would overflow on its way to Postgres.
            raise Problem(400, "invalid_cursor", "The cursor is not one this API issued.") from None
        params += [created_at, call_id]
        where.append(f"(created_at, id) < (${len(params) - 1}, ${len(params)})")
    params.append(limit + 1)
    sql = (
        f"SELECT {_COLUMNS} FROM calls WHERE {' AND '.join(where)}"
        f" ORDER BY created_at DESC, id DESC LIMIT ${len(params)}"
    )
    async with tenant_tx(call.state.pool, tenant_id, readonly=True) as conn:
        rows = await conn.fetch(sql, *params)
    more = len(rows) > limit
    items = [CallSummary(**_summary(r)) for r in rows[:limit]]
    return CallPage(
        items=items,
        next_cursor=encode_cursor(items[-1].created_at, items[-1].id) if more else None,
    )


@group(
    "GET",
    "/v1/calls",
    summary="List calls, newest first",
    query=CallListQuery,
    response=CallPage,
)
async def list_calls(call: ApiCall[Any, CallListQuery]) -> CallPage:
    q = call.query
    conditions: list[str] = []
    args: list[Any] = []
    for column, op, value in (
        ("status", "=", q.status),
        ("agent_id", "=", q.agent_id),
        ("created_at", ">=", q.from_),
        ("created_at", "<", q.to),
    ):
        if value is not None:
            args.append(value)
            conditions.append(f"{column} {op} ${len(args) + 1}")
    return await _page(call, conditions, args, q.cursor, q.limit)


@group(
    "GET",
    "/v1/calls/active",
    summary="Calls not yet ended (created, connecting or active), newest first",
    query=ActiveQuery,
    response=CallPage,
)
async def list_active_calls(call: ApiCall[Any, ActiveQuery]) -> CallPage:
    settings = call.state.settings
    # No call outlives its token, so an open call older than that lost its ended event (a
    # relay crash) and is not shown as active.
    lifetime = (
        timedelta(
            seconds=settings.call_token_connect_window_seconds + settings.max_call_duration_seconds
        )
        + ACTIVE_GRACE
    )
    return await _page(
        call,
        ["status = ANY($2::text[])", "created_at > $3"],
        [list(OPEN_STATUSES), datetime.now(UTC) - lifetime],
        call.query.cursor,
        call.query.limit,
    )


@group(
    "GET",
    "/v1/calls/{id}",
    summary="One call with its timeline, transcript, usage and end reason",
    response=CallDetail,
    errors=[404],
)
async def get_call(call: ApiCall[Any, Any]) -> CallDetail:
    call_id: uuid.UUID = call.path["id"]
    tenant_id = call.tenant_id
    async with tenant_tx(call.state.pool, tenant_id, readonly=True) as conn:
        row = await conn.fetchrow(
            f"SELECT {_COLUMNS}, client_audio_format, dynamic_variables, provider_call_id"
            " FROM calls WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            call_id,
        )
        if row is None:
            raise Problem(404, "not_found", "No such call.")
        events = await conn.fetch(
            "SELECT event_id, type, occurred_at, seq, data FROM call_events"
            " WHERE tenant_id = $1 AND call_id = $2"
            " ORDER BY occurred_at, seq, event_id LIMIT $3",
            tenant_id,
            call_id,
            MAX_TIMELINE_EVENTS + 1,
        )
    timeline = [TimelineEvent(**dict(e)) for e in events[:MAX_TIMELINE_EVENTS]]
    return CallDetail(
        **_summary(row),
        timeline=timeline,
        timeline_truncated=len(events) > MAX_TIMELINE_EVENTS,
        transcript=transcript_lines(timeline),
    )


def transcript_lines(timeline: list[TimelineEvent]) -> list[TranscriptLine]:
    lines: list[TranscriptLine] = []
    for event in timeline:
        if event.type != "transcript":
            continue
        role, text, upstream_id = (
            event.data.get("role"),
            event.data.get("text"),
            event.data.get("event_id"),
        )
        if role not in ("user", "agent") or not isinstance(text, str):
            continue
        lines.append(
            TranscriptLine(
                role=role,
                text=text,
                occurred_at=event.occurred_at,
                event_id=upstream_id if isinstance(upstream_id, int) else None,
            )
        )
    return lines
