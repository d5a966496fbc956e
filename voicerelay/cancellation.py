"""Cancelling background tasks so that they really end, on Python 3.11 too.

On 3.11, ``asyncio.wait_for`` returns the result of an awaitable that finished in the same loop
iteration as a cancellation, and the cancellation is lost (CPython gh-86296, fixed in 3.12).
redis-py writes every command through ``wait_for`` when a socket timeout is set, so a task
cancelled just as it sends a command carries on as if nothing happened, and whoever awaits it
waits forever (the control API's shutdown did, right after start-up). Cancelling again until
the tasks have ended closes that gap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

# A lost cancellation is rare: re-sending it this often costs nothing while tasks end promptly.
_RECANCEL_SECONDS = 0.5


async def cancel_until_done(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended; their outcomes are left to read."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=_RECANCEL_SECONDS)


def failures(tasks: Iterable[asyncio.Task[Any]]) -> list[BaseException]:
    """The exceptions of ended ``tasks`` that were not cancelled, read (so asyncio does not
    report them as never retrieved when the tasks are collected)."""
    found: list[BaseException] = []
    for task in tasks:
        if task.done() and not task.cancelled():
            error = task.exception()
            if error is not None:
                found.append(error)
    return found
