"""Running a platform maintenance function (``reap_stale_calls``, ``expire_unconnected_calls``)
a batch at a time: a short transaction per batch, so no lock is held for long, and a bound on one
round's work (whatever is left waits for the next round)."""

from __future__ import annotations

from typing import Any

import asyncpg

BATCH_SIZE = 500
MAX_BATCHES_PER_ROUND = 20


async def run_in_batches(
    pool: asyncpg.Pool,
    query: str,
    *args: Any,
    batch_size: int = BATCH_SIZE,
    max_batches: int = MAX_BATCHES_PER_ROUND,
) -> list[asyncpg.Record]:
    """Rows of ``query`` run with ``*args`` and the batch size as its last parameter, batch after
    batch until one comes back short or ``max_batches`` have run."""
    found: list[asyncpg.Record] = []
    for _ in range(max_batches):
        async with pool.acquire() as conn:
            rows = await conn.fetch(query, *args, batch_size)
        found.extend(rows)
        if len(rows) < batch_size:
            break
    return found
