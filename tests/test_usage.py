"""GET /v1/usage: calls, call minutes and audio seconds per UTC day and per agent, per tenant."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from tests.support.tenants import auth


async def _call(
    conn: asyncpg.Connection,
    tenant_id: uuid.UUID,
    created_at: datetime,
    agent_id: uuid.UUID | None,
    duration_ms: int | None,
    audio_in: float,
    audio_out: float,
) -> None:
    await conn.execute(
        "INSERT INTO calls (id, tenant_id, agent_id, created_at, status, duration_ms,"
        " audio_in_seconds, audio_out_seconds) VALUES ($1, $2, $3, $4, 'ended', $5, $6, $7)",
        uuid.uuid4(),
        tenant_id,
        agent_id,
        created_at,
        duration_ms,
        audio_in,
        audio_out,
    )


async def _seed(owner_conn, tenant, other_tenant) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    day1, day2 = today - timedelta(days=3), today - timedelta(days=2)
    a, b = uuid.uuid4(), uuid.uuid4()
    for args in (
        (day1, a, 60_000, 30.0, 25.5),
        (day1 + timedelta(hours=3), b, 120_000, 50.0, 60.0),
        (day2, a, 30_000, 10.0, 12.0),
        (day2 + timedelta(hours=1), None, None, 0.0, 0.0),  # never connected
    ):
        await _call(owner_conn, tenant.tenant_id, *args)
    await _call(owner_conn, other_tenant.tenant_id, day1, a, 999_000, 999.0, 999.0)
    return {"day1": day1, "day2": day2, "a": a, "b": b}


def _window(seeded: dict[str, Any]) -> dict[str, str]:
    return {
        "from": (seeded["day1"] - timedelta(hours=12)).isoformat(),
        "to": (seeded["day2"] + timedelta(hours=12)).isoformat(),
    }


async def test_usage_per_day(http, owner_conn, tenant, other_tenant) -> None:  # type: ignore[no-untyped-def]
    seeded = await _seed(owner_conn, tenant, other_tenant)
    response = await http.get(
        "/v1/usage", params={**_window(seeded), "group_by": "day"}, headers=auth(tenant)
    )
    assert response.status_code == 200
    body = response.json()
    assert body["group_by"] == "day"
    rows = [
        (r["day"], r["calls"], r["call_minutes"], r["audio_in_seconds"], r["audio_out_seconds"])
        for r in body["items"]
    ]
    assert rows == [
        (seeded["day1"].date().isoformat(), 2, 3.0, 80.0, 85.5),
        (seeded["day2"].date().isoformat(), 2, 0.5, 10.0, 12.0),
    ]
    assert all(r["agent_id"] is None for r in body["items"])
    assert body["totals"] == {
        "calls": 4,
        "call_minutes": 3.5,
        "audio_in_seconds": 90.0,
        "audio_out_seconds": 97.5,
    }
    assert datetime.fromisoformat(body["from"]) == seeded["day1"] - timedelta(hours=12)


async def test_usage_per_agent(http, owner_conn, tenant, other_tenant) -> None:  # type: ignore[no-untyped-def]
    seeded = await _seed(owner_conn, tenant, other_tenant)
    response = await http.get(
        "/v1/usage", params={**_window(seeded), "group_by": "agent"}, headers=auth(tenant)
    )
    assert response.status_code == 200
    by_agent = {r["agent_id"]: (r["calls"], r["call_minutes"]) for r in response.json()["items"]}
    assert by_agent == {str(seeded["a"]): (2, 1.5), str(seeded["b"]): (1, 2.0), None: (1, 0.0)}
    assert all(r["day"] is None for r in response.json()["items"])


async def test_usage_defaults_to_the_last_30_days(http, owner_conn, tenant, other_tenant) -> None:  # type: ignore[no-untyped-def]
    await _seed(owner_conn, tenant, other_tenant)
    body = (await http.get("/v1/usage", headers=auth(tenant))).json()
    assert body["group_by"] == "day"
    assert body["totals"]["calls"] == 4
    span = datetime.fromisoformat(body["to"]) - datetime.fromisoformat(body["from"])
    assert span == timedelta(days=30)


async def test_usage_rejects_bad_ranges(http, tenant) -> None:  # type: ignore[no-untyped-def]
    headers = auth(tenant)
    too_long = await http.get(
        "/v1/usage",
        params={"from": "2025-01-01T00:00:00Z", "to": "2026-01-03T00:00:00Z"},
        headers=headers,
    )
    assert too_long.status_code == 422
    assert too_long.json()["code"] == "range_too_large"
    backwards = await http.get(
        "/v1/usage",
        params={"from": "2026-01-03T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
        headers=headers,
    )
    assert backwards.status_code == 422
    assert backwards.json()["code"] == "invalid_range"
    for params in (
        {"group_by": "week"},
        {"from": "soon"},
        {"to": "0001-01-01T00:00:00+14:00"},
        {"from": "9999-12-31T23:59:59-14:00"},
    ):
        response = await http.get("/v1/usage", params=params, headers=headers)
        assert response.status_code == 422
        assert response.json()["code"] == "validation_failed"
    full_year = await http.get(
        "/v1/usage",
        params={"from": "2024-01-01T00:00:00Z", "to": "2025-01-01T00:00:00Z"},
        headers=headers,
    )
    assert full_year.status_code == 200  # a leap year is exactly the 366-day maximum
    assert full_year.json()["items"] == []
