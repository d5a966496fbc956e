"""Strings bound for Postgres ``text`` or ``jsonb``, which cannot hold the NUL character.

Without this check a JSON ``"\\u0000"`` passes validation and fails in the database as a 500.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def reject_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain the NUL character")
    return value


PgText = Annotated[str, AfterValidator(reject_nul)]
