"""Participants of a call whose owner (upstream bridge) is another replica.

Two sides of the call's owner channel (``owner:<call_id>``, see relay.cluster.manager):

**Here, a non-owner replica** (``RemoteCalls``): a client connected here joins the call's rooms
*locally* (so the client manager routes the owner's room emits here), then a ``join`` {sid, role}
goes to the owner. The client's audio (raw bytes as the payload, never base64) and commands are
forwarded with ``audio`` / ``event``; its disconnect sends ``leave``. A watcher per call follows
the registry record: the call ended → the clients here are let go (they already got
``call.ended`` through routing); the owner changed → every participant joins the new owner; the
owner is gone (no heartbeat, lease expired, or nobody serving its owner channel) → the call is
taken over here (``TakeOver``: claim with the dead owner's epoch, start a new upstream
conversation, attach these participants to the new local bridge).

**The owner** (``OwnerEndpoint``, one per owned bridge): decodes those messages and applies them
to the bridge as the Socket.IO handlers do for local clients: ``join`` adds a participant (the
bridge sends ``call.ready`` {resumed: true} to its sid, routed back to its replica), ``audio``
and ``event`` go through the same validation and dispatch, rejections are emitted to the sid.
Participants of replicas whose heartbeat is gone are treated as disconnected.

Whether an owner is reachable right now is asked of Redis directly: ``PUBSUB NUMSUB`` (and
``SHARDNUMSUB``) of the owner channel counts its subscribers, and an owner process that died
(kill -9) loses its subscription the moment its connection closes, well before its heartbeat
key expires. That is what makes a crash failover fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from relay import metrics
from relay.bridge import CallBridge, Emitter
from relay.cluster.channels import Channels
from relay.cluster.envelope import Envelope
from relay.cluster.registry import (
    REDIS_ERRORS,
    CallRecord,
    ClusterRegistry,
    RegistryUnavailable,
)
from relay.protocol import client as wire
from relay.registry import Participant, Role, call_room, monitors_room
from relay.sessions import CallSession

log = logging.getLogger(__name__)

JOIN = "join"
LEAVE = "leave"
AUDIO = "audio"
EVENT = "event"

# How often a non-owner replica looks at the record of a call whose clients it holds.
WATCH_SECONDS = 0.5


class OwnerRouting(Protocol):
    """What this module needs of the client manager (relay.cluster.manager)."""

    async def send_to_owner(
        self,
        call_id: uuid.UUID | str,
        kind: str,
        header: Mapping[str, Any],
        payload: bytes = b"",
    ) -> None: ...

    async def serve_owner(
        self, call_id: uuid.UUID | str, handler: Callable[[Envelope], Awaitable[None]]
    ) -> None: ...

    async def unserve_owner(self, call_id: uuid.UUID | str) -> None: ...


async def owner_listeners(redis: Redis, channels: Channels, call_id: uuid.UUID) -> int | None:
    """Subscribers of the call's owner channel (plain and sharded); None if Redis is away."""
    channel = channels.owner(call_id)
    try:
        async with asyncio.timeout(2.0):
            plain = await redis.pubsub_numsub(channel)
            try:
                sharded = await redis.pubsub_shardnumsub(channel)
            except ResponseError:  # Redis < 7 has no sharded pub/sub
                sharded = []
    except REDIS_ERRORS:
        return None
    return sum(int(count) for _, count in (*plain, *sharded))


async def owner_reachable(redis: Redis, channels: Channels, record: CallRecord) -> bool:
    """False only when Redis says twice, a moment apart, that nobody serves the owner channel."""
    for attempt in range(2):
        listeners = await owner_listeners(redis, channels, record.call_id)
        if listeners is None or listeners > 0:
            return True
        if attempt == 0:
            await asyncio.sleep(0.1)
    return False


def reject(emitter: Emitter, sid: str, rejection: wire.ClientRejection) -> Awaitable[None]:
    metrics.ERRORS.labels(rejection.code).inc()
    return emitter.emit(wire.EV_ERROR, wire.error(rejection.code, rejection.message), room=sid)


# --- the owner side ------------------------------------------------------------------------------


class OwnerEndpoint:
    """Applies a call's messages from other replicas to its bridge (``bridge.owner_link``)."""

    def __init__(
        self,
        bridge: CallBridge,
        routing: OwnerRouting,
        cluster: ClusterRegistry,
        emitter: Emitter,
        *,
        max_audio_bytes: int,
    ) -> None:
        self._bridge = bridge
        self._routing = routing
        self._cluster = cluster
        self._emitter = emitter
        self._max_audio = max_audio_bytes
        self._roles: dict[str, str] = {}
        self._open = False

    async def open(self) -> None:
        await self._routing.serve_owner(self._bridge.call_id, self.handle)
        self._open = True
        self._bridge.owner_link = self

    async def close(self) -> None:
        if self._open:
            self._open = False
            await self._routing.unserve_owner(self._bridge.call_id)

    async def handle(self, envelope: Envelope) -> None:
        header, bridge = envelope.header, self._bridge
        kind, origin, sid = header.get("kind"), envelope.origin, header.get("sid")
        if not isinstance(sid, str) or origin is None:
            return
        if kind == JOIN:
            role: Role = "monitor" if header.get("role") == "monitor" else "caller"
            ip = header.get("ip")
            self._roles[sid] = role
            participant = Participant(
                sid=sid,
                call_id=bridge.call_id,
                tenant_id=bridge.tenant_id,
                role=role,
                client_ip=ip if isinstance(ip, str) else "",
                remote=True,
            )
            await bridge.join(participant, replica=origin)
        elif kind == LEAVE:
            self._roles.pop(sid, None)
            if bridge.remote_sids.get(sid) == origin:
                bridge.leave(sid)
        elif kind == AUDIO:
            # Only the current caller speaks: a replaced caller's late frames go nowhere.
            if sid != bridge.caller_sid or bridge.ended:
                return
            rejection = await bridge.caller_audio(envelope.payload)
            if rejection is not None:
                await reject(self._emitter, sid, rejection)
        elif kind == EVENT:
            await self._event(sid, header.get("event"), envelope.payload)

    async def _event(self, sid: str, event: Any, payload: bytes) -> None:
        role = self._roles.get(sid)
        if role is None or not isinstance(event, str) or self._bridge.ended:
            return
        try:
            data = orjson.loads(payload) if payload else None
        except orjson.JSONDecodeError:
            return
        command = wire.parse_client_event(
            event,
            data,
            role=role,  # type: ignore[arg-type]
            max_audio_bytes=self._max_audio,
        )
        if isinstance(command, wire.ClientRejection):
            rejection: wire.ClientRejection | None = command
        else:
            rejection = await self._bridge.handle(sid, role, command)
        if rejection is not None:
            await reject(self._emitter, sid, rejection)

    async def check_replicas(self) -> None:
        bridge = self._bridge
        for replica in set(bridge.remote_sids.values()):
            if not await self._cluster.replica_alive(replica):
                gone = [sid for sid, r in bridge.remote_sids.items() if r == replica]
                log.warning(
                    "replica %s is gone; its %d participant(s) left the call",
                    replica,
                    len(gone),
                    extra={"call_id": str(bridge.call_id)},
                )
                for sid in gone:
                    self._roles.pop(sid, None)
                    bridge.leave(sid)


# --- the non-owner side --------------------------------------------------------------------------


@dataclass
class RemoteCall:
    call_id: uuid.UUID
    session: CallSession
    owner: str
    epoch: int
    participants: dict[str, Participant] = field(default_factory=dict)
    watcher: asyncio.Task[None] | None = None


# Takes over a call whose owner is gone: claims it and starts a local bridge for these
# participants; True when this replica owns the call now.
TakeOver = Callable[[RemoteCall, CallRecord | None], Awaitable[bool]]


class RemoteCalls:
    def __init__(
        self,
        *,
        cluster: ClusterRegistry,
        routing: OwnerRouting,
        emitter: Emitter,
        redis: Redis,
        channels: Channels,
        take_over: TakeOver,
        watch_seconds: float = WATCH_SECONDS,
    ) -> None:
        self._cluster = cluster
        self._routing = routing
        self._emitter = emitter
        self._redis = redis
        self._channels = channels
        self._take_over = take_over
        self._watch_seconds = watch_seconds
        self._calls: dict[uuid.UUID, RemoteCall] = {}

    def __len__(self) -> int:
        return sum(len(c.participants) for c in self._calls.values())

    def sids(self) -> list[str]:
        return [sid for call in self._calls.values() for sid in call.participants]

    async def attach(
        self, participant: Participant, record: CallRecord, session: CallSession
    ) -> None:
        """A fully connected client of a call owned by ``record.owner``."""
        call = self._calls.get(participant.call_id)
        if call is None:
            call = RemoteCall(participant.call_id, session, record.owner, record.epoch)
            self._calls[participant.call_id] = call
        participant.remote = True
        call.participants[participant.sid] = participant
        await self._emitter.enter_room(participant.sid, call_room(participant.call_id))
        if participant.role == "monitor" and self._holds(call, participant):
            await self._emitter.enter_room(participant.sid, monitors_room(participant.call_id))
        if not self._holds(call, participant):
            # It disconnected while the rooms were entered (they wait on Redis): its leave has
            # gone to the owner already, and a join after it would make a dead connection the
            # caller again (and have the owner disconnect a newer connection of the caller).
            return
        await self._join(call, participant)
        if call.watcher is None or call.watcher.done():
            call.watcher = asyncio.create_task(
                self._watch(call), name=f"remote-call-{call.call_id}"
            )

    def _holds(self, call: RemoteCall, participant: Participant) -> bool:
        return (
            self._calls.get(call.call_id) is call
            and call.participants.get(participant.sid) is participant
        )

    async def _join(self, call: RemoteCall, participant: Participant) -> None:
        await self._routing.send_to_owner(
            call.call_id,
            JOIN,
            {"sid": participant.sid, "role": participant.role, "ip": participant.client_ip},
        )

    async def forward(self, participant: Participant, event: str, data: Any) -> None:
        """A client event already validated here (role, size, shape)."""
        if event == wire.EV_AUDIO and isinstance(data, bytes | bytearray):
            await self._routing.send_to_owner(
                participant.call_id, AUDIO, {"sid": participant.sid}, bytes(data)
            )
            return
        await self._routing.send_to_owner(
            participant.call_id,
            EVENT,
            {"sid": participant.sid, "event": event},
            orjson.dumps(data) if data is not None else b"",
        )

    async def detach(self, participant: Participant) -> None:
        call = self._calls.get(participant.call_id)
        if call is None or call.participants.pop(participant.sid, None) is None:
            return
        with contextlib.suppress(Exception):
            await self._routing.send_to_owner(call.call_id, LEAVE, {"sid": participant.sid})
        if not call.participants:
            self._forget(call)

    def _forget(self, call: RemoteCall) -> None:
        if self._calls.get(call.call_id) is call:
            del self._calls[call.call_id]
        task = call.watcher
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def close(self) -> None:
        for call in list(self._calls.values()):
            self._forget(call)

    # --- following the owner ----------------------------------------------------------------
    async def _watch(self, call: RemoteCall) -> None:
        while call.participants and self._calls.get(call.call_id) is call:
            await asyncio.sleep(self._watch_seconds)
            try:
                record = await self._cluster.lookup(call.call_id)
            except RegistryUnavailable:
                continue  # Redis is away: nothing to learn, nothing to change
            except Exception:
                log.exception("watching a remote call failed", extra={"call_id": str(call.call_id)})
                continue
            try:
                if not await self._follow(call, record):
                    return
            except Exception:
                log.exception(
                    "following a remote call's owner failed", extra={"call_id": str(call.call_id)}
                )

    async def _follow(self, call: RemoteCall, record: CallRecord | None) -> bool:
        """Act on the latest record; False once this call is no longer held here as remote."""
        me = self._cluster.replica_id
        if record is not None and record.ended:
            await asyncio.sleep(self._watch_seconds)  # let call.ended reach the clients first
            for sid in list(call.participants):
                with contextlib.suppress(Exception):
                    await self._emitter.disconnect(sid)
            self._forget(call)
            return False
        if record is not None and record.owner == me:
            # Taken over here (by another participant's connect): become local participants.
            if await self._take_over(call, record):
                self._forget(call)
                return False
            return True
        # No record: Redis lost it (a restart); the owner restores it if it is still there.
        if record is None and await self._owner_still_there(call):
            return True
        alive = record is not None and record.has_live_owner
        if alive and record is not None:
            alive = await owner_reachable(self._redis, self._channels, record)
        if alive and record is not None:
            if (record.owner, record.epoch) != (call.owner, call.epoch):
                # A new owner (it took the call over): it has to learn who is here.
                call.owner, call.epoch = record.owner, record.epoch
                for participant in list(call.participants.values()):
                    await self._join(call, participant)
            return True
        # Only a replica holding the caller takes over; monitors wait for the caller's replica.
        if await self._take_over(call, record):
            log.warning(
                "owner of a call was gone; took the call over",
                extra={"call_id": str(call.call_id), "owner": call.owner},
            )
            self._forget(call)
            return False
        return True

    async def _owner_still_there(self, call: RemoteCall) -> bool:
        try:
            if await self._cluster.replica_alive(call.owner):
                return True
        except RegistryUnavailable:
            return True
        listeners = await owner_listeners(self._redis, self._channels, call.call_id)
        return listeners is None or listeners > 0
