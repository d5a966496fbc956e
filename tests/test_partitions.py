"""Call-log maintenance: partitions ahead of time, dropping past retention, per-tenant deletes."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta

import asyncpg

from control_api.calllog.maintenance import (
    PARTITION_LOCK_KEY,
    apply_tenant_retention,
    maintain_partitions,
    run_maintenance_once,
)
from tests.support.tenants import make_tenant


async def _exists(conn: asyncpg.Connection, name: str) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"public.{name}"))


async def test_partitions_are_created_for_the_current_month_and_ahead(pool, owner_conn) -> None:  # type: ignore[no-untyped-def]
    # A far-future "today", so the months are certainly missing before the call.
    names = [f"{t}_p2081{m:02d}" for m in (11, 12) for t in ("calls", "call_events")]
    names += ["calls_p208201", "call_events_p208201"]
    try:
        outcome = await maintain_partitions(
            pool, today=date(2081, 11, 17), months_ahead=2, max_retention_days=400
        )
        assert outcome is not None
        created, _dropped = outcome
        assert created == 6
        for name in names:
            assert await _exists(owner_conn, name), name
        again = await maintain_partitions(
            pool, today=date(2081, 11, 17), months_ahead=2, max_retention_days=400
        )
        assert again is not None
        assert again[0] == 0  # idempotent
    finally:
        for name in names:
            await owner_conn.execute(f"DROP TABLE IF EXISTS {name}")


async def test_real_maintenance_round_keeps_this_month_and_months_ahead(
    pool, settings, owner_conn
) -> None:  # type: ignore[no-untyped-def]
    report = await run_maintenance_once(pool, settings)
    assert not report.skipped_partitions
    month = datetime.now(UTC).date().replace(day=1)
    for _ in range(settings.call_log_partitions_ahead_months + 1):
        assert await _exists(owner_conn, f"calls_p{month:%Y%m}")
        assert await _exists(owner_conn, f"call_events_p{month:%Y%m}")
        month = (month + timedelta(days=32)).replace(day=1)


async def test_partitions_past_the_maximum_retention_are_dropped(
    pool, settings, owner_conn, tenant
) -> None:  # type: ignore[no-untyped-def]
    await owner_conn.execute("SELECT ensure_call_log_partitions('2001-01-01', 2)")
    await owner_conn.execute(
        "INSERT INTO calls (id, tenant_id, created_at) VALUES ($1, $2, '2001-01-10T00:00:00Z')",
        uuid.uuid4(),
        tenant.tenant_id,
    )
    assert await _exists(owner_conn, "calls_p200101")

    report = await run_maintenance_once(pool, settings)

    assert {"calls_p200101", "call_events_p200101", "calls_p200102", "call_events_p200102"} <= set(
        report.partitions_dropped
    )
    assert not await _exists(owner_conn, "calls_p200101")
    assert not await _exists(owner_conn, "call_events_p200102")
    month = datetime.now(UTC).date().replace(day=1)
    assert await _exists(owner_conn, f"calls_p{month:%Y%m}")


async def test_partition_work_is_skipped_while_another_replica_holds_the_lock(
    pool, owner_conn
) -> None:  # type: ignore[no-untyped-def]
    async with owner_conn.transaction():
        await owner_conn.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK_KEY)
        outcome = await maintain_partitions(
            pool, today=date.today(), months_ahead=1, max_retention_days=400
        )
    assert outcome is None


async def test_tenant_retention_deletes_only_that_tenants_old_rows(
    pool, database, owner_conn
) -> None:  # type: ignore[no-untyped-def]
    short = await make_tenant(database.owner_dsn, call_log_retention_days=30)
    long = await make_tenant(database.owner_dsn, call_log_retention_days=90)
    now = datetime.now(UTC)
    await owner_conn.execute(
        "SELECT ensure_call_log_partitions($1::date, 4)", (now - timedelta(days=70)).date()
    )

    async def add(tenant_id: uuid.UUID, age_days: int, events: int = 3) -> uuid.UUID:
        call_id = uuid.uuid4()
        at = now - timedelta(days=age_days)
        await owner_conn.execute(
            "INSERT INTO calls (id, tenant_id, created_at) VALUES ($1, $2, $3)",
            call_id,
            tenant_id,
            at,
        )
        for i in range(events):
            await owner_conn.execute(
                "INSERT INTO call_events (event_id, tenant_id, call_id, occurred_at, type)"
                " VALUES ($1, $2, $3, $4, 'usage')",
                uuid.uuid4(),
                tenant_id,
                call_id,
                at + timedelta(seconds=i),
            )
        return call_id

    short_old = [await add(short.tenant_id, 40), await add(short.tenant_id, 60)]
    short_new = await add(short.tenant_id, 10)
    long_old = await add(long.tenant_id, 60)

    # Batches of one row exercise the batching loop.
    await apply_tenant_retention(pool, now=now, batch_size=1)

    async def counts(call_id: uuid.UUID) -> tuple[int, int]:
        calls = await owner_conn.fetchval("SELECT count(*) FROM calls WHERE id = $1", call_id)
        events = await owner_conn.fetchval(
            "SELECT count(*) FROM call_events WHERE call_id = $1", call_id
        )
        return calls, events

    for call_id in short_old:
        assert await counts(call_id) == (0, 0)
    assert await counts(short_new) == (1, 3)
    assert await counts(long_old) == (1, 3)
