"""Folds a batch of call events into the change each call's row needs (pure, no I/O).

Every field of the result merges into the stored row with an operation that is commutative and
idempotent (max, min, first-terminal-wins, set union), so the order in which batches arrive and
how events are split between batches or consumers does not change the final row.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from voicerelay.call_events import (
    CallEvent,
    CallStatus,
    ConnectedEvent,
    ConnectingEvent,
    CreatedEvent,
    EndedEvent,
    StatusEvent,
    UpstreamConnectedEvent,
    UsageEvent,
)

# Statuses only move forward; both terminal statuses share the top rank, so the first terminal
# status a call reaches is the one it keeps.
STATUS_RANK: dict[str, int] = {"created": 0, "connecting": 1, "active": 2, "ended": 3, "failed": 3}


@dataclass(frozen=True)
class Usage:
    audio_in_seconds: float = 0.0
    audio_out_seconds: float = 0.0
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def merge(self, other: Usage) -> Usage:
        return Usage(
            audio_in_seconds=max(self.audio_in_seconds, other.audio_in_seconds),
            audio_out_seconds=max(self.audio_out_seconds, other.audio_out_seconds),
            frames_in=max(self.frames_in, other.frames_in),
            frames_out=max(self.frames_out, other.frames_out),
            bytes_in=max(self.bytes_in, other.bytes_in),
            bytes_out=max(self.bytes_out, other.bytes_out),
        )


@dataclass(frozen=True)
class Ending:
    ended_at: datetime
    reason: str
    code: str | None
    ended_by: str | None
    duration_ms: int | None


@dataclass
class CallChange:
    call_id: uuid.UUID
    status: CallStatus | None = None
    started_at: datetime | None = None
    ending: Ending | None = None
    usage: Usage | None = None
    conversation_ids: list[str] = field(default_factory=list)
    last_event_at: datetime | None = None

    @property
    def status_rank(self) -> int:
        return STATUS_RANK[self.status] if self.status is not None else -1


def implied_status(event: CallEvent) -> CallStatus | None:
    """The status an event moves its call to, if any."""
    if isinstance(event, CreatedEvent):
        return "created"
    if isinstance(event, ConnectingEvent):
        return "connecting"
    if isinstance(event, ConnectedEvent | UpstreamConnectedEvent):
        return "active"
    if isinstance(event, EndedEvent):
        return "failed" if event.data.failed else "ended"
    if isinstance(event, StatusEvent):
        return event.data.status
    return None


def event_order(event: CallEvent) -> tuple[datetime, int, str]:
    return (event.occurred_at, event.seq, str(event.event_id))


def fold_events(events: Iterable[CallEvent]) -> dict[uuid.UUID, CallChange]:
    """One ``CallChange`` per call for the given (new, not yet applied) events."""
    changes: dict[uuid.UUID, CallChange] = {}
    for event in sorted(events, key=event_order):
        change = changes.setdefault(event.call_id, CallChange(call_id=event.call_id))
        if change.last_event_at is None or event.occurred_at > change.last_event_at:
            change.last_event_at = event.occurred_at
        status = implied_status(event)
        if status is not None and STATUS_RANK[status] > change.status_rank:
            change.status = status
        if isinstance(event, ConnectedEvent | UpstreamConnectedEvent) and (
            change.started_at is None or event.occurred_at < change.started_at
        ):
            change.started_at = event.occurred_at
        if isinstance(event, UpstreamConnectedEvent):
            if event.data.conversation_id not in change.conversation_ids:
                change.conversation_ids.append(event.data.conversation_id)
        elif isinstance(event, UsageEvent):
            usage = Usage(
                audio_in_seconds=event.data.audio_in_seconds,
                audio_out_seconds=event.data.audio_out_seconds,
                frames_in=event.data.frames_in,
                frames_out=event.data.frames_out,
                bytes_in=event.data.bytes_in,
                bytes_out=event.data.bytes_out,
            )
            change.usage = usage if change.usage is None else change.usage.merge(usage)
        elif isinstance(event, EndedEvent) and change.ending is None:
            change.ending = Ending(
                ended_at=event.occurred_at,
                reason=event.data.reason,
                code=event.data.code,
                ended_by=event.data.ended_by,
                duration_ms=event.data.duration_ms,
            )
    return changes
