"""The agent's end_call tool, inside the bridge (no sockets): which tool responses count, and
agent audio after it pushing back the relay's own close. tests/test_relay_lifecycle.py shows
the whole call ending agent_ended/end_call, with the agent's close and without it."""

from __future__ import annotations

import time

import pytest

from relay.bridge import CallBridge
from relay.protocol.elevenlabs import AgentAudio, AgentToolResponse
from tests.support.bridges import GatedEmitter, unstarted_bridge


@pytest.fixture
def bridge() -> CallBridge:
    return unstarted_bridge(GatedEmitter())


def hung_up_at(bridge: CallBridge) -> float | None:
    return bridge._agent_hung_up_at  # noqa: SLF001


@pytest.mark.parametrize(
    "response",
    [
        AgentToolResponse("end_call", "t1", is_error=True),
        AgentToolResponse("transfer_to_number", "t2", is_error=False),
    ],
)
def test_only_a_successful_end_call_ends_the_call(
    bridge: CallBridge,
    response: AgentToolResponse,
) -> None:
    bridge._on_upstream_event(response, time.monotonic())  # noqa: SLF001
    assert hung_up_at(bridge) is None


def test_agent_audio_after_end_call_moves_the_relays_close_later(
    bridge: CallBridge,
) -> None:
    bridge._on_upstream_event(AgentToolResponse("end_call", "t1", False), time.monotonic())  # noqa: SLF001
    first = hung_up_at(bridge)
    assert first is not None
    time.sleep(0.002)  # monotonic time must move between the two events
    bridge._on_upstream_event(AgentAudio(bytes(640), 7), time.monotonic())  # noqa: SLF001
    moved = hung_up_at(bridge)
    assert moved is not None
    assert moved > first
    # A repeated end_call does not move it back.
    bridge._on_upstream_event(AgentToolResponse("end_call", "t3", False), time.monotonic())  # noqa: SLF001
    assert hung_up_at(bridge) == moved
