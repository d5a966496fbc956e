"""Email addresses as users' login names: trimmed, lower-cased, and shaped like an address.

Deliverability is not checked (no DNS); the check only rejects what cannot be an address, so
that typos surface at creation rather than as a user who can never sign in.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

_ADDRESS = re.compile(
    r"^[^@\s\x00-\x1f\x7f]{1,64}@[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)+$"
)


class InvalidEmail(ValueError):
    pass


def normalize_email(raw: str) -> str:
    email = raw.strip().lower()
    if len(email) > 320 or not _ADDRESS.match(email):
        raise InvalidEmail("not a valid email address")
    return email


EmailAddress = Annotated[str, Field(min_length=3, max_length=320), AfterValidator(normalize_email)]
