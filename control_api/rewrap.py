"""Re-encrypt every credential under the vault's active key (`voicerelay credentials rewrap`).

Key rotation: put the new key FIRST in ENCRYPTION_KEYS everywhere (old keys stay listed, so
existing rows still decrypt), restart the services, run this, and remove an old key only once
it reports no rows remaining. It runs as the schema owner, which sees every tenant's rows; each
batch locks its rows with FOR UPDATE SKIP LOCKED and commits on its own, so it can run while the
API serves and can be interrupted and rerun at any point.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

import asyncpg

from control_api.vault import Sealed, Vault, VaultError

log = logging.getLogger(__name__)


class RewrapRefused(RuntimeError):
    pass


@dataclass
class RewrapReport:
    active_key_id: str
    rewrapped: int = 0
    batches: int = 0
    # Rows that could not be decrypted: leave their key configured and investigate.
    failed: list[uuid.UUID] = field(default_factory=list)
    # Rows still under another key, e.g. locked by a concurrent transaction during this run.
    remaining: int = 0


async def _check_sees_all_tenants(conn: asyncpg.Connection) -> None:
    bypass = await conn.fetchval(
        "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user"
    )
    if not bypass:
        # Under RLS without a tenant every row is invisible, and "0 rows" would look like success.
        raise RewrapRefused(
            "rewrap must connect as the schema owner (MIGRATION_DATABASE_URL), "
            "a role that bypasses row-level security"
        )


async def rewrap_credentials(dsn: str, vault: Vault, *, batch_size: int = 100) -> RewrapReport:
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    report = RewrapReport(active_key_id=vault.active_key_id)
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        await _check_sees_all_tenants(conn)
        while True:
            done = await _rewrap_batch(conn, vault, batch_size, report)
            if done == 0:
                break
        report.remaining = await conn.fetchval(
            "SELECT count(*) FROM credentials WHERE key_id <> $1 AND NOT (id = ANY($2::uuid[]))",
            vault.active_key_id,
            report.failed,
        )
    finally:
        await conn.close()
    return report


async def _rewrap_batch(
    conn: asyncpg.Connection, vault: Vault, batch_size: int, report: RewrapReport
) -> int:
    """Rewraps one batch in one transaction; returns how many rows it looked at."""
    async with conn.transaction():
        rows = await conn.fetch(
            """
            SELECT id, tenant_id, provider, key_id, nonce, ciphertext FROM credentials
            WHERE key_id <> $1 AND NOT (id = ANY($2::uuid[]))
            ORDER BY id
            LIMIT $3
            FOR UPDATE SKIP LOCKED
            """,
            vault.active_key_id,
            report.failed,
            batch_size,
        )
        updates: list[tuple[uuid.UUID, str, bytes, bytes]] = []
        for row in rows:
            sealed = Sealed(key_id=row["key_id"], nonce=row["nonce"], ciphertext=row["ciphertext"])
            try:
                fresh = vault.rewrap(
                    sealed,
                    tenant_id=row["tenant_id"],
                    credential_id=row["id"],
                    provider=row["provider"],
                )
            except VaultError as exc:
                log.error(
                    "credential could not be rewrapped",
                    extra={"credential_id": str(row["id"]), "reason": type(exc).__name__},
                )
                report.failed.append(row["id"])
                continue
            updates.append((row["id"], fresh.key_id, fresh.nonce, fresh.ciphertext))
        if updates:
            await conn.executemany(
                "UPDATE credentials SET key_id = $2, nonce = $3, ciphertext = $4 WHERE id = $1",
                updates,
            )
    if rows:
        report.batches += 1
        report.rewrapped += len(updates)
    return len(rows)
