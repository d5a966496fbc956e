"""A call bridge without sockets, Redis or a control API, for tests of its own logic: an emitter
that records (and can hold a participant at the call's room) and a call session of one's own."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, cast

from relay.bridge import BridgeOptions, BridgeServices, CallBridge
from relay.registry import CallRegistry
from relay.sessions import CallSession
from voicerelay.settings import Settings


class GatedEmitter:
    """An emitter whose ``enter_room`` waits, for the sids given a gate, until it is opened."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.waiting: dict[str, asyncio.Event] = {}
        self.rooms: list[tuple[str, str]] = []
        self.disconnected: list[str] = []
        self.emitted: list[tuple[str, str]] = []

    def gate(self, sid: str) -> None:
        self.gates[sid] = asyncio.Event()
        self.waiting[sid] = asyncio.Event()

    async def emit(self, event: str, data: Any, *, room: str) -> None:
        self.emitted.append((event, room))

    async def enter_room(self, sid: str, room: str) -> None:
        gate = self.gates.get(sid)
        if gate is not None:
            self.waiting[sid].set()
            await gate.wait()
        self.rooms.append((sid, room))

    async def disconnect(self, sid: str) -> None:
        self.disconnected.append(sid)

    def backlog(self, sid: str) -> int:
        return 0

    async def hand_off(self, sid: str, reason: str) -> None:
        self.disconnected.append(sid)


class NullCallLog:
    def emit(self, event: Any) -> None:
        pass


def session() -> CallSession:
    return CallSession.model_validate(
        {
            "call_id": str(uuid.uuid4()),
            "tenant_id": str(uuid.uuid4()),
            "role": "caller",
            "status": "active",
            "agent": {
                "id": str(uuid.uuid4()),
                "elevenlabs_agent_id": "agent",
                "input_audio_format": "pcm_16000",
                "output_audio_format": "pcm_16000",
                "allowed_origins": [],
            },
            "client_audio_format": "pcm_16000",
            "conversation_initiation": {
                "conversation_config_override": {},
                "dynamic_variables": {},
            },
            "upstream_url": "ws://127.0.0.1:9/unused",
            "upstream_url_expires_at": None,
            "max_duration_seconds": 600,
            "tenant_max_concurrent_calls": 10,
            "conversation_ids": [],
        }
    )


def unstarted_bridge(emitter: Any, options: BridgeOptions | None = None) -> CallBridge:
    """A bridge that is never started (no upstream): what its methods do is all there is."""
    services = BridgeServices(
        settings=Settings(),
        emitter=emitter,
        registry=CallRegistry(),
        call_log=cast(Any, NullCallLog()),
        cap=cast(Any, None),
        options=options or BridgeOptions(),
    )
    return CallBridge(services, session())
