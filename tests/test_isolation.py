"""Tenant isolation, tested as an attacker.

Tenant A (the victim) is populated through the real API: users, API keys, refresh tokens, a
credential, an agent with a phone number and a live call whose events went through the call-log
consumer. Tenant B (the attacker) holds its own admin API key and its owner's access token, and
knows every id of A. Through the API, B must get exactly what a made-up id gets (404, nothing
revealed) and change nothing of A. In the database, connected as the application's own role, row-
level security must hold for every table in ``TENANT_TABLES`` and the role must not be able to
switch it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from control_api.call_tokens import issue_call_token
from control_api.db import TENANT_TABLES
from control_api.routes import all_endpoints
from control_api.security.access_tokens import issue_access_token
from control_api.security.signing import SigningKeyring
from tests.conftest import TestDatabase
from tests.support.attack import Populated, populate, snapshot, tenant_column
from tests.support.tenants import make_tenant
from voicerelay.call_events import append_call_event, make_event
from voicerelay.settings import Settings


@dataclass
class World:
    victim: Populated
    attacker: Populated


@pytest.fixture(scope="module")
async def world(api_url: str, settings: Settings, database: TestDatabase) -> World:
    redis = aioredis.Redis.from_url(settings.require("redis_url"))
    try:
        async with httpx.AsyncClient(base_url=api_url, timeout=10) as http:
            victim = await populate(http, redis, settings, await make_tenant(database.owner_dsn))
            attacker = await populate(http, redis, settings, await make_tenant(database.owner_dsn))
    finally:
        await redis.aclose()
    return World(victim=victim, attacker=attacker)


@pytest.fixture
async def unchanged(world: World, owner_conn: asyncpg.Connection) -> AsyncIterator[None]:
    """Fails the test if any row of the victim changed while it ran."""
    before = await snapshot(owner_conn, world.victim.tenant.tenant_id)
    yield
    assert await snapshot(owner_conn, world.victim.tenant.tenant_id) == before


def _attacker_credentials(world: World) -> list[tuple[str, dict[str, str]]]:
    return [
        ("api_key", world.attacker.auth()),
        ("owner_access_token", world.attacker.user_auth()),
    ]


def _assert_reveals_nothing(response: httpx.Response, victim: Populated) -> None:
    # A problem's "instance" is the path the attacker sent; only the rest could reveal anything.
    body = response.json()
    if isinstance(body, dict):
        body.pop("instance", None)
    text = json.dumps(body).lower()
    leaked = [m for m in victim.markers if m.lower() in text]
    assert not leaked, f"{response.request.method} {response.request.url}: {leaked}"


# --- every endpoint that takes an id -----------------------------------------------------------

_NEW_SECRET = {"provider": "elevenlabs", "api_key": "sk_" + "a" * 32}


@dataclass(frozen=True)
class Attack:
    ids: Callable[[Populated], list[uuid.UUID]]
    body: dict[str, Any] | None = None


def _users(p: Populated) -> list[uuid.UUID]:
    return [p.user_id, p.tenant.owner_id]


ATTACKS: dict[tuple[str, str], Attack] = {
    ("GET", "/v1/users/{id}"): Attack(_users),
    ("PATCH", "/v1/users/{id}"): Attack(_users, {"disabled": True}),
    ("DELETE", "/v1/users/{id}"): Attack(_users),
    ("DELETE", "/v1/api-keys/{id}"): Attack(lambda p: [p.api_key_id, p.tenant.api_key_id]),
    ("GET", "/v1/credentials/{id}"): Attack(lambda p: [p.credential_id]),
    ("PUT", "/v1/credentials/{id}/secret"): Attack(lambda p: [p.credential_id], _NEW_SECRET),
    ("DELETE", "/v1/credentials/{id}"): Attack(lambda p: [p.credential_id]),
    ("GET", "/v1/agents/{id}"): Attack(lambda p: [p.agent_id]),
    ("PATCH", "/v1/agents/{id}"): Attack(lambda p: [p.agent_id], {"name": "pwned"}),
    ("DELETE", "/v1/agents/{id}"): Attack(lambda p: [p.agent_id]),
    ("GET", "/v1/calls/{id}"): Attack(lambda p: [p.call_id]),
    ("POST", "/v1/calls/{id}/monitor-token"): Attack(lambda p: [p.call_id]),
}


def test_every_endpoint_with_an_id_is_attacked() -> None:
    """A new endpoint taking an id fails here until it is added to ATTACKS."""
    with_ids = {(e.method, e.path) for e in all_endpoints() if "{" in e.path}
    assert with_ids == set(ATTACKS)


@pytest.mark.parametrize("route", sorted(ATTACKS), ids=lambda r: f"{r[0]} {r[1]}")
async def test_other_tenants_ids_are_not_found(
    http: httpx.AsyncClient, world: World, unchanged: None, route: tuple[str, str]
) -> None:
    method, template = route
    attack = ATTACKS[route]
    for label, headers in _attacker_credentials(world):
        made_up = await http.request(
            method, template.format(id=uuid.uuid4()), json=attack.body, headers=headers
        )
        assert made_up.status_code == 404, (label, made_up.text)
        for victim_id in attack.ids(world.victim):
            r = await http.request(
                method, template.format(id=victim_id), json=attack.body, headers=headers
            )
            # Exactly what a made-up id gets: the id's existence is not revealed.
            assert r.status_code == 404, (label, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            expected = {k: v for k, v in made_up.json().items() if k != "instance"}
            assert {k: v for k, v in r.json().items() if k != "instance"} == expected
            _assert_reveals_nothing(r, world.victim)
    # The attacker's own id works with the same request: the 404 above was not a bad request.
    if method == "GET":
        own = attack.ids(world.attacker)[0]
        r = await http.get(template.format(id=own), headers=world.attacker.auth())
        assert r.status_code == 200, r.text


async def test_lists_show_only_the_callers_rows(
    http: httpx.AsyncClient, world: World, unchanged: None
) -> None:
    listings = [
        e.path
        for e in all_endpoints()
        if e.method == "GET" and e.auth and "{" not in e.path and e.include_in_schema
    ]
    assert {"/v1/users", "/v1/api-keys", "/v1/credentials", "/v1/agents", "/v1/calls"} <= set(
        listings
    )
    for path in listings:
        for label, headers in _attacker_credentials(world):
            r = await http.get(path, headers=headers)
            assert r.status_code == 200, (path, label, r.text)
            _assert_reveals_nothing(r, world.victim)
    own = (await http.get("/v1/agents", headers=world.attacker.auth())).json()["items"]
    assert [a["id"] for a in own] == [str(world.attacker.agent_id)]
    calls = (await http.get("/v1/calls/active", headers=world.attacker.auth())).json()["items"]
    assert [c["id"] for c in calls] == [str(world.attacker.call_id)]


async def test_filters_on_other_tenants_ids_find_nothing(
    http: httpx.AsyncClient, world: World, unchanged: None
) -> None:
    for params in (
        {"agent_id": str(world.victim.agent_id)},
        {"agent_id": str(world.victim.agent_id), "status": "active"},
    ):
        r = await http.get("/v1/calls", params=params, headers=world.attacker.auth())
        assert r.status_code == 200
        assert r.json()["items"] == []
    usage = await http.get("/v1/usage", params={"group_by": "agent"}, headers=world.attacker.auth())
    assert [row["agent_id"] for row in usage.json()["items"]] == [str(world.attacker.agent_id)]


async def test_other_tenants_credential_cannot_be_referenced(
    http: httpx.AsyncClient, world: World, unchanged: None
) -> None:
    headers = world.attacker.auth()

    async def create(credential_id: uuid.UUID) -> httpx.Response:
        return await http.post(
            "/v1/agents",
            json={
                "name": "borrower",
                "elevenlabs_agent_id": "agent_x",
                "credential_id": str(credential_id),
            },
            headers=headers,
        )

    made_up, theirs = await create(uuid.uuid4()), await create(world.victim.credential_id)
    assert theirs.status_code == made_up.status_code == 422
    assert theirs.json()["code"] == made_up.json()["code"] == "invalid_credential"
    patched = await http.patch(
        f"/v1/agents/{world.attacker.agent_id}",
        json={"credential_id": str(world.victim.credential_id)},
        headers=headers,
    )
    assert patched.status_code == 422
    assert patched.json()["code"] == "invalid_credential"
    agent = await http.get(f"/v1/agents/{world.attacker.agent_id}", headers=headers)
    assert agent.json()["credential_id"] == str(world.attacker.credential_id)


async def test_no_call_on_another_tenants_agent(
    http: httpx.AsyncClient, world: World, unchanged: None
) -> None:
    for _, headers in _attacker_credentials(world):
        made_up = await http.post(
            "/v1/calls", json={"agent_id": str(uuid.uuid4())}, headers=headers
        )
        r = await http.post(
            "/v1/calls", json={"agent_id": str(world.victim.agent_id)}, headers=headers
        )
        assert r.status_code == made_up.status_code == 404
        assert r.json()["detail"] == made_up.json()["detail"]


async def test_another_tenants_email_is_not_revealed(
    http: httpx.AsyncClient, world: World, unchanged: None, owner_conn: asyncpg.Connection
) -> None:
    """Emails are unique per tenant: B can add a user with A's email, learning nothing."""
    r = await http.post(
        "/v1/users",
        json={"email": world.victim.user_email, "role": "viewer"},
        headers=world.attacker.auth(),
    )
    assert r.status_code == 201, r.text
    await owner_conn.execute("DELETE FROM users WHERE id = $1", uuid.UUID(r.json()["id"]))


async def test_phone_numbers_are_platform_unique_but_reveal_no_owner(
    http: httpx.AsyncClient, world: World, unchanged: None
) -> None:
    """The one deliberate exception: Twilio routes by number, so a number is taken platform-wide
    and claiming A's number says so, without saying by whom."""
    r = await http.patch(
        f"/v1/agents/{world.attacker.agent_id}",
        json={"phone_numbers": [world.victim.phone_number]},
        headers=world.attacker.auth(),
    )
    assert r.status_code == 409
    assert r.json()["code"] == "phone_number_taken"
    assert str(world.victim.tenant.tenant_id) not in r.text
    assert str(world.victim.agent_id) not in r.text


async def test_correctly_signed_token_mixing_tenants_is_refused(
    http: httpx.AsyncClient, settings: Settings, world: World, unchanged: None
) -> None:
    """What a stolen signing key is not needed for: the tenant claim is checked against the user."""
    signing = SigningKeyring(settings.signing_keyring())
    victim, attacker = world.victim, world.attacker
    for user_id, tenant_id in (
        (attacker.tenant.owner_id, victim.tenant.tenant_id),
        (victim.tenant.owner_id, attacker.tenant.tenant_id),
    ):
        token = issue_access_token(
            signing, settings, user_id=user_id, tenant_id=tenant_id, role="owner"
        ).token
        for path in ("/v1/me", f"/v1/agents/{victim.agent_id}", "/v1/agents"):
            r = await http.get(path, headers={"authorization": f"Bearer {token}"})
            assert r.status_code == 401, (path, r.text)
            assert r.json()["code"] == "invalid_token"


async def test_call_token_for_another_tenants_call_gets_no_session(
    http: httpx.AsyncClient, settings: Settings, world: World, unchanged: None
) -> None:
    """The relay's session endpoint reads the call under the token's tenant, not the call's."""
    signing = SigningKeyring(settings.signing_keyring())
    token = issue_call_token(
        signing,
        settings,
        call_id=world.victim.call_id,
        tenant_id=world.attacker.tenant.tenant_id,
        role="caller",
    ).token
    service = settings.internal_service_token
    assert service is not None
    r = await http.post(
        "/internal/v1/call-sessions",
        json={"token": token},
        headers={"authorization": f"Bearer {service.get_secret_value()}"},
    )
    assert r.status_code == 401, r.text
    assert r.json()["code"] == "invalid_call_token"
    _assert_reveals_nothing(r, world.victim)


async def test_event_claiming_another_tenant_does_not_touch_the_call(
    settings: Settings,
    redis_client: aioredis.Redis,
    owner_conn: asyncpg.Connection,
    world: World,
    unchanged: None,
) -> None:
    """An event naming B with A's call id is filed under B and leaves A's call as it was."""
    event = make_event(
        "ended",
        tenant_id=world.attacker.tenant.tenant_id,
        call_id=world.victim.call_id,
        seq=99,
        data={"reason": "hijack", "duration_ms": 1},
    )
    stream = settings.redis_key(settings.call_events_stream)
    await append_call_event(redis_client, stream, event, maxlen=100_000)
    deadline = time.monotonic() + 30
    while not await owner_conn.fetchval(
        "SELECT tenant_id FROM call_events WHERE event_id = $1", event.event_id
    ):
        assert time.monotonic() < deadline, "the consumer did not write the event"
        await asyncio.sleep(0.05)
    filed_under = await owner_conn.fetchval(
        "SELECT tenant_id FROM call_events WHERE event_id = $1", event.event_id
    )
    assert filed_under == world.attacker.tenant.tenant_id


# --- the database, as the application's own role -----------------------------------------------


@contextlib.asynccontextmanager
async def as_tenant(conn: asyncpg.Connection, tenant_id: uuid.UUID) -> AsyncIterator[None]:
    """What ``tenant_tx`` does, rolled back at the end whatever happened."""
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(tenant_id))
        yield
    finally:
        await tx.rollback()


async def _privileged(conn: asyncpg.Connection, table: str, privilege: str) -> bool:
    return bool(
        await conn.fetchval("SELECT has_table_privilege(current_user, $1, $2)", table, privilege)
    )


async def test_every_table_with_a_tenant_id_is_a_tenant_table(
    owner_conn: asyncpg.Connection, world: World
) -> None:
    rows = await owner_conn.fetch(
        """
        SELECT c.relname FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND a.attname = 'tenant_id' AND NOT a.attisdropped
          AND c.relkind IN ('r', 'p') AND NOT c.relispartition
        """
    )
    assert {r["relname"] for r in rows} | {"tenants"} == set(TENANT_TABLES)


async def test_other_tables_are_out_of_the_app_roles_reach(
    app_conn: asyncpg.Connection, world: World
) -> None:
    """Tables that are neither tenant tables nor their partitions hold no tenant data and are
    not readable by the service (today: the migration ledger)."""
    rows = await app_conn.fetch(
        """
        SELECT c.relname,
               has_table_privilege(current_user, c.oid, 'SELECT,INSERT,UPDATE,DELETE,TRUNCATE')
                 AS reachable
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND c.relname <> ALL($1::text[])
        """,
        list(TENANT_TABLES),
    )
    assert {r["relname"]: r["reachable"] for r in rows} == {"schema_migrations": False}


async def test_app_role_owns_nothing(app_conn: asyncpg.Connection, world: World) -> None:
    """An owner may disable RLS, drop policies or redefine functions: the service's role (and
    the group it inherits from) owns no relation, function, schema, type or database."""
    owned = await app_conn.fetch(
        """
        SELECT 'relation' AS kind, relname::text AS name FROM pg_class
        WHERE pg_has_role(current_user, relowner, 'USAGE')
        UNION ALL SELECT 'function', proname::text FROM pg_proc
        WHERE pg_has_role(current_user, proowner, 'USAGE')
        UNION ALL SELECT 'schema', nspname::text FROM pg_namespace
        WHERE pg_has_role(current_user, nspowner, 'USAGE')
        UNION ALL SELECT 'type', typname::text FROM pg_type
        WHERE pg_has_role(current_user, typowner, 'USAGE')
        UNION ALL SELECT 'database', datname::text FROM pg_database
        WHERE pg_has_role(current_user, datdba, 'USAGE')
        """
    )
    assert [(r["kind"], r["name"]) for r in owned] == []


async def test_forced_rls_and_a_policy_on_every_tenant_table(
    owner_conn: asyncpg.Connection,
) -> None:
    rows = await owner_conn.fetch(
        """
        SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity,
               (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid) AS policies
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relname = ANY($1::text[])
        """,
        list(TENANT_TABLES),
    )
    assert {r["relname"]: (r["relrowsecurity"], r["relforcerowsecurity"]) for r in rows} == {
        t: (True, True) for t in TENANT_TABLES
    }
    assert all(r["policies"] >= 1 for r in rows)


async def test_no_tenant_set_sees_no_rows(
    app_conn: asyncpg.Connection, owner_conn: asyncpg.Connection, world: World
) -> None:
    for table in TENANT_TABLES:
        assert await owner_conn.fetchval(f"SELECT count(*) FROM {table}") > 0, table
        assert await app_conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table
    # After a tenant's transaction the setting is '' (not NULL) on the same connection: still
    # nothing, so a pooled connection never carries a tenant over to its next user.
    async with as_tenant(app_conn, world.attacker.tenant.tenant_id):
        assert await app_conn.fetchval("SELECT count(*) FROM agents") == 1
    assert await app_conn.fetchval("SELECT current_setting('app.tenant_id', true)") == ""
    for table in TENANT_TABLES:
        assert await app_conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table


async def test_other_tenants_rows_are_invisible(app_conn: asyncpg.Connection, world: World) -> None:
    victim, attacker = world.victim.tenant.tenant_id, world.attacker.tenant.tenant_id
    async with as_tenant(app_conn, attacker):
        for table in TENANT_TABLES:
            column = tenant_column(table)
            theirs = await app_conn.fetchval(
                f"SELECT count(*) FROM {table} WHERE {column} = $1", victim
            )
            not_mine = await app_conn.fetchval(
                f"SELECT count(*) FROM {table} WHERE {column} <> $1", attacker
            )
            mine = await app_conn.fetchval(
                f"SELECT count(*) FROM {table} WHERE {column} = $1", attacker
            )
            assert (theirs, not_mine) == (0, 0), table
            assert mine > 0, table  # the attacker's own rows are there: the check is not vacuous


async def test_update_and_delete_of_other_tenants_rows_affect_nothing(
    app_conn: asyncpg.Connection, world: World, unchanged: None
) -> None:
    victim = world.victim.tenant.tenant_id
    for table in TENANT_TABLES:
        column = tenant_column(table)
        for verb, sql in (
            ("UPDATE", f"UPDATE {table} SET {column} = {column} WHERE {column} = $1"),
            ("DELETE", f"DELETE FROM {table} WHERE {column} = $1"),
        ):
            async with as_tenant(app_conn, world.attacker.tenant.tenant_id):
                if await _privileged(app_conn, table, verb):
                    assert await app_conn.execute(sql, victim) == f"{verb} 0", table
                else:
                    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission"):
                        await app_conn.execute(sql, victim)


async def test_rows_cannot_be_moved_into_another_tenant(
    app_conn: asyncpg.Connection, world: World, unchanged: None
) -> None:
    victim, attacker = world.victim.tenant.tenant_id, world.attacker.tenant.tenant_id
    for table in TENANT_TABLES:
        column = tenant_column(table)
        async with as_tenant(app_conn, attacker):
            if not await _privileged(app_conn, table, "UPDATE"):
                continue
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
                await app_conn.execute(
                    f"UPDATE {table} SET {column} = $1 WHERE {column} = $2", victim, attacker
                )


def _inserts(p: Populated) -> dict[str, tuple[str, list[Any]]]:
    """One plausible row per tenant table, claiming tenant ``p``."""
    tid, now = p.tenant.tenant_id, "now()"
    return {
        "tenants": (
            "INSERT INTO tenants (id, name, slug) VALUES ($1, 'x', $2)",
            [tid, f"x-{secrets.token_hex(4)}"],
        ),
        "users": (
            "INSERT INTO users (id, tenant_id, email, password_hash, role)"
            " VALUES ($1, $2, 'evil@example.com', 'x', 'owner')",
            [uuid.uuid4(), tid],
        ),
        "api_keys": (
            "INSERT INTO api_keys (id, tenant_id, name, prefix, key_hash, role)"
            " VALUES ($1, $2, 'evil', 'vr_live_x', $3, 'admin')",
            [uuid.uuid4(), tid, secrets.token_bytes(32)],
        ),
        "refresh_token_families": (
            "INSERT INTO refresh_token_families (id, tenant_id, user_id, absolute_expires_at)"
            f" VALUES ($1, $2, $3, {now} + interval '1 day')",
            [uuid.uuid4(), tid, p.tenant.owner_id],
        ),
        "refresh_tokens": (
            "INSERT INTO refresh_tokens (id, tenant_id, family_id, token_hash, expires_at)"
            f" VALUES ($1, $2, $3, $4, {now} + interval '1 day')",
            [uuid.uuid4(), tid, uuid.uuid4(), secrets.token_bytes(32)],
        ),
        "credentials": (
            "INSERT INTO credentials (id, tenant_id, provider, name, key_id, nonce, ciphertext,"
            " mask) VALUES ($1, $2, 'elevenlabs', 'evil', 'k', $3, $4, 'x')",
            [uuid.uuid4(), tid, secrets.token_bytes(12), b"x"],
        ),
        "agents": (
            "INSERT INTO agents (id, tenant_id, name, elevenlabs_agent_id)"
            " VALUES ($1, $2, 'evil', 'agent_evil')",
            [uuid.uuid4(), tid],
        ),
        "phone_numbers": (
            "INSERT INTO phone_numbers (e164, tenant_id, agent_id) VALUES ('+16285550100', $1, $2)",
            [tid, p.agent_id],
        ),
        "calls": (
            f"INSERT INTO calls (id, tenant_id, agent_id, created_at) VALUES ($1, $2, $3, {now})",
            [uuid.uuid4(), tid, p.agent_id],
        ),
        "call_events": (
            "INSERT INTO call_events (event_id, tenant_id, call_id, occurred_at, type)"
            f" VALUES ($1, $2, $3, {now}, 'ended')",
            [uuid.uuid4(), tid, p.call_id],
        ),
    }


async def test_inserting_for_another_tenant_violates_the_policy(
    app_conn: asyncpg.Connection, world: World, unchanged: None
) -> None:
    inserts = _inserts(world.victim)
    assert set(inserts) == set(TENANT_TABLES)
    for table, (sql, args) in inserts.items():
        async with as_tenant(app_conn, world.attacker.tenant.tenant_id):
            if await _privileged(app_conn, table, "INSERT"):
                with pytest.raises(
                    asyncpg.InsufficientPrivilegeError,
                    match=f'new row violates row-level security policy for table "{table}"',
                ):
                    await app_conn.execute(sql, *args)
            else:
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                    await app_conn.execute(sql, *args)


async def test_own_rows_cannot_point_at_another_tenants_rows(
    app_conn: asyncpg.Connection, world: World, unchanged: None
) -> None:
    """Composite (tenant_id, id) foreign keys: a row of B cannot reference A's agent or credential."""
    attacker = world.attacker.tenant.tenant_id
    async with as_tenant(app_conn, attacker):
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await app_conn.execute(
                "INSERT INTO phone_numbers (e164, tenant_id, agent_id) VALUES ('+16285550101', $1, $2)",
                attacker,
                world.victim.agent_id,
            )
    async with as_tenant(app_conn, attacker):
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await app_conn.execute(
                "UPDATE agents SET credential_id = $1 WHERE id = $2",
                world.victim.credential_id,
                world.attacker.agent_id,
            )


async def test_row_security_off_does_not_bypass(app_conn: asyncpg.Connection, world: World) -> None:
    await app_conn.execute("SET row_security = off")
    for table in TENANT_TABLES:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            await app_conn.fetchval(f"SELECT count(*) FROM {table}")
    async with as_tenant(app_conn, world.attacker.tenant.tenant_id):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            await app_conn.fetchval("SELECT count(*) FROM agents")


@pytest.mark.parametrize(
    "statement",
    [
        "ALTER TABLE {t} DISABLE ROW LEVEL SECURITY",
        "ALTER TABLE {t} NO FORCE ROW LEVEL SECURITY",
        "DROP POLICY tenant_isolation ON {t}",
        "CREATE POLICY open_door ON {t} USING (true)",
        "ALTER POLICY tenant_isolation ON {t} USING (true)",
        "ALTER TABLE {t} OWNER TO CURRENT_USER",
        "TRUNCATE {t} CASCADE",
        "DROP TABLE {t}",
    ],
)
async def test_app_role_cannot_lift_or_dodge_rls(
    app_conn: asyncpg.Connection, statement: str
) -> None:
    # TRUNCATE would empty a table without consulting RLS at all: it must be denied too.
    for table in TENANT_TABLES:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app_conn.execute(statement.format(t=table))


async def test_partitions_are_unreachable(app_conn: asyncpg.Connection, world: World) -> None:
    """Partitions have no policy of their own; the role has no privilege on them at all."""
    partitions = await app_conn.fetch(
        """
        SELECT c.relname FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.relname IN ('calls', 'call_events')
        """
    )
    names = [r["relname"] for r in partitions]
    assert any(n.startswith("calls_p") for n in names)
    assert any(n.startswith("call_events_p") for n in names)
    for name in names:
        assert not await _privileged(app_conn, name, "SELECT,INSERT,UPDATE,DELETE,TRUNCATE")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await app_conn.fetchval(f"SELECT count(*) FROM {name}")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app_conn.execute(f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY")


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE ROLE vr_evil LOGIN SUPERUSER",
        "CREATE ROLE vr_evil",
        "ALTER ROLE CURRENT_USER BYPASSRLS",
        "ALTER ROLE CURRENT_USER SUPERUSER",
        "SELECT rolpassword FROM pg_authid",
        "SET SESSION AUTHORIZATION {owner}",
        "SET ROLE {owner}",
        "GRANT {owner} TO CURRENT_USER",
        "CREATE TABLE public.vr_evil (x int)",
        "CREATE OR REPLACE FUNCTION current_tenant_id() RETURNS uuid LANGUAGE sql"
        " AS $$ SELECT NULL::uuid $$",
        "CREATE EXTENSION IF NOT EXISTS dblink",
    ],
)
async def test_app_role_cannot_escalate(
    app_conn: asyncpg.Connection, owner_conn: asyncpg.Connection, statement: str
) -> None:
    owner = await owner_conn.fetchval("SELECT current_user")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await app_conn.execute(statement.format(owner=f'"{owner}"'))


async def test_the_tenant_setting_is_trusted_so_the_service_sets_it(
    app_conn: asyncpg.Connection, world: World
) -> None:
    """The application role CAN set ``app.tenant_id`` to any tenant: Postgres cannot know which
    tenant a request is for. RLS guarantees that every statement sees one tenant only, never
    several and never one by accident (unset means none); choosing which one is the service's
    job, from the authenticated principal only (``tenant_tx``), and the API-level tests above
    show it cannot be steered by ids, bodies, filters or forged tokens. The pre-tenant lookups
    below are the only way across tenants, and return only what they must."""
    async with as_tenant(app_conn, world.victim.tenant.tenant_id):
        assert await app_conn.fetchval("SELECT count(*) FROM agents") == 1
        # Even then, one tenant at a time: never the attacker's rows alongside.
        assert (
            await app_conn.fetchval(
                "SELECT count(*) FROM agents WHERE tenant_id = $1",
                world.attacker.tenant.tenant_id,
            )
            == 0
        )


_DEFINER_FUNCTIONS = {
    "auth_users_by_email": [
        "user_id",
        "tenant_id",
        "tenant_slug",
        "password_hash",
        "role",
        "disabled",
    ],
    "auth_api_key": ["api_key_id", "tenant_id", "role", "active"],
    "auth_refresh_token_tenant": [],
    "phone_number_route": ["tenant_id", "agent_id"],
    "phone_number_taken": [],
    "twilio_call_route": ["tenant_id", "call_id"],
    "expire_unconnected_calls": ["tenant_id", "call_id"],
    "call_log_retention_policies": ["tenant_id", "retention_days"],
    "ensure_call_log_partitions": [],
    "drop_call_log_partitions_before": [],
    "reap_stale_calls": ["tenant_id", "call_id"],
}


async def test_security_definer_functions_are_the_reviewed_ones(
    app_conn: asyncpg.Connection,
) -> None:
    """A new SECURITY DEFINER function runs past RLS: it fails here until reviewed and listed."""
    rows = await app_conn.fetch(
        """
        SELECT p.proname, coalesce(p.proargnames, '{}') AS names,
               coalesce(p.proargmodes::text[], '{}') AS modes, p.proconfig
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public' AND p.prosecdef
        """
    )
    found = {
        r["proname"]: [n for n, m in zip(r["names"], r["modes"], strict=False) if m == "t"]
        for r in rows
    }
    assert found == _DEFINER_FUNCTIONS
    # A pinned search_path, so no object the caller creates can be picked up by name.
    assert all(any(c.startswith("search_path=") for c in (r["proconfig"] or [])) for r in rows)


async def test_security_definer_lookups_return_only_what_they_must(
    app_conn: asyncpg.Connection, world: World
) -> None:
    victim = world.victim
    by_email = await app_conn.fetch(
        "SELECT * FROM auth_users_by_email($1)", victim.tenant.owner_email
    )
    assert [(r["user_id"], r["tenant_id"]) for r in by_email] == [
        (victim.tenant.owner_id, victim.tenant.tenant_id)
    ]
    # Exact matches only: no pattern or empty input lists anyone.
    for probe in ("%", "", "%@example.com", victim.tenant.owner_email[:-1]):
        assert await app_conn.fetch("SELECT * FROM auth_users_by_email($1)", probe) == []
    assert await app_conn.fetch("SELECT * FROM auth_api_key($1)", secrets.token_bytes(32)) == []
    assert (
        await app_conn.fetchval("SELECT auth_refresh_token_tenant($1)", secrets.token_bytes(32))
        is None
    )
    route = await app_conn.fetch("SELECT * FROM phone_number_route($1)", victim.phone_number)
    assert [(r["tenant_id"], r["agent_id"]) for r in route] == [
        (victim.tenant.tenant_id, victim.agent_id)
    ]
    assert await app_conn.fetch("SELECT * FROM phone_number_route('%')") == []
    # Only phone calls, by exact CallSid: a browser call or a pattern finds nothing.
    for probe in ("%", "", "CA%"):
        assert await app_conn.fetch("SELECT * FROM twilio_call_route($1)", probe) == []
    await _cannot_drop_retained_call_logs(app_conn)
    await _cannot_end_live_calls(app_conn, world)
    for months in (0, 121):
        with pytest.raises(asyncpg.RaiseError, match="p_months"):
            await app_conn.fetchval("SELECT ensure_call_log_partitions(current_date, $1)", months)


async def _cannot_drop_retained_call_logs(app_conn: asyncpg.Connection) -> None:
    """The maintenance job's drop function is the role's one destructive cross-tenant power: asked
    to drop everything, it drops nothing that a tenant's retention still covers. Rolled back
    whatever it did, so a regression cannot take the session's call logs with it."""
    month = await app_conn.fetchval("SELECT to_char(current_date, 'YYYYMM')")
    tx = app_conn.transaction()
    await tx.start()
    try:
        await app_conn.execute("SET LOCAL lock_timeout = '5s'")
        dropped = [
            r[0]
            for r in await app_conn.fetch("SELECT drop_call_log_partitions_before('2999-01-01')")
        ]
        assert f"calls_p{month}" not in dropped
        assert f"call_events_p{month}" not in dropped
        assert await app_conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"calls_p{month}")
    finally:
        await tx.rollback()


async def _cannot_end_live_calls(app_conn: asyncpg.Connection, world: World) -> None:
    """The stale-call reaper ends only calls silent for longer than its floor (far above the
    relay's 15 s usage interval and every lease), with an outcome the caller cannot choose: the
    role cannot aim it at a live call, of its own tenant or another. Rolled back whatever it did."""
    for idle, limit in ((0, 1), (299, 1), (None, 1), (300, 0), (300, 10001)):
        with pytest.raises(asyncpg.RaiseError, match="out of range"):
            await app_conn.fetch("SELECT * FROM reap_stale_calls($1, $2)", idle, limit)
    tx = app_conn.transaction()
    await tx.start()
    try:
        reaped = {
            r["call_id"] for r in await app_conn.fetch("SELECT * FROM reap_stale_calls(300, 10000)")
        }
        assert world.victim.call_id not in reaped
        assert world.attacker.call_id not in reaped
    finally:
        await tx.rollback()
