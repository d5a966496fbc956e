"""Where a call's bridge lives: the admission and placement steps shared by every way in.

Socket.IO connections (relay.sio_server) and Twilio Media Streams (relay.phone.stream) both verify
a call token, fetch the call's session and then either attach to the call's bridge, join it on
another replica, or start its bridge here and own the call (claiming it in the cluster registry).
Each refusal is a ``Refusal`` with a stable code that each transport reports its own way
(``connect_error`` data, a WebSocket close).

A phone call's bridge is always started where its stream arrives and is **pinned** there: the
phone line cannot reconnect to another replica, so the call is never handed over or taken over;
when its owner dies, whoever notices ends it (``end_orphan``).

Placement decisions for one call are serialized per replica (``placement``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from relay import metrics
from relay.admission import AdmissionUnavailable
from relay.bridge import CallBridge
from relay.cluster.registry import CallEndedInRegistry, CallRecord, RegistryUnavailable
from relay.cluster.remote import OwnerEndpoint, owner_reachable
from relay.jwks import KeysUnavailable
from relay.protocol import client as wire
from relay.protocol.close_codes import OWNER_LOST
from relay.registry import call_room
from relay.runtime import RelayRuntime
from relay.sessions import CallSession, SessionError
from voicerelay.call_events import InvalidCallEvent, make_event
from voicerelay.call_token import CallTokenClaims, CallTokenError

log = logging.getLogger(__name__)


class Refusal(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class RemotePlacement:
    """The call is owned by another live replica: the connection joins it from here."""

    record: CallRecord
    session: CallSession


Placement = CallBridge | RemotePlacement
# Called with a new bridge before it starts (e.g. to attach its phone leg).
Prepare = Callable[[CallBridge], None]


class CallPlacer:
    def __init__(self, runtime: RelayRuntime, *, max_audio_bytes: int) -> None:
        self._runtime = runtime
        self._registry = runtime.registry
        self._max_audio = max_audio_bytes
        self._placing: dict[uuid.UUID, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def placement(self, call_id: uuid.UUID) -> AsyncIterator[None]:
        """One placement decision (attach, join remotely, claim) at a time per call here."""
        lock = self._placing.setdefault(call_id, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and self._placing.get(call_id) is lock:
                del self._placing[call_id]

    # --- admission ----------------------------------------------------------------------------
    async def verify(self, token: str) -> CallTokenClaims:
        try:
            return await self._runtime.verifier.verify(token)
        except KeysUnavailable:
            raise Refusal(
                "upstream_unavailable", "Call tokens cannot be checked right now; try again."
            ) from None
        except CallTokenError as exc:
            raise Refusal("unauthorized", f"The call token is not valid: {exc}.") from None

    async def session(self, token: str, claims: CallTokenClaims) -> CallSession:
        try:
            session = await self._runtime.sessions.fetch(token)
        except SessionError as exc:
            raise Refusal(exc.code, exc.message) from None
        if session.call_id != claims.call_id or session.tenant_id != claims.tenant_id:
            raise Refusal("unauthorized", "The call token does not match its call.")
        return session

    # --- placement ----------------------------------------------------------------------------
    def local_bridge(self, call_id: uuid.UUID) -> CallBridge | None:
        bridge = self._registry.get(call_id)
        if self._registry.recently_ended(call_id) or (
            bridge is not None and bridge.ended and not bridge.abandoned
        ):
            raise Refusal("call_ended", "This call has ended.")
        return bridge if bridge is not None and not bridge.ended else None

    async def place(self, claims: CallTokenClaims, session: CallSession) -> Placement:
        """Where this connection's call lives, cluster-wide (claiming it if nobody has it)."""
        runtime, cluster = self._runtime, self._runtime.cluster
        assert cluster is not None
        local = self.local_bridge(claims.call_id)
        if local is not None:
            return local
        for _ in range(3):
            record = await self.lookup(claims.call_id)
            if record is not None and record.ended:
                raise Refusal("call_ended", "This call has ended.")
            if (
                record is not None
                and record.owner not in ("", cluster.replica_id)
                and record.has_live_owner
                and await owner_reachable(runtime.redis, runtime.channels, record)
            ):
                if runtime.drain.draining:
                    raise Refusal("draining", "This relay is shutting down; connect again.")
                return RemotePlacement(record, session)
            if record is not None and record.pinned:
                # Its owner is gone, and with it the phone line: nobody can carry the call on.
                await self.end_orphan(record)
                raise Refusal("call_ended", "This call has ended.")
            if claims.role == "monitor":
                raise Refusal("not_ready", "The call is not in progress yet; try again shortly.")
            bridge = await self.new_bridge(claims, session, record)
            if bridge is not None:
                return bridge
            # Another replica claimed the call a moment ago: join it there.
        raise Refusal("upstream_unavailable", "The call could not be placed; try again.")

    async def place_pinned(
        self, claims: CallTokenClaims, session: CallSession, prepare: Prepare
    ) -> CallBridge:
        """Start the call's bridge here for a connection that cannot move (a phone stream).
        A call that already has a bridge anywhere is refused: a phone line has one stream."""
        call_id = claims.call_id
        busy = Refusal("call_in_progress", "This call is already connected.")
        if self._runtime.cluster is None:
            if self.local_bridge(call_id) is not None:
                raise busy
            bridge = await self.new_bridge(claims, session, prepare=prepare)
        else:
            async with self.placement(call_id):
                if self.local_bridge(call_id) is not None:
                    raise busy
                record = await self.lookup(call_id)
                if record is not None and record.ended:
                    raise Refusal("call_ended", "This call has ended.")
                if record is not None:
                    raise busy
                bridge = await self.new_bridge(claims, session, prepare=prepare)
        if bridge is None or bridge.phone is None:
            raise busy  # another connection won the race for this call
        return bridge

    async def lookup(self, call_id: uuid.UUID) -> CallRecord | None:
        assert self._runtime.cluster is not None
        try:
            return await self._runtime.cluster.lookup(call_id)
        except RegistryUnavailable:
            raise Refusal(
                "upstream_unavailable", "The relay cannot place calls right now; try again."
            ) from None

    async def new_bridge(
        self,
        claims: CallTokenClaims | None,
        session: CallSession,
        record: CallRecord | None = None,
        *,
        prepare: Prepare | None = None,
    ) -> CallBridge | None:
        """Start the call's bridge here (and own the call). ``claims`` is None for a take-over
        by a watcher; ``record`` is the registry's view of the call, if it has one. Returns None
        when another replica claimed the call first."""
        runtime = self._runtime
        cluster = runtime.cluster
        # The call had a conversation before: this bridge continues the call with a new one.
        takeover = record if record is not None and record.conversation_ids else None
        if (
            claims is not None
            and takeover is None
            and session.status == "created"
            and not claims.may_first_connect()
        ):
            raise Refusal("unauthorized", "The call token's time to connect has passed.")
        # A call that is already running keeps its slot whatever the cap is now (idempotent).
        limit = 1_000_000 if takeover is not None else session.tenant_max_concurrent_calls
        try:
            held = await runtime.cap.acquire(session.tenant_id, session.call_id, limit)
        except AdmissionUnavailable:
            raise Refusal(
                "upstream_unavailable", "The relay cannot admit calls right now; try again."
            ) from None
        if not held:
            raise Refusal("tenant_limit", "The tenant's limit of concurrent calls is reached.")
        call_id, tenant_id = session.call_id, session.tenant_id
        # Everything below is synchronous up to the claim: no other connect can slip in between
        # the check and the registration (and the cluster path holds the placement lock).
        existing = self._registry.get(call_id)
        if existing is not None and not existing.ended:
            return existing  # another connection of this caller won the race
        if (existing is not None and not existing.abandoned) or self._registry.recently_ended(
            call_id
        ):
            # The call ended meanwhile; its own release may have run before our acquire.
            await runtime.cap.release(tenant_id, call_id)
            raise Refusal("call_ended", "This call has ended.")
        if runtime.drain.draining:
            if takeover is None:
                await runtime.cap.release(tenant_id, call_id)
            raise Refusal("draining", "This relay is shutting down; connect again.")
        bridge = CallBridge(runtime.bridge_services, session, takeover=takeover)
        if prepare is not None:
            prepare(bridge)
        if cluster is None:
            self._registry.add(bridge)
            bridge.start()
            return bridge
        # Serve the owner channel before claiming: an owner is reachable as soon as it owns.
        endpoint = OwnerEndpoint(
            bridge,
            runtime.routing,
            cluster,
            runtime.bridge_services.emitter,
            max_audio_bytes=self._max_audio,
        )
        await endpoint.open()
        dead_owner = record if record is not None and record.owner else None
        try:
            epoch = await cluster.claim(
                call_id, tenant_id, dead_owner=dead_owner, pinned=bridge.pinned
            )
        except CallEndedInRegistry:
            await endpoint.close()
            await runtime.cap.release(tenant_id, call_id)
            raise Refusal("call_ended", "This call has ended.") from None
        except RegistryUnavailable:
            await endpoint.close()
            if takeover is None:
                await runtime.cap.release(tenant_id, call_id)
            raise Refusal(
                "upstream_unavailable", "The relay cannot place calls right now; try again."
            ) from None
        if epoch is None:
            # Lost the race; the slot (same call id) is the winner's now, so it stays.
            await endpoint.close()
            return None
        self._registry.add(bridge)
        bridge.start(epoch)
        if takeover is not None:
            log.info(
                "took the call over; starting a new upstream conversation",
                extra={"call_id": str(call_id), "epoch": epoch, "previous": takeover.owner},
            )
        return bridge

    async def end_orphan(self, record: CallRecord) -> bool:
        """End a pinned call whose owner died (no take-over: its phone line died with it): the
        registry tombstone, the tenant slot, the call log's ``ended`` and ``call.ended`` for
        whoever listens here. True when this replica did it (exactly one replica does)."""
        runtime, cluster = self._runtime, self._runtime.cluster
        assert cluster is not None
        call_id = record.call_id
        try:
            epoch = await cluster.claim(
                call_id, record.tenant_id, dead_owner=record if record.owner else None, pinned=True
            )
            if epoch is None:
                return False
            await cluster.release(call_id, epoch, ended=True)
        except (CallEndedInRegistry, RegistryUnavailable):
            return False
        await runtime.cap.release(record.tenant_id, call_id)
        how = OWNER_LOST
        try:
            event = make_event(
                "ended",
                tenant_id=uuid.UUID(record.tenant_id),
                call_id=call_id,
                # The owner reported its sequence with room to spare (CallBridge.report).
                seq=max(0, record.seq) + 1,
                data={
                    "reason": how.reason,
                    "code": how.code,
                    "ended_by": how.ended_by,
                    "failed": how.failed,
                },
            )
        except (InvalidCallEvent, ValueError):
            log.error("could not log the end of an orphaned call", extra={"call_id": str(call_id)})
        else:
            runtime.call_log.emit(event)
        metrics.CALLS.labels(how.reason).inc()
        metrics.ERRORS.labels(how.code).inc()
        with contextlib.suppress(Exception):
            await runtime.bridge_services.emitter.emit(
                wire.EV_ENDED, wire.call_ended(how.reason, how.code), room=call_room(call_id)
            )
        log.warning(
            "the replica carrying a phone call died; the call cannot move, so it ended",
            extra={"call_id": str(call_id), "owner": record.owner},
        )
        return True
