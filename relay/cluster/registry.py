"""The call registry in Redis: which replica owns each call's upstream bridge, under a fenced lease.

Keys (all under the settings' prefix; the call id is a hash tag so a call's keys share one Redis
Cluster slot):

- ``replica:<replica_id>``: the replica's heartbeat, ``SET PX replica_ttl`` every third of the TTL.
  A replica whose key is gone is dead.
- ``call:{<call_id>}``: a hash: ``owner``, ``epoch``, ``lease_until_ms``, ``state``
  (starting | active | ended), ``tenant_id``, ``conversation_ids`` (JSON list), ``usage`` (JSON,
  cumulative totals as last reported by the owner), ``seq`` (the owner's call-log sequence),
  ``pinned`` ("1" for a call that cannot move: its caller's connection, a phone line, lives on the
  owner, so when the owner dies nobody can take the call over; it is ended instead).
- ``call-epoch:{<call_id>}``: an INCR counter; every ownership change takes the next epoch.

Every write by an owner names its epoch and happens in a Lua script that first checks the hash
still says ``owner == me and epoch == mine``: a replica that lost its lease can never write again
(fencing). Lease times come from Redis's own clock (``TIME``), so replica clocks may disagree.

A claim succeeds when the call has no owner, the owner's lease has expired, or the caller proves
the owner dead (its heartbeat key is gone, or nobody serves the call's owner channel): the proof
is checked by the caller and passed in as the owner and epoch it saw, and the script takes over
only if those are still current (compare-and-set), so two replicas racing for the same dead
owner's call cannot both win. The heartbeat key is not read inside the script because it lives in
another Cluster slot.

After a Redis restart (or a flush) the keys are gone; each replica writes back what it holds with
``restore``, which only writes a call that is absent, so a replica that already claimed the call
meanwhile keeps it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from voicerelay.cancellation import cancel_until_done
from voicerelay.settings import Settings

log = logging.getLogger(__name__)

REDIS_ERRORS = (RedisError, OSError, TimeoutError)

# How long a call's record outlives its last write: long enough for a successor to read the
# usage and conversation ids of a crashed owner, and for an ended call to refuse reconnects.
RECORD_TTL_MS = 3_600_000
ENDED_RECORD_TTL_MS = 600_000

OWNERSHIP_CHANGES = Counter(
    "voicerelay_relay_call_ownership_total",
    "Call ownership transitions on this replica, by kind (claimed, taken_over, restored, lost, "
    "released).",
    ["kind"],
)
REGISTRY_ERRORS = Counter(
    "voicerelay_relay_call_registry_errors_total",
    "Call registry operations that failed because Redis could not be reached.",
    ["operation"],
)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] = call hash, KEYS[2] = epoch counter.
# ARGV = me, lease_ms, tenant_id, expected_owner ('' = none), expected_epoch, record ttl ms,
# pinned ('1' or '0').
# Returns {epoch} when claimed, {0, owner} when someone else holds a live lease, {-1} when the
# call has ended.
CLAIM_SCRIPT = (
    _NOW
    + """
local me, lease, tenant = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local expected_owner, expected_epoch, ttl, pinned = ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7]
local f = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'lease_until_ms', 'state')
local owner, epoch, lease_until, state = f[1] or '', f[2] or '0', tonumber(f[3] or '0'), f[4]
if state == 'ended' then
    return {-1}
end
local free = owner == '' or owner == me or lease_until <= now
    or (expected_owner ~= '' and owner == expected_owner and epoch == expected_epoch)
if not free then
    return {0, owner}
end
local new_epoch = redis.call('INCR', KEYS[2])
if new_epoch <= tonumber(epoch) then
    -- The counter was lost (Redis restart) but the record was restored: stay monotonic.
    new_epoch = tonumber(epoch) + 1
    redis.call('SET', KEYS[2], new_epoch)
end
redis.call('HSET', KEYS[1], 'owner', me, 'epoch', new_epoch, 'lease_until_ms', now + lease,
    'state', 'starting', 'tenant_id', tenant, 'pinned', pinned)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return {new_epoch}
"""
)

# KEYS[1] = call hash, KEYS[2] = epoch counter. ARGV = me, epoch, lease_ms, record ttl ms, then
# field/value pairs to write with the renewal. Returns 1 renewed, 0 someone else owns the call
# (or it ended), -1 the record is gone.
RENEW_SCRIPT = (
    _NOW
    + """
local me, epoch, lease, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local f = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'state')
if not f[2] then
    return -1
end
if f[1] ~= me or f[2] ~= epoch or f[3] == 'ended' then
    return 0
end
redis.call('HSET', KEYS[1], 'lease_until_ms', now + lease)
for i = 5, #ARGV, 2 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
"""
)

# KEYS[1] = call hash. ARGV = me, epoch, ended ('1' keeps a tombstone, '0' hands the call to the
# next claimer), tombstone ttl ms. Returns 1 if it was ours.
RELEASE_SCRIPT = """
local me, epoch, ended, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local f = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if f[1] ~= me or f[2] ~= epoch then
    return 0
end
if ended == '1' then
    redis.call('HSET', KEYS[1], 'state', 'ended', 'owner', '', 'lease_until_ms', 0)
    redis.call('PEXPIRE', KEYS[1], ttl)
else
    redis.call('HSET', KEYS[1], 'owner', '', 'lease_until_ms', 0)
end
return 1
"""

# KEYS[1] = call hash, KEYS[2] = epoch counter. ARGV = me, epoch, lease_ms, record ttl ms, then
# field/value pairs. Writes the record only if it is absent. Returns 1 when the call is ours
# (restored now or already), 0 when someone else has it, -1 when it ended.
RESTORE_SCRIPT = (
    _NOW
    + """
local me, epoch, lease, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local f = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'state')
if f[2] then
    if f[3] == 'ended' then
        return -1
    end
    if f[1] == me and f[2] == epoch then
        return 1
    end
    return 0
end
redis.call('HSET', KEYS[1], 'owner', me, 'epoch', epoch, 'lease_until_ms', now + lease)
for i = 5, #ARGV, 2 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ttl)
local counter = tonumber(redis.call('GET', KEYS[2]) or '0')
if counter < tonumber(epoch) then
    redis.call('SET', KEYS[2], epoch)
end
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
"""
)

# KEYS[1] = call hash. Returns {fields..., now_ms, pinned}.
LOOKUP_SCRIPT = (
    _NOW
    + """
local f = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'lease_until_ms', 'state', 'tenant_id',
    'conversation_ids', 'usage', 'seq', 'pinned')
local pinned = f[9] or ''
for i = 1, 8 do
    if not f[i] then f[i] = '' end
end
f[9] = tostring(now)
f[10] = pinned
return f
"""
)


class RegistryUnavailable(Exception):
    """Redis could not be asked."""


class Renewal(enum.Enum):
    RENEWED = "renewed"
    LOST = "lost"  # someone else owns the call now (or it ended): stop quietly
    MISSING = "missing"  # the record is gone (Redis restarted or was flushed): restore it


class Restore(enum.Enum):
    OURS = "ours"
    TAKEN = "taken"
    ENDED = "ended"


@dataclass(frozen=True)
class CallRecord:
    call_id: uuid.UUID
    owner: str
    epoch: int
    lease_until_ms: int
    state: str
    tenant_id: str
    conversation_ids: list[str]
    usage: dict[str, Any]
    seq: int
    now_ms: int
    owner_alive: bool = False
    # The call cannot move to another replica (a phone leg): never taken over, only ended.
    pinned: bool = False

    @property
    def ended(self) -> bool:
        return self.state == "ended"

    @property
    def lease_valid(self) -> bool:
        return bool(self.owner) and self.lease_until_ms > self.now_ms

    @property
    def has_live_owner(self) -> bool:
        return self.lease_valid and self.owner_alive


@dataclass
class OwnedCall:
    """What an owner reports about its call with each renewal (and restores after a flush)."""

    tenant_id: str
    state: str = "starting"
    conversation_ids: list[str] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    pinned: bool = False

    def fields(self) -> list[str]:
        return [
            "pinned",
            "1" if self.pinned else "0",
            "state",
            self.state,
            "tenant_id",
            self.tenant_id,
            "conversation_ids",
            orjson.dumps(self.conversation_ids).decode(),
            "usage",
            orjson.dumps(self.usage).decode(),
            "seq",
            str(self.seq),
        ]


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


class ClusterRegistry:
    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        replica_id: str,
        *,
        timeout: float = 2.0,
    ) -> None:
        self._redis = redis
        self._settings = settings
        self.replica_id = replica_id
        self.lease_ms = max(1000, round(settings.call_owner_lease_seconds * 1000))
        self.replica_ttl_ms = max(1000, round(settings.replica_ttl_seconds * 1000))
        self._timeout = timeout
        self._claim = redis.register_script(CLAIM_SCRIPT)
        self._renew = redis.register_script(RENEW_SCRIPT)
        self._release = redis.register_script(RELEASE_SCRIPT)
        self._restore = redis.register_script(RESTORE_SCRIPT)
        self._lookup = redis.register_script(LOOKUP_SCRIPT)
        self.started_at = time.time()

    # --- keys ---------------------------------------------------------------------------------
    def replica_key(self, replica_id: str) -> str:
        return self._settings.redis_key("replica", replica_id)

    def call_key(self, call_id: uuid.UUID | str) -> str:
        return self._settings.redis_key("call", "{" + str(call_id) + "}")

    def epoch_key(self, call_id: uuid.UUID | str) -> str:
        return self._settings.redis_key("call-epoch", "{" + str(call_id) + "}")

    @property
    def renew_interval_seconds(self) -> float:
        return self.lease_ms / 3000

    @property
    def heartbeat_interval_seconds(self) -> float:
        return self.replica_ttl_ms / 3000

    async def _call(self, operation: str, coro: Any) -> Any:
        try:
            async with asyncio.timeout(self._timeout):
                return await coro
        except REDIS_ERRORS as exc:
            REGISTRY_ERRORS.labels(operation).inc()
            raise RegistryUnavailable(f"{operation}: {type(exc).__name__}") from None

    # --- replicas -----------------------------------------------------------------------------
    async def heartbeat(self, *, draining: bool = False) -> None:
        value = orjson.dumps(
            {
                "started_at": self.started_at,
                "host": socket.gethostname(),
                "draining": draining,
            }
        )
        await self._call(
            "heartbeat",
            self._redis.set(self.replica_key(self.replica_id), value, px=self.replica_ttl_ms),
        )

    async def forget_replica(self) -> None:
        """Remove this replica's heartbeat (a clean exit: its calls may be claimed at once)."""
        await self._call("heartbeat", self._redis.delete(self.replica_key(self.replica_id)))

    async def replica_alive(self, replica_id: str) -> bool:
        return bool(await self._call("replica", self._redis.exists(self.replica_key(replica_id))))

    async def live_replicas(self) -> dict[str, dict[str, Any]]:
        """Every replica with a heartbeat, with what it reported (SCAN: not for hot paths)."""
        pattern = self.replica_key("*")
        prefix_len = len(self.replica_key(""))
        found: dict[str, dict[str, Any]] = {}

        async def scan() -> None:
            keys = [key async for key in self._redis.scan_iter(match=pattern, count=500)]
            if not keys:
                return
            values = await self._redis.mget(keys)
            for key, value in zip(keys, values, strict=True):
                if value is None:
                    continue
                name = key.decode() if isinstance(key, bytes) else str(key)
                try:
                    info = orjson.loads(value)
                except orjson.JSONDecodeError:
                    info = {}
                found[name[prefix_len:]] = info if isinstance(info, dict) else {}

        await self._call("replicas", scan())
        return found

    # --- calls --------------------------------------------------------------------------------
    async def claim(
        self,
        call_id: uuid.UUID,
        tenant_id: uuid.UUID | str,
        *,
        dead_owner: CallRecord | None = None,
        pinned: bool = False,
    ) -> int | None:
        """Become the call's owner; returns the new epoch, or None if another replica holds it.

        ``dead_owner`` is the record the caller saw for an owner it found dead (no heartbeat, or
        nobody on its owner channel): the claim then succeeds if that owner and epoch are still
        the current ones. Raises ``CallEndedInRegistry`` when the call has ended. ``pinned``
        marks a call that must never be taken over (see the module docstring).
        """
        expected_owner, expected_epoch = "", ""
        if dead_owner is not None and dead_owner.owner:
            expected_owner, expected_epoch = dead_owner.owner, str(dead_owner.epoch)
        result = await self._call(
            "claim",
            self._claim(
                keys=[self.call_key(call_id), self.epoch_key(call_id)],
                args=[
                    self.replica_id,
                    self.lease_ms,
                    str(tenant_id),
                    expected_owner,
                    expected_epoch,
                    RECORD_TTL_MS,
                    "1" if pinned else "0",
                ],
            ),
        )
        code = int(result[0])
        if code == -1:
            raise CallEndedInRegistry(str(call_id))
        if code == 0:
            return None
        OWNERSHIP_CHANGES.labels("taken_over" if expected_owner else "claimed").inc()
        return code

    async def renew(self, call_id: uuid.UUID, epoch: int, report: OwnedCall | None) -> Renewal:
        """Extend our lease (and write the report with it). Raises ``RegistryUnavailable``."""
        result = await self._call(
            "renew",
            self._renew(
                keys=[self.call_key(call_id), self.epoch_key(call_id)],
                args=[
                    self.replica_id,
                    str(epoch),
                    self.lease_ms,
                    RECORD_TTL_MS,
                    *(report.fields() if report is not None else []),
                ],
            ),
        )
        code = int(result)
        if code == 1:
            return Renewal.RENEWED
        if code == -1:
            return Renewal.MISSING
        OWNERSHIP_CHANGES.labels("lost").inc()
        return Renewal.LOST

    async def restore(self, call_id: uuid.UUID, epoch: int, report: OwnedCall) -> Restore:
        """Write our ownership back if the record is absent (after a Redis restart)."""
        result = await self._call(
            "restore",
            self._restore(
                keys=[self.call_key(call_id), self.epoch_key(call_id)],
                args=[self.replica_id, str(epoch), self.lease_ms, RECORD_TTL_MS, *report.fields()],
            ),
        )
        code = int(result)
        if code == 1:
            OWNERSHIP_CHANGES.labels("restored").inc()
            return Restore.OURS
        if code == -1:
            return Restore.ENDED
        OWNERSHIP_CHANGES.labels("lost").inc()
        return Restore.TAKEN

    async def release(self, call_id: uuid.UUID, epoch: int, *, ended: bool) -> bool:
        """Give the call up if it is still ours. ``ended`` leaves a tombstone that refuses
        reconnects for a while; otherwise the next claimer takes over at once (a hand-over)."""
        result = await self._call(
            "release",
            self._release(
                keys=[self.call_key(call_id)],
                args=[self.replica_id, str(epoch), "1" if ended else "0", ENDED_RECORD_TTL_MS],
            ),
        )
        if int(result) == 1:
            OWNERSHIP_CHANGES.labels("released").inc()
            return True
        return False

    async def lookup(self, call_id: uuid.UUID) -> CallRecord | None:
        """The call's record, with whether its owner's heartbeat is there; None if unknown."""
        raw = await self._call("lookup", self._lookup(keys=[self.call_key(call_id)], args=[]))
        values = [v.decode() if isinstance(v, bytes) else str(v) for v in raw]
        record = parse_record(call_id, values)
        if record is None:
            return None
        if record.owner and record.lease_valid:
            alive = record.owner == self.replica_id or await self.replica_alive(record.owner)
            record = _with_alive(record, alive)
        return record


class CallEndedInRegistry(Exception):
    """The registry says the call has ended (its owner released it as ended)."""


def _with_alive(record: CallRecord, alive: bool) -> CallRecord:
    return CallRecord(**{**record.__dict__, "owner_alive": alive})


def _json(text: str, default: Any) -> Any:
    if not text:
        return default
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return default


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def parse_record(call_id: uuid.UUID, values: list[str]) -> CallRecord | None:
    """A record from LOOKUP_SCRIPT's reply (pure); None when the call has no record."""
    owner, epoch, lease_until, state, tenant, conversations, usage, seq, now = values[:9]
    pinned = len(values) > 9 and values[9] == "1"
    if not epoch:
        return None
    conversation_ids = _json(conversations, [])
    usage_totals = _json(usage, {})
    return CallRecord(
        call_id=call_id,
        owner=owner,
        epoch=_int(epoch),
        lease_until_ms=_int(lease_until),
        state=state,
        tenant_id=tenant,
        conversation_ids=[c for c in conversation_ids if isinstance(c, str)]
        if isinstance(conversation_ids, list)
        else [],
        usage=dict(usage_totals) if isinstance(usage_totals, Mapping) else {},
        seq=_int(seq),
        now_ms=_int(now),
        pinned=pinned,
    )


class Heartbeat:
    """Keeps this replica's heartbeat key alive; logs (once per outage) when Redis is away and
    calls ``on_restored`` when a heartbeat succeeds again after failing."""

    def __init__(self, registry: ClusterRegistry) -> None:
        self._registry = registry
        self.draining = False
        self.healthy = False
        self._task: asyncio.Task[None] | None = None
        self.on_restored: list[Any] = []

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="replica-heartbeat")

    async def beat(self) -> None:
        await self._registry.heartbeat(draining=self.draining)

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self.beat()
                self.healthy = True
                if failing:
                    failing = False
                    log.info("replica heartbeat restored")
                    for callback in list(self.on_restored):
                        try:
                            await callback()
                        except Exception:
                            log.exception("restore after a Redis outage failed")
            except RegistryUnavailable:
                self.healthy = False
                if not failing:
                    failing = True
                    log.warning("replica heartbeat failed: Redis unreachable; calls go on")
            except Exception:
                log.exception("replica heartbeat failed")
            await asyncio.sleep(self._registry.heartbeat_interval_seconds)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_until_done([self._task])
            self._task = None
