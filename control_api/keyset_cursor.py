"""Opaque cursors for newest-first keyset pagination over (created_at, id).

The cursor is not signed: it only positions a query that RLS already limits to the caller's
tenant, so a forged cursor can skip rows but never reveal someone else's.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime

import orjson
from pydantic import Field

from control_api.endpoints import QueryModel
from control_api.problems import Problem


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    raw = orjson.dumps([created_at.isoformat(), str(row_id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, row_id = orjson.loads(raw)
        position = (datetime.fromisoformat(created_at), uuid.UUID(row_id))
    except (binascii.Error, ValueError, TypeError, orjson.JSONDecodeError):
        raise Problem(400, "invalid_cursor", "The cursor is not one this API issued.") from None
    # Postgres cannot compare timestamps at the edges of Python's datetime range (a forged cursor
    # like 0001-01-01T00:00:00+14:00 would be a 500), and no row of ours was created there.
    if position[0].tzinfo is None or not 1970 <= position[0].year <= 2999:
        raise Problem(400, "invalid_cursor", "The cursor is not one this API issued.")
    return position


class PageQuery(QueryModel):
    """Query of a newest-first list endpoint: a page size and the cursor of the previous page."""

    limit: int = Field(default=50, ge=1, le=100)
    cursor: str | None = Field(default=None, max_length=200)
