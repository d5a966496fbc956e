"""The call-log read API: list filters and cursor pagination, active calls, one call's detail
fed end to end through the app's own stream consumer, and tenant isolation."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from tests.support.tenants import auth
from voicerelay.call_events import append_call_event, make_event


async def _insert_call(
    conn: asyncpg.Connection,
    tenant_id: uuid.UUID,
    *,
    created_at: datetime,
    status: str = "created",
    agent_id: uuid.UUID | None = None,
) -> uuid.UUID:
    call_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO calls (id, tenant_id, agent_id, created_at, status, metadata)"
        " VALUES ($1, $2, $3, $4, $5, $6::jsonb)",
        call_id,
        tenant_id,
        agent_id,
        created_at,
        status,
        '{"crm_id": "abc"}',
    )
    return call_id


async def _seed(owner_conn, tenant) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    now = datetime.now(UTC)
    agent_a, agent_b = uuid.uuid4(), uuid.uuid4()
    plan = [
        (50, "ended", agent_a),
        (40, "failed", agent_b),
        (30, "ended", agent_a),
        (20, "active", agent_b),
        (10, "created", agent_a),
    ]
    ids = [
        await _insert_call(
            owner_conn,
            tenant.tenant_id,
            created_at=now - timedelta(minutes=m),
            status=s,
            agent_id=a,
        )
        for m, s, a in plan
    ]
    # Newest first, as the API lists them.
    return {"now": now, "ids": ids[::-1], "agent_a": agent_a, "agent_b": agent_b}


async def test_list_is_newest_first_with_filters(http, owner_conn, tenant, other_tenant) -> None:  # type: ignore[no-untyped-def]
    seeded = await _seed(owner_conn, tenant)
    await _insert_call(owner_conn, other_tenant.tenant_id, created_at=datetime.now(UTC))
    ids = [str(i) for i in seeded["ids"]]
    headers = auth(tenant)

    page = (await http.get("/v1/calls", headers=headers)).json()
    assert [c["id"] for c in page["items"]] == ids
    assert page["next_cursor"] is None
    first = page["items"][0]
    assert first["metadata"] == {"crm_id": "abc"}
    assert first["usage"]["audio_in_seconds"] == 0

    ended = (await http.get("/v1/calls", params={"status": "ended"}, headers=headers)).json()
    assert [c["id"] for c in ended["items"]] == [ids[2], ids[4]]

    by_agent = await http.get(
        "/v1/calls", params={"agent_id": str(seeded["agent_b"])}, headers=headers
    )
    assert [c["id"] for c in by_agent.json()["items"]] == [ids[1], ids[3]]

    now: datetime = seeded["now"]
    window = await http.get(
        "/v1/calls",
        params={
            "from": (now - timedelta(minutes=45)).isoformat(),
            "to": (now - timedelta(minutes=15)).isoformat(),
        },
        headers=headers,
    )
    assert [c["id"] for c in window.json()["items"]] == [ids[1], ids[2], ids[3]]

    naive_utc = (now - timedelta(minutes=25)).replace(tzinfo=None).isoformat()
    since = await http.get("/v1/calls", params={"from": naive_utc}, headers=headers)
    assert [c["id"] for c in since.json()["items"]] == ids[:2]


async def test_cursor_pagination_walks_every_call_once(http, owner_conn, tenant) -> None:  # type: ignore[no-untyped-def]
    seeded = await _seed(owner_conn, tenant)
    # Two calls created in the same microsecond are still ordered (by id) and both listed.
    same = datetime.now(UTC) - timedelta(minutes=35)
    twins = [await _insert_call(owner_conn, tenant.tenant_id, created_at=same) for _ in range(2)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        response = await http.get("/v1/calls", params=params, headers=auth(tenant))
        assert response.status_code == 200
        body = response.json()
        assert len(body["items"]) <= 2
        seen += [c["id"] for c in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 4
    assert len(seen) == len(set(seen)) == 7
    assert set(seen) == {str(i) for i in [*seeded["ids"], *twins]}


async def test_bad_list_parameters_are_client_errors(http, tenant) -> None:  # type: ignore[no-untyped-def]
    headers = auth(tenant)
    forged_extremes = [
        "WyIwMDAxLTAxLTAxVDAwOjAwOjAwKzE0OjAwIiwiMDE4ZjAwMDAtMDAwMC03MDAwLTgwMDAtMDAwMDAwMDAwMDAxIl0",
        "WyI5OTk5LTEyLTMxVDIzOjU5OjU5LTE0OjAwIiwiMDE4ZjAwMDAtMDAwMC03MDAwLTgwMDAtMDAwMDAwMDAwMDAxIl0",
    ]
    for cursor in ("garbage!", "bm90LWpzb24", "WyJ5ZXN0ZXJkYXkiLCAiMSJd", *forged_extremes):
        response = await http.get("/v1/calls", params={"cursor": cursor}, headers=headers)
        assert response.status_code == 400
        assert response.json()["code"] == "invalid_cursor"
        assert response.headers["content-type"].startswith("application/problem+json")
    for params in (
        {"limit": "0"},
        {"limit": "101"},
        {"status": "sleeping"},
        {"agent_id": "nope"},
        {"from": "not-a-date"},
        {"to": "0001-01-01T00:00:00+14:00"},
        {"from": "9999-12-31T23:59:59-14:00"},
        {"from": "2026-02-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
    ):
        response = await http.get("/v1/calls", params=params, headers=headers)
        assert response.status_code == 422, params
        assert response.json()["code"] == "validation_failed"
    response = await http.get("/v1/calls", params={"colour": "blue"}, headers=headers)
    assert response.status_code == 422
    assert (await http.get("/v1/calls")).status_code == 401


async def test_active_lists_only_open_recent_calls(http, owner_conn, tenant, other_tenant) -> None:  # type: ignore[no-untyped-def]
    now = datetime.now(UTC)
    open_ids = [
        await _insert_call(
            owner_conn, tenant.tenant_id, created_at=now - timedelta(seconds=s), status=st
        )
        for s, st in ((30, "created"), (20, "connecting"), (10, "active"))
    ]
    for st in ("ended", "failed"):
        await _insert_call(owner_conn, tenant.tenant_id, created_at=now, status=st)
    # Open but older than any call can live: its ended event was lost (a relay crash).
    await _insert_call(
        owner_conn, tenant.tenant_id, created_at=now - timedelta(days=2), status="active"
    )
    await _insert_call(owner_conn, other_tenant.tenant_id, created_at=now, status="active")

    response = await http.get("/v1/calls/active", headers=auth(tenant))
    assert response.status_code == 200
    assert [c["id"] for c in response.json()["items"]] == [str(i) for i in open_ids[::-1]]


async def test_detail_shows_timeline_transcript_usage_and_end(
    http, settings, redis_client, owner_conn, tenant
) -> None:  # type: ignore[no-untyped-def]
    created = datetime.now(UTC) - timedelta(minutes=2)
    call_id = await _insert_call(owner_conn, tenant.tenant_id, created_at=created)
    stream = settings.redis_key(settings.call_events_stream)  # the app's own consumer reads it
    spec: list[tuple[str, dict[str, Any]]] = [
        ("created", {}),
        ("connected", {}),
        ("upstream_connected", {"conversation_id": "conv_xyz"}),
        ("transcript", {"role": "agent", "text": "Hello, this is Ava.", "event_id": 1}),
        ("transcript", {"role": "user", "text": "Hi Ava.", "event_id": 2}),
        ("error", {"code": "bad_audio_frame"}),
        ("usage", {"audio_in_seconds": 12.5, "audio_out_seconds": 20.0, "frames_in": 625}),
        (
            "ended",
            {"reason": "caller_hangup", "code": 1000, "ended_by": "caller", "duration_ms": 42000},
        ),
    ]
    events = [
        make_event(
            t,
            tenant_id=tenant.tenant_id,
            call_id=call_id,
            seq=i,
            data=d,
            occurred_at=created + timedelta(seconds=i),
        )
        for i, (t, d) in enumerate(spec)
    ]
    for event in events:
        await append_call_event(redis_client, stream, event, maxlen=100_000)

    async with asyncio.timeout(30):
        while True:
            response = await http.get(f"/v1/calls/{call_id}", headers=auth(tenant))
            assert response.status_code == 200
            body = response.json()
            if body["status"] == "ended" and len(body["timeline"]) == len(events):
                break
            await asyncio.sleep(0.05)

    assert [e["type"] for e in body["timeline"]] == [t for t, _ in spec]
    assert [e["event_id"] for e in body["timeline"]] == [str(e.event_id) for e in events]
    assert body["timeline"][5]["data"] == {"code": "bad_audio_frame"}
    assert [(line["role"], line["text"], line["event_id"]) for line in body["transcript"]] == [
        ("agent", "Hello, this is Ava.", 1),
        ("user", "Hi Ava.", 2),
    ]
    assert body["usage"]["audio_in_seconds"] == 12.5
    assert body["usage"]["audio_out_seconds"] == 20.0
    assert body["usage"]["frames_in"] == 625
    assert body["duration_ms"] == 42000
    assert (body["end_reason"], body["end_code"], body["ended_by"]) == (
        "caller_hangup",
        "1000",
        "caller",
    )
    assert body["conversation_ids"] == ["conv_xyz"]
    assert body["timeline_truncated"] is False
    assert datetime.fromisoformat(body["started_at"]) == created + timedelta(seconds=1)


async def test_other_tenants_calls_are_invisible(http, owner_conn, tenant, other_tenant) -> None:  # type: ignore[no-untyped-def]
    theirs = await _insert_call(
        owner_conn, other_tenant.tenant_id, created_at=datetime.now(UTC), status="active"
    )
    await owner_conn.execute(
        "INSERT INTO call_events (event_id, tenant_id, call_id, occurred_at, type) VALUES ($1, $2, $3, now(), 'connected')",
        uuid.uuid4(),
        other_tenant.tenant_id,
        theirs,
    )
    headers = auth(tenant)
    response = await http.get(f"/v1/calls/{theirs}", headers=headers)
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    assert (await http.get(f"/v1/calls/{uuid.uuid4()}", headers=headers)).status_code == 404
    assert (await http.get("/v1/calls/not-a-uuid", headers=headers)).status_code == 404
    for path in ("/v1/calls", "/v1/calls/active"):
        listed = (await http.get(path, headers=headers)).json()["items"]
        assert str(theirs) not in {c["id"] for c in listed}
    # Their own key sees it.
    assert (await http.get(f"/v1/calls/{theirs}", headers=auth(other_tenant))).status_code == 200
