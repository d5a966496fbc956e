"""Who is calling: a tenant's user (access token) or a tenant's API key."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Principal:
    tenant_id: uuid.UUID
    kind: Literal["user", "api_key"]
    subject_id: uuid.UUID
    role: Literal["viewer", "admin", "owner"]
    # A user signed in with a one-time password: only choosing a new one is allowed.
    must_change_password: bool = False

    @property
    def rate_limit_key(self) -> str:
        return f"{self.kind}:{self.subject_id}"
