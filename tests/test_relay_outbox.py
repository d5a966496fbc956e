"""The per-call outbox (bounded audio, ordered events, interruption flush) and the call registry."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from relay.outbox import Outbox, Outgoing
from relay.registry import CallRegistry, Participant, call_room, monitors_room


def audio(n: int) -> Outgoing:
    return Outgoing("audio", bytes([n]), "room", audio=True)


def control(name: str) -> Outgoing:
    return Outgoing(name, {}, "room")


async def drain(outbox: Outbox) -> list[Any]:
    outbox.close()
    items = []
    while (item := await outbox.get()) is not None:
        items.append(item.data if item.audio else item.event)
    return items


async def test_events_come_out_in_order() -> None:
    outbox = Outbox(max_audio=10)
    for item in (control("call.ready"), audio(1), control("agent_response"), audio(2)):
        assert outbox.put(item) == 0
    assert await drain(outbox) == ["call.ready", b"\x01", "agent_response", b"\x02"]


async def test_oldest_audio_is_dropped_past_the_bound_never_control_events() -> None:
    outbox = Outbox(max_audio=3)
    outbox.put(control("call.ready"))
    dropped = [outbox.put(audio(n)) for n in range(6)]
    outbox.put(control("user_transcript"))
    assert dropped == [0, 0, 0, 1, 1, 1]
    assert await drain(outbox) == ["call.ready", b"\x03", b"\x04", b"\x05", "user_transcript"]


async def test_interruption_drops_queued_audio_and_marks_held_audio_stale() -> None:
    outbox = Outbox(max_audio=10)
    outbox.put(audio(1))
    outbox.put(control("agent_response"))
    outbox.put(audio(2))
    held = await outbox.get()  # the pump holds this one while the client is slow
    assert held is not None
    assert outbox.is_current(held)
    assert outbox.drop_audio() == 1
    assert not outbox.is_current(held)
    outbox.put(control("interruption"))
    outbox.put(audio(3))
    assert await drain(outbox) == ["agent_response", "interruption", b"\x03"]


async def test_get_waits_for_items_and_ends_after_close() -> None:
    outbox = Outbox(max_audio=2)
    waiter = asyncio.create_task(outbox.get())
    await asyncio.sleep(0)
    assert not waiter.done()
    outbox.put(control("x"))
    item = await asyncio.wait_for(waiter, 1)
    assert item is not None
    assert item.event == "x"
    closing = asyncio.create_task(outbox.get())
    await asyncio.sleep(0)
    outbox.close()
    assert await asyncio.wait_for(closing, 1) is None
    assert outbox.put(control("late")) == 0
    assert len(outbox) == 0


def test_outbox_needs_room_for_audio() -> None:
    with pytest.raises(ValueError, match="max_audio"):
        Outbox(max_audio=0)


class _Bridge:
    def __init__(self, call_id: uuid.UUID) -> None:
        self.call_id = call_id


def test_registry_tracks_bridges_participants_and_ended_calls() -> None:
    registry = CallRegistry()
    call_id = uuid.uuid4()
    first, second = _Bridge(call_id), _Bridge(call_id)
    registry.add(first)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already"):
        registry.add(second)  # type: ignore[arg-type]
    assert registry.get(call_id) is first
    assert len(registry) == 1
    assert not registry.recently_ended(call_id)

    registry.remove(second)  # type: ignore[arg-type]  # not the registered one: kept
    assert registry.get(call_id) is first
    registry.remove(first)  # type: ignore[arg-type]
    assert registry.get(call_id) is None
    assert registry.recently_ended(call_id)

    someone = Participant("sid1", call_id, uuid.uuid4(), "monitor", "203.0.113.9")
    registry.bind(someone)
    assert registry.participant("sid1") is someone
    assert list(registry.participants()) == [someone]
    assert registry.unbind("sid1") is someone
    assert registry.unbind("sid1") is None
    assert call_room(call_id) == f"call:{call_id}"
    assert monitors_room(call_id) == f"call:{call_id}:monitors"
