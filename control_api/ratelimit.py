"""Rate limits shared by every replica (GCRA in Redis)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from control_api.principal import Principal

if TYPE_CHECKING:
    from control_api.state import AppState


async def limit_principal(state: AppState, principal: Principal) -> None:
    return None
