"""Where this replica keeps its calls: bridges by call id, participants by Socket.IO sid.

One seam for this replica's call state, in process memory: the bridges it owns and the
Socket.IO connections it holds. Which replica owns a call cluster-wide (lease, fencing epochs)
is the Redis registry's business (relay.cluster.registry); a participant here may belong to a
call owned elsewhere (``Participant.remote``).
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from time import monotonic
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from relay.bridge import CallBridge

Role = Literal["caller", "monitor"]


def call_room(call_id: uuid.UUID) -> str:
    """Every participant of a call (caller and monitors) joins this room."""
    return f"call:{call_id}"


def monitors_room(call_id: uuid.UUID) -> str:
    """Monitors only: they also hear the caller's side."""
    return f"call:{call_id}:monitors"


@dataclass
class Participant:
    sid: str
    call_id: uuid.UUID
    tenant_id: uuid.UUID
    role: Role
    client_ip: str
    joined_at: float = field(default_factory=monotonic)
    # The call's owner is another replica: this connection's traffic is forwarded there.
    remote: bool = False
    # Kept to fetch the call's session again if this replica has to take the call over.
    token: str = field(default="", repr=False)


# Calls that ended here are remembered this long, so a reconnect with the same token is refused
# even before the control API has recorded the end.
RECENTLY_ENDED_SECONDS = 600.0
RECENTLY_ENDED_MAX = 100_000


class CallRegistry:
    def __init__(self) -> None:
        self._bridges: dict[uuid.UUID, CallBridge] = {}
        self._participants: dict[str, Participant] = {}
        self._ended: OrderedDict[uuid.UUID, float] = OrderedDict()

    # --- bridges ------------------------------------------------------------------------------
    def get(self, call_id: uuid.UUID) -> CallBridge | None:
        return self._bridges.get(call_id)

    def add(self, bridge: CallBridge) -> None:
        if bridge.call_id in self._bridges:
            raise ValueError("this call already has a bridge")
        self._bridges[bridge.call_id] = bridge

    def remove(self, bridge: CallBridge, *, ended: bool = True) -> None:
        """Forget a bridge that stopped; ``ended``: remember that its call ended (False when
        another replica took the call over and it goes on there)."""
        # Only the bridge that is registered may remove itself: a late cleanup of an old bridge
        # must not drop a newer one for the same call.
        if self._bridges.get(bridge.call_id) is bridge:
            del self._bridges[bridge.call_id]
        if not ended:
            return
        self._ended[bridge.call_id] = monotonic()
        self._ended.move_to_end(bridge.call_id)
        self._forget_old_ends()

    def recently_ended(self, call_id: uuid.UUID) -> bool:
        self._forget_old_ends()
        return call_id in self._ended

    def _forget_old_ends(self) -> None:
        horizon = monotonic() - RECENTLY_ENDED_SECONDS
        while self._ended and (
            len(self._ended) > RECENTLY_ENDED_MAX or next(iter(self._ended.values())) < horizon
        ):
            self._ended.popitem(last=False)

    def bridges(self) -> list[CallBridge]:
        return list(self._bridges.values())

    def __len__(self) -> int:
        return len(self._bridges)

    # --- participants -------------------------------------------------------------------------
    def bind(self, participant: Participant) -> None:
        self._participants[participant.sid] = participant

    def participant(self, sid: str) -> Participant | None:
        return self._participants.get(sid)

    def unbind(self, sid: str) -> Participant | None:
        return self._participants.pop(sid, None)

    def participants(self) -> Iterator[Participant]:
        return iter(list(self._participants.values()))
