"""Consumes relay call lifecycle events from the Redis Stream into Postgres."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from control_api.state import AppState


async def run_call_log_consumer(state: AppState) -> None:
    return None
