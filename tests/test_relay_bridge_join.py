"""A participant's join racing its own disconnect, and a newer connection of the same caller.

Entering a call's room can wait on Redis (the cluster manager subscribes and records the
replica's membership first). A caller whose connection dropped during that wait, and who came
back on another connection (on another replica, or this one), must stay the call's caller: the
old connection's join finishing late must neither make the dead connection the caller again nor
disconnect the new one (that silenced whole calls: the new connection was cut, the call stayed
open on its owner with nobody to talk to).

The rooms are gated by hand here, so the interleaving is exact rather than timed.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, cast

import pytest

from relay.bridge import CallBridge
from relay.cluster.registry import CallRecord, ClusterRegistry
from relay.cluster.remote import JOIN, LEAVE, OwnerRouting, RemoteCalls
from relay.registry import Participant, call_room
from tests.support.bridges import GatedEmitter, session, unstarted_bridge


def caller(bridge: CallBridge, sid: str) -> Participant:
    return Participant(
        sid=sid, call_id=bridge.call_id, tenant_id=bridge.tenant_id, role="caller", client_ip=""
    )


@pytest.fixture
def emitter() -> GatedEmitter:
    return GatedEmitter()


@pytest.fixture
def bridge(emitter: GatedEmitter) -> CallBridge:
    # Never started: joins and leaves are all these tests exercise.
    return unstarted_bridge(emitter)


async def join_gated(bridge: CallBridge, emitter: GatedEmitter, sid: str) -> asyncio.Task[None]:
    """Start ``sid``'s join and return once it waits to enter the call's room."""
    emitter.gate(sid)
    task = asyncio.create_task(bridge.join(caller(bridge, sid)))
    await emitter.waiting[sid].wait()
    return task


@pytest.mark.parametrize("where", ["other replica", "same replica"])
async def test_a_caller_back_on_a_new_connection_is_not_undone_by_the_old_ones_late_join(
    bridge: CallBridge, emitter: GatedEmitter, where: str
) -> None:
    old = await join_gated(bridge, emitter, "old")
    bridge.leave("old")  # its connection closed while the join waited on the room
    replica = "replica-b" if where == "other replica" else None
    await bridge.join(caller(bridge, "new"), replica=replica)
    assert bridge.caller_sid == "new"

    emitter.gates["old"].set()
    await old

    assert bridge.caller_sid == "new"
    assert "new" not in emitter.disconnected
    assert "old" not in bridge.remote_sids
    assert bridge.remote_sids == ({"new": "replica-b"} if replica else {})


async def test_a_newer_connection_during_the_old_ones_join_replaces_it(
    bridge: CallBridge, emitter: GatedEmitter
) -> None:
    # The old connection is still up (a duplicate): the newer one wins, the old one is let go.
    old = await join_gated(bridge, emitter, "old")
    await bridge.join(caller(bridge, "new"), replica="replica-b")
    emitter.gates["old"].set()
    await old
    assert bridge.caller_sid == "new"
    assert emitter.disconnected == ["old"]


async def test_a_join_that_waited_through_its_own_leave_leaves_no_caller(
    bridge: CallBridge, emitter: GatedEmitter
) -> None:
    old = await join_gated(bridge, emitter, "old")
    bridge.leave("old")
    emitter.gates["old"].set()
    await old
    assert bridge.caller_sid is None
    assert emitter.disconnected == []


class RecordingRouting:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def send_to_owner(
        self, call_id: uuid.UUID | str, kind: str, header: Any, payload: bytes = b""
    ) -> None:
        self.sent.append((kind, header["sid"]))

    async def serve_owner(self, call_id: uuid.UUID | str, handler: Any) -> None:
        pass

    async def unserve_owner(self, call_id: uuid.UUID | str) -> None:
        pass


async def test_a_remote_participant_gone_while_entering_the_rooms_never_joins_the_owner(
    emitter: GatedEmitter,
) -> None:
    routing = RecordingRouting()

    async def no_take_over(*_: Any) -> bool:
        return False

    remotes = RemoteCalls(
        cluster=cast(ClusterRegistry, None),
        routing=cast(OwnerRouting, routing),
        emitter=emitter,
        redis=cast(Any, None),
        channels=cast(Any, None),
        take_over=no_take_over,
    )
    call = session()
    participant = Participant(
        sid="b1", call_id=call.call_id, tenant_id=call.tenant_id, role="caller", client_ip=""
    )
    record = cast(CallRecord, type("Record", (), {"owner": "replica-a", "epoch": 1})())
    emitter.gate("b1")
    attach = asyncio.create_task(remotes.attach(participant, record, call))
    await emitter.waiting["b1"].wait()
    await remotes.detach(participant)  # disconnected meanwhile
    emitter.gates["b1"].set()
    await attach
    try:
        # Its leave went to the owner; a join after it would revive a dead connection there.
        assert routing.sent == [(LEAVE, "b1")]
        assert JOIN not in [kind for kind, _ in routing.sent]
        assert len(remotes) == 0
        assert ("b1", call_room(call.call_id)) in emitter.rooms
    finally:
        await remotes.close()
