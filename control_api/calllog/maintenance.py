"""Call-log upkeep: monthly partitions ahead of time, whole partitions dropped past the platform's
maximum retention, each tenant's rows deleted past its own (shorter) retention, calls that
stopped producing events ended (``stale``), and calls whose caller never connected before their
token's connect window closed ended (``expired``).

Every replica runs it; that is safe because partition work happens under a transaction-scoped
advisory lock that other replicas skip rather than wait for (and which PgBouncer in transaction
mode supports), the per-tenant deletes are idempotent, and the stale-call reaper and the
unconnected-call expiry skip calls another replica has locked.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg

from control_api.calllog import metrics
from control_api.calllog.stale import reap_stale_calls
from control_api.calllog.unconnected import expire_unconnected_calls
from control_api.db import tenant_tx
from voicerelay.settings import Settings

if TYPE_CHECKING:
    from control_api.state import AppState

log = logging.getLogger(__name__)

# Fixed key so every replica contends for the same lock.
PARTITION_LOCK_KEY = 0x7672_636C_6D61_696E  # "vrclmain"
MAINTENANCE_INTERVAL_SECONDS = 3600.0
RETRY_AFTER_ERROR_SECONDS = 60.0
# Well below CALL_STALE_AFTER_SECONDS (at least 300 s), so a dead call ends soon after it qualifies;
# an unconnected call ends within about a minute of its connect deadline (plus the margin).
STALE_CALL_CHECK_SECONDS = 60.0
DELETE_BATCH_SIZE = 5000

_DELETE_CALLS = """
WITH doomed AS (
    SELECT id, created_at FROM calls
    WHERE tenant_id = $1 AND created_at < $2
    ORDER BY created_at LIMIT $3
)
DELETE FROM calls c USING doomed d WHERE c.id = d.id AND c.created_at = d.created_at
"""
_DELETE_EVENTS = """
WITH doomed AS (
    SELECT event_id, occurred_at FROM call_events
    WHERE tenant_id = $1 AND occurred_at < $2
    ORDER BY occurred_at LIMIT $3
)
DELETE FROM call_events e USING doomed d
WHERE e.event_id = d.event_id AND e.occurred_at = d.occurred_at
"""


@dataclass
class MaintenanceReport:
    partitions_created: int = 0
    partitions_dropped: list[str] = field(default_factory=list)
    calls_deleted: int = 0
    events_deleted: int = 0
    skipped_partitions: bool = False


def month_start(day: date) -> date:
    return day.replace(day=1)


async def maintain_partitions(
    pool: asyncpg.Pool, *, today: date, months_ahead: int, max_retention_days: int
) -> tuple[int, list[str]] | None:
    """Create this month's and ``months_ahead`` next partitions; drop those past retention.

    Returns ``None`` when another replica holds the maintenance lock.
    """
    cutoff = today - timedelta(days=max_retention_days)
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", PARTITION_LOCK_KEY):
            return None
        # Dropping a partition needs an exclusive lock on the parent; waiting behind a long
        # query would stall every writer queued after us, so give up and retry next round.
        await conn.execute("SET LOCAL lock_timeout = '5s'")
        created = await conn.fetchval(
            "SELECT ensure_call_log_partitions($1::date, $2)", month_start(today), months_ahead + 1
        )
        dropped = [
            r[0]
            for r in await conn.fetch("SELECT drop_call_log_partitions_before($1::date)", cutoff)
        ]
    return int(created or 0), dropped


async def delete_tenant_rows_before(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, cutoff: datetime, *, batch_size: int
) -> tuple[int, int]:
    """Delete one tenant's calls and events older than ``cutoff``, a short transaction per batch."""
    totals = [0, 0]
    for index, sql in enumerate((_DELETE_CALLS, _DELETE_EVENTS)):
        while True:
            async with tenant_tx(pool, tenant_id) as conn:
                status = await conn.execute(sql, tenant_id, cutoff, batch_size)
            deleted = int(status.rsplit(" ", 1)[-1])
            totals[index] += deleted
            if deleted < batch_size:
                break
    return totals[0], totals[1]


async def apply_tenant_retention(
    pool: asyncpg.Pool, *, now: datetime, batch_size: int = DELETE_BATCH_SIZE
) -> tuple[int, int]:
    async with pool.acquire() as conn:
        policies = await conn.fetch(
            "SELECT tenant_id, retention_days FROM call_log_retention_policies()"
        )
    calls_deleted = events_deleted = 0
    for policy in policies:
        cutoff = now - timedelta(days=int(policy["retention_days"]))
        calls, events = await delete_tenant_rows_before(
            pool, policy["tenant_id"], cutoff, batch_size=batch_size
        )
        calls_deleted += calls
        events_deleted += events
    return calls_deleted, events_deleted


async def run_maintenance_once(
    pool: asyncpg.Pool, settings: Settings, *, now: datetime | None = None
) -> MaintenanceReport:
    now = now or datetime.now(UTC)
    report = MaintenanceReport()
    outcome = await maintain_partitions(
        pool,
        today=now.astimezone(UTC).date(),
        months_ahead=settings.call_log_partitions_ahead_months,
        max_retention_days=settings.call_log_max_retention_days,
    )
    if outcome is None:
        report.skipped_partitions = True
    else:
        report.partitions_created, report.partitions_dropped = outcome
        metrics.PARTITIONS_CREATED.inc(report.partitions_created)
        metrics.PARTITIONS_DROPPED.inc(len(report.partitions_dropped))
    report.calls_deleted, report.events_deleted = await apply_tenant_retention(pool, now=now)
    metrics.ROWS_DELETED.labels(table="calls").inc(report.calls_deleted)
    metrics.ROWS_DELETED.labels(table="call_events").inc(report.events_deleted)
    if report.partitions_created or report.partitions_dropped or report.calls_deleted:
        log.info(
            "call-log maintenance done",
            extra={
                "partitions_created": report.partitions_created,
                "partitions_dropped": report.partitions_dropped,
                "calls_deleted": report.calls_deleted,
                "events_deleted": report.events_deleted,
            },
        )
    return report


async def _attempt(job: str, work: Callable[[], Awaitable[object]]) -> bool:
    """Run one round of ``work``; a failure is logged and counted, never fatal to the loop."""
    try:
        await work()
    except asyncio.CancelledError:
        raise
    except Exception:
        metrics.MAINTENANCE_ERRORS.inc()
        log.exception("call-log maintenance failed; retrying", extra={"job": job})
        return False
    return True


async def run_call_log_maintenance(state: AppState) -> None:
    """Until cancelled: stale and unconnected calls every minute; partitions and retention at
    start and then hourly. Intervals have jitter, so replicas spread out."""
    pool, settings = state.pool, state.settings
    loop = asyncio.get_running_loop()
    next_upkeep = loop.time()
    while True:
        if loop.time() >= next_upkeep:
            done = await _attempt("partitions", lambda: run_maintenance_once(pool, settings))
            delay = MAINTENANCE_INTERVAL_SECONDS if done else RETRY_AFTER_ERROR_SECONDS
            next_upkeep = loop.time() + delay * random.uniform(0.9, 1.1)
        await _attempt(
            "stale_calls",
            lambda: reap_stale_calls(pool, idle_seconds=settings.call_stale_after_seconds),
        )
        await _attempt(
            "unconnected_calls",
            lambda: expire_unconnected_calls(
                pool, connect_window_seconds=settings.call_token_connect_window_seconds
            ),
        )
        await asyncio.sleep(STALE_CALL_CHECK_SECONDS * random.uniform(0.9, 1.1))
