"""The unconnected-call expiry: a call still ``created`` once its caller token's connect window
(plus Twilio's webhook retries for a phone call, plus a margin) has passed will never be connected
and is ended as never_connected (code expired, failed, no duration) at its connect deadline, with
an `ended` event in its timeline; the relay's own events, should they turn up, win.

The session's API server runs the same expiry every minute with the same window, so assertions
are on the rows' final state, which is the same whichever of the two expired a call."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from control_api.calllog.apply import write_tenant_events
from control_api.calllog.unconnected import expire_unconnected_calls
from control_api.db import tenant_tx
from control_api.metrics import UNCONNECTED_CALLS_EXPIRED
from control_api.routes.twilio import _RETRY_WINDOW_SECONDS
from tests.support.call_maintenance import call_row, maintain_until_failed
from tests.support.tenants import auth
from voicerelay.call_events import CallEvent, make_event

# The API server's window (the setting's default), so both expire the same calls.
WINDOW = 300
MARGIN = 60
ENDED_DATA = {
    "reason": "never_connected",
    "code": "expired",
    "ended_by": "control_api",
    "failed": True,
}


async def _call(
    owner_conn: asyncpg.Connection,
    tenant_id: uuid.UUID,
    *,
    created_ago: timedelta = timedelta(minutes=30),
    status: str = "created",
    direction: str = "browser",
    last_event_ago: timedelta | None = None,
) -> uuid.UUID:
    call_id = uuid.uuid4()
    now = datetime.now(UTC)
    await owner_conn.execute(
        "INSERT INTO calls (id, tenant_id, created_at, status, direction, last_event_at)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        call_id,
        tenant_id,
        now - created_ago,
        status,
        direction,
        None if last_event_ago is None else now - last_event_ago,
    )
    return call_id


async def _ended_events(
    owner_conn: asyncpg.Connection, call_id: uuid.UUID
) -> list[tuple[uuid.UUID, dict[str, Any]]]:
    rows = await owner_conn.fetch(
        "SELECT tenant_id, data FROM call_events"
        " WHERE call_id = $1 AND type = 'ended' ORDER BY occurred_at",
        call_id,
    )
    return [(r["tenant_id"], orjson.loads(r["data"])) for r in rows]


def _ending(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """How a call row (or the API's view of it) says it ended."""
    return tuple(row[k] for k in ("status", "end_reason", "end_code", "ended_by", "duration_ms"))


EXPIRED = ("failed", "never_connected", "expired", "control_api", None)


async def _write(pool: asyncpg.Pool, tenant_id: uuid.UUID, events: list[CallEvent]) -> None:
    """As the call-log consumer writes a batch of the relay's events."""
    async with tenant_tx(pool, tenant_id) as conn:
        await write_tenant_events(conn, events)


async def _expire(pool: asyncpg.Pool, window: int = WINDOW) -> int:
    return await expire_unconnected_calls(pool, connect_window_seconds=window)


def _expired_total() -> float:
    return UNCONNECTED_CALLS_EXPIRED._value.get()


async def test_a_call_nobody_connected_to_ends_as_never_connected_at_its_deadline(
    pool, http, owner_conn, tenant
) -> None:  # type: ignore[no-untyped-def]
    call_id = await _call(owner_conn, tenant.tenant_id)
    created_at = (await call_row(owner_conn, call_id))["created_at"]

    await _expire(pool)

    row = await call_row(owner_conn, call_id)
    assert _ending(row) == EXPIRED
    # It ended when its caller could last have connected, not when the expiry noticed.
    deadline = created_at + timedelta(seconds=WINDOW)
    assert row["ended_at"] == deadline
    assert row["started_at"] is None
    assert row["reaped_at"] is not None

    body = (await http.get(f"/v1/calls/{call_id}", headers=auth(tenant))).json()
    assert _ending(body) == EXPIRED
    assert [e["type"] for e in body["timeline"]] == ["ended"]
    assert body["timeline"][0]["data"] == ENDED_DATA
    assert datetime.fromisoformat(body["timeline"][0]["occurred_at"]) == deadline

    # The call log and usage see a failed call that used nothing.
    headers = auth(tenant)
    failed = (await http.get("/v1/calls", params={"status": "failed"}, headers=headers)).json()
    assert [c["id"] for c in failed["items"]] == [str(call_id)]
    still_created = await http.get("/v1/calls", params={"status": "created"}, headers=headers)
    assert still_created.json()["items"] == []
    assert (await http.get("/v1/calls/active", headers=headers)).json()["items"] == []
    usage = (await http.get("/v1/usage", headers=headers)).json()
    assert usage["totals"] == {
        "calls": 1,
        "call_minutes": 0,
        "audio_in_seconds": 0,
        "audio_out_seconds": 0,
    }


async def test_a_phone_call_waits_for_twilios_webhook_retries(pool, owner_conn, tenant) -> None:  # type: ignore[no-untyped-def]
    """A retried voice webhook hands the same call a fresh token up to the retry window later, so
    a phone call's deadline is that much later than a browser call's."""
    phone_deadline = WINDOW + _RETRY_WINDOW_SECONDS
    # Past a browser call's deadline and margin, not yet past a phone call's.
    age = timedelta(seconds=phone_deadline + MARGIN - 30)
    waiting = await _call(owner_conn, tenant.tenant_id, created_ago=age, direction="phone_inbound")
    browser = await _call(owner_conn, tenant.tenant_id, created_ago=age)
    over = await _call(owner_conn, tenant.tenant_id, direction="phone_inbound")

    await _expire(pool)

    assert (await call_row(owner_conn, waiting))["status"] == "created"
    assert (await call_row(owner_conn, browser))["end_code"] == "expired"
    row = await call_row(owner_conn, over)
    assert (row["status"], row["end_reason"]) == ("failed", "never_connected")
    assert row["ended_at"] == row["created_at"] + timedelta(seconds=phone_deadline)


async def test_calls_that_may_still_connect_or_did_are_untouched(pool, owner_conn, tenant) -> None:  # type: ignore[no-untyped-def]
    # The token's window has passed, but not the margin (clock skew, a consumer a little behind).
    in_margin = await _call(
        owner_conn, tenant.tenant_id, created_ago=timedelta(seconds=WINDOW + MARGIN - 30)
    )
    fresh = await _call(owner_conn, tenant.tenant_id, created_ago=timedelta(seconds=5))
    # Old, but the caller connected: the stale-call reaper's business, not this (and recent
    # events keep that one away too).
    connected = [
        await _call(
            owner_conn, tenant.tenant_id, status=status, last_event_ago=timedelta(seconds=10)
        )
        for status in ("connecting", "active")
    ]
    done = await _call(owner_conn, tenant.tenant_id, status="ended")
    await owner_conn.execute(
        "UPDATE calls SET ended_at = now() - interval '20 minutes', end_reason = 'caller_hangup',"
        " ended_by = 'caller' WHERE id = $1",
        done,
    )
    untouched = [in_margin, fresh, *connected, done]
    before = {c: await call_row(owner_conn, c) for c in untouched}

    await _expire(pool)

    for call_id in untouched:
        assert await call_row(owner_conn, call_id) == before[call_id]
        assert await _ended_events(owner_conn, call_id) == []


async def test_the_relays_late_events_replace_the_expiry(pool, owner_conn, tenant) -> None:  # type: ignore[no-untyped-def]
    """The caller did connect just before the deadline, but the relay's events were stuck (a
    Redis outage, a consumer far behind): as for a reaped stale call, late events add what they
    carry and the relay's own ending replaces the expiry's."""
    call_id = await _call(owner_conn, tenant.tenant_id)
    await _expire(pool)
    created_at = (await call_row(owner_conn, call_id))["created_at"]
    assert (await call_row(owner_conn, call_id))["end_reason"] == "never_connected"

    connected_at = created_at + timedelta(seconds=WINDOW - 5)
    late = [
        make_event(
            "connecting",
            tenant_id=tenant.tenant_id,
            call_id=call_id,
            seq=0,
            occurred_at=connected_at - timedelta(seconds=1),
        ),
        make_event(
            "connected",
            tenant_id=tenant.tenant_id,
            call_id=call_id,
            seq=1,
            occurred_at=connected_at,
        ),
        make_event(
            "usage",
            tenant_id=tenant.tenant_id,
            call_id=call_id,
            seq=2,
            data={"audio_in_seconds": 240.0},
            occurred_at=connected_at + timedelta(minutes=4),
        ),
    ]
    await _write(pool, tenant.tenant_id, late)
    row = await call_row(owner_conn, call_id)
    assert (row["status"], row["end_code"]) == ("failed", "expired")
    assert (row["started_at"], row["audio_in_seconds"]) == (connected_at, 240.0)

    real_end = connected_at + timedelta(minutes=5)
    ended = make_event(
        "ended",
        tenant_id=tenant.tenant_id,
        call_id=call_id,
        seq=3,
        data={"reason": "caller_hangup", "code": 1000, "ended_by": "caller"},
        occurred_at=real_end,
    )
    await _write(pool, tenant.tenant_id, [ended])
    row = await call_row(owner_conn, call_id)
    assert _ending(row) == ("ended", "caller_hangup", "1000", "caller", 5 * 60 * 1000)
    assert row["ended_at"] == real_end
    assert row["reaped_at"] is None
    # Both endings stay in the timeline: what the expiry concluded, and what really happened.
    reasons = [data["reason"] for _, data in await _ended_events(owner_conn, call_id)]
    assert reasons == ["never_connected", "caller_hangup"]

    # The call has ended: the expiry does not come back for it.
    await _expire(pool)
    assert (await call_row(owner_conn, call_id))["end_reason"] == "caller_hangup"


async def test_every_tenant_is_expired_and_each_event_filed_under_its_own(
    pool, owner_conn, tenant, other_tenant
) -> None:  # type: ignore[no-untyped-def]
    mine = await _call(owner_conn, tenant.tenant_id)
    theirs = await _call(owner_conn, other_tenant.tenant_id, direction="phone_inbound")
    their_fresh = await _call(owner_conn, other_tenant.tenant_id, created_ago=timedelta(0))

    await _expire(pool)

    for call_id, tenant_id in ((mine, tenant.tenant_id), (theirs, other_tenant.tenant_id)):
        assert (await call_row(owner_conn, call_id))["end_reason"] == "never_connected"
        assert await _ended_events(owner_conn, call_id) == [(tenant_id, ENDED_DATA)]
    assert (await call_row(owner_conn, their_fresh))["status"] == "created"


async def test_batches_are_bounded_and_the_rest_waits(pool, owner_conn, tenant) -> None:  # type: ignore[no-untyped-def]
    calls = [await _call(owner_conn, tenant.tenant_id) for _ in range(3)]
    # One batch of one call: at most one of them (the API server's expiry may take the others).
    one = await expire_unconnected_calls(
        pool, connect_window_seconds=WINDOW, batch_size=1, max_batches=1
    )
    assert one <= 1
    await expire_unconnected_calls(
        pool, connect_window_seconds=WINDOW, batch_size=1, max_batches=10
    )
    for call_id in calls:
        assert (await call_row(owner_conn, call_id))["status"] == "failed"


async def test_the_app_role_can_expire_but_choose_nothing(app_conn, owner_conn, tenant) -> None:  # type: ignore[no-untyped-def]
    """The role passes a window within the setting's bounds and a bounded batch; it picks
    neither calls nor outcome, gets back only ids, and cannot shrink the margin."""
    for window, limit in ((9, 10), (None, 10), (3601, 10), (10, 0), (10, 10001), (10, None)):
        with pytest.raises(asyncpg.RaiseError, match="out of range"):
            await app_conn.fetch("SELECT * FROM expire_unconnected_calls($1, $2)", window, limit)
    # Past the shortest window, not past the margin.
    recent = await _call(owner_conn, tenant.tenant_id, created_ago=timedelta(seconds=40))
    tx = app_conn.transaction()
    await tx.start()
    try:
        rows = await app_conn.fetch("SELECT * FROM expire_unconnected_calls(10, 10000)")
        assert recent not in {r["call_id"] for r in rows}
        assert all(list(r.keys()) == ["tenant_id", "call_id"] for r in rows)
    finally:
        await tx.rollback()
    assert (await call_row(owner_conn, recent))["status"] == "created"
    # Nobody but the application (and the owner) may run it.
    acl = await owner_conn.fetchval(
        "SELECT proacl::text[] FROM pg_proc WHERE proname = 'expire_unconnected_calls'"
    )
    assert not [entry for entry in acl if entry.startswith("=")], acl
    assert any(entry.startswith("voicerelay_app=X/") for entry in acl), acl


async def test_the_expiry_counts_what_it_ends(pool, owner_conn, tenant) -> None:  # type: ignore[no-untyped-def]
    # Expired under the shortest window only, so the API server's expiry (300 s) leaves it to us.
    await _expire(pool, window=10)
    call_id = await _call(owner_conn, tenant.tenant_id, created_ago=timedelta(seconds=120))
    counted = _expired_total()
    expired = await _expire(pool, window=10)
    assert expired >= 1
    assert _expired_total() - counted == expired
    assert (await call_row(owner_conn, call_id))["end_code"] == "expired"


async def test_the_maintenance_loop_expires_with_the_configured_window(
    pool, settings, owner_conn, tenant
) -> None:  # type: ignore[no-untyped-def]
    # 120 s old: expired under a 10 s window, not under the API server's 300 s, so only the loop
    # started here can end it.
    call_id = await _call(owner_conn, tenant.tenant_id, created_ago=timedelta(seconds=120))
    row = await maintain_until_failed(
        pool, settings, owner_conn, call_id, call_token_connect_window_seconds=10
    )
    assert (row["end_code"], row["ended_at"]) == (
        "expired",
        row["created_at"] + timedelta(seconds=10),
    )
