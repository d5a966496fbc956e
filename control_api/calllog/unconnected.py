"""Ends calls whose caller never connected and no longer can.

A call is ``created`` when its caller token is issued (``POST /v1/calls``, Twilio's voice
webhook); the relay admits the caller's first connection only until the token's connect-by,
``CALL_TOKEN_CONNECT_WINDOW_SECONDS`` after issue. A call still ``created`` well past that will
never get an event. ``expire_unconnected_calls`` (migration 0009) ends such calls as
``never_connected`` with code ``expired`` (failed, no duration); if the relay's events turn up
after all, the consumer lets its own ``ended`` replace that ending, as for a reaped stale call.
"""

from __future__ import annotations

import logging

import asyncpg

from control_api.calllog.batches import BATCH_SIZE, MAX_BATCHES_PER_ROUND, run_in_batches
from control_api.metrics import UNCONNECTED_CALLS_EXPIRED

log = logging.getLogger(__name__)


async def expire_unconnected_calls(
    pool: asyncpg.Pool,
    *,
    connect_window_seconds: int,
    batch_size: int = BATCH_SIZE,
    max_batches: int = MAX_BATCHES_PER_ROUND,
) -> int:
    """End unconnected calls of every tenant, a short transaction per batch; returns how many."""
    rows = await run_in_batches(
        pool,
        "SELECT tenant_id, call_id FROM expire_unconnected_calls($1, $2)",
        connect_window_seconds,
        batch_size=batch_size,
        max_batches=max_batches,
    )
    UNCONNECTED_CALLS_EXPIRED.inc(len(rows))
    if rows:
        log.info(
            "ended calls whose caller never connected within the token's connect window",
            extra={"count": len(rows), "connect_window_seconds": connect_window_seconds},
        )
    return len(rows)
