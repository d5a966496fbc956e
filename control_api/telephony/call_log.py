"""``telephony`` events in a call's log, appended by the control API (status callbacks, hang-ups
and transfers it made) to the same Redis stream the relay writes; the call-log consumer stores
them like any other event."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from voicerelay.call_events import append_call_event, make_event

if TYPE_CHECKING:
    from control_api.state import AppState


class CallLogUnavailable(Exception):
    """Redis did not take the event."""


async def append_telephony_event(
    state: AppState,
    *,
    tenant_id: uuid.UUID,
    call_id: uuid.UUID,
    data: Mapping[str, Any],
    seq: int = 0,
    occurred_at: datetime | None = None,
    event_id: uuid.UUID | None = None,
) -> None:
    """Raises ``InvalidCallEvent`` for data the contract refuses, ``CallLogUnavailable`` when
    the stream cannot be written."""
    event = make_event(
        "telephony",
        tenant_id=tenant_id,
        call_id=call_id,
        seq=seq,
        data={"provider": "twilio", **data},
        occurred_at=occurred_at,
        event_id=event_id,
    )
    settings = state.settings
    try:
        await append_call_event(
            state.redis,
            settings.redis_key(settings.call_events_stream),
            event,
            maxlen=settings.call_events_stream_maxlen,
        )
    except (RedisError, OSError, TimeoutError) as exc:
        raise CallLogUnavailable(type(exc).__name__) from None
