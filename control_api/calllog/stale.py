"""Ends calls that stopped producing events: their relay replica died and nobody took them over.

A live call writes a usage event every 15 s and its owner keeps renewing leases, so a call that
has been silent for ``CALL_STALE_AFTER_SECONDS`` can only be dead, and no ``ended`` event will
ever come for it. ``reap_stale_calls`` (migration 0008) ends such calls as ``relay_lost`` with
code ``stale``; if a real ``ended`` arrives afterwards, the consumer lets it replace that guess.
"""

from __future__ import annotations

import logging

import asyncpg

from control_api.calllog.batches import BATCH_SIZE, MAX_BATCHES_PER_ROUND, run_in_batches
from control_api.metrics import STALE_CALLS_REAPED

log = logging.getLogger(__name__)


async def reap_stale_calls(
    pool: asyncpg.Pool,
    *,
    idle_seconds: int,
    batch_size: int = BATCH_SIZE,
    max_batches: int = MAX_BATCHES_PER_ROUND,
) -> int:
    """End stale calls of every tenant, a short transaction per batch; returns how many."""
    rows = await run_in_batches(
        pool,
        "SELECT tenant_id, call_id FROM reap_stale_calls($1, $2)",
        idle_seconds,
        batch_size=batch_size,
        max_batches=max_batches,
    )
    STALE_CALLS_REAPED.inc(len(rows))
    if rows:
        log.warning(
            "ended calls that had sent no event for too long (relay lost)",
            extra={
                "count": len(rows),
                "idle_seconds": idle_seconds,
                "call_ids": [str(r["call_id"]) for r in rows[:20]],
            },
        )
    return len(rows)
