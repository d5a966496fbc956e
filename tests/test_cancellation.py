"""Background tasks end on cancellation even when one cancellation is lost (Python 3.11's
``wait_for``), and `voicerelay api` on a taken port exits instead of hanging in its shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys

from tests.conftest import TestDatabase
from tests.support.ports import subprocess_port
from voicerelay.cancellation import cancel_until_done, failures
from voicerelay.settings import Settings


async def _loses_one_cancellation(ended: asyncio.Event) -> None:
    # What a swallowed cancellation looks like to the task: it simply carries on.
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(3600)
    try:
        await asyncio.sleep(3600)
    finally:
        ended.set()


async def test_a_task_that_lost_a_cancellation_still_ends() -> None:
    ended = asyncio.Event()
    stubborn = asyncio.create_task(_loses_one_cancellation(ended))
    plain = asyncio.create_task(asyncio.sleep(3600))
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_until_done([stubborn, plain]), timeout=30)
    assert ended.is_set()
    assert stubborn.cancelled()
    assert plain.cancelled()


async def test_outcomes_are_left_to_read() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    failed = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await cancel_until_done([failed])
    assert isinstance(failed.exception(), ValueError)


async def test_failures_reads_only_ended_tasks_that_failed() -> None:
    async def fail() -> None:
        raise ValueError("boom")

    failed = asyncio.create_task(fail())
    finished = asyncio.create_task(asyncio.sleep(0))
    forever = asyncio.create_task(asyncio.Event().wait())
    await asyncio.wait([failed, finished])
    await cancel_until_done([forever])
    found = failures([failed, finished, forever])
    assert len(found) == 1
    assert isinstance(found[0], ValueError)


def test_api_on_a_taken_port_exits(settings: Settings, database: TestDatabase) -> None:
    port = subprocess_port()
    env = {
        **os.environ,
        "DATABASE_URL": database.app_dsn,
        "REDIS_URL": settings.require("redis_url"),
        "REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "SIGNING_KEYS": settings.require("signing_keys"),
        "LOG_FORMAT": "text",
    }
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        # Repeated: the lost cancellation depended on timing, so one clean exit proves little.
        for _ in range(3):
            process = subprocess.run(
                [sys.executable, "-m", "voicerelay", "api", "--port", str(port)],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert process.returncode != 0
            assert "address already in use" in process.stderr
            assert "control API failed to start" in process.stderr
