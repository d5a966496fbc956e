"""``call.ready`` reaches each participant exactly once, however its join and the agent's
conversation start interleave.

It used to go to the call's room when the conversation started, and to the sid from a join that
found the call ready. A room emit is resolved when the outbox pump sends it, so a join that
entered the room in between got both (seen as two ``call.ready`` in ``relay.demo``). Here the
room is resolved at emit time as python-socketio does, and the interleavings are made by hand.
"""

from __future__ import annotations

import asyncio

import pytest

from relay.bridge import CallBridge
from relay.protocol.client import EV_READY
from relay.protocol.elevenlabs import ConversationStarted
from tests import test_relay_bridge_join as join_tests
from tests.test_relay_bridge_join import GatedEmitter, caller, join_gated
from voicerelay.audio_formats import AudioFormat

# An unstarted bridge over the ``emitter`` fixture below.
bridge = join_tests.bridge
STARTED = ConversationStarted("conv_1", AudioFormat.pcm_16000, AudioFormat.pcm_16000)


def ready_payloads(emitter: RoomEmitter, sid: str) -> list[object]:
    """What ``sid`` received as ``call.ready``, a room emit counting for every member then."""
    return [data for event, data, to in emitter.deliveries if event == EV_READY and sid in to]


class RoomEmitter(GatedEmitter):
    def __init__(self) -> None:
        super().__init__()
        self.deliveries: list[tuple[str, object, set[str]]] = []

    async def emit(self, event: str, data: object, *, room: str) -> None:
        members = {sid for sid, joined in self.rooms if joined == room}
        self.deliveries.append((event, data, members or {room}))


@pytest.fixture
def emitter() -> RoomEmitter:
    return RoomEmitter()


async def pump_all(bridge: CallBridge) -> None:
    """Run the bridge's outbox pump over everything queued so far."""
    pump = asyncio.create_task(bridge._pump())
    bridge._outbox.close()
    await pump


async def test_ready_before_the_join_while_its_room_emit_is_still_queued(
    bridge: CallBridge, emitter: RoomEmitter
) -> None:
    bridge._on_started(STARTED)
    await bridge.join(caller(bridge, "a"))
    await pump_all(bridge)
    assert len(ready_payloads(emitter, "a")) == 1


async def test_ready_while_the_join_waits_to_enter_the_room(
    bridge: CallBridge, emitter: RoomEmitter
) -> None:
    join = await join_gated(bridge, emitter, "a")
    bridge._on_started(STARTED)
    emitter.gates["a"].set()
    await join
    await pump_all(bridge)
    assert len(ready_payloads(emitter, "a")) == 1


async def test_participants_before_ready_get_it_once_with_their_own_resumed_flag(
    bridge: CallBridge, emitter: RoomEmitter
) -> None:
    await bridge.join(caller(bridge, "first"))
    bridge.leave("first")
    await bridge.join(caller(bridge, "again"))  # the caller back before the agent answered
    bridge._on_started(STARTED)
    await bridge.join(caller(bridge, "later"))  # replaces "again" after ready
    await pump_all(bridge)
    assert ready_payloads(emitter, "first") == []
    [again] = ready_payloads(emitter, "again")
    [later] = ready_payloads(emitter, "later")
    assert isinstance(again, dict)
    assert isinstance(later, dict)
    assert again["resumed"] is True
    assert again["conversation_id"] == "conv_1"
    assert later["resumed"] is True
