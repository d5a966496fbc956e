"""Everything a request handler may use, built once per process in the app's lifespan."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncpg
import httpx
from redis.asyncio import Redis
from starlette.requests import Request

from control_api.principal import Principal
from control_api.security.signing import SigningKeyring
from voicerelay.settings import Settings

if TYPE_CHECKING:
    from control_api.vault import Vault


@dataclass
class AppState:
    settings: Settings
    pool: asyncpg.Pool
    redis: Redis
    signing: SigningKeyring
    vault: Vault | None
    http: httpx.AsyncClient
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    draining: bool = False

    async def authenticate(self, request: Request) -> Principal:
        from control_api.security.authenticate import authenticate_request

        return await authenticate_request(self, request)

    async def limit_principal(self, principal: Principal) -> None:
        from control_api.ratelimit import limit_principal

        await limit_principal(self, principal)

    def require_vault(self) -> Vault:
        from control_api.problems import Problem

        if self.vault is None:
            raise Problem(
                503, "vault_unavailable", "Credential encryption keys are not configured."
            )
        return self.vault
