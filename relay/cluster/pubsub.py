"""One replica's Redis pub/sub: a single listening connection with dynamic subscriptions, and a
single publishing connection that keeps every message in the order it was published.

Listening. One connection, one reader task. Channels are (un)subscribed while it runs;
``subscribe`` returns once Redis has confirmed the subscription, so a message published after
that (from anywhere) is delivered. Handlers run inline in the reader, one message at a time, in
arrival order: they must be quick (hand longer work to a queue). On Redis >= 7 the channels are
sharded (SSUBSCRIBE/SPUBLISH), otherwise plain; the server is asked once, on first connect.

The connection has no socket timeout (an idle subscriber must not time out) and TCP keepalive.
A dead server that never closes the socket is found by a PING after ``ping_interval`` of
silence: no reply within another interval and the connection is dropped. On any loss the reader
reconnects with capped backoff, resubscribes everything wanted at that moment, waits for the
confirmations, then runs the ``on_reconnect`` callbacks. The loss is logged at ERROR and
counted (``voicerelay_relay_pubsub_listener_restarts_total``); ``healthy`` is False until the
subscriptions are back (``/ready`` reports it).

Publishing. ``publish`` only queues (it never waits on Redis); one task sends the queue in
pipelined batches on its own connection, so messages reach Redis in ``publish`` order. While
Redis is unreachable the queue is bounded (oldest dropped) and messages older than
``max_delay`` are dropped rather than delivered late; both are counted.

Not Redis Cluster aware: sharded channels would need one listener per shard. The names already
carry hash tags where it matters (see ``channels``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from relay import metrics
from voicerelay.cancellation import cancel_until_done, failures

log = logging.getLogger(__name__)

LISTENER_RESTARTS = Counter(
    "voicerelay_relay_pubsub_listener_restarts_total",
    "Times the pub/sub listener lost its Redis connection (or failed) and started over.",
)
PUBLISH_DROPPED = Counter(
    "voicerelay_relay_pubsub_publish_dropped_total",
    "Messages not published, by reason (queue_full, stale, redis_error).",
    ["reason"],
)
_DROPPED_QUEUE_FULL = PUBLISH_DROPPED.labels("queue_full")
_DROPPED_STALE = PUBLISH_DROPPED.labels("stale")
_DROPPED_REDIS_ERROR = PUBLISH_DROPPED.labels("redis_error")

Handler = Callable[[bytes], Awaitable[None]]
ReconnectCallback = Callable[[], Awaitable[None]]

_MESSAGE_TYPES = frozenset({b"message", b"smessage"})
_SUBSCRIBED_TYPES = frozenset({b"subscribe", b"ssubscribe"})
_PUBLISH_BATCH = 256
_FIRST_BACKOFF = 0.05


def parse_redis_major(info: bytes | str) -> int | None:
    """The major version from ``INFO server`` text, or None."""
    text = info.decode(errors="replace") if isinstance(info, bytes) else info
    for line in text.splitlines():
        if line.startswith("redis_version:"):
            head = line.split(":", 1)[1].strip().split(".", 1)[0]
            return int(head) if head.isdigit() else None
    return None


class PubSub:
    def __init__(
        self,
        redis_url: str,
        *,
        backoff_cap: float = 2.0,
        ping_interval: float = 5.0,
        subscribe_timeout: float = 2.0,
        connect_timeout: float = 2.0,
        queue_limit: int = 10_000,
        max_delay: float = 2.0,
    ) -> None:
        self._url = redis_url
        self._backoff_cap = backoff_cap
        self._ping_interval = ping_interval
        self._subscribe_timeout = subscribe_timeout
        self._connect_timeout = connect_timeout
        self._queue_limit = queue_limit
        self._max_delay = max_delay
        self.sharded: bool | None = None  # decided on the first connection
        self.restarts = 0
        self.published = 0
        self._wanted: dict[bytes, Handler] = {}
        self._pending: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._callbacks: list[ReconnectCallback] = []
        self._conn: AbstractConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._healthy = False
        self._queue: deque[tuple[float, bytes, bytes]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._mode_known = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._listen_client: aioredis.Redis | None = None
        self._publish_client: aioredis.Redis | None = None
        self._closing = False
        self._heard = True  # the reader got something since the watchdog last looked
        self._silent = False  # the watchdog closed the connection: no reply to its PING

    # --- lifecycle ------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """Connected, with every wanted channel resubscribed."""
        return self._healthy and not self._closing

    def on_reconnect(self, callback: ReconnectCallback) -> None:
        """Run ``callback`` after each reconnection, once the subscriptions are back."""
        self._callbacks.append(callback)

    async def start(self) -> None:
        metrics.PUBSUB_LISTENER_UP.track(self)
        if self._tasks:
            return
        no_retry = Retry(NoBackoff(), 0)  # we reconnect ourselves, and never re-send a batch
        # TCP keepalive finds a peer that vanished without closing; Unix sockets have none.
        keepalive = {} if self._url.startswith("unix:") else {"socket_keepalive": True}
        self._listen_client = aioredis.Redis.from_url(
            self._url,
            socket_timeout=None,
            socket_connect_timeout=self._connect_timeout,
            health_check_interval=0,
            retry=no_retry,
            **keepalive,
        )
        self._publish_client = aioredis.Redis.from_url(
            self._url,
            socket_timeout=5.0,
            socket_connect_timeout=self._connect_timeout,
            retry=no_retry,
            **keepalive,
        )
        self._tasks = [
            asyncio.create_task(self._listen(), name="pubsub-listener"),
            asyncio.create_task(self._publish_loop(), name="pubsub-publisher"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        # Both loops catch everything; ending anyway is a bug, and must not go unnoticed.
        if self._closing or task.cancelled():
            return
        self._healthy = False
        log.error("pub/sub %s stopped", task.get_name(), exc_info=task.exception())

    async def close(self, flush_timeout: float = 1.0) -> None:
        if self._closing:
            return
        metrics.PUBSUB_LISTENER_UP.forget(self)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(flush_timeout):
                await self.flush()
        self._closing = True
        tasks = [*self._tasks, *self._side_tasks]
        await cancel_until_done(tasks)
        failures(tasks)  # read, not raised: an early end is logged as it happens (_task_ended)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.disconnect(nowait=True)
            self._conn = None
        for client in (self._listen_client, self._publish_client):
            if client is not None:
                await client.aclose()
        self._release_waiters()

    # --- subscriptions --------------------------------------------------------------------------
    async def subscribe(self, channel: str, handler: Handler) -> None:
        """Deliver the channel's messages to ``handler``. Returns when Redis has confirmed it
        (or at once while disconnected: the reconnection subscribes everything wanted).
        From inside a message handler it does not wait (the reader that would read the
        confirmation is the one running the handler)."""
        name = channel.encode()
        self._wanted[name] = handler
        waiter = await self._send(self._command("SUBSCRIBE"), name, confirm=True)
        if waiter is None or asyncio.current_task() is self._reader:
            return  # a handler cannot wait for what its own reader would read next
        try:
            async with asyncio.timeout(self._subscribe_timeout):
                await asyncio.shield(waiter)
        except TimeoutError:
            log.warning("no confirmation of a pub/sub subscription yet", extra={"channel": channel})

    async def unsubscribe(self, channel: str) -> None:
        name = channel.encode()
        if self._wanted.pop(name, None) is not None:
            await self._send(self._command("UNSUBSCRIBE"), name, confirm=False)

    def subscribed(self, channel: str) -> bool:
        return channel.encode() in self._wanted

    def _command(self, plain: str) -> str:
        return "S" + plain if self.sharded else plain

    async def _send(
        self, command: str, name: bytes, *, confirm: bool
    ) -> asyncio.Future[None] | None:
        conn = self._conn
        # A Connection reconnects by itself when written to after a loss; that would be a socket
        # without our subscriptions, so only an intact connection is written to.
        if conn is None or not conn.is_connected:
            return None
        waiter: asyncio.Future[None] | None = None
        if confirm:
            waiter = asyncio.get_running_loop().create_future()
            self._pending.setdefault(name, deque()).append(waiter)
        try:
            await conn.send_command(command, name, check_health=False)
        except Exception:
            log.warning(
                "pub/sub %s not sent; the listener will resubscribe", command, exc_info=True
            )
            return None
        return waiter

    # --- listening ------------------------------------------------------------------------------
    async def _listen(self) -> None:
        backoff = _FIRST_BACKOFF
        connected_before = False
        lost_at: float | None = None
        while True:
            conn: AbstractConnection | None = None
            try:
                conn = await self._open()
                backoff = _FIRST_BACKOFF
                reader = self._reader = asyncio.create_task(self._read(conn), name="pubsub-reader")
                try:
                    await self._await_confirmations()
                    self._healthy = True
                    if connected_before:
                        log.warning(
                            "pub/sub listener reconnected and resubscribed %d channels after %.1f s",
                            len(self._wanted),
                            time.monotonic() - (lost_at or time.monotonic()),
                        )
                        self._spawn(self._run_callbacks())
                    connected_before = True
                    await reader
                finally:
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await reader
                raise ConnectionError("pub/sub reader stopped")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                was_healthy = self._healthy
                self._healthy = False
                self._conn = None
                self._release_waiters()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.disconnect(nowait=True)
                if was_healthy or lost_at is None:
                    lost_at = time.monotonic()
                    self.restarts += 1
                    LISTENER_RESTARTS.inc()
                    log.error(
                        "pub/sub listener lost its Redis connection; reconnecting (%s: %s)",
                        type(exc).__name__,
                        exc,
                    )
                else:
                    log.debug("pub/sub reconnect failed: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(self._backoff_cap, backoff * 2)

    async def _open(self) -> AbstractConnection:
        assert self._listen_client is not None
        conn: AbstractConnection = self._listen_client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
            _quiet_push_handler(conn)
            if self.sharded is None:
                await self._detect_sharding(conn)
            self._conn = conn
            self._pending.clear()
            for name in list(self._wanted):
                self._pending.setdefault(name, deque()).append(
                    asyncio.get_running_loop().create_future()
                )
                await conn.send_command(self._command("SUBSCRIBE"), name, check_health=False)
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
            raise
        return conn

    async def _detect_sharding(self, conn: AbstractConnection) -> None:
        await conn.send_command("INFO", "server", check_health=False)
        try:
            info = await conn.read_response(timeout=self._connect_timeout)
        except aioredis.ResponseError:
            info = b""
        if info is None:
            raise ConnectionError("no reply to INFO")
        major = parse_redis_major(info) if isinstance(info, bytes | str) else None
        self.sharded = major is not None and major >= 7
        self._mode_known.set()
        log.info("pub/sub uses %s channels", "sharded" if self.sharded else "plain")

    async def _await_confirmations(self) -> None:
        waiters = [w for queue in self._pending.values() for w in queue]
        if waiters:
            async with asyncio.timeout(self._subscribe_timeout * 2):
                await asyncio.gather(*(asyncio.shield(w) for w in waiters))

    async def _read(self, conn: AbstractConnection) -> None:
        # No timeout per read (one would cost a timer per message): a watchdog looks at the
        # connection once an interval instead.
        self._heard, self._silent = True, False
        watchdog = asyncio.create_task(self._watch_silence(conn), name="pubsub-silence")
        try:
            while True:
                try:
                    response = await conn.read_response(
                        timeout=math.inf, disconnect_on_error=True, push_request=True
                    )
                except Exception:
                    if self._silent:
                        raise ConnectionError("no reply to PING from Redis") from None
                    raise
                self._heard = True
                if not isinstance(response, list) or len(response) < 3:
                    continue  # PONG and anything else we did not ask for
                kind, channel, data = response[0], response[1], response[2]
                if kind in _MESSAGE_TYPES:
                    handler = self._wanted.get(channel)
                    if handler is not None:
                        await self._dispatch(handler, channel, data)
                elif kind in _SUBSCRIBED_TYPES:
                    waiters = self._pending.get(channel)
                    if waiters:
                        waiter = waiters.popleft()
                        if not waiters:
                            del self._pending[channel]
                        if not waiter.done():
                            waiter.set_result(None)
        finally:
            watchdog.cancel()

    async def _watch_silence(self, conn: AbstractConnection) -> None:
        """A whole interval without a message: PING. Another one without the reply: the server
        is gone or frozen (its socket may stay open), so the connection is closed, which ends
        the reader's read."""
        ping_sent = False
        while True:
            self._heard = False
            await asyncio.sleep(self._ping_interval)
            if self._heard:
                ping_sent = False
                continue
            if ping_sent:
                self._silent = True
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
                return
            try:
                await conn.send_command("PING", check_health=False)
            except Exception:
                return  # the connection is gone: the reader finds out by itself
            ping_sent = True

    async def _dispatch(self, handler: Handler, channel: bytes, data: Any) -> None:
        try:
            await handler(data)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "pub/sub message handler failed",
                extra={"channel": channel.decode(errors="replace")},
            )

    def _release_waiters(self) -> None:
        # Subscribers waiting on a lost connection return now; the reconnection subscribes them.
        for queue in self._pending.values():
            for waiter in queue:
                if not waiter.done():
                    waiter.set_result(None)
        self._pending.clear()

    async def _run_callbacks(self) -> None:
        for callback in list(self._callbacks):
            try:
                await callback()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("pub/sub on_reconnect callback failed")

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # --- publishing -----------------------------------------------------------------------------
    def publish(self, channel: str, message: bytes) -> None:
        """Queue ``message`` for ``channel``; messages leave in the order they were queued."""
        if len(self._queue) >= self._queue_limit:
            self._queue.popleft()
            _DROPPED_QUEUE_FULL.inc()
        self._queue.append((time.monotonic(), channel.encode(), message))
        self._idle.clear()
        self._wake.set()

    async def flush(self) -> None:
        """Wait until everything queued so far has been handed to Redis (or dropped)."""
        await self._idle.wait()

    async def _publish_loop(self) -> None:
        await self._mode_known.wait()
        assert self._publish_client is not None
        pool = self._publish_client.connection_pool
        packer = PublishPacker(self._command("PUBLISH"))
        conn: AbstractConnection | None = None
        backoff = _FIRST_BACKOFF
        failing_since: float | None = None
        try:
            while True:
                if not self._queue:
                    self._idle.set()
                    await self._wake.wait()
                self._wake.clear()
                batch = self._take_batch()
                if not batch:
                    continue
                try:
                    if conn is None or not conn.is_connected:
                        conn = await self._connect_publisher(pool)
                    # The whole batch in one write; then its replies (one integer each), so a
                    # failure or a silent server is noticed here (socket timeout), not ignored.
                    await conn.send_packed_command(packer.pack(batch), check_health=False)
                    for _ in batch:
                        await conn.read_response()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    _DROPPED_REDIS_ERROR.inc(len(batch))
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            await conn.disconnect(nowait=True)
                        conn = None
                    if failing_since is None:
                        failing_since = time.monotonic()
                        log.error(
                            "pub/sub publishing failed; dropping %d messages while Redis is "
                            "unreachable (%s: %s)",
                            len(batch),
                            type(exc).__name__,
                            exc,
                        )
                    await asyncio.sleep(backoff)
                    backoff = min(self._backoff_cap, backoff * 2)
                    continue
                self.published += len(batch)
                if failing_since is not None:
                    log.warning(
                        "pub/sub publishing works again after %.1f s",
                        time.monotonic() - failing_since,
                    )
                    failing_since = None
                backoff = _FIRST_BACKOFF
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)

    @staticmethod
    async def _connect_publisher(pool: aioredis.ConnectionPool) -> AbstractConnection:
        conn: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
        await conn.connect()  # type: ignore[no-untyped-call]
        return conn

    def _take_batch(self) -> list[tuple[bytes, bytes]]:
        oldest = time.monotonic() - self._max_delay
        batch: list[tuple[bytes, bytes]] = []
        while self._queue and len(batch) < _PUBLISH_BATCH:
            queued_at, channel, message = self._queue.popleft()
            if queued_at < oldest:
                _DROPPED_STALE.inc()
                continue
            batch.append((channel, message))
        return batch


async def _push_as_is(response: Any) -> Any:
    return response


def _quiet_push_handler(conn: AbstractConnection) -> None:
    """redis-py's hiredis parser hands every pub/sub message to a default handler that builds a
    debug line from the whole message (its payload's repr) before the logger drops it: per
    message, that costs about what the delivery does. redis-py's own PubSub replaces the
    handler the same way when given one."""
    parser = getattr(conn, "_parser", None)
    setter = getattr(parser, "set_pubsub_push_handler", None)
    if setter is not None:
        setter(_push_as_is)


class PublishPacker:
    """RESP encoding of (S)PUBLISH commands, for one write per batch (sans-I/O).

    What redis-py's pipeline would send, without its per-command machinery: each channel's part
    of the command is encoded once and kept (a replica publishes on a few hundred channels at
    most; the bound only keeps a long-lived process from collecting dead calls' channels).
    """

    MAX_CHANNELS = 4096

    def __init__(self, command: str) -> None:
        name = command.encode()
        self._head = b"*3\r\n$%d\r\n%s\r\n" % (len(name), name)
        self._channels: dict[bytes, bytes] = {}

    def pack(self, batch: list[tuple[bytes, bytes]]) -> bytes:
        parts: list[bytes] = []
        append = parts.append
        for channel, message in batch:
            prefix = self._channels.get(channel)
            if prefix is None:
                if len(self._channels) >= self.MAX_CHANNELS:
                    self._channels.clear()
                prefix = self._head + b"$%d\r\n%s\r\n" % (len(channel), channel)
                self._channels[channel] = prefix
            append(prefix)
            append(b"$%d\r\n" % len(message))
            append(message)
            append(b"\r\n")
        return b"".join(parts)
