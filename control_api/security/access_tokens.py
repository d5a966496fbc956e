"""Access tokens: short-lived EdDSA JWTs for dashboard users."""

from __future__ import annotations

from typing import TYPE_CHECKING

from control_api.principal import Principal
from control_api.problems import Problem

if TYPE_CHECKING:
    from control_api.state import AppState


async def principal_from_access_token(state: AppState, token: str) -> Principal:
    raise Problem(401, "invalid_token", "Access tokens are not supported yet.")
