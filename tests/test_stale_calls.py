"""The stale-call reaper: a connecting/active call that has sent no event for longer than
CALL_STALE_AFTER_SECONDS lost its relay and is ended as relay_lost (code stale, failed), with an
`ended` event in its timeline; a real `ended` arriving afterwards replaces that guess.

The session's API server runs the same reaper every minute, so assertions are on the rows'
final state, which is the same whichever of the two reaped a call."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from control_api.calllog.apply import write_tenant_events
from control_api.calllog.stale import reap_stale_calls
from control_api.db import tenant_tx
from control_api.metrics import STALE_CALLS_REAPED
from tests.support.call_maintenance import call_row, maintain_until_failed
from tests.support.tenants import auth
from voicerelay.call_events import make_event

IDLE = 600


async def _call(
    owner_conn: asyncpg.Connection,
    tenant_id: uuid.UUID,
    *,
    status: str = "active",
    created_ago: timedelta = timedelta(minutes=30),
    events_ago: tuple[timedelta, ...] = (timedelta(minutes=29), timedelta(minutes=20)),
) -> uuid.UUID:
    """A call as the consumer leaves it after ``events_ago`` (usage events): the last one is its
    ``last_event_at``."""
    call_id = uuid.uuid4()
    now = datetime.now(UTC)
    created = now - created_ago
    moments = [now - ago for ago in events_ago]
    started = moments[0] if moments and status == "active" else None
    await owner_conn.execute(
        "INSERT INTO calls (id, tenant_id, created_at, status, started_at, last_event_at)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        call_id,
        tenant_id,
        created,
        status,
        started,
        max(moments) if moments else None,
    )
    for seq, at in enumerate(moments):
        await owner_conn.execute(
            "INSERT INTO call_events (event_id, tenant_id, call_id, occurred_at, type, seq)"
            " VALUES ($1, $2, $3, $4, 'usage', $5)",
            uuid.uuid4(),
            tenant_id,
            call_id,
            at,
            seq,
        )
    return call_id


async def _reap(pool: asyncpg.Pool) -> int:
    return await reap_stale_calls(pool, idle_seconds=IDLE)


def _reaped_total() -> float:
    return STALE_CALLS_REAPED._value.get()


async def test_a_silent_call_is_ended_as_relay_lost_with_an_event_in_its_timeline(
    pool, http, owner_conn, tenant
) -> None:  # type: ignore[no-untyped-def]
    stale = await _call(owner_conn, tenant.tenant_id)
    before = await call_row(owner_conn, stale)
    counted = _reaped_total()

    await _reap(pool)

    row = await call_row(owner_conn, stale)
    assert row["status"] == "failed"
    assert (row["end_reason"], row["end_code"], row["ended_by"]) == ("relay_lost", "stale", "relay")
    # It ended when it was last heard of, not when the reaper noticed.
    assert row["ended_at"] == before["last_event_at"]
    assert row["duration_ms"] == 9 * 60 * 1000
    assert row["reaped_at"] is not None
    assert _reaped_total() >= counted  # the API server's reaper may have counted it instead

    response = await http.get(f"/v1/calls/{stale}", headers=auth(tenant))
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "failed"
    assert (body["end_reason"], body["end_code"], body["ended_by"]) == (
        "relay_lost",
        "stale",
        "relay",
    )
    assert [e["type"] for e in body["timeline"]] == ["usage", "usage", "ended"]
    ended = body["timeline"][-1]
    assert ended["data"] == {
        "reason": "relay_lost",
        "code": "stale",
        "ended_by": "relay",
        "duration_ms": 9 * 60 * 1000,
        "failed": True,
    }
    assert datetime.fromisoformat(ended["occurred_at"]) == before["last_event_at"]


async def test_the_reaper_counts_what_it_ends(pool, owner_conn, tenant) -> None:  # type: ignore[no-untyped-def]
    # Long dead: the API server's own reaper (same floor) may race us for it, so count both.
    await _call(owner_conn, tenant.tenant_id, events_ago=(timedelta(minutes=25),))
    counted = _reaped_total()
    reaped = await _reap(pool)
    assert _reaped_total() - counted == reaped


async def test_live_ended_and_never_started_calls_are_untouched(pool, owner_conn, tenant) -> None:  # type: ignore[no-untyped-def]
    # Created long ago but still sending usage events.
    live = await _call(
        owner_conn,
        tenant.tenant_id,
        created_ago=timedelta(hours=2),
        events_ago=(timedelta(hours=2), timedelta(seconds=20)),
    )
    # Connecting for a moment, no event yet: its creation counts as activity.
    fresh = await _call(
        owner_conn,
        tenant.tenant_id,
        status="connecting",
        created_ago=timedelta(seconds=30),
        events_ago=(),
    )
    # Just under the limit.
    quiet = await _call(owner_conn, tenant.tenant_id, events_ago=(timedelta(seconds=IDLE - 120),))
    # A token that nobody connected with has no relay to lose: not this reaper's business.
    # Recent: a created call past its connect window is the unconnected-call expiry's (0009),
    # which the session's own control API runs meanwhile.
    never_connected = await _call(
        owner_conn,
        tenant.tenant_id,
        status="created",
        created_ago=timedelta(seconds=60),
        events_ago=(),
    )
    done = await _call(owner_conn, tenant.tenant_id, status="ended")
    await owner_conn.execute(
        "UPDATE calls SET ended_at = now() - interval '20 minutes', end_reason = 'caller_hangup',"
        " ended_by = 'caller' WHERE id = $1",
        done,
    )
    untouched = [live, fresh, quiet, never_connected, done]
    before = {c: await call_row(owner_conn, c) for c in untouched}

    await _reap(pool)

    for call_id in untouched:
        assert await call_row(owner_conn, call_id) == before[call_id]
        types = await owner_conn.fetch(
            "SELECT type FROM call_events WHERE call_id = $1 AND type = 'ended'", call_id
        )
        assert types == []


async def test_a_late_real_ending_replaces_the_reapers(pool, owner_conn, tenant) -> None:  # type: ignore[no-untyped-def]
    """The relay was only late (its events stuck behind a Redis outage, say): its own ending is
    the truth. Once it has replaced the reaper's, the first real ending wins again."""
    call_id = await _call(owner_conn, tenant.tenant_id)
    await _reap(pool)
    assert (await call_row(owner_conn, call_id))["end_reason"] == "relay_lost"
    started = (await call_row(owner_conn, call_id))["started_at"]

    real_end = datetime.now(UTC) - timedelta(minutes=1)
    late_usage = make_event(
        "usage",
        tenant_id=tenant.tenant_id,
        call_id=call_id,
        seq=10,
        data={"audio_in_seconds": 1500.0},
        occurred_at=real_end - timedelta(seconds=5),
    )
    async with tenant_tx(pool, tenant.tenant_id) as conn:
        await write_tenant_events(conn, [late_usage])
    row = await call_row(owner_conn, call_id)
    # Other late events add what they carry but do not undo the ending on their own.
    assert (row["status"], row["end_reason"]) == ("failed", "relay_lost")
    assert row["audio_in_seconds"] == 1500.0

    ended = make_event(
        "ended",
        tenant_id=tenant.tenant_id,
        call_id=call_id,
        seq=11,
        data={"reason": "caller_hangup", "code": 1000, "ended_by": "caller"},
        occurred_at=real_end,
    )
    async with tenant_tx(pool, tenant.tenant_id) as conn:
        await write_tenant_events(conn, [ended])
    row = await call_row(owner_conn, call_id)
    assert row["status"] == "ended"
    assert (row["end_reason"], row["end_code"], row["ended_by"]) == (
        "caller_hangup",
        "1000",
        "caller",
    )
    assert row["ended_at"] == real_end
    assert row["duration_ms"] == round((real_end - started).total_seconds() * 1000)
    assert row["reaped_at"] is None
    # Both endings stay in the timeline: what the reaper concluded, and what really happened.
    reasons = await owner_conn.fetch(
        "SELECT data->>'reason' AS reason FROM call_events"
        " WHERE call_id = $1 AND type = 'ended' ORDER BY occurred_at",
        call_id,
    )
    assert [r["reason"] for r in reasons] == ["relay_lost", "caller_hangup"]

    # A second real ending (a replica taking over raced the first) does not replace the first.
    again = make_event(
        "ended",
        tenant_id=tenant.tenant_id,
        call_id=call_id,
        seq=12,
        data={"reason": "agent_hangup", "ended_by": "agent", "failed": True},
        occurred_at=real_end + timedelta(seconds=1),
    )
    async with tenant_tx(pool, tenant.tenant_id) as conn:
        await write_tenant_events(conn, [again])
    row = await call_row(owner_conn, call_id)
    assert (row["status"], row["end_reason"], row["ended_at"]) == (
        "ended",
        "caller_hangup",
        real_end,
    )
    # Nor does the reaper come back: the call has ended.
    await _reap(pool)
    assert (await call_row(owner_conn, call_id))["end_reason"] == "caller_hangup"


async def test_every_tenant_is_reaped_and_each_event_filed_under_its_own(
    pool, owner_conn, tenant, other_tenant
) -> None:  # type: ignore[no-untyped-def]
    mine = await _call(owner_conn, tenant.tenant_id)
    theirs = await _call(owner_conn, other_tenant.tenant_id)
    their_live = await _call(owner_conn, other_tenant.tenant_id, events_ago=(timedelta(seconds=5),))

    await _reap(pool)

    for call_id, tenant_id in ((mine, tenant.tenant_id), (theirs, other_tenant.tenant_id)):
        assert (await call_row(owner_conn, call_id))["end_reason"] == "relay_lost"
        filed = await owner_conn.fetch(
            "SELECT tenant_id FROM call_events WHERE call_id = $1 AND type = 'ended'", call_id
        )
        assert [r["tenant_id"] for r in filed] == [tenant_id]
    assert (await call_row(owner_conn, their_live))["status"] == "active"


async def test_batches_are_bounded_and_the_rest_waits(pool, owner_conn, tenant) -> None:  # type: ignore[no-untyped-def]
    calls = [await _call(owner_conn, tenant.tenant_id) for _ in range(3)]
    # One batch of one call: at most one of them (the API server's reaper may take the others).
    assert await reap_stale_calls(pool, idle_seconds=IDLE, batch_size=1, max_batches=1) <= 1
    await reap_stale_calls(pool, idle_seconds=IDLE, batch_size=1, max_batches=10)
    for call_id in calls:
        assert (await call_row(owner_conn, call_id))["status"] == "failed"


async def test_the_app_role_can_reap_but_choose_nothing(app_conn, owner_conn, tenant) -> None:  # type: ignore[no-untyped-def]
    """The role picks neither the calls nor the outcome; the idle floor keeps it from ending a
    call that is merely between usage events, and the limit keeps one call's work bounded."""
    recent = await _call(owner_conn, tenant.tenant_id, events_ago=(timedelta(seconds=250),))
    for idle, limit in ((0, 10), (299, 10), (None, 10), (604801, 10), (300, 0), (300, 10001)):
        with pytest.raises(asyncpg.RaiseError, match="out of range"):
            await app_conn.fetch("SELECT * FROM reap_stale_calls($1, $2)", idle, limit)
    tx = app_conn.transaction()
    await tx.start()
    try:
        rows = await app_conn.fetch("SELECT * FROM reap_stale_calls(300, 10000)")
        assert recent not in {r["call_id"] for r in rows}
    finally:
        await tx.rollback()
    assert (await call_row(owner_conn, recent))["status"] == "active"


async def test_the_maintenance_loop_reaps_with_the_configured_limit(
    pool, settings, owner_conn, tenant
) -> None:  # type: ignore[no-untyped-def]
    # Silent for 400 s: stale under a 300 s setting, not under the API server's default 600 s, so
    # only the loop started here can end it.
    call_id = await _call(owner_conn, tenant.tenant_id, events_ago=(timedelta(seconds=400),))
    row = await maintain_until_failed(
        pool, settings, owner_conn, call_id, call_stale_after_seconds=300
    )
    assert row["end_code"] == "stale"
