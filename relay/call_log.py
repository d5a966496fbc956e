"""The relay's producer of call-log events: a bounded, retrying buffer in front of the Redis Stream.

Audio must never wait on logging, so ``emit`` only appends to an in-memory buffer and returns;
``run`` (one background task per relay) appends the buffer to the stream in order, in pipelined
batches. When Redis is unreachable the buffer holds up to ``relay_call_log_buffer_events`` events
and the flusher retries with capped exponential backoff; past that the *oldest* event is dropped
(counted, and logged at most once per interval), because the newest (ended, final usage) matter
most. ``close`` flushes what it can before a deadline.

Contract for callers:

- Build each event once with ``voicerelay.call_events.make_event`` and emit that object. Its
  ``event_id`` is kept on every retry, so an append that reached Redis but whose reply was lost is
  a harmless duplicate the consumer recognises.
- ``seq`` is the caller's business: keep one counter per call, increment it for every event of
  that call (and continue it when a call is taken over). The producer never renumbers.
- Events are appended in emit order, so the order of each call's events is preserved.
- Not thread-safe: call ``emit`` from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay.metrics import (
    CALL_LOG_APPEND_FAILURES,
    CALL_LOG_APPENDED,
    CALL_LOG_BUFFERED,
    CALL_LOG_DROPPED,
)
from voicerelay.call_events import CallEvent, InvalidCallEvent, encode_event
from voicerelay.settings import Settings

log = logging.getLogger(__name__)

_REDIS_ERRORS = (RedisError, OSError, TimeoutError)
_BATCH_EVENTS = 200
_LOG_INTERVAL_SECONDS = 30.0
_INITIAL_BACKOFF_SECONDS = 0.05
_SEND_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, eq=False)
class _Pending:
    event: CallEvent
    fields: dict[str, str]


class _RateLimitedLog:
    """A warning at most once per interval, with how many times it happened meanwhile."""

    def __init__(self, message: str, interval: float = _LOG_INTERVAL_SECONDS) -> None:
        self._message = message
        self._interval = interval
        self._last = -math.inf
        self._suppressed = 0

    def hit(self, *, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        count, self._suppressed, self._last = self._suppressed + 1, 0, now
        log.warning(self._message, count, exc_info=exc_info)


class CallLogProducer:
    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        *,
        buffer_events: int | None = None,
        max_backoff: float = 5.0,
    ) -> None:
        self._redis = redis
        self._stream = settings.redis_key(settings.call_events_stream)
        self._maxlen = settings.call_events_stream_maxlen
        self._capacity = buffer_events or settings.relay_call_log_buffer_events
        self._max_backoff = max_backoff
        self._buffer: collections.deque[_Pending] = collections.deque()
        self._wakeup = asyncio.Event()
        self._stop = asyncio.Event()
        self._done = asyncio.Event()
        self._running = False
        self._closing = False
        self._deadline = math.inf
        self._backoff = 0.0
        self._healthy = True
        self._dropped_log = _RateLimitedLog("call-log buffer full; dropped %d oldest events")
        self._failed_log = _RateLimitedLog("cannot append call-log events to Redis (%d attempts)")
        self._late_log = _RateLimitedLog("call-log events emitted after close: %d dropped")

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def emit(self, event: CallEvent) -> None:
        """Queue the event for the stream. Never blocks, never raises for Redis trouble."""
        if self._closing:
            CALL_LOG_DROPPED.labels("closed").inc()
            self._late_log.hit()
            return
        try:
            fields = encode_event(event)
        except InvalidCallEvent as exc:
            CALL_LOG_DROPPED.labels("invalid").inc()
            log.error("call-log event cannot be encoded; dropped", extra={"reason": exc.reason})
            return
        if len(self._buffer) >= self._capacity:
            self._buffer.popleft()
            CALL_LOG_DROPPED.labels("buffer_full").inc()
            self._dropped_log.hit()
        self._buffer.append(_Pending(event, fields))
        CALL_LOG_BUFFERED.set(len(self._buffer))
        self._wakeup.set()

    async def run(self) -> None:
        """Append buffered events until ``close``; start it once, as a background task."""
        self._running = True
        self._done.clear()
        try:
            while True:
                if not self._buffer:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if self._closing and asyncio.get_running_loop().time() >= self._deadline:
                    return
                if await self._send_batch():
                    self._backoff = 0.0
                else:
                    await self._pause()
        finally:
            self._running = False
            self._done.set()

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 (the agreed interface)
        """Stop accepting events and flush the buffer for at most ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        self._closing = True
        self._deadline = loop.time() + timeout
        self._stop.set()
        self._wakeup.set()
        with contextlib.suppress(TimeoutError):
            if self._running:
                await asyncio.wait_for(self._done.wait(), timeout)
            else:
                await asyncio.wait_for(self.run(), timeout)
        if self._buffer:
            lost = len(self._buffer)
            CALL_LOG_DROPPED.labels("closed").inc(lost)
            log.error("call-log events not appended before shutdown: %d lost", lost)
            self._buffer.clear()
            CALL_LOG_BUFFERED.set(0)

    async def _send_batch(self) -> bool:
        batch = [self._buffer[i] for i in range(min(_BATCH_EVENTS, len(self._buffer)))]
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for pending in batch:
                    pipe.xadd(
                        self._stream,
                        pending.fields,  # type: ignore[arg-type]
                        maxlen=self._maxlen,
                        approximate=True,
                    )
                results = await asyncio.wait_for(
                    pipe.execute(raise_on_error=False), self._send_timeout()
                )
        except _REDIS_ERRORS:
            CALL_LOG_APPEND_FAILURES.inc()
            self._healthy = False
            self._failed_log.hit(exc_info=True)
            return False
        for pending, result in zip(batch, results, strict=True):
            # emit may have dropped the oldest entries meanwhile; the rest are still in front.
            if self._buffer and self._buffer[0] is pending:
                self._buffer.popleft()
            if isinstance(result, Exception):
                # Redis refused this entry itself; retrying it would block everything behind it.
                CALL_LOG_DROPPED.labels("rejected").inc()
                log.error(
                    "Redis rejected a call-log event; dropped",
                    extra={"event_type": pending.event.type, "error": type(result).__name__},
                )
            else:
                CALL_LOG_APPENDED.inc()
        CALL_LOG_BUFFERED.set(len(self._buffer))
        if not self._healthy:
            self._healthy = True
            log.info("call-log events are reaching Redis again")
        return True

    def _send_timeout(self) -> float:
        remaining = self._deadline - asyncio.get_running_loop().time()
        return max(0.001, min(_SEND_TIMEOUT_SECONDS, remaining))

    async def _pause(self) -> None:
        self._backoff = min(self._max_backoff, max(_INITIAL_BACKOFF_SECONDS, self._backoff * 2))
        # Jitter, so replicas that lost Redis together do not come back in lockstep.
        delay = self._backoff * random.uniform(0.5, 1.0)
        if self._closing:
            await asyncio.sleep(
                min(delay, max(0.0, self._deadline - asyncio.get_running_loop().time()))
            )
            return
        with contextlib.suppress(TimeoutError):
            # close() cuts the wait short so the final flush starts at once.
            await asyncio.wait_for(self._stop.wait(), delay)
