"""Turns an ``Authorization: Bearer`` header into a Principal (access token or API key)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request

from control_api.principal import Principal
from control_api.problems import Problem

if TYPE_CHECKING:
    from control_api.state import AppState


async def authenticate_request(state: AppState, request: Request) -> Principal:
    raise Problem(401, "unauthorized", "Authentication is not configured yet.")
