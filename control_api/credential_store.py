"""Credentials rows: encrypt on write, decrypt only on use, never hand plaintext to a response.

Every function takes a connection inside ``tenant_tx``, so RLS already limits it to one tenant;
the explicit tenant filters below are a second line, not the isolation mechanism.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NamedTuple

import asyncpg
import orjson

from control_api.bootstrap import new_id
from control_api.db import Conn
from control_api.vault import Sealed, Vault, VaultError

log = logging.getLogger(__name__)

Provider = Literal["elevenlabs", "twilio"]
PROVIDERS: tuple[Provider, ...] = ("elevenlabs", "twilio")

_COLUMNS = "id, provider, name, mask, public_info, created_at, updated_at"


class CredentialNotFound(LookupError):
    pass


class CredentialInUse(Exception):
    pass


class CredentialUnreadable(Exception):
    """The stored ciphertext could not be decrypted (unknown key id, tampering, moved row)."""


class SecretFields(dict[str, str]):
    """A decrypted secret; its repr is redacted so an accidental log line shows no plaintext."""

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k!r}: '***'" for k in self) + "}"

    __str__ = __repr__


class CredentialSecret(NamedTuple):
    provider: Provider
    secret: SecretFields


@dataclass(frozen=True)
class CredentialRow:
    id: uuid.UUID
    provider: Provider
    name: str
    mask: str
    public_info: dict[str, Any]
    created_at: datetime
    updated_at: datetime


def mask_secret(secret: str) -> str:
    """The last four characters; callers only store secrets long enough for that to be safe."""
    return "\u2026" + secret[-4:]


def _row(record: asyncpg.Record) -> CredentialRow:
    return CredentialRow(
        id=record["id"],
        provider=record["provider"],
        name=record["name"],
        mask=record["mask"],
        public_info=dict(record["public_info"] or {}),
        created_at=record["created_at"],
        updated_at=record["updated_at"],
    )


def _seal(
    vault: Vault,
    secret: dict[str, str],
    *,
    tenant_id: uuid.UUID,
    credential_id: uuid.UUID,
    provider: Provider,
) -> Sealed:
    return vault.encrypt(
        orjson.dumps(secret, option=orjson.OPT_SORT_KEYS),
        tenant_id=tenant_id,
        credential_id=credential_id,
        provider=provider,
    )


async def create_credential(
    conn: Conn,
    vault: Vault,
    *,
    tenant_id: uuid.UUID,
    provider: Provider,
    name: str,
    secret: dict[str, str],
    mask: str,
    public_info: dict[str, Any],
) -> CredentialRow:
    # The id is part of the associated data, so it must exist before encryption.
    credential_id = new_id()
    sealed = _seal(
        vault, secret, tenant_id=tenant_id, credential_id=credential_id, provider=provider
    )
    record = await conn.fetchrow(
        f"""
        INSERT INTO credentials
            (id, tenant_id, provider, name, key_id, nonce, ciphertext, mask, public_info)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        RETURNING {_COLUMNS}
        """,
        credential_id,
        tenant_id,
        provider,
        name,
        sealed.key_id,
        sealed.nonce,
        sealed.ciphertext,
        mask,
        public_info,
    )
    assert record is not None
    return _row(record)


async def list_credentials(
    conn: Conn, *, limit: int, after: tuple[datetime, uuid.UUID] | None = None
) -> list[CredentialRow]:
    """Newest first; ``after`` is the (created_at, id) of the last row of the previous page."""
    if after is None:
        records = await conn.fetch(
            f"SELECT {_COLUMNS} FROM credentials ORDER BY created_at DESC, id DESC LIMIT $1",
            limit,
        )
    else:
        records = await conn.fetch(
            f"""
            SELECT {_COLUMNS} FROM credentials
            WHERE (created_at, id) < ($1, $2)
            ORDER BY created_at DESC, id DESC LIMIT $3
            """,
            after[0],
            after[1],
            limit,
        )
    return [_row(r) for r in records]


async def get_credential(conn: Conn, credential_id: uuid.UUID) -> CredentialRow | None:
    record = await conn.fetchrow(f"SELECT {_COLUMNS} FROM credentials WHERE id = $1", credential_id)
    return _row(record) if record is not None else None


async def credential_provider(conn: Conn, credential_id: uuid.UUID) -> Provider | None:
    provider: Provider | None = await conn.fetchval(
        "SELECT provider FROM credentials WHERE id = $1", credential_id
    )
    return provider


async def delete_credential(conn: Conn, credential_id: uuid.UUID) -> bool:
    """False when there is no such credential; CredentialInUse when an agent references it."""
    try:
        deleted = await conn.fetchval(
            "DELETE FROM credentials WHERE id = $1 RETURNING id", credential_id
        )
    except asyncpg.ForeignKeyViolationError:
        raise CredentialInUse(str(credential_id)) from None
    return deleted is not None


async def replace_secret(
    conn: Conn,
    vault: Vault,
    *,
    tenant_id: uuid.UUID,
    credential_id: uuid.UUID,
    provider: Provider,
    secret: dict[str, str],
    mask: str,
    public_info: dict[str, Any],
) -> CredentialRow | None:
    """Rotate the secret of an existing credential of ``provider``; None if there is none."""
    sealed = _seal(
        vault, secret, tenant_id=tenant_id, credential_id=credential_id, provider=provider
    )
    record = await conn.fetchrow(
        f"""
        UPDATE credentials
        SET key_id = $3, nonce = $4, ciphertext = $5, mask = $6, public_info = $7,
            updated_at = now()
        WHERE id = $1 AND provider = $2
        RETURNING {_COLUMNS}
        """,
        credential_id,
        provider,
        sealed.key_id,
        sealed.nonce,
        sealed.ciphertext,
        mask,
        public_info,
    )
    return _row(record) if record is not None else None


async def load_credential_secret(
    conn: Conn, tenant_id: uuid.UUID, credential_id: uuid.UUID, *, vault: Vault
) -> CredentialSecret:
    """Decrypt a credential for immediate use (signed URLs, Twilio REST).

    Keep the result in local variables only: never log it, store it or put it in a response.
    Raises CredentialNotFound or CredentialUnreadable.
    """
    record = await conn.fetchrow(
        """
        SELECT provider, key_id, nonce, ciphertext FROM credentials
        WHERE id = $1 AND tenant_id = $2
        """,
        credential_id,
        tenant_id,
    )
    if record is None:
        raise CredentialNotFound(str(credential_id))
    provider: Provider = record["provider"]
    sealed = Sealed(key_id=record["key_id"], nonce=record["nonce"], ciphertext=record["ciphertext"])
    try:
        plaintext = vault.decrypt(
            sealed, tenant_id=tenant_id, credential_id=credential_id, provider=provider
        )
        fields = orjson.loads(plaintext)
    except (VaultError, orjson.JSONDecodeError) as exc:
        log.error(
            "credential could not be decrypted",
            extra={"credential_id": str(credential_id), "reason": type(exc).__name__},
        )
        raise CredentialUnreadable(str(credential_id)) from None
    if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
        raise CredentialUnreadable(str(credential_id))
    return CredentialSecret(provider=provider, secret=SecretFields(fields))
