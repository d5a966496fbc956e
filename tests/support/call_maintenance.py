"""Shared by the tests of the control API's call maintenance (stale-call reaper, unconnected-call
expiry): reading a call row as the owner, and running the real maintenance loop until a call
has been ended."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from types import SimpleNamespace
from typing import Any

import asyncpg

from control_api.calllog.maintenance import run_call_log_maintenance
from voicerelay.settings import Settings


async def call_row(owner_conn: asyncpg.Connection, call_id: uuid.UUID) -> dict[str, Any]:
    row = await owner_conn.fetchrow("SELECT * FROM calls WHERE id = $1", call_id)
    assert row is not None
    return dict(row)


async def maintain_until_failed(
    pool: asyncpg.Pool,
    settings: Settings,
    owner_conn: asyncpg.Connection,
    call_id: uuid.UUID,
    **overrides: Any,
) -> dict[str, Any]:
    """Run ``run_call_log_maintenance`` with ``settings`` changed by ``overrides`` until the call
    is ``failed`` (within a minute); returns its row."""
    state = SimpleNamespace(pool=pool, settings=settings.model_copy(update=overrides))
    task = asyncio.create_task(run_call_log_maintenance(state))  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(60):
            while (await call_row(owner_conn, call_id))["status"] != "failed":
                await asyncio.sleep(0.1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return await call_row(owner_conn, call_id)
