"""Writes one tenant's call events and applies the new ones to their calls, in one transaction.

Idempotence comes from the event table's primary key: ``INSERT ... ON CONFLICT DO NOTHING
RETURNING`` tells which events are new, and only those touch the ``calls`` row. A replayed batch
inserts nothing and so changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, timedelta

import asyncpg
import orjson

from control_api.calllog.fold import CallChange, fold_events
from control_api.db import Conn
from voicerelay.call_events import CallEvent, event_data

_INSERT_EVENTS = """
INSERT INTO call_events (event_id, tenant_id, call_id, occurred_at, type, data, seq)
SELECT e.event_id, $1, e.call_id, e.occurred_at, e.type, e.data::jsonb, e.seq
FROM unnest($2::uuid[], $3::uuid[], $4::timestamptz[], $5::text[], $6::text[], $7::bigint[])
    AS e(event_id, call_id, occurred_at, type, data, seq)
ON CONFLICT DO NOTHING
RETURNING event_id
"""

# Column references on the right-hand side are the row's values before this update, so each
# expression merges the stored value with the batch's value monotonically. The first ending wins,
# except over the stale-call reaper's (reaped_at set, migration 0008): that one was only a guess
# made for want of events, and the relay's own `ended` is the truth whenever it turns up.
_APPLY_CHANGE = """
UPDATE calls SET
    status = CASE
        WHEN reaped_at IS NOT NULL AND $5::timestamptz IS NOT NULL THEN $2::text
        WHEN $2::text IS NOT NULL AND $3::int > (CASE status
            WHEN 'created' THEN 0 WHEN 'connecting' THEN 1 WHEN 'active' THEN 2 ELSE 3 END)
        THEN $2::text ELSE status END,
    started_at = LEAST(started_at, $4::timestamptz),
    ended_at = CASE WHEN reaped_at IS NOT NULL AND $5 IS NOT NULL THEN $5::timestamptz
        ELSE COALESCE(ended_at, $5::timestamptz) END,
    end_reason = CASE WHEN (ended_at IS NULL OR reaped_at IS NOT NULL) AND $5 IS NOT NULL
        THEN $6::text ELSE end_reason END,
    end_code = CASE WHEN (ended_at IS NULL OR reaped_at IS NOT NULL) AND $5 IS NOT NULL
        THEN $7::text ELSE end_code END,
    ended_by = CASE WHEN (ended_at IS NULL OR reaped_at IS NOT NULL) AND $5 IS NOT NULL
        THEN $8::text ELSE ended_by END,
    duration_ms = CASE
        WHEN (ended_at IS NULL OR reaped_at IS NOT NULL) AND $5::timestamptz IS NOT NULL
            AND $9::bigint IS NOT NULL THEN $9
        -- Replacing the reaper's ending: derive the duration from the real end.
        WHEN reaped_at IS NOT NULL AND $5::timestamptz IS NOT NULL
        THEN CASE WHEN LEAST(started_at, $4) IS NOT NULL
            THEN GREATEST(0, EXTRACT(EPOCH FROM ($5 - LEAST(started_at, $4))) * 1000)::bigint END
        -- A stored duration that is not the derived one was reported by the relay: keep it.
        WHEN duration_ms IS DISTINCT FROM (CASE WHEN ended_at IS NOT NULL AND started_at IS NOT NULL
            THEN GREATEST(0, EXTRACT(EPOCH FROM (ended_at - started_at)) * 1000)::bigint END)
        THEN duration_ms
        -- Otherwise derive it, again, from the (possibly just widened) start and end.
        WHEN COALESCE(ended_at, $5) IS NOT NULL AND LEAST(started_at, $4) IS NOT NULL
        THEN GREATEST(0, EXTRACT(EPOCH FROM (COALESCE(ended_at, $5) - LEAST(started_at, $4)))
            * 1000)::bigint
    END,
    audio_in_seconds = GREATEST(audio_in_seconds, $10::double precision),
    audio_out_seconds = GREATEST(audio_out_seconds, $11::double precision),
    frames_in = GREATEST(frames_in, $12::bigint),
    frames_out = GREATEST(frames_out, $13::bigint),
    bytes_in = GREATEST(bytes_in, $14::bigint),
    bytes_out = GREATEST(bytes_out, $15::bigint),
    conversation_ids = conversation_ids || ARRAY(
        SELECT u.cid FROM unnest($16::text[]) WITH ORDINALITY AS u(cid, n)
        WHERE NOT (u.cid = ANY(conversation_ids)) ORDER BY u.n),
    last_event_at = GREATEST(last_event_at, $17::timestamptz),
    reaped_at = CASE WHEN $5::timestamptz IS NOT NULL THEN NULL ELSE reaped_at END
WHERE id = $1
RETURNING id
"""


@dataclass
class TenantWrite:
    inserted: list[CallEvent] = field(default_factory=list)
    duplicates: int = 0
    unknown_calls: list[str] = field(default_factory=list)


def is_missing_partition(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.CheckViolationError) and "no partition of relation" in str(exc)


def event_months(events: Sequence[CallEvent]) -> list[date]:
    """The months whose partitions ``events`` may fall in.

    Partition bounds are dates read in the server's time zone, so an event within a day of a
    month boundary may belong to either side: ask for both.
    """
    months: set[date] = set()
    for event in events:
        moment = event.occurred_at.astimezone(UTC)
        for shifted in (moment - timedelta(days=1), moment, moment + timedelta(days=1)):
            months.add(shifted.date().replace(day=1))
    return sorted(months)


async def ensure_partitions_for(conn: Conn, months: Sequence[date]) -> None:
    for month in months:
        await conn.execute("SELECT ensure_call_log_partitions($1::date, 1)", month)


async def write_tenant_events(conn: Conn, events: Sequence[CallEvent]) -> TenantWrite:
    """Insert ``events`` (all of one tenant, inside its ``tenant_tx``) and apply the new ones."""
    result = TenantWrite()
    if not events:
        return result
    tenant_id = events[0].tenant_id
    rows = await conn.fetch(
        _INSERT_EVENTS,
        tenant_id,
        [e.event_id for e in events],
        [e.call_id for e in events],
        [e.occurred_at for e in events],
        [e.type for e in events],
        [orjson.dumps(event_data(e)).decode() for e in events],
        [e.seq for e in events],
    )
    new_ids = {r["event_id"] for r in rows}
    result.inserted = [e for e in events if e.event_id in new_ids]
    result.duplicates = len(events) - len(result.inserted)
    changes = fold_events(result.inserted)
    # A fixed lock order keeps concurrent consumers touching the same calls from deadlocking.
    for call_id in sorted(changes):
        if not await _apply_change(conn, changes[call_id]):
            result.unknown_calls.append(str(call_id))
    return result


async def _apply_change(conn: Conn, change: CallChange) -> bool:
    usage = change.usage
    ending = change.ending
    row = await conn.fetchrow(
        _APPLY_CHANGE,
        change.call_id,
        change.status,
        change.status_rank,
        change.started_at,
        ending.ended_at if ending else None,
        ending.reason if ending else None,
        ending.code if ending else None,
        ending.ended_by if ending else None,
        ending.duration_ms if ending else None,
        usage.audio_in_seconds if usage else None,
        usage.audio_out_seconds if usage else None,
        usage.frames_in if usage else None,
        usage.frames_out if usage else None,
        usage.bytes_in if usage else None,
        usage.bytes_out if usage else None,
        change.conversation_ids,
        change.last_event_at,
    )
    return row is not None
