"""Endpoints: usage (calls, call minutes and audio seconds per day or per agent).

Sums are over the tenant's calls created in the range; usage counters on a call are the relay's
cumulative totals, so a call still in progress counts what it has used so far.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from control_api.db import tenant_tx
from control_api.endpoints import ApiCall, EndpointGroup, QueryModel
from control_api.problems import Problem
from control_api.routes.call_logs import Instant

group = EndpointGroup("usage")

MAX_RANGE = timedelta(days=366)
DEFAULT_RANGE = timedelta(days=30)


class UsageQuery(QueryModel):
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True)

    from_: Instant | None = Field(
        default=None,
        alias="from",
        description="Start of the range (ISO 8601, inclusive); default: 30 days before `to`.",
    )
    to: Instant | None = Field(
        default=None, description="End of the range (ISO 8601, exclusive); default: now."
    )
    group_by: Literal["day", "agent"] = Field(
        default="day", description="`day` (UTC calendar days) or `agent`."
    )


class UsageFigures(BaseModel):
    calls: int
    call_minutes: float = Field(description="Sum of call durations, in minutes.")
    audio_in_seconds: float = Field(description="Caller audio received, in seconds.")
    audio_out_seconds: float = Field(description="Agent audio sent to callers, in seconds.")


class UsageRow(UsageFigures):
    day: date | None = Field(description="The UTC day (group_by=day), else null.")
    agent_id: uuid.UUID | None = Field(
        description="The agent (group_by=agent); null for calls without one."
    )


class UsageReport(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True, validate_by_name=True)

    from_: datetime = Field(alias="from")
    to: datetime
    group_by: Literal["day", "agent"]
    items: list[UsageRow]
    totals: UsageFigures


_FIGURES = """
    count(*) AS calls,
    COALESCE(sum(duration_ms), 0) / 60000.0 AS call_minutes,
    COALESCE(sum(audio_in_seconds), 0) AS audio_in_seconds,
    COALESCE(sum(audio_out_seconds), 0) AS audio_out_seconds
"""
_GROUPINGS = {
    "day": ("(created_at AT TIME ZONE 'UTC')::date", "day"),
    "agent": ("agent_id", "agent_id"),
}


@group(
    "GET",
    "/v1/usage",
    summary="Calls, call minutes and audio seconds per day or per agent",
    query=UsageQuery,
    response=UsageReport,
)
async def get_usage(call: ApiCall[Any, UsageQuery]) -> UsageReport:
    q = call.query
    end = q.to or datetime.now(UTC)
    start = q.from_ or end - DEFAULT_RANGE
    if start >= end:
        raise Problem(422, "invalid_range", "'from' must be before 'to'.")
    if end - start > MAX_RANGE:
        raise Problem(422, "range_too_large", f"The range may span at most {MAX_RANGE.days} days.")
    expression, name = _GROUPINGS[q.group_by]
    tenant_id = call.tenant_id
    async with tenant_tx(call.state.pool, tenant_id, readonly=True) as conn:
        rows = await conn.fetch(
            f"SELECT {expression} AS {name}, {_FIGURES} FROM calls"
            " WHERE tenant_id = $1 AND created_at >= $2 AND created_at < $3"
            f" GROUP BY 1 ORDER BY 1 NULLS LAST",
            tenant_id,
            start,
            end,
        )
    items = [
        UsageRow(
            day=r["day"] if q.group_by == "day" else None,
            agent_id=r["agent_id"] if q.group_by == "agent" else None,
            calls=r["calls"],
            call_minutes=round(float(r["call_minutes"]), 4),
            audio_in_seconds=round(float(r["audio_in_seconds"]), 3),
            audio_out_seconds=round(float(r["audio_out_seconds"]), 3),
        )
        for r in rows
    ]
    totals = UsageFigures(
        calls=sum(i.calls for i in items),
        call_minutes=round(sum(i.call_minutes for i in items), 4),
        audio_in_seconds=round(sum(i.audio_in_seconds for i in items), 3),
        audio_out_seconds=round(sum(i.audio_out_seconds for i in items), 3),
    )
    return UsageReport(from_=start, to=end, group_by=q.group_by, items=items, totals=totals)
