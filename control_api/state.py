"""Everything a request handler may use, built once per process in the app's lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
    # Short jobs a request started and does not wait for; cancelled at shutdown.
    background: set[asyncio.Task[None]] = field(default_factory=set)
    draining: bool = False

    def spawn(self, job: Coroutine[Any, Any, None], *, name: str) -> None:
        """Run ``job`` after the response; it must handle its own errors."""
        task = asyncio.create_task(job, name=name)
        # The event loop keeps only weak references to tasks.
        self.background.add(task)
        task.add_done_callback(self.background.discard)

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
