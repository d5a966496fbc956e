"""Agents and their phone numbers in Postgres. Every function runs inside ``tenant_tx``.

Phone numbers are unique across the platform (Twilio routes by number). Whether a number is
taken is answered by the SECURITY DEFINER function ``phone_number_taken``, which says yes or no
and nothing about who holds it; the primary key catches the race between check and insert.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from control_api.audio_formats import AudioFormat
from control_api.bootstrap import new_id
from control_api.db import Conn

_COLUMNS = (
    "id, name, elevenlabs_agent_id, credential_id, input_audio_format, output_audio_format,"
    " conversation_overrides, dynamic_variables, allowed_origins, transfer_numbers,"
    " phone_dynamic_variables, created_at, updated_at"
)
# The only columns a caller may set; names are never taken from input.
SETTABLE_COLUMNS = frozenset(
    {
        "name",
        "elevenlabs_agent_id",
        "credential_id",
        "input_audio_format",
        "output_audio_format",
        "conversation_overrides",
        "dynamic_variables",
        "allowed_origins",
        "transfer_numbers",
        "phone_dynamic_variables",
    }
)


class PhoneNumberTaken(Exception):
    def __init__(self, number: str | None) -> None:
        super().__init__("phone number taken")
        self.number = number


class InvalidCredential(Exception):
    """The credential does not exist for this tenant or is not an ElevenLabs credential."""


@dataclass(frozen=True)
class AgentRecord:
    id: uuid.UUID
    name: str
    elevenlabs_agent_id: str
    credential_id: uuid.UUID | None
    input_audio_format: AudioFormat
    output_audio_format: AudioFormat
    conversation_overrides: dict[str, Any]
    dynamic_variables: dict[str, Any]
    allowed_origins: list[str]
    phone_numbers: list[str]
    transfer_numbers: list[str]
    phone_dynamic_variables: dict[str, str]
    created_at: datetime
    updated_at: datetime


def _record(row: asyncpg.Record, phone_numbers: list[str]) -> AgentRecord:
    return AgentRecord(
        id=row["id"],
        name=row["name"],
        elevenlabs_agent_id=row["elevenlabs_agent_id"],
        credential_id=row["credential_id"],
        input_audio_format=AudioFormat(row["input_audio_format"]),
        output_audio_format=AudioFormat(row["output_audio_format"]),
        conversation_overrides=dict(row["conversation_overrides"] or {}),
        dynamic_variables=dict(row["dynamic_variables"] or {}),
        allowed_origins=list(row["allowed_origins"] or []),
        phone_numbers=phone_numbers,
        transfer_numbers=list(row["transfer_numbers"] or []),
        phone_dynamic_variables=dict(row["phone_dynamic_variables"] or {}),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def _numbers_by_agent(conn: Conn, agent_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[str]]:
    found: dict[uuid.UUID, list[str]] = {a: [] for a in agent_ids}
    if agent_ids:
        rows = await conn.fetch(
            "SELECT agent_id, e164 FROM phone_numbers WHERE agent_id = ANY($1::uuid[])"
            " ORDER BY e164",
            agent_ids,
        )
        for r in rows:
            found[r["agent_id"]].append(r["e164"])
    return found


async def _check_credential(conn: Conn, credential_id: uuid.UUID | None) -> None:
    if credential_id is None:
        return
    provider = await conn.fetchval(
        "SELECT provider FROM credentials WHERE id = $1 FOR KEY SHARE", credential_id
    )
    if provider != "elevenlabs":
        raise InvalidCredential(str(credential_id))


async def _replace_numbers(
    conn: Conn, tenant_id: uuid.UUID, agent_id: uuid.UUID, numbers: list[str]
) -> None:
    await conn.execute("DELETE FROM phone_numbers WHERE agent_id = $1", agent_id)
    if not numbers:
        return
    taken = await conn.fetchval(
        "SELECT n FROM unnest($1::text[]) WITH ORDINALITY AS t(n, i)"
        " WHERE phone_number_taken(n) ORDER BY i LIMIT 1",
        numbers,
    )
    if taken is not None:
        raise PhoneNumberTaken(taken)
    try:
        await conn.executemany(
            "INSERT INTO phone_numbers (e164, tenant_id, agent_id) VALUES ($1, $2, $3)",
            [(n, tenant_id, agent_id) for n in numbers],
        )
    except asyncpg.UniqueViolationError:
        # Another transaction claimed a number between our check and insert.
        raise PhoneNumberTaken(None) from None


async def create_agent(
    conn: Conn, tenant_id: uuid.UUID, values: dict[str, Any], phone_numbers: list[str]
) -> AgentRecord:
    unknown = set(values) - SETTABLE_COLUMNS
    if unknown:
        raise ValueError(f"not agent columns: {sorted(unknown)}")
    await _check_credential(conn, values.get("credential_id"))
    agent_id = new_id()
    columns = ["id", "tenant_id", *values]
    placeholders = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    try:
        row = await conn.fetchrow(
            f"INSERT INTO agents ({', '.join(columns)}) VALUES ({placeholders})"
            f" RETURNING {_COLUMNS}",
            agent_id,
            tenant_id,
            *values.values(),
        )
    except asyncpg.ForeignKeyViolationError:
        raise InvalidCredential(str(values.get("credential_id"))) from None
    assert row is not None
    await _replace_numbers(conn, tenant_id, agent_id, phone_numbers)
    return _record(row, sorted(phone_numbers))


async def get_agent(conn: Conn, agent_id: uuid.UUID) -> AgentRecord | None:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM agents WHERE id = $1", agent_id)
    if row is None:
        return None
    numbers = await _numbers_by_agent(conn, [agent_id])
    return _record(row, numbers[agent_id])


async def list_agents(
    conn: Conn, *, limit: int, after: tuple[datetime, uuid.UUID] | None = None
) -> list[AgentRecord]:
    """Newest first; ``after`` is the (created_at, id) of the last row of the previous page."""
    if after is None:
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM agents ORDER BY created_at DESC, id DESC LIMIT $1", limit
        )
    else:
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM agents WHERE (created_at, id) < ($1, $2)"
            " ORDER BY created_at DESC, id DESC LIMIT $3",
            after[0],
            after[1],
            limit,
        )
    numbers = await _numbers_by_agent(conn, [r["id"] for r in rows])
    return [_record(r, numbers[r["id"]]) for r in rows]


async def update_agent(
    conn: Conn,
    tenant_id: uuid.UUID,
    agent_id: uuid.UUID,
    values: dict[str, Any],
    phone_numbers: list[str] | None,
) -> AgentRecord | None:
    """Set the given columns (and replace the phone numbers when given); None if no such agent."""
    unknown = set(values) - SETTABLE_COLUMNS
    if unknown:
        raise ValueError(f"not agent columns: {sorted(unknown)}")
    # Lock the agent first so that concurrent updates of its numbers serialise.
    exists = await conn.fetchval("SELECT 1 FROM agents WHERE id = $1 FOR UPDATE", agent_id)
    if exists is None:
        return None
    if "credential_id" in values:
        await _check_credential(conn, values["credential_id"])
    if values or phone_numbers is not None:
        assignments = ", ".join(f"{col} = ${i}" for i, col in enumerate(values, start=2))
        try:
            await conn.execute(
                f"UPDATE agents SET {assignments + ', ' if assignments else ''}updated_at = now()"
                " WHERE id = $1",
                agent_id,
                *values.values(),
            )
        except asyncpg.ForeignKeyViolationError:
            raise InvalidCredential(str(values.get("credential_id"))) from None
    if phone_numbers is not None:
        await _replace_numbers(conn, tenant_id, agent_id, phone_numbers)
    return await get_agent(conn, agent_id)


async def delete_agent(conn: Conn, agent_id: uuid.UUID) -> bool:
    # Its phone numbers go with it (ON DELETE CASCADE).
    deleted = await conn.fetchval("DELETE FROM agents WHERE id = $1 RETURNING id", agent_id)
    return deleted is not None
