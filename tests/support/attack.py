"""A populated tenant to attack, and snapshots that show an attack changed none of its rows.

Everything is created through the real API (and the call-log stream the relay writes to), so
the rows look exactly as they do in production.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
from phonenumbers import is_valid_number, parse
from redis.asyncio import Redis

from control_api.bootstrap import NewTenant
from control_api.db import TENANT_TABLES
from tests.support.sessions import login
from tests.support.tenants import auth
from voicerelay.call_events import append_call_event, make_event
from voicerelay.settings import Settings

_numbers: set[str] = set()


def unique_phone_number() -> str:
    """A valid US number not handed out before in this run (numbers are platform-unique)."""
    while True:
        candidate = f"+1628{2_000_000 + secrets.randbelow(8_000_000)}"
        if candidate not in _numbers and is_valid_number(parse(candidate)):
            _numbers.add(candidate)
            return candidate


@dataclass
class Populated:
    """A tenant with at least one row in every tenant table, and what identifies those rows."""

    tenant: NewTenant
    user_id: uuid.UUID
    user_email: str
    api_key_id: uuid.UUID
    api_key_prefix: str
    credential_id: uuid.UUID
    agent_id: uuid.UUID
    phone_number: str
    call_id: uuid.UUID
    access_token: str
    refresh_token: str
    names: list[str] = field(default_factory=list)

    @property
    def markers(self) -> set[str]:
        """Strings that identify this tenant's rows; none may show up in another tenant's view."""
        return {
            str(self.tenant.tenant_id),
            self.tenant.slug,
            str(self.tenant.owner_id),
            self.tenant.owner_email,
            str(self.tenant.api_key_id),
            str(self.user_id),
            self.user_email,
            str(self.api_key_id),
            self.api_key_prefix,
            str(self.credential_id),
            str(self.agent_id),
            self.phone_number,
            str(self.call_id),
            *self.names,
        }

    def auth(self) -> dict[str, str]:
        return auth(self.tenant)

    def user_auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.access_token}"}


def _created(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def populate(
    http: httpx.AsyncClient, redis: Redis, settings: Settings, tenant: NewTenant
) -> Populated:
    """Users, API keys, refresh tokens, a credential, an agent with a number, and a live call
    whose events went through the app's own call-log consumer."""
    tag = uuid.uuid4().hex[:8]
    headers = auth(tenant)
    email = f"viewer-{tag}@example.com"
    user = _created(
        await http.post("/v1/users", json={"email": email, "role": "viewer"}, headers=headers)
    )
    key = _created(
        await http.post(
            "/v1/api-keys", json={"name": f"key-{tag}", "role": "viewer"}, headers=headers
        )
    )
    credential = _created(
        await http.post(
            "/v1/credentials",
            json={
                "provider": "elevenlabs",
                "name": f"cred-{tag}",
                "api_key": f"sk_{secrets.token_hex(16)}",
            },
            headers=headers,
        )
    )
    number = unique_phone_number()
    agent = _created(
        await http.post(
            "/v1/agents",
            json={
                "name": f"agent-{tag}",
                "elevenlabs_agent_id": f"agent_{tag}",
                "credential_id": credential["id"],
                "phone_numbers": [number],
            },
            headers=headers,
        )
    )
    call = _created(
        await http.post(
            "/v1/calls",
            json={"agent_id": agent["id"], "metadata": {"crm": f"crm-{tag}"}},
            headers=headers,
        )
    )
    call_id = uuid.UUID(call["call_id"])
    await _feed_call_events(http, redis, settings, tenant, call_id, tag)
    session = await login(http, tenant.owner_email, tenant.owner_password)
    return Populated(
        tenant=tenant,
        user_id=uuid.UUID(user["id"]),
        user_email=email,
        api_key_id=uuid.UUID(key["id"]),
        api_key_prefix=key["prefix"],
        credential_id=uuid.UUID(credential["id"]),
        agent_id=uuid.UUID(agent["id"]),
        phone_number=number,
        call_id=call_id,
        access_token=session["access_token"],
        refresh_token=session["refresh_token"],
        names=[f"key-{tag}", f"cred-{tag}", f"agent-{tag}", f"agent_{tag}", f"crm-{tag}"],
    )


async def _feed_call_events(
    http: httpx.AsyncClient,
    redis: Redis,
    settings: Settings,
    tenant: NewTenant,
    call_id: uuid.UUID,
    tag: str,
) -> None:
    # No "ended" event: the call stays open, so a monitor token could be issued for it.
    start = datetime.now(UTC) - timedelta(seconds=30)
    spec: list[tuple[str, dict[str, Any]]] = [
        ("created", {}),
        ("connected", {}),
        ("upstream_connected", {"conversation_id": f"conv_{tag}"}),
        ("transcript", {"role": "user", "text": f"secret words {tag}"}),
        ("usage", {"audio_in_seconds": 3.5, "frames_in": 175}),
    ]
    stream = settings.redis_key(settings.call_events_stream)
    for seq, (kind, data) in enumerate(spec):
        event = make_event(
            kind,
            tenant_id=tenant.tenant_id,
            call_id=call_id,
            seq=seq,
            data=data,
            occurred_at=start + timedelta(seconds=seq),
        )
        await append_call_event(redis, stream, event, maxlen=100_000)
    async with asyncio.timeout(30):
        while True:
            r = await http.get(f"/v1/calls/{call_id}", headers=auth(tenant))
            assert r.status_code == 200, r.text
            if len(r.json()["timeline"]) == len(spec) and r.json()["status"] == "active":
                return
            await asyncio.sleep(0.05)


def tenant_column(table: str) -> str:
    return "id" if table == "tenants" else "tenant_id"


async def snapshot(owner_conn: asyncpg.Connection, tenant_id: uuid.UUID) -> dict[str, list[str]]:
    """Every row of the tenant in every tenant table, as JSON text (read as the schema owner)."""
    rows: dict[str, list[str]] = {}
    for table in TENANT_TABLES:
        found = await owner_conn.fetch(
            f"SELECT to_jsonb(t)::text AS row FROM {table} t"
            f" WHERE {tenant_column(table)} = $1 ORDER BY 1",
            tenant_id,
        )
        rows[table] = [r["row"] for r in found]
    return rows
