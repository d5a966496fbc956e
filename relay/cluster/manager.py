"""``RelayClientManager``: a python-socketio client manager that routes an emit only to the
replicas that have members of its room.

Emit to a room. Local members get it exactly as with ``AsyncManager`` (no Redis). Then, if the
room's replica set (an in-memory cache: no Redis round trip per frame) holds another live
replica, ONE envelope goes out on the room's channel; every replica with members of the room is
subscribed to it, delivers to its own members and ignores its own envelopes. A replica with no
member of a room never receives its emits. A replica that emits to a room it has no member of
(the owner of a call whose clients are elsewhere) loads the room's replica set once, on the
first emit, and keeps following its membership notices while it keeps emitting.

Membership. When a room gets its first local member, this replica subscribes to the room's
channel (waiting for Redis to confirm), adds itself to ``room-replicas:{room}``, and publishes a
membership notice there, so the replicas following the room update their cache at once; the
last local member leaving does the reverse. Every ``refresh_seconds`` the caches are reloaded,
this replica's own memberships re-asserted (which also rebuilds them after a Redis restart) and
replicas whose heartbeat key (``replica:<id>``, written by the replica registry) is gone are
left out. After a pub/sub reconnection the memberships are re-asserted and announced before the
``on_reconnect`` callbacks registered by others run.

Emit to a sid. Sids made here end in a tag of the replica holding them (see ``channels``): an
emit, ``disconnect``, ``enter_room`` or ``leave_room`` for a sid of another replica goes to that
replica's inbox channel. No sid-to-replica lookup, nothing written per connection.

Owner channels. ``send_to_owner`` / ``serve_owner`` carry client -> owner traffic of a call on
``owner:<call_id>``. One connection publishes everything, so a replica's messages arrive in the
order it sent them; each served call has its own worker, so one slow call does not hold up the
others and its messages are handled in order.

Not supported across replicas (local delivery works as in python-socketio): acknowledgement
callbacks (``CrossReplicaCallbackError``), emits to a list of rooms, ``close_room`` and
``get_participants`` (both see local members only).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import socketio
from bidict import ValueDuplicationError
from prometheus_client import Counter

from relay.cluster import envelope as env
from relay.cluster.channels import Channels, KeyFunction, replica_tag, sid_tag, tagged_sid
from relay.cluster.emit_packets import EmitPackets
from relay.cluster.envelope import Envelope, EnvelopeError, Kind
from relay.cluster.pubsub import PubSub, ReconnectCallback
from voicerelay.cancellation import cancel_until_done, failures
from voicerelay.settings import Settings

log = logging.getLogger(__name__)

ENVELOPES = Counter(
    "voicerelay_relay_cluster_envelopes_total",
    "Envelopes exchanged with other replicas through Redis, by direction (in, out) and kind.",
    ["direction", "kind"],
)
_OUT = {kind: ENVELOPES.labels("out", kind.name.lower()) for kind in Kind}
_IN = {kind: ENVELOPES.labels("in", kind.name.lower()) for kind in Kind}
UNDECODABLE = Counter(
    "voicerelay_relay_cluster_undecodable_total",
    "Messages on cluster channels that were not valid envelopes (dropped).",
)
OWNER_QUEUE_DROPPED = Counter(
    "voicerelay_relay_cluster_owner_queue_dropped_total",
    "Owner messages dropped because the call's handler fell too far behind.",
)

OwnerHandler = Callable[[Envelope], Awaitable[None]]
RoomKey = tuple[str, str]

OWNER_QUEUE_LIMIT = 1000


class CrossReplicaCallbackError(RuntimeError):
    """An emit with an acknowledgement callback would reach clients on another replica."""

    def __init__(self, target: str) -> None:
        super().__init__(
            f"acknowledgement callbacks are not supported across replicas (emit to {target!r} "
            "reaches clients on another replica); emit without a callback"
        )


@dataclass
class ManagerStats:
    """This manager's own counts (the Prometheus counters add up every manager in a process)."""

    published: int = 0  # envelopes queued for Redis
    received: int = 0  # pub/sub messages that reached this manager
    decoded: int = 0  # envelopes decoded past the kind byte
    delivered: int = 0  # emits from other replicas delivered to local clients


class _Room:
    __slots__ = (
        "announced",
        "channel",
        "generation",
        "key",
        "last_used",
        "leave_pending",
        "lock",
        "members",
        "namespace",
        "remote",
        "room",
        "watching",
    )

    def __init__(self, namespace: str, room: str, channel: str, key: str) -> None:
        self.namespace = namespace
        self.room = room
        self.channel = channel
        self.key = key  # room-replicas set
        self.members: frozenset[str] = frozenset()  # other replicas listed in the set
        self.remote: frozenset[str] = frozenset()  # ... of them, the live ones: emits go there
        self.announced = False  # this replica is in the set (as far as we know)
        self.leave_pending = False  # ... and its removal from the set has not succeeded yet
        self.watching = False  # subscribed to the channel
        self.generation = 0  # bumped by membership notices
        self.last_used = time.monotonic()
        self.lock = asyncio.Lock()


class RelayClientManager(socketio.AsyncManager):  # type: ignore[misc]
    name = "relay-targeted"

    def __init__(
        self,
        redis_url: str,
        key: Settings | KeyFunction,
        replica_id: str,
        *,
        refresh_seconds: float = 2.0,
        interest_seconds: float = 30.0,
        room_ttl_seconds: float = 300.0,
        check_heartbeats: bool = True,
        pubsub: PubSub | None = None,
    ) -> None:
        super().__init__()
        self.replica_id = replica_id
        self.tag = replica_tag(replica_id)
        self.channels = Channels(key.redis_key if isinstance(key, Settings) else key)
        self.pubsub = pubsub or PubSub(redis_url)
        self.stats = ManagerStats()
        self._redis_url = redis_url
        self._refresh_seconds = refresh_seconds
        self._interest_seconds = interest_seconds
        self._room_ttl_ms = int(room_ttl_seconds * 1000)
        self._check_heartbeats = check_heartbeats
        self._rooms: dict[RoomKey, _Room] = {}
        self._alive: dict[str, bool] = {}
        self._owners: dict[str, _OwnerWorker] = {}
        self._redis: aioredis.Redis | None = None
        self._started = False
        self._closed = False
        self._start_lock = asyncio.Lock()
        self._writes = asyncio.Lock()  # this replica's writes to room-replicas sets
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refresher: asyncio.Task[None] | None = None
        self._emit_packets: EmitPackets | None = None
        self.pubsub.on_reconnect(self._reassert)

    # --- lifecycle ------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """For /ready: the pub/sub listener is connected and subscribed."""
        return self.pubsub.healthy

    def on_reconnect(self, callback: ReconnectCallback) -> None:
        """Run ``callback`` after each pub/sub reconnection (after memberships are restored)."""
        self.pubsub.on_reconnect(callback)

    async def start(self) -> None:
        """Connect (in the background: Redis may be down) and start listening. Idempotent; the
        first emit, room change or owner call starts the manager if nobody did."""
        if self._started:
            return
        async with self._start_lock:
            if self._started:
                return
            self._redis = aioredis.Redis.from_url(
                self._redis_url,
                socket_connect_timeout=2.0,
                socket_timeout=5.0,
                health_check_interval=15,
            )
            await self.pubsub.start()
            await self.pubsub.subscribe(self.channels.inbox(self.tag), self._on_inbox)
            await self.pubsub.subscribe(self.channels.broadcast(), self._on_broadcast)
            self._refresher = asyncio.create_task(self._refresh_loop(), name="room-refresh")
            self._started = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (self._refresher, *self._tasks) if t is not None]
        tasks += [w.task for w in self._owners.values()]
        await cancel_until_done(tasks)
        failures(tasks)  # read, not raised: failures are logged as they happen (_task_done)
        self._owners.clear()
        if self._redis is not None:
            await self._leave_all()
        await self.pubsub.close()
        if self._redis is not None:
            await self._redis.aclose()

    def initialize(self) -> None:
        # python-socketio calls this on the first connection; starting here covers servers
        # whose owner never called start().
        super().initialize()
        if not self._started:
            self._spawn(self.start())

    async def _ready(self) -> aioredis.Redis:
        if not self._started:
            await self.start()
        assert self._redis is not None
        return self._redis

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("cluster manager task failed", exc_info=task.exception())

    # --- connections ----------------------------------------------------------------------------
    async def pre_connect(self, eio_sid: str, namespace: str) -> str | None:
        # BaseManager.pre_connect, with a sid that names the replica holding it.
        sid = tagged_sid(self.server.eio.generate_id(), self.tag)
        try:
            self.basic_enter_room(sid, namespace, None, eio_sid=eio_sid)
        except ValueDuplicationError:
            return None  # already connected
        self.basic_enter_room(sid, namespace, sid, eio_sid=eio_sid)
        self.pending_connect.setdefault(namespace, []).append(sid)
        return sid

    def _is_local_sid(self, sid: Any, namespace: str) -> bool:
        return self.eio_sid_from_sid(sid, namespace) is not None

    def _remote_tag(self, sid: Any) -> str | None:
        tag = sid_tag(sid) if isinstance(sid, str) else None
        return tag if tag is not None and tag != self.tag else None

    async def can_disconnect(self, sid: str, namespace: str) -> bool:
        if self._is_local_sid(sid, namespace):
            return bool(await super().can_disconnect(sid, namespace))
        tag = self._remote_tag(sid)
        if tag is not None:
            await self._to_inbox(tag, Kind.DISCONNECT, {"sid": sid, "namespace": namespace})
        return False

    async def disconnect(self, sid: str, namespace: str, **kwargs: Any) -> None:
        rooms = [r for r in self.get_rooms(sid, namespace) if isinstance(r, str) and r != sid]
        await super().disconnect(sid, namespace, **kwargs)
        for room in rooms:
            self._reconcile_soon(namespace, room)

    # --- rooms ----------------------------------------------------------------------------------
    async def enter_room(
        self, sid: str, namespace: str, room: Any, eio_sid: str | None = None
    ) -> None:
        if eio_sid is None and not self._is_local_sid(sid, namespace):
            tag = self._remote_tag(sid)
            if tag is not None:
                header = {"sid": sid, "namespace": namespace, "room": room}
                await self._to_inbox(tag, Kind.ENTER_ROOM, header)
            return
        self.basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
        if isinstance(room, str) and room != sid:
            # Awaited: once enter_room returns, emits from every replica reach this member.
            await self._reconcile(namespace, room)

    async def leave_room(self, sid: str, namespace: str, room: Any) -> None:
        if not self._is_local_sid(sid, namespace):
            tag = self._remote_tag(sid)
            if tag is not None:
                header = {"sid": sid, "namespace": namespace, "room": room}
                await self._to_inbox(tag, Kind.LEAVE_ROOM, header)
            return
        self.basic_leave_room(sid, namespace, room)
        if isinstance(room, str) and room != sid:
            self._reconcile_soon(namespace, room)

    async def close_room(self, room: Any, namespace: str) -> None:
        self.basic_close_room(room, namespace)
        if isinstance(room, str):
            self._reconcile_soon(namespace, room)

    def _has_local(self, namespace: str, room: str) -> bool:
        return bool(self.rooms.get(namespace, {}).get(room))

    def _room(self, namespace: str, room: str) -> _Room:
        state = self._rooms.get((namespace, room))
        if state is None:
            state = _Room(
                namespace,
                room,
                self.channels.room(namespace, room),
                self.channels.room_replicas(namespace, room),
            )
            self._rooms[namespace, room] = state
        return state

    def remote_replicas(self, namespace: str, room: str) -> frozenset[str]:
        """The other live replicas this one would publish the room's emits to (cached)."""
        state = self._rooms.get((namespace, room))
        return state.remote if state is not None else frozenset()

    def _reconcile_soon(self, namespace: str, room: str) -> None:
        self._spawn(self._reconcile(namespace, room))

    async def _reconcile(self, namespace: str, room: str) -> None:
        """Bring this replica's membership of the room in Redis in line with its local members.
        One transition at a time per room, and every membership write of this replica under
        one lock, so a quick join and leave (or a refresh) cannot cross in Redis."""
        redis = await self._ready()
        state = self._room(namespace, room)
        async with state.lock:
            local = self._has_local(namespace, room)
            if local and not state.announced:
                await self._watch(state)  # subscribed before anyone is told to publish to us
                async with self._writes:
                    try:
                        pipe = redis.pipeline(transaction=False)
                        pipe.sadd(state.key, self.replica_id)
                        pipe.pexpire(state.key, self._room_ttl_ms)
                        pipe.smembers(state.key)
                        _, _, members = await pipe.execute()
                    except Exception as exc:
                        log.warning("room membership not recorded yet (%s); retrying", exc)
                        return  # the refresh loop retries
                    state.announced = True
                    state.leave_pending = False
                self._set_members(state, members)
                self._announce(state, "add")
            elif not local and state.announced:
                async with self._writes:
                    state.announced = False
                    state.leave_pending = True
                    with contextlib.suppress(Exception):
                        await redis.srem(state.key, self.replica_id)
                        state.leave_pending = False  # else the refresh loop retries
                self._announce(state, "remove")
                if time.monotonic() - state.last_used > self._interest_seconds:
                    await self._forget(state)

    def _announce(self, state: _Room, op: str) -> None:
        self._publish(
            state.channel,
            Kind.MEMBERSHIP,
            env.encode(Kind.MEMBERSHIP, {"origin": self.replica_id, "op": op}),
        )

    async def _watch(self, state: _Room) -> None:
        if not state.watching:
            state.watching = True
            handler = functools.partial(self._on_room, (state.namespace, state.room))
            await self.pubsub.subscribe(state.channel, handler)

    async def _forget(self, state: _Room) -> None:
        if self._rooms.get((state.namespace, state.room)) is state:
            del self._rooms[state.namespace, state.room]
        if state.watching:
            state.watching = False
            await self.pubsub.unsubscribe(state.channel)

    async def _follow(self, namespace: str, room: str) -> _Room:
        """The room's state for an emitter with no local member: subscribe to its notices and
        load its replica set once (later changes come from notices and the refresh loop)."""
        redis = await self._ready()
        state = self._room(namespace, room)
        async with state.lock:
            if not state.watching:
                await self._watch(state)
                try:
                    members = await redis.smembers(state.key)
                except Exception as exc:
                    log.warning("room replica set not loaded (%s); the refresh loop retries", exc)
                else:
                    self._set_members(state, members)
        return state

    def _set_members(self, state: _Room, members: Iterable[bytes | str]) -> None:
        ids = (m.decode() if isinstance(m, bytes) else m for m in members)
        state.members = frozenset(i for i in ids if i != self.replica_id)
        self._recompute(state)

    def _recompute(self, state: _Room) -> None:
        alive = self._alive
        state.remote = frozenset(r for r in state.members if alive.get(r, True))

    # --- emits ----------------------------------------------------------------------------------
    async def emit(
        self,
        event: str,
        data: Any,
        namespace: str,
        room: Any = None,
        skip_sid: Any = None,
        callback: Any = None,
        to: Any = None,
        **kwargs: Any,
    ) -> None:
        room = to or room
        namespace = namespace or "/"
        if kwargs.get("ignore_queue"):
            await self._emit_local(event, data, namespace, room, skip_sid, callback)
            return
        if room is None:
            await self._broadcast(event, data, namespace, skip_sid, callback)
            return
        if not isinstance(room, str):
            raise TypeError("RelayClientManager emits to one room or sid (a str) at a time")
        state = self._rooms.get((namespace, room))
        if state is None or not state.watching:
            if self.is_sid_room(namespace, room):  # a local client
                await self._emit_local(event, data, namespace, room, skip_sid, callback)
                return
            tag = sid_tag(room)
            if tag is not None:  # a client of another replica (or one gone from here)
                if tag != self.tag:
                    if callback is not None:
                        raise CrossReplicaCallbackError(room)
                    await self._ready()
                    message = env.encode_emit(
                        event,
                        data,
                        namespace=namespace,
                        room=room,
                        skip_sid=skip_sid,
                        origin=self.replica_id,
                    )
                    self._publish(self.channels.inbox(tag), Kind.EMIT, message)
                return
            state = await self._follow(namespace, room)
        state.last_used = time.monotonic()
        if state.remote:
            if callback is not None:
                raise CrossReplicaCallbackError(room)
            message = env.encode_emit(
                event,
                data,
                namespace=namespace,
                room=room,
                skip_sid=skip_sid,
                origin=self.replica_id,
            )
            self._publish(state.channel, Kind.EMIT, message)
        if self._has_local(namespace, room):
            await self._emit_local(event, data, namespace, room, skip_sid, callback)

    async def _emit_local(
        self, event: str, data: Any, namespace: str, room: Any, skip_sid: Any, callback: Any
    ) -> None:
        """Deliver to the local members of ``room`` (or every local client when None).

        Without an acknowledgement callback every recipient gets the same packets, encoded
        once, handed to each recipient's Engine.IO socket in turn. AsyncManager.emit does the
        same through a task per packet per recipient (two per audio chunk) and a wait on them
        all, which on the per-frame path costs more than the encoding. Engine.IO's per-socket
        queues are unbounded, so handing a packet over never waits on a slow client.
        """
        if callback is not None:
            await super().emit(
                event, data, namespace, room=room, skip_sid=skip_sid, callback=callback
            )
            return
        if namespace not in self.rooms:
            return
        skip = skip_sid if isinstance(skip_sid, list) else [skip_sid]
        # A list first: the room may change while a send below waits.
        recipients = [eio for sid, eio in self.get_participants(namespace, room) if sid not in skip]
        if not recipients:
            return
        if self._emit_packets is None:
            self._emit_packets = EmitPackets(self.server.packet_class)
        packets = self._emit_packets.encode(event, data, namespace)
        send = self.server._send_eio_packet
        for eio_sid in recipients:
            for packet in packets:
                await send(eio_sid, packet)

    async def _broadcast(
        self, event: str, data: Any, namespace: str, skip_sid: Any, callback: Any
    ) -> None:
        if callback is not None:
            raise CrossReplicaCallbackError("every client")
        await self._ready()
        message = env.encode_emit(
            event, data, namespace=namespace, room=None, skip_sid=skip_sid, origin=self.replica_id
        )
        self._publish(self.channels.broadcast(), Kind.EMIT, message)
        await super().emit(event, data, namespace, room=None, skip_sid=skip_sid)

    def _publish(self, channel: str, kind: Kind, message: bytes) -> None:
        self.pubsub.publish(channel, message)
        self.stats.published += 1
        _OUT[kind].inc()

    async def _to_inbox(self, tag: str, kind: Kind, header: Mapping[str, Any]) -> None:
        await self._ready()
        message = env.encode(kind, {**header, "origin": self.replica_id})
        self._publish(self.channels.inbox(tag), kind, message)

    # --- receiving ------------------------------------------------------------------------------
    def _peek(self, data: bytes) -> Kind | None:
        self.stats.received += 1
        try:
            return env.peek_kind(data)
        except EnvelopeError:
            UNDECODABLE.inc()
            return None

    def _decode(self, data: bytes) -> Envelope | None:
        self.stats.decoded += 1
        try:
            envelope = env.decode(data)
        except EnvelopeError:
            UNDECODABLE.inc()
            return None
        _IN[envelope.kind].inc()
        return envelope

    async def _on_room(self, key: RoomKey, data: bytes) -> None:
        kind = self._peek(data)
        state = self._rooms.get(key)
        if kind is None or state is None:
            return
        if kind is Kind.EMIT:
            # Following a room only to emit to it: its emits are not for us; skip them undecoded.
            if self._has_local(*key):
                await self._deliver(data)
        elif kind is Kind.MEMBERSHIP:
            envelope = self._decode(data)
            origin = envelope.origin if envelope is not None else None
            if envelope is None or origin is None or origin == self.replica_id:
                return
            op = envelope.header.get("op")
            if op == "add":
                state.members = state.members | {origin}
                self._alive[origin] = True
            elif op == "remove":
                state.members = state.members - {origin}
            state.generation += 1
            self._recompute(state)

    async def _deliver(self, data: bytes) -> None:
        envelope = self._decode(data)
        if envelope is None:
            return
        try:
            message = env.decode_emit(envelope)
        except EnvelopeError:
            UNDECODABLE.inc()
            return
        if message.origin == self.replica_id:
            return
        self.stats.delivered += 1
        await self._emit_local(
            message.event, message.data, message.namespace, message.room, message.skip_sid, None
        )

    async def _on_broadcast(self, data: bytes) -> None:
        if self._peek(data) is Kind.EMIT:
            await self._deliver(data)

    async def _on_inbox(self, data: bytes) -> None:
        kind = self._peek(data)
        if kind is None:
            return
        if kind is Kind.EMIT:
            await self._deliver(data)
            return
        envelope = self._decode(data)
        if envelope is None:
            return
        h = envelope.header
        sid, namespace, room = h.get("sid"), h.get("namespace"), h.get("room")
        if not isinstance(sid, str) or not isinstance(namespace, str):
            return
        # In tasks: these run application handlers and wait on Redis, which the reader that
        # called us must stay free to serve.
        if kind is Kind.DISCONNECT:
            self._spawn(self.server.disconnect(sid, namespace=namespace, ignore_queue=True))
        elif kind is Kind.ENTER_ROOM and self._is_local_sid(sid, namespace):
            self._spawn(self.enter_room(sid, namespace, room))
        elif kind is Kind.LEAVE_ROOM and self._is_local_sid(sid, namespace):
            self._spawn(self.leave_room(sid, namespace, room))

    # --- owner channels -------------------------------------------------------------------------
    async def send_to_owner(
        self,
        call_id: uuid.UUID | str,
        kind: str,
        header: Mapping[str, Any],
        payload: bytes = b"",
    ) -> None:
        """Queue a message for the replica serving ``call_id``; this replica's messages arrive
        in the order they were sent. Nothing is delivered while no replica serves the call."""
        await self._ready()
        message = env.encode_owner(kind, header, payload, origin=self.replica_id)
        self._publish(self.channels.owner(call_id), Kind.OWNER, message)

    async def serve_owner(self, call_id: uuid.UUID | str, handler: OwnerHandler) -> None:
        """Handle ``call_id``'s owner messages here, in order, one at a time. Returns once Redis
        has confirmed the subscription."""
        await self._ready()
        name = str(call_id)
        previous = self._owners.pop(name, None)
        if previous is not None:
            previous.stop()
        worker = _OwnerWorker(name, handler)
        self._owners[name] = worker
        await self.pubsub.subscribe(
            self.channels.owner(name), functools.partial(self._on_owner, worker)
        )

    async def unserve_owner(self, call_id: uuid.UUID | str) -> None:
        """Stop serving ``call_id``; messages already received are still handled."""
        name = str(call_id)
        worker = self._owners.pop(name, None)
        if worker is not None:
            worker.stop()
            await self.pubsub.unsubscribe(self.channels.owner(name))

    def serving(self, call_id: uuid.UUID | str) -> bool:
        return str(call_id) in self._owners

    async def _on_owner(self, worker: _OwnerWorker, data: bytes) -> None:
        if self._peek(data) is not Kind.OWNER or self._owners.get(worker.call_id) is not worker:
            return
        envelope = self._decode(data)
        if envelope is not None:
            worker.put(envelope)

    # --- refresh --------------------------------------------------------------------------------
    async def _refresh_loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._refresh_seconds)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:  # once per outage, not every few seconds
                    log.warning("room replica sets not refreshed (%s); retrying", exc)
                failing = True
            else:
                failing = False

    async def refresh(self) -> None:
        """Reload every followed room's replica set, re-assert this replica's memberships and
        drop replicas whose heartbeat is gone; stop following rooms idle for a while."""
        redis = await self._ready()
        now = time.monotonic()
        for state in list(self._rooms.values()):
            local = self._has_local(state.namespace, state.room)
            if local != state.announced:
                self._reconcile_soon(state.namespace, state.room)
            elif (
                not local
                and not state.lock.locked()
                and now - state.last_used > self._interest_seconds
            ):
                await self._forget(state)
        if not self._rooms:
            return
        async with self._writes:
            states = list(self._rooms.values())
            generations = [s.generation for s in states]
            pipe = redis.pipeline(transaction=False)
            writes = []
            for state in states:
                if state.announced:
                    pipe.sadd(state.key, self.replica_id)
                    pipe.pexpire(state.key, self._room_ttl_ms)
                    writes.append(2)
                elif state.leave_pending:
                    pipe.srem(state.key, self.replica_id)
                    writes.append(1)
                else:
                    writes.append(0)
                pipe.smembers(state.key)
            results = await pipe.execute()
            for state in states:
                if not state.announced:
                    state.leave_pending = False
        fetched: list[set[bytes]] = []
        position = 0
        for skip in writes:
            fetched.append(results[position + skip])
            position += skip + 1
        if self._check_heartbeats:
            await self._load_liveness(redis, fetched)
        for state, members, generation in zip(states, fetched, generations, strict=True):
            if state.generation == generation:  # no notice arrived meanwhile: the set is current
                self._set_members(state, members)
            else:
                self._recompute(state)

    async def _load_liveness(self, redis: aioredis.Redis, fetched: list[set[bytes]]) -> None:
        others = sorted({m.decode() for members in fetched for m in members} - {self.replica_id})
        if not others:
            self._alive = {}
            return
        pipe = redis.pipeline(transaction=False)
        for replica in others:
            pipe.exists(self.channels.heartbeat(replica))
        found = await pipe.execute()
        self._alive = {r: bool(n) for r, n in zip(others, found, strict=True)}

    async def _reassert(self) -> None:
        """After a pub/sub reconnection (perhaps Redis restarted empty): put this replica back in
        every room it has members of and tell the rooms' other replicas."""
        try:
            await self.refresh()
        except Exception as exc:
            log.warning("memberships not re-asserted yet (%s); the refresh loop retries", exc)
            return
        for state in list(self._rooms.values()):
            if state.announced:
                self._announce(state, "add")

    async def _leave_all(self) -> None:
        assert self._redis is not None
        announced = [s for s in self._rooms.values() if s.announced]
        if not announced:
            return
        async with self._writes:
            with contextlib.suppress(Exception):
                pipe = self._redis.pipeline(transaction=False)
                for state in announced:
                    pipe.srem(state.key, self.replica_id)
                await pipe.execute()
        for state in announced:
            self._announce(state, "remove")


class _OwnerWorker:
    """Runs one served call's owner handler over its messages, in order, one at a time."""

    def __init__(self, call_id: str, handler: OwnerHandler) -> None:
        self.call_id = call_id
        self._handler = handler
        self._queue: asyncio.Queue[Envelope | None] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(), name=f"owner-{call_id}")

    def put(self, envelope: Envelope) -> None:
        if self._queue.qsize() >= OWNER_QUEUE_LIMIT:
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
            OWNER_QUEUE_DROPPED.inc()
        self._queue.put_nowait(envelope)

    def stop(self) -> None:
        self._queue.put_nowait(None)

    async def _run(self) -> None:
        while (envelope := await self._queue.get()) is not None:
            try:
                await self._handler(envelope)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("owner message handler failed", extra={"call_id": self.call_id})
