"""Consumes relay call lifecycle events from the Redis Stream into Postgres.

Delivery is at least once and writing is idempotent, which together make every event land
exactly once:

- An entry is acknowledged only after the transaction holding its event has committed. If the
  process dies in between, the entry stays in the group's pending list; this consumer re-reads
  its own pending entries on start and after every error, and any consumer claims entries left
  idle by a dead one (XAUTOCLAIM). The redelivered event hits the event table's primary key and
  changes nothing.
- While Postgres is unreachable nothing is acknowledged; entries wait in the stream and are
  written when it is back.
- An entry that can never be written (not decodable, invalid, rejected by the database) is
  copied to ``<stream>:dlq`` with the reason and then acknowledged: never dropped silently.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from control_api.calllog import metrics
from control_api.calllog.apply import (
    TenantWrite,
    ensure_partitions_for,
    event_months,
    is_missing_partition,
    write_tenant_events,
)
from control_api.db import tenant_tx
from voicerelay.call_events import CallEvent, InvalidCallEvent, decode_event, encode_event
from voicerelay.settings import Settings

if TYPE_CHECKING:
    from control_api.state import AppState

log = logging.getLogger(__name__)

# Raw stream entry fields: bytes from Redis, str when re-encoded for the dead-letter stream.
Fields = Mapping[Any, Any]
Entry = tuple[str, Fields]


@dataclass(frozen=True)
class ConsumerOptions:
    stream_key: str
    group: str
    consumer_name: str
    batch_size: int = 200
    block_ms: int = 2000
    # Above the worst-case time to write a batch, so a live consumer's entries are never stolen.
    claim_idle_ms: int = 60_000
    claim_interval_seconds: float = 15.0
    # Older events would land in partitions already dropped by retention.
    max_event_age: timedelta = timedelta(days=400)
    max_clock_skew: timedelta = timedelta(days=1)
    dlq_maxlen: int = 100_000
    backoff_initial_seconds: float = 0.2
    backoff_max_seconds: float = 10.0

    @property
    def dlq_key(self) -> str:
        return f"{self.stream_key}:dlq"

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ConsumerOptions:
        options = cls(
            stream_key=settings.redis_key(settings.call_events_stream),
            group=settings.call_events_group,
            consumer_name=consumer_name(),
            max_event_age=timedelta(days=settings.call_log_max_retention_days),
        )
        return replace(options, **overrides)


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class BatchResult:
    """What became of a batch. ``written_ids`` are committed and may be acknowledged."""

    written_ids: list[str] = field(default_factory=list)
    failed_ids: list[str] = field(default_factory=list)
    dead_lettered: int = 0
    inserted: int = 0
    duplicates: int = 0
    error: BaseException | None = None


class BatchIncompleteError(RuntimeError):
    """Some entries of a batch could not be written yet; they stay pending."""


def is_permanent_db_error(exc: BaseException) -> bool:
    # Data and integrity errors will fail again on every retry; anything else (connection loss,
    # shutdown, timeouts, lock contention, a missing grant after a bad deploy) may heal, so the
    # events must wait for it rather than be dead-lettered.
    if not isinstance(exc, asyncpg.PostgresError) or is_missing_partition(exc):
        return False
    sqlstate = str(getattr(exc, "sqlstate", "") or "")
    return sqlstate[:2] in {"22", "23"}


class CallLogConsumer:
    def __init__(self, pool: asyncpg.Pool, redis: Redis, options: ConsumerOptions) -> None:
        self.pool = pool
        self.redis = redis
        self.options = options

    @property
    def name(self) -> str:
        return self.options.consumer_name

    # --- Redis side -----------------------------------------------------------------------
    async def ensure_group(self) -> None:
        try:
            # From the stream's start: entries the relay added before the group existed count.
            await self.redis.xgroup_create(
                self.options.stream_key, self.options.group, id="0", mkstream=True
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_pending(self) -> list[Entry]:
        """This consumer's own delivered-but-unacknowledged entries, oldest first."""
        return await self._read("0", block=None)

    async def read_new(self) -> list[Entry]:
        return await self._read(">", block=self.options.block_ms)

    async def _read(self, start: str, *, block: int | None) -> list[Entry]:
        response = await self.redis.xreadgroup(
            self.options.group,
            self.name,
            {self.options.stream_key: start},
            count=self.options.batch_size,
            block=block,
        )
        return _entries(response)

    async def claim_stale(self, *, max_rounds: int = 10) -> list[Entry]:
        """Take over entries that another (presumably dead) consumer left idle too long."""
        claimed: list[Entry] = []
        cursor = "0-0"
        for _ in range(max_rounds):
            response = await self.redis.xautoclaim(
                self.options.stream_key,
                self.options.group,
                self.name,
                min_idle_time=self.options.claim_idle_ms,
                start_id=cursor,
                count=self.options.batch_size,
            )
            cursor = _text(response[0])
            for entry_id, fields in response[1] or []:
                if entry_id is not None:
                    claimed.append((_text(entry_id), fields or {}))
            deleted = response[2] if len(response) > 2 else []
            if deleted:
                # Redis has already dropped these from the pending list: they were trimmed
                # from the stream before anyone wrote them.
                metrics.ENTRIES_TRIMMED.inc(len(deleted))
                log.warning(
                    "pending call events were trimmed from the stream before being written",
                    extra={"count": len(deleted), "stream": self.options.stream_key},
                )
            if cursor == "0-0":
                break
        if claimed:
            log.info(
                "claimed idle call events from another consumer",
                extra={"count": len(claimed), "consumer": self.name},
            )
        return claimed

    async def ack(self, ids: Sequence[str]) -> None:
        if ids:
            await self.redis.xack(self.options.stream_key, self.options.group, *ids)

    async def refresh_metrics(self) -> None:
        groups = await self.redis.xinfo_groups(self.options.stream_key)
        for info in groups:
            if _text(info.get("name", b"")) == self.options.group:
                metrics.CONSUMER_PENDING.set(int(info.get("pending") or 0))
                lag = info.get("lag")
                if lag is not None:  # Redis < 7 does not report it
                    metrics.CONSUMER_LAG.set(int(lag))

    async def _dead_letter(self, entries: Sequence[tuple[str, str, Fields]]) -> None:
        for entry_id, reason, fields in entries:
            record: dict[Any, Any] = dict(fields)
            record.update(
                {
                    "dlq_reason": reason,
                    "dlq_source_id": entry_id,
                    "dlq_consumer": self.name,
                    "dlq_at": datetime.now(UTC).isoformat(),
                }
            )
            await self.redis.xadd(
                self.options.dlq_key, record, maxlen=self.options.dlq_maxlen, approximate=True
            )
            metrics.EVENTS_DEAD_LETTERED.labels(reason=reason.split(":", 1)[0]).inc()
            log.warning(
                "call event moved to the dead-letter stream",
                extra={"entry_id": entry_id, "reason": reason, "dlq": self.options.dlq_key},
            )
        await self.ack([entry_id for entry_id, _, _ in entries])

    # --- Postgres side --------------------------------------------------------------------
    async def process(self, entries: Sequence[Entry]) -> BatchResult:
        """Write a batch; acknowledges only dead-lettered entries, never written ones.

        The caller acknowledges ``written_ids`` (see ``handle``); keeping the two apart lets a
        test stop between COMMIT and XACK exactly where a crash would.
        """
        started = time.perf_counter()
        result = BatchResult()
        now = datetime.now(UTC)
        dead: list[tuple[str, str, Fields]] = []
        by_tenant: dict[uuid.UUID, dict[uuid.UUID, tuple[CallEvent, list[str]]]] = {}
        for entry_id, fields in entries:
            if not fields:
                # A pending entry whose content was trimmed away: nothing left to write.
                metrics.ENTRIES_TRIMMED.inc()
                log.warning("pending call event was trimmed from the stream before being written")
                result.written_ids.append(entry_id)
                continue
            try:
                event = decode_event(fields)
            except InvalidCallEvent as exc:
                dead.append((entry_id, exc.reason, fields))
                continue
            if event.occurred_at < now - self.options.max_event_age:
                dead.append((entry_id, "too_old", fields))
                continue
            if event.occurred_at > now + self.options.max_clock_skew:
                dead.append((entry_id, "in_future", fields))
                continue
            events = by_tenant.setdefault(event.tenant_id, {})
            if event.event_id in events:
                events[event.event_id][1].append(entry_id)
            else:
                events[event.event_id] = (event, [entry_id])
        if dead:
            await self._dead_letter(dead)
            result.dead_lettered = len(dead)

        pending_tenants = list(by_tenant.items())
        for index, (tenant_id, events) in enumerate(pending_tenants):
            try:
                written = await self._write_tenant(tenant_id, [e for e, _ in events.values()])
            except Exception as exc:
                if not is_permanent_db_error(exc):
                    # Postgres is unavailable or unwell: leave this and every later tenant's
                    # entries pending for the retry.
                    result.error = exc
                    for _, later in pending_tenants[index:]:
                        for _, ids in later.values():
                            result.failed_ids.extend(ids)
                    break
                await self._isolate_rejected(tenant_id, events, result)
                if result.error is not None:
                    for _, later in pending_tenants[index + 1 :]:
                        for _, ids in later.values():
                            result.failed_ids.extend(ids)
                    break
                continue
            self._account(written, result)
            for _, ids in events.values():
                result.written_ids.extend(ids)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        return result

    async def _isolate_rejected(
        self,
        tenant_id: uuid.UUID,
        events: dict[uuid.UUID, tuple[CallEvent, list[str]]],
        result: BatchResult,
    ) -> None:
        """Write a rejected tenant batch one event at a time to find and dead-letter the culprit."""
        rejected: list[tuple[str, str, Fields]] = []
        for event, ids in events.values():
            try:
                written = await self._write_tenant(tenant_id, [event])
            except Exception as exc:
                if not is_permanent_db_error(exc):
                    result.error = exc
                    result.failed_ids.extend(ids)
                    continue
                sqlstate = str(getattr(exc, "sqlstate", "") or "unknown")
                for entry_id in ids:
                    rejected.append((entry_id, f"db_rejected:{sqlstate}", encode_event(event)))
                continue
            self._account(written, result)
            result.written_ids.extend(ids)
        if rejected:
            await self._dead_letter(rejected)
            result.dead_lettered += len(rejected)

    async def _write_tenant(self, tenant_id: uuid.UUID, events: list[CallEvent]) -> TenantWrite:
        for attempt in range(2):
            try:
                async with tenant_tx(self.pool, tenant_id) as conn:
                    return await write_tenant_events(conn, events)
            except asyncpg.CheckViolationError as exc:
                if attempt or not is_missing_partition(exc):
                    raise
            months = event_months(events)
            log.info(
                "creating call-log partitions for incoming events",
                extra={"months": [m.isoformat() for m in months]},
            )
            async with self.pool.acquire() as conn:
                await ensure_partitions_for(conn, months)
        raise AssertionError("unreachable")

    def _account(self, written: TenantWrite, result: BatchResult) -> None:
        result.inserted += len(written.inserted)
        result.duplicates += written.duplicates
        metrics.EVENTS_WRITTEN.inc(len(written.inserted))
        metrics.EVENTS_DUPLICATE.inc(written.duplicates)
        if written.unknown_calls:
            metrics.EVENTS_UNKNOWN_CALL.inc(len(written.unknown_calls))
            log.info(
                "call events recorded for calls without a row",
                extra={"call_ids": written.unknown_calls[:20]},
            )

    async def handle(self, entries: Sequence[Entry]) -> BatchResult:
        """Process a batch and acknowledge what was committed."""
        result = await self.process(entries)
        await self.ack(result.written_ids)
        return result

    # --- The loop -------------------------------------------------------------------------
    async def run(self) -> None:
        """Consume until cancelled. Every failure is logged, backed off and retried."""
        options = self.options
        backoff = options.backoff_initial_seconds
        recovering = True  # read our own pending entries before new ones
        group_ready = False
        next_claim = 0.0
        loop = asyncio.get_running_loop()
        log.info(
            "call-log consumer started",
            extra={"consumer": self.name, "stream": options.stream_key, "group": options.group},
        )
        while True:
            stage = "redis"
            try:
                if not group_ready:
                    await self.ensure_group()
                    group_ready = True
                if loop.time() >= next_claim:
                    next_claim = loop.time() + options.claim_interval_seconds
                    claimed = await self.claim_stale()
                    if claimed:
                        stage = "batch"
                        self._raise_if_incomplete(await self.handle(claimed))
                        stage = "redis"
                    await self.refresh_metrics()
                entries = await (self.read_pending() if recovering else self.read_new())
                if recovering and not entries:
                    recovering = False
                    continue
                if entries:
                    stage = "batch"
                    self._raise_if_incomplete(await self.handle(entries))
                backoff = options.backoff_initial_seconds
            except asyncio.CancelledError:
                log.info("call-log consumer stopped", extra={"consumer": self.name})
                raise
            except Exception as exc:
                metrics.CONSUMER_ERRORS.labels(stage=stage).inc()
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    group_ready = False
                recovering = True
                cause = exc.__cause__ if isinstance(exc, BatchIncompleteError) else exc
                log.warning(
                    "call-log consumer error; retrying",
                    extra={
                        "consumer": self.name,
                        "stage": stage,
                        "error": type(cause).__name__,
                        "detail": str(cause)[:300],
                        "retry_in_seconds": round(backoff, 2),
                    },
                )
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, options.backoff_max_seconds)

    @staticmethod
    def _raise_if_incomplete(result: BatchResult) -> None:
        if result.error is not None:
            raise BatchIncompleteError(
                f"{len(result.failed_ids)} call events not written yet"
            ) from result.error


def _entries(response: Any) -> list[Entry]:
    """Entries of an XREADGROUP reply on one stream (RESP2 list or RESP3 map shape)."""
    if not response:
        return []
    if isinstance(response, dict):
        batches = [v[0] if v and isinstance(v[0], list) else v for v in response.values()]
    else:
        batches = [items for _stream, items in response]
    return [
        (_text(entry_id), fields or {})
        for items in batches
        for entry_id, fields in items or []
        if entry_id is not None
    ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def run_call_log_consumer(state: AppState) -> None:
    consumer = CallLogConsumer(
        state.pool, state.redis, ConsumerOptions.from_settings(state.settings)
    )
    await consumer.run()
