"""Key rotation: `voicerelay credentials rewrap` moves every credential to the active key.

These tests use their own database: rewrap touches every tenant's rows, and the shared test
database holds rows other tests deliberately corrupted.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import pytest
from click.testing import CliRunner

from control_api.bootstrap import new_id
from control_api.credential_store import create_credential, load_credential_secret
from control_api.db import create_pool, tenant_tx
from control_api.rewrap import RewrapRefused, rewrap_credentials
from control_api.vault import Vault
from tests.conftest import APP_LOGIN, RUN_ID
from tests.support.services import Services
from voicerelay.cli import main
from voicerelay.devstack import bootstrap_database
from voicerelay.settings import Settings, get_settings

KEY1, KEY2, KEY3 = (os.urandom(32) for _ in range(3))


def b64(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode()


@dataclass(frozen=True)
class VaultDb:
    owner_dsn: str
    app_dsn: str


@dataclass(frozen=True)
class Stored:
    tenant_id: uuid.UUID
    credential_id: uuid.UUID
    api_key: str


@pytest.fixture(scope="module")
def vault_db(services: Services) -> Iterator[VaultDb]:
    name = f"vrt_{RUN_ID}_rewrap"
    owner_dsn, app_dsn = asyncio.run(
        bootstrap_database(services.admin_dsn, name, app_login=APP_LOGIN)
    )
    yield VaultDb(owner_dsn=owner_dsn, app_dsn=app_dsn)

    async def drop() -> None:
        conn = await asyncpg.connect(services.admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())


async def seed(db: VaultDb, settings: Settings, vault: Vault, count: int) -> list[Stored]:
    """Empties the credentials table, then stores ``count`` credentials over two tenants."""
    owner = await asyncpg.connect(db.owner_dsn)
    tenants = [new_id(), new_id()]
    try:
        await owner.execute("DELETE FROM credentials")
        for t in tenants:
            await owner.execute(
                "INSERT INTO tenants (id, name, slug) VALUES ($1, 'Rewrap', $2)", t, f"rw-{t.hex}"
            )
    finally:
        await owner.close()
    pool = await create_pool(settings, dsn=db.app_dsn)
    stored: list[Stored] = []
    try:
        for i in range(count):
            tenant_id = tenants[i % 2]
            api_key = f"sk_rewrap_{uuid.uuid4().hex}"
            async with tenant_tx(pool, tenant_id) as conn:
                row = await create_credential(
                    conn,
                    vault,
                    tenant_id=tenant_id,
                    provider="elevenlabs",
                    name=f"c{i}",
                    secret={"api_key": api_key},
                    mask="\u2026" + api_key[-4:],
                    public_info={},
                )
            stored.append(Stored(tenant_id, row.id, api_key))
    finally:
        await pool.close()
    return stored


async def key_ids(db: VaultDb) -> dict[uuid.UUID, str]:
    conn = await asyncpg.connect(db.owner_dsn)
    try:
        return {
            r["id"]: r["key_id"] for r in await conn.fetch("SELECT id, key_id FROM credentials")
        }
    finally:
        await conn.close()


async def decrypt_all(db: VaultDb, settings: Settings, vault: Vault, stored: list[Stored]) -> None:
    pool = await create_pool(settings, dsn=db.app_dsn)
    try:
        for s in stored:
            async with tenant_tx(pool, s.tenant_id) as conn:
                provider, secret = await load_credential_secret(
                    conn, s.tenant_id, s.credential_id, vault=vault
                )
            assert (provider, secret) == ("elevenlabs", {"api_key": s.api_key})
    finally:
        await pool.close()


async def test_rewrap_moves_every_row_to_the_active_key(
    vault_db: VaultDb, settings: Settings
) -> None:
    stored = await seed(vault_db, settings, Vault([("k1", KEY1)]), 5)
    rotated = Vault([("k2", KEY2), ("k1", KEY1)])
    # Before the rewrap, the rotated keyring still reads key-1 rows.
    await decrypt_all(vault_db, settings, rotated, stored)

    report = await rewrap_credentials(vault_db.owner_dsn, rotated, batch_size=2)
    assert (report.rewrapped, report.batches, report.failed, report.remaining) == (5, 3, [], 0)
    assert set((await key_ids(vault_db)).values()) == {"k2"}
    # Key 1 can now be retired.
    await decrypt_all(vault_db, settings, Vault([("k2", KEY2)]), stored)

    again = await rewrap_credentials(vault_db.owner_dsn, rotated, batch_size=2)
    assert (again.rewrapped, again.batches, again.remaining) == (0, 0, 0)


async def test_rewrap_reports_rows_it_cannot_decrypt_and_carries_on(
    vault_db: VaultDb, settings: Settings
) -> None:
    stored = await seed(vault_db, settings, Vault([("k1", KEY1)]), 4)
    victim, moved = stored[0], stored[1]
    owner = await asyncpg.connect(vault_db.owner_dsn)
    try:
        # One row is tampered with, another has a ciphertext copied from a different row.
        await owner.execute(
            "UPDATE credentials SET ciphertext = set_byte(ciphertext, 0, get_byte(ciphertext, 0) # 1)"
            " WHERE id = $1",
            victim.credential_id,
        )
        await owner.execute(
            "UPDATE credentials AS a SET nonce = b.nonce, ciphertext = b.ciphertext"
            " FROM credentials AS b WHERE a.id = $1 AND b.id = $2",
            moved.credential_id,
            stored[2].credential_id,
        )
    finally:
        await owner.close()
    rotated = Vault([("k2", KEY2), ("k1", KEY1)])
    report = await rewrap_credentials(vault_db.owner_dsn, rotated, batch_size=1)
    assert sorted(report.failed) == sorted([victim.credential_id, moved.credential_id])
    assert report.rewrapped == 2
    assert report.remaining == 0
    ids = await key_ids(vault_db)
    assert ids[victim.credential_id] == "k1"
    assert ids[stored[2].credential_id] == ids[stored[3].credential_id] == "k2"


async def test_rewrap_skips_rows_locked_by_the_api(vault_db: VaultDb, settings: Settings) -> None:
    stored = await seed(vault_db, settings, Vault([("k1", KEY1)]), 3)
    rotated = Vault([("k2", KEY2), ("k1", KEY1)])
    locker = await asyncpg.connect(vault_db.owner_dsn)
    try:
        tx = locker.transaction()
        await tx.start()
        await locker.execute(
            "SELECT 1 FROM credentials WHERE id = $1 FOR UPDATE", stored[0].credential_id
        )
        report = await rewrap_credentials(vault_db.owner_dsn, rotated, batch_size=10)
        assert (report.rewrapped, report.remaining, report.failed) == (2, 1, [])
        await tx.rollback()
    finally:
        await locker.close()
    report = await rewrap_credentials(vault_db.owner_dsn, rotated, batch_size=10)
    assert (report.rewrapped, report.remaining) == (1, 0)
    await decrypt_all(vault_db, settings, Vault([("k2", KEY2)]), stored)


async def test_rewrap_refuses_a_role_under_rls(vault_db: VaultDb) -> None:
    with pytest.raises(RewrapRefused):
        await rewrap_credentials(vault_db.app_dsn, Vault([("k2", KEY2)]))


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, vault_db: VaultDb) -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    for name in ("DATABASE_URL", "REDIS_URL", "SIGNING_KEYS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MIGRATION_DATABASE_URL", vault_db.owner_dsn)
    monkeypatch.setenv("LOG_FORMAT", "text")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
    # The command configures logging for the process; give pytest its handlers back.
    root.handlers[:] = handlers
    root.setLevel(level)


def test_rewrap_command(
    cli_env: None, monkeypatch: pytest.MonkeyPatch, vault_db: VaultDb, settings: Settings
) -> None:
    stored = asyncio.run(seed(vault_db, settings, Vault([("k1", KEY1)]), 3))
    monkeypatch.setenv("ENCRYPTION_KEYS", f"k3:{b64(KEY3)},k2:{b64(KEY2)},k1:{b64(KEY1)}")
    get_settings.cache_clear()
    runner = CliRunner()

    result = runner.invoke(main, ["credentials", "rewrap", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "rewrapped 3 credential(s) to key 'k3' in 2 batch(es); 0 remaining; 0 failed" in (
        result.output
    )
    assert set(asyncio.run(key_ids(vault_db)).values()) == {"k3"}
    asyncio.run(decrypt_all(vault_db, settings, Vault([("k3", KEY3)]), stored))
    for s in stored:
        assert s.api_key not in result.output

    result = runner.invoke(main, ["credentials", "rewrap"])
    assert result.exit_code == 0, result.output
    assert "rewrapped 0 credential(s)" in result.output

    # Dropping a key that rows still use is reported, with a non-zero exit status.
    monkeypatch.setenv("ENCRYPTION_KEYS", f"k4:{b64(os.urandom(32))}")
    get_settings.cache_clear()
    result = runner.invoke(main, ["credentials", "rewrap"])
    assert result.exit_code == 1
    assert "3 failed" in result.output
    assert "could not be decrypted" in result.output

    monkeypatch.delenv("ENCRYPTION_KEYS")
    get_settings.cache_clear()
    result = runner.invoke(main, ["credentials", "rewrap"])
    assert result.exit_code == 1
    assert "ENCRYPTION_KEYS is not set" in result.output
    assert runner.invoke(main, ["credentials", "rewrap", "--batch-size", "0"]).exit_code == 2
