"""CallBridge: one call on this replica — its upstream conversation, participants, audio and end.

A bridge is created when a call's caller first connects here and lives until the call ends,
however that happens: the caller hangs up, the agent closes (any close code), the upstream fails
or never answers, the call runs past its maximum duration or goes idle, the caller vanishes and
does not come back within the reconnect grace, or the relay drains. Every one of those paths goes
through ``end()`` (idempotent) and the single ``_finish()`` that sends exactly one ``call.ended``
to every participant, closes the upstream, releases the tenant slot, writes the final usage and
the ``ended`` call-log event, updates the metrics and removes the bridge from the registry.

Three tasks per call: ``_run`` (start the conversation, then handle upstream events), the outbox
pump (the only writer to the call's clients) and the watchdog (timers, lease renewal, periodic
usage). Client audio is handled inline in the Socket.IO handler: validate, transcode, send.

With several replicas (``BridgeServices.cluster`` set) the bridge is its call's **owner**: it
holds the call's fenced lease in the Redis registry and renews it from the watchdog with its
epoch, reporting usage and conversation ids each time so a successor can continue from them.
Participants may sit on other replicas (``join(..., replica=...)``); emits reach them through the
client manager's routing. A renewal that finds another owner means this replica lost the call:
the bridge stops *quietly* (``abandon``): no ``call.ended``, no ``ended`` call-log event, the
tenant slot and the registry record are left to the new owner, and local clients are told to
reconnect (they land on a replica that reaches the new owner). A renewal that fails because
Redis is unreachable changes nothing: the call goes on and the lease is re-asserted (restored)
once Redis answers. A bridge created by a take-over (``takeover``: the previous owner died or
handed the call over) starts a new upstream conversation for the same call: ``call.ready`` says
``resumed: true`` with the new conversation id, and usage continues from the reported totals.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from relay import metrics
from relay.admission import AdmissionUnavailable, TenantCallCap
from relay.audio.transcode import Transcoder, make_transcoder
from relay.call_log import CallLogProducer
from relay.cluster.registry import (
    CallRecord,
    ClusterRegistry,
    OwnedCall,
    RegistryUnavailable,
    Renewal,
    Restore,
)
from relay.outbox import Outbox, Outgoing
from relay.protocol import client as wire
from relay.protocol.close_codes import (
    AGENT_END_CALL,
    CALLER_HANGUP,
    CLIENT_GONE,
    IDLE_TIMEOUT,
    MAX_DURATION,
    OWNER_LOST,
    RELAY_ERROR,
    CallEnd,
)
from relay.protocol.elevenlabs import (
    AgentAudio,
    AgentResponse,
    AgentResponseCorrection,
    AgentToolResponse,
    ClientToolCall,
    ConversationStarted,
    ElevenLabsProtocol,
    Interruption,
    ProtocolViolation,
    UpstreamError,
    UpstreamEvent,
    UserTranscript,
)
from relay.registry import CallRegistry, Participant, call_room, monitors_room
from relay.sessions import CallSession
from relay.upstream import Upstream, UpstreamFailed
from voicerelay.audio_formats import coerce_audio_format
from voicerelay.call_events import InvalidCallEvent, make_event
from voicerelay.logs import call_id_var, tenant_id_var
from voicerelay.settings import Settings

log = logging.getLogger(__name__)

# Bound once: the per-frame path should not look labels up.
_FRAMES_IN = metrics.AUDIO_FRAMES.labels("in")
_FRAMES_OUT = metrics.AUDIO_FRAMES.labels("out")
_BYTES_IN = metrics.AUDIO_BYTES.labels("in")
_BYTES_OUT = metrics.AUDIO_BYTES.labels("out")

EV_CALLER_AUDIO = "caller_audio"
EV_RECONNECT = "relay.reconnect"

# Not a way a call ends: this replica lost the call to another owner, which carries on with it.
OWNERSHIP_LOST = CallEnd("ownership_lost", "ownership_lost", "relay", False)


@dataclass(frozen=True)
class BridgeOptions:
    # A caller whose connection drops has this long to reconnect and resume the same call.
    caller_grace_seconds: float = 30.0
    # Cumulative usage is written to the call log this often while a call lives.
    usage_interval_seconds: float = 15.0
    # Engine.IO packets waiting for one client before its agent audio queues in the outbox
    # (where the oldest is dropped). A binary emit is two packets.
    client_backlog_packets: int = 16
    # How long the end of a call waits for ``call.ended`` to be handed to the clients.
    end_flush_seconds: float = 2.0
    # After the agent's end_call tool, ElevenLabs closes the conversation itself; if it has
    # not within this long of the agent's last audio, the relay ends the call (the tenant's
    # slot must not stay held by a conversation that is over).
    agent_end_call_close_seconds: float = 5.0


class Emitter(Protocol):
    """How a bridge reaches its clients. Emits address rooms (a sid is a room of one)."""

    async def emit(self, event: str, data: Any, *, room: str) -> None: ...

    async def enter_room(self, sid: str, room: str) -> None: ...

    async def disconnect(self, sid: str) -> None: ...

    def backlog(self, sid: str) -> int:
        """Packets queued for ``sid`` and not yet written to its socket (0 if not local)."""
        ...

    async def hand_off(self, sid: str, reason: str) -> None:
        """Tell a client connected here to reconnect (``relay.reconnect``) and close its
        transport so its Socket.IO client reconnects on its own."""
        ...


class PhoneLink(Protocol):
    """The call's phone line (relay.phone.leg), when the caller is one. It is the caller: agent
    audio goes to it directly, not through the outbox, and it cannot move to another replica."""

    def play(self, audio: bytes, encoded: str, received_at: float) -> None:
        """Queue agent audio (μ-law 8 kHz; ``encoded``: the same as base64, or "")."""
        ...

    def interrupt(self) -> None:
        """Barge-in: cut what is queued or playing, at once."""
        ...

    async def ready(self) -> None:
        """The agent is there: deliver what the caller said meanwhile, in order."""
        ...

    def tool_call(self, event: ClientToolCall) -> None:
        """The agent asked for a client tool; the phone line answers it (no app can)."""
        ...

    async def finish(self, how: CallEnd) -> None:
        """The call ended: let queued agent audio play if the agent ended it, close the line."""
        ...

    def report(self) -> dict[str, int]:
        """Extra usage fields: what the caller heard, marks, key presses."""
        ...


class OwnerLink(Protocol):
    """The owner side of the call's cross-replica channel (relay.cluster.remote)."""

    async def close(self) -> None: ...

    async def check_replicas(self) -> None:
        """Let participants on replicas that died go (as if they had disconnected)."""
        ...


@dataclass(frozen=True)
class BridgeServices:
    settings: Settings
    emitter: Emitter
    registry: CallRegistry
    call_log: CallLogProducer
    cap: TenantCallCap
    options: BridgeOptions
    # The Redis call registry when several replicas share the calls; None for a lone replica.
    cluster: ClusterRegistry | None = None


class CallBridge:
    def __init__(
        self,
        services: BridgeServices,
        session: CallSession,
        *,
        takeover: CallRecord | None = None,
    ) -> None:
        self._services = services
        self._emitter = services.emitter
        self.session = session
        self.call_id: uuid.UUID = session.call_id
        self.tenant_id: uuid.UUID = session.tenant_id
        self.room = call_room(self.call_id)
        self.monitors_room = monitors_room(self.call_id)
        self.state = "connecting"
        self.conversation_id: str | None = None
        self.caller_sid: str | None = None
        self.monitor_sids: set[str] = set()
        self._had_caller = False
        self._client_format = coerce_audio_format(session.client_audio_format)
        agent = session.agent
        self._protocol = ElevenLabsProtocol(
            expected_input_format=agent.input_audio_format,
            expected_output_format=agent.output_audio_format,
        )
        self._to_agent: Transcoder = make_transcoder(self._client_format, agent.input_audio_format)
        self._to_client: Transcoder = make_transcoder(
            agent.output_audio_format, self._client_format
        )
        self._upstream: Upstream | None = None
        self._outbox = Outbox(services.settings.relay_client_queue_chunks)
        self._seq = 0
        self.created_at = time.monotonic()
        self._last_audio = self.created_at
        self._caller_left_at: float | None = None
        # When the agent ran its end_call tool, moved on by any agent audio after it.
        self._agent_hung_up_at: float | None = None
        self._end: CallEnd | None = None
        self._done = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._run_task: asyncio.Task[None] | None = None
        # Usage, cumulative, as the client sees it (its own format, both directions).
        self.frames_in = 0
        self.bytes_in = 0
        self.frames_out = 0
        self.bytes_out = 0
        # Ownership (cluster only): the fenced epoch of our lease, the conversations of this
        # call so far (ours last), participants connected to other replicas (sid -> replica).
        self.epoch: int | None = None
        self.owner_link: OwnerLink | None = None
        self.conversation_ids: list[str] = []
        self.remote_sids: dict[str, str] = {}
        # The caller's phone line, for a phone call (attached before ``start``).
        self.phone: PhoneLink | None = None
        self._quiet = False
        self._renew_now = False
        # Participants still owed ``call.ready`` (sid -> resumed). It goes to each sid, never to
        # the room: a room emit is resolved when the pump sends it, by which time a join that
        # also saw the call ready may have put the same sid in the room (a second call.ready).
        self._ready_owed: dict[str, bool] = {}
        self.takeover = takeover is not None
        if takeover is not None:
            self._continue_from(takeover)

    def _continue_from(self, record: CallRecord) -> None:
        """A successor owner: the call already had a caller, a conversation and usage."""
        self._had_caller = True
        self.conversation_ids = list(record.conversation_ids)
        self._seq = max(0, record.seq)
        usage = record.usage
        for name in ("frames_in", "bytes_in", "frames_out", "bytes_out"):
            value = usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                setattr(self, name, value)

    # --- lifecycle ----------------------------------------------------------------------------
    def attach_phone(self, phone: PhoneLink) -> None:
        """Make ``phone`` the call's caller (before ``start``)."""
        self.phone = phone

    @property
    def pinned(self) -> bool:
        """The call cannot move to another replica: its caller is a phone line connected here."""
        return self.phone is not None

    @property
    def how_ended(self) -> CallEnd | None:
        return self._end

    def start(self, epoch: int | None = None) -> None:
        """Start the call; ``epoch`` is our ownership lease's (cluster only)."""
        self.epoch = epoch
        metrics.ACTIVE_CALLS.inc()
        metrics.TENANT_ACTIVE_CALLS.started(self.tenant_id)
        if not self.takeover:
            self._log_event("connecting")
        if self.phone is not None:
            self._had_caller = True
            self._log_event("connected", resumed=False, leg="phone")
        name = f"call-{self.call_id}"
        self._run_task = asyncio.create_task(self._run(), name=name, context=self._log_context())
        self._tasks = [
            asyncio.create_task(self._pump(), name=name + "-out", context=self._log_context()),
            asyncio.create_task(self._watch(), name=name + "-watch", context=self._log_context()),
        ]

    def _log_context(self) -> contextvars.Context:
        """A context for one of the call's tasks: every log line they write (the upstream's,
        the call log's too) carries the tenant and call ids."""
        context = contextvars.copy_context()
        context.run(tenant_id_var.set, str(self.tenant_id))
        context.run(call_id_var.set, str(self.call_id))
        return context

    @property
    def ended(self) -> bool:
        return self._end is not None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def end(self, how: CallEnd) -> None:
        """End the call (idempotent; the first reason wins). Returns at once."""
        if self._end is not None:
            return
        self._end = how
        task = self._run_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
        self._wake.set()

    def renew_soon(self) -> None:
        """Renew (or restore) the ownership lease now: Redis came back, perhaps empty."""
        self._renew_now = True
        self._wake.set()

    def abandon(self) -> None:
        """Another replica owns the call now: stop without ending the call for anyone."""
        if self._end is None:
            self._quiet = True
            self.end(OWNERSHIP_LOST)

    @property
    def abandoned(self) -> bool:
        return self._quiet

    async def wait_ended(self) -> None:
        await self._done.wait()

    async def _run(self) -> None:
        how: CallEnd | None = None
        try:
            how = await self._converse()
        except asyncio.CancelledError:
            pass  # end() was called; self._end says why
        except UpstreamFailed as exc:
            log.warning(
                "upstream conversation could not start: %s",
                exc.detail,
                extra={"call_id": str(self.call_id), "code": exc.end.code},
            )
            how = exc.end
        except Exception:
            log.exception("call failed inside the relay", extra={"call_id": str(self.call_id)})
            how = RELAY_ERROR
        finally:
            if self._end is None:
                self._end = how or RELAY_ERROR
            # Cleanup must finish even if the task is cancelled again meanwhile.
            await asyncio.shield(self._finish())

    async def _converse(self) -> CallEnd | None:
        settings = self._services.settings
        initiation = self._protocol.initiation_message(
            conversation_config_override=self.session.conversation_initiation.conversation_config_override,
            dynamic_variables=self.session.conversation_initiation.dynamic_variables,
        )
        started_at = time.monotonic()
        upstream, started = await Upstream.open(
            self.session.upstream_url,
            self._protocol,
            initiation,
            connect_timeout=settings.upstream_connect_timeout_seconds,
        )
        self._upstream = upstream
        metrics.UPSTREAM_CONNECT_SECONDS.observe(time.monotonic() - started_at)
        if self._end is not None:
            return None
        self._on_started(started)
        if self.phone is not None:
            await self.phone.ready()
        async for event in upstream.events():
            self._on_upstream_event(event, upstream.received_at)
            if self._end is not None:
                return None
        if self._agent_hung_up_at is not None:
            # The agent ended the conversation on purpose; however its socket then closed.
            return AGENT_END_CALL
        return upstream.end()

    def _on_started(self, started: ConversationStarted) -> None:
        self.conversation_id = started.conversation_id
        if started.conversation_id not in self.conversation_ids:
            self.conversation_ids.append(started.conversation_id)
        if self.epoch is not None:
            self.renew_soon()  # a successor must know this conversation from now on
        # The agent's real formats win over what the control API had on file.
        for attribute, name, build in (
            ("_to_agent", started.user_input_format, self._transcoder_to_agent),
            ("_to_client", started.agent_output_format, self._transcoder_to_client),
        ):
            if name:
                try:
                    setattr(self, attribute, build(name))
                except ValueError:
                    log.warning(
                        "agent announced an unknown audio format; keeping the configured one",
                        extra={"call_id": str(self.call_id)},
                    )
        self.state = "ready"
        self._last_audio = time.monotonic()
        self._log_event("upstream_connected", conversation_id=started.conversation_id)
        log.info(
            "call ready",
            extra={"call_id": str(self.call_id), "conversation_id": started.conversation_id},
        )
        # After a take-over the call goes on with a new conversation: resumed for the clients.
        owed, self._ready_owed = self._ready_owed, {}
        for sid, resumed in owed.items():
            if self._present(sid):
                self._send(
                    wire.EV_READY, self._ready_payload(resumed=resumed or self.takeover), sid
                )

    def _transcoder_to_agent(self, name: str) -> Transcoder:
        return make_transcoder(self._client_format, name)

    def _transcoder_to_client(self, name: str) -> Transcoder:
        return make_transcoder(name, self._client_format)

    def _ready_payload(self, *, resumed: bool) -> dict[str, Any]:
        return wire.call_ready(
            call_id=str(self.call_id),
            conversation_id=self.conversation_id or "",
            input_format=self._client_format.value,
            output_format=self._client_format.value,
            resumed=resumed,
        )

    async def _finish(self) -> None:
        how = self._end or RELAY_ERROR
        quiet = self._quiet
        self.state = "ended"
        duration_ms = int((time.monotonic() - self.created_at) * 1000)
        self._outbox.drop_audio()
        if not quiet:
            self._send(wire.EV_ENDED, wire.call_ended(how.reason, how.code), self.room)
            # The tombstone first: from now on a reconnect anywhere is refused call_ended.
            await self._release_ownership()
        self._outbox.close()
        pump, watch = self._tasks
        watch.cancel()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(pump), self._services.options.end_flush_seconds)
        pump.cancel()
        if self.owner_link is not None:
            with contextlib.suppress(Exception):
                await self.owner_link.close()
        if self._upstream is not None:
            await self._upstream.close()
        if self.phone is not None:
            try:
                await self.phone.finish(how)
            except Exception:
                log.exception("closing the phone line failed", extra={"call_id": str(self.call_id)})
        # Usage is cumulative, so even a replica that lost the call may report what it carried.
        self._log_event("usage", **self.usage())
        metrics.ACTIVE_CALLS.dec()
        metrics.TENANT_ACTIVE_CALLS.ended(self.tenant_id)
        sids = [s for s in (self.caller_sid, *self.monitor_sids) if s is not None]
        if quiet:
            # The new owner holds the tenant slot and the record now, and ends the call one day.
            self._services.registry.remove(self, ended=False)
            for sid in sids:
                if sid not in self.remote_sids:
                    with contextlib.suppress(Exception):
                        await self._emitter.hand_off(sid, "owner_moved")
            self._done.set()
            log.warning(
                "call ownership lost to another replica; stopped here",
                extra={"call_id": str(self.call_id), "epoch": self.epoch},
            )
            return
        await self._services.cap.release(self.tenant_id, self.call_id)
        self._log_event(
            "ended",
            reason=how.reason,
            code=how.code,
            ended_by=how.ended_by,
            duration_ms=duration_ms,
            failed=how.failed,
            **(self.phone.report() if self.phone is not None else {}),
        )
        metrics.CALLS.labels(how.reason).inc()
        if how.failed:
            metrics.ERRORS.labels(how.code or how.reason).inc()
        self._services.registry.remove(self)
        for sid in sids:
            with contextlib.suppress(Exception):
                await self._emitter.disconnect(sid)
        self._done.set()
        log.info(
            "call ended",
            extra={
                "call_id": str(self.call_id),
                "tenant_id": str(self.tenant_id),
                "reason": how.reason,
                "code": how.code,
                "duration_ms": duration_ms,
            },
        )

    # --- participants -------------------------------------------------------------------------
    async def join(self, participant: Participant, *, replica: str | None = None) -> None:
        """Add a fully connected participant (its connect ack has been sent). ``replica`` names
        the replica holding its connection when that is not this one (it joined the rooms
        there)."""
        sid = participant.sid
        if self.ended:
            if self._quiet:
                if replica is None:
                    await self._emitter.hand_off(sid, "owner_moved")
                return
            how = self._end or RELAY_ERROR
            await self._emitter.emit(wire.EV_ENDED, wire.call_ended(how.reason, how.code), room=sid)
            await self._emitter.disconnect(sid)
            return
        # The participant is recorded before anything is awaited: entering a room can wait on
        # Redis, and a leave() (its disconnect) or a newer connection of the caller arriving
        # meanwhile must find it here and win, not be overwritten by this join afterwards.
        if replica is None:
            self.remote_sids.pop(sid, None)
        else:
            self.remote_sids[sid] = replica
        resumed = False
        previous: str | None = None
        if participant.role == "monitor":
            self.monitor_sids.add(sid)
        else:
            previous, self.caller_sid = self.caller_sid, sid
            resumed = self._had_caller
            self._had_caller = True
            self._caller_left_at = None
            if resumed:
                # Whatever the resamplers held belongs to before the gap.
                self._to_agent.reset()
                self._to_client.reset()
            self._log_event("connected", resumed=resumed)
        ready_now = self.ready
        if not ready_now:
            self._ready_owed[sid] = resumed  # _on_started sends it, even while we await below
        if replica is None:
            await self._emitter.enter_room(sid, self.room)
            if participant.role == "monitor" and self._present(sid):
                await self._emitter.enter_room(sid, self.monitors_room)
        if previous is not None and previous != sid:
            # The same caller on a newer connection: the old one is dead or a duplicate.
            await self._emitter.disconnect(previous)
        if ready_now and self._present(sid):
            self._send(wire.EV_READY, self._ready_payload(resumed=resumed), sid)

    def _present(self, sid: str) -> bool:
        """``sid`` is still a participant (it has not left, nor been replaced as the caller)."""
        return sid == self.caller_sid or sid in self.monitor_sids

    def leave(self, sid: str) -> None:
        self.remote_sids.pop(sid, None)
        self._ready_owed.pop(sid, None)
        if sid == self.caller_sid:
            self.caller_sid = None
            if not self.ended:
                self._caller_left_at = time.monotonic()
                self._wake.set()
        else:
            self.monitor_sids.discard(sid)

    # --- client to agent ----------------------------------------------------------------------
    async def handle(self, sid: str, role: str, command: object) -> wire.ClientRejection | None:
        """A parsed client command from participant ``sid`` (connected here or elsewhere)."""
        if isinstance(command, wire.ClientAudio):
            return await self.caller_audio(command.data)
        if isinstance(command, wire.EndCall):
            if role == "monitor":
                await self._emitter.disconnect(sid)  # a monitor just leaves
            else:
                self.end(CALLER_HANGUP)
            return None
        return await self.caller_command(command)

    async def caller_audio(self, data: bytes) -> wire.ClientRejection | None:
        if not self.ready or self._upstream is None:
            return wire.ClientRejection(
                wire.ErrorCode.not_ready, "The call is not ready for audio yet."
            )
        if self._client_format.encoding == "pcm" and len(data) & 1:
            return wire.ClientRejection(
                wire.ErrorCode.invalid_message,
                "PCM audio must be whole 16-bit samples (an even byte count).",
            )
        await self._forward_caller_audio(self._upstream, data, "")
        return None

    async def phone_audio(self, data: bytes, encoded: str) -> None:
        """Audio from the phone line (μ-law; ``encoded`` is the same as Twilio's base64)."""
        upstream = self._upstream
        if upstream is not None and self.ready:
            await self._forward_caller_audio(upstream, data, encoded)

    async def _forward_caller_audio(self, upstream: Upstream, data: bytes, encoded: str) -> None:
        received = time.perf_counter()
        self._last_audio = time.monotonic()
        self.frames_in += 1
        self.bytes_in += len(data)
        if encoded and self._to_agent.passthrough:
            await upstream.send(self._protocol.user_audio_base64(encoded))
            metrics.ADDED_LATENCY_SECONDS.observe(time.perf_counter() - received)
        else:
            converted = self._to_agent.convert(data)
            if converted:
                await upstream.send(self._protocol.user_audio(converted))
                metrics.ADDED_LATENCY_SECONDS.observe(time.perf_counter() - received)
        _FRAMES_IN.inc()
        _BYTES_IN.inc(len(data))
        if self.monitor_sids:
            self._send_audio(EV_CALLER_AUDIO, data, self.monitors_room, self._last_audio)

    async def dtmf(self, digit: str) -> bool:
        """A key the caller pressed on the phone: a turn for the agent (``user_message``), and
        ``dtmf`` {digit} for the call's Socket.IO clients. False if the agent is not there yet."""
        upstream = self._upstream
        if upstream is None or not self.ready:
            return False
        self._last_audio = time.monotonic()
        await upstream.send(self._protocol.user_message(wire.dtmf_text(digit)))
        self._send(wire.EV_DTMF, wire.dtmf(digit), self.room)
        return True

    async def caller_command(self, command: object) -> wire.ClientRejection | None:
        """Any caller command other than audio."""
        if isinstance(command, wire.EndCall):
            self.end(CALLER_HANGUP)
            return None
        if not self.ready or self._upstream is None:
            return wire.ClientRejection(wire.ErrorCode.not_ready, "The call is not ready yet.")
        message = self._upstream_message(command)
        if message is None:
            return wire.ClientRejection(
                wire.ErrorCode.unknown_event, "This event is not supported."
            )
        await self._upstream.send(message)
        return None

    def _upstream_message(self, command: object) -> str | None:
        protocol = self._protocol
        if isinstance(command, wire.UserMessage):
            return protocol.user_message(command.text)
        if isinstance(command, wire.ContextualUpdate):
            return protocol.contextual_update(command.text)
        if isinstance(command, wire.UserActivity):
            return protocol.user_activity()
        if isinstance(command, wire.ClientToolResult):
            return protocol.client_tool_result(
                command.tool_call_id, command.result, command.is_error
            )
        return None

    # --- agent to client ----------------------------------------------------------------------
    def _on_upstream_event(self, event: UpstreamEvent, received_at: float) -> None:
        if isinstance(event, AgentAudio):
            converted = self._to_client.convert(event.audio)
            if converted:
                if self.phone is not None:
                    self._to_phone(self.phone, converted, event, received_at)
                else:
                    self._send_audio(wire.EV_AUDIO, converted, self.room, received_at)
            self._last_audio = time.monotonic()
            if self._agent_hung_up_at is not None:
                self._agent_hung_up_at = self._last_audio
        elif isinstance(event, Interruption):
            if self.phone is not None:
                self.phone.interrupt()  # before anything else: the caller hears the cut first
            dropped = self._outbox.drop_audio()
            if dropped:
                metrics.STALE_AUDIO_DROPPED.inc(dropped)
            self._to_client.reset()
            self._send(wire.EV_INTERRUPTION, {}, self.room)
        elif isinstance(event, AgentResponse):
            self._send(wire.EV_AGENT_RESPONSE, wire.agent_response(event.text), self.room)
            self._log_transcript("agent", event.text, event.event_id)
        elif isinstance(event, AgentResponseCorrection):
            self._send(
                wire.EV_AGENT_RESPONSE_CORRECTION,
                wire.agent_response_correction(event.original, event.corrected),
                self.room,
            )
            self._log_transcript("agent", event.corrected, event.event_id, correction=True)
        elif isinstance(event, UserTranscript):
            self._send(wire.EV_USER_TRANSCRIPT, wire.user_transcript(event.text), self.room)
            self._log_transcript("user", event.text, event.event_id)
        elif isinstance(event, ClientToolCall):
            self._send(
                wire.EV_CLIENT_TOOL_CALL,
                wire.client_tool_call(event.tool_name, event.tool_call_id, event.parameters),
                self.room,
            )
            if self.phone is not None:
                self.phone.tool_call(event)
        elif isinstance(event, AgentToolResponse):
            if event.ends_call and not event.is_error and self._agent_hung_up_at is None:
                self._agent_hung_up_at = time.monotonic()
                self._wake.set()  # the watcher keeps the deadline for the close
        elif isinstance(event, UpstreamError):
            log.warning(
                "agent reported an error",
                extra={
                    "call_id": str(self.call_id),
                    "code": event.code,
                    "error_type": event.error_type,
                },
            )
        elif isinstance(event, ProtocolViolation):
            log.warning(
                "agent sent a frame we cannot read; ignored",
                extra={"call_id": str(self.call_id), "detail": event.detail[:200]},
            )
        # Pings are answered inside Upstream; ConversationStarted repeats and unknown types
        # are ignored.

    def _to_phone(
        self, phone: PhoneLink, audio: bytes, event: AgentAudio, received_at: float
    ) -> None:
        """Agent audio straight to the phone line; monitors, if any, get it through the outbox."""
        # Passed through untouched (a μ-law agent): Twilio can take the agent's own base64.
        encoded = event.encoded if audio is event.audio else ""
        phone.play(audio, encoded, received_at)
        self.frames_out += 1
        if self.frames_out == 1:
            metrics.FIRST_AGENT_AUDIO_SECONDS.observe(time.monotonic() - self.created_at)
        self.bytes_out += len(audio)
        _FRAMES_OUT.inc()
        _BYTES_OUT.inc(len(audio))
        if self.monitor_sids:
            self._send_audio(wire.EV_AUDIO, audio, self.room, received_at)

    def _send(self, event: str, data: Any, room: str) -> None:
        self._outbox.put(Outgoing(event, data, room))

    def _send_audio(self, event: str, data: bytes, room: str, received_at: float) -> None:
        dropped = self._outbox.put(Outgoing(event, data, room, audio=True, received_at=received_at))
        if dropped:
            metrics.CLIENT_QUEUE_DROPPED.inc(dropped)

    async def _pump(self) -> None:
        """The only writer to this call's clients: emits the outbox in order."""
        emitter, outbox = self._emitter, self._outbox
        high_water = self._services.options.client_backlog_packets
        while True:
            item = await outbox.get()
            if item is None:
                return
            if item.audio:
                # A slow caller: let audio queue (and drop) in the bounded outbox rather than
                # in Engine.IO's unbounded per-socket queue.
                await self._caller_caught_up(high_water)
                if not outbox.is_current(item):
                    metrics.STALE_AUDIO_DROPPED.inc()
                    continue
            try:
                await emitter.emit(item.event, item.data, room=item.room)
            except Exception:
                log.exception("emit to clients failed", extra={"call_id": str(self.call_id)})
                continue
            if item.audio and item.event == wire.EV_AUDIO and self.phone is None:
                self.frames_out += 1
                if self.frames_out == 1:  # a successor owner continues the count: not observed
                    metrics.FIRST_AGENT_AUDIO_SECONDS.observe(time.monotonic() - self.created_at)
                self.bytes_out += len(item.data)
                _FRAMES_OUT.inc()
                _BYTES_OUT.inc(len(item.data))
                metrics.ADDED_LATENCY_SECONDS.observe(time.monotonic() - item.received_at)

    async def _caller_caught_up(self, high_water: int) -> None:
        # Engine.IO has no "drained" notification to wait on, so poll; this only runs while
        # the caller is behind.
        while True:
            sid = self.caller_sid
            if sid is None or self._emitter.backlog(sid) <= high_water:
                return
            await asyncio.sleep(0.005)

    # --- timers -------------------------------------------------------------------------------
    async def _watch(self) -> None:
        settings, options = self._services.settings, self._services.options
        cap = self._services.cap
        max_deadline = self.created_at + max(1, self.session.max_duration_seconds)
        next_usage = self.created_at + options.usage_interval_seconds
        next_renew = self.created_at + cap.renew_interval_seconds
        cluster = self._services.cluster
        next_lease = float("inf")
        if cluster is not None and self.epoch is not None:
            next_lease = self.created_at + cluster.renew_interval_seconds
        while not self.ended:
            now = time.monotonic()
            if now >= max_deadline:
                self.end(MAX_DURATION)
                return
            idle_deadline = self._last_audio + settings.call_idle_timeout_seconds
            if self.ready and now >= idle_deadline:
                self.end(IDLE_TIMEOUT)
                return
            grace_deadline = float("inf")
            if self._caller_left_at is not None:
                grace_deadline = self._caller_left_at + options.caller_grace_seconds
                if now >= grace_deadline:
                    self.end(CLIENT_GONE)
                    return
            hang_up_deadline = float("inf")
            if self._agent_hung_up_at is not None:
                hang_up_deadline = self._agent_hung_up_at + options.agent_end_call_close_seconds
                if now >= hang_up_deadline:
                    self.end(AGENT_END_CALL)
                    return
            if cluster is not None and (now >= next_lease or self._renew_now):
                self._renew_now = False
                next_lease = now + await self._renew_lease(cluster)
                if self.ended:
                    return
            if now >= next_renew:
                next_renew = now + await self._renew_slot(cap)
            if now >= next_usage:
                next_usage = now + options.usage_interval_seconds
                self._log_event("usage", **self.usage())
            wake_at = min(
                max_deadline,
                idle_deadline,
                grace_deadline,
                hang_up_deadline,
                next_renew,
                next_usage,
                next_lease,
            )
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.01, wake_at - time.monotonic()))

    def report(self) -> OwnedCall:
        """What the registry keeps for a successor: usage so far, conversations, sequence."""
        return OwnedCall(
            tenant_id=str(self.tenant_id),
            state="active" if self.ready else "starting",
            conversation_ids=list(self.conversation_ids),
            usage=self.usage(),
            # Room for the events logged after this report, should the successor take over.
            seq=self._seq + 1000,
            pinned=self.pinned,
        )

    async def _renew_lease(self, cluster: ClusterRegistry) -> float:
        """Renew our ownership; returns the seconds until the next renewal. Only an explicit
        "someone else owns it" stops the call: Redis being away never does."""
        epoch = self.epoch
        assert epoch is not None
        report = self.report()
        try:
            renewal = await cluster.renew(self.call_id, epoch, report)
            if renewal is Renewal.MISSING:
                # Redis lost the record (restart, flush): write ours back unless taken.
                restored = await cluster.restore(self.call_id, epoch, report)
                renewal = Renewal.RENEWED if restored is Restore.OURS else Renewal.LOST
            if self.owner_link is not None:
                await self.owner_link.check_replicas()
        except RegistryUnavailable:
            log.warning(
                "could not renew the call's ownership lease (Redis unreachable); going on",
                extra={"call_id": str(self.call_id)},
            )
            return min(0.5, cluster.renew_interval_seconds)
        if renewal is Renewal.LOST:
            if self.pinned:
                # The phone line is here and cannot follow: another replica ended the call
                # (it took us for dead), so it ends here too.
                self.end(OWNER_LOST)
            else:
                self.abandon()
        return cluster.renew_interval_seconds

    async def _release_ownership(self) -> None:
        cluster, epoch = self._services.cluster, self.epoch
        if cluster is None or epoch is None:
            return
        try:
            await cluster.release(self.call_id, epoch, ended=True)
        except RegistryUnavailable:
            # The lease runs out on its own; the control API refuses the ended call meanwhile.
            log.warning(
                "could not mark the call ended in the registry",
                extra={"call_id": str(self.call_id)},
            )

    async def _renew_slot(self, cap: TenantCallCap) -> float:
        """Renew the tenant slot; returns the seconds until the next renewal."""
        try:
            held = await cap.renew(self.tenant_id, self.call_id)
        except AdmissionUnavailable:
            log.warning(
                "could not renew the call's tenant slot", extra={"call_id": str(self.call_id)}
            )
            return min(1.0, cap.renew_interval_seconds)
        if not held:
            # The lease lapsed (e.g. Redis lost it): take the slot again regardless of the cap,
            # since this call is already running.
            log.warning(
                "tenant slot lease was lost; re-taking it", extra={"call_id": str(self.call_id)}
            )
            with contextlib.suppress(AdmissionUnavailable):
                await cap.acquire(self.tenant_id, self.call_id, 1_000_000)
        return cap.renew_interval_seconds

    # --- call log -----------------------------------------------------------------------------
    def usage(self) -> dict[str, Any]:
        bytes_per_second = self._client_format.bytes_per_second
        return {
            "audio_in_seconds": round(self.bytes_in / bytes_per_second, 3),
            "audio_out_seconds": round(self.bytes_out / bytes_per_second, 3),
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            **(self.phone.report() if self.phone is not None else {}),
        }

    def _log_transcript(self, role: str, text: str, event_id: int | None, **extra: Any) -> None:
        if event_id is not None and event_id < 0:
            event_id = None
        self._log_event("transcript", role=role, text=text[:16_000], event_id=event_id, **extra)

    def _log_event(self, type_: str, **data: Any) -> None:
        self._seq += 1
        try:
            event = make_event(
                type_,
                tenant_id=self.tenant_id,
                call_id=self.call_id,
                seq=self._seq,
                data={k: v for k, v in data.items() if v is not None},
            )
        except InvalidCallEvent as exc:
            log.error(
                "call-log event is invalid: %s", exc.reason, extra={"call_id": str(self.call_id)}
            )
            return
        self._services.call_log.emit(event)
