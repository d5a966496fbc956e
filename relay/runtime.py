"""The relay's long-lived objects: clients of Redis and the control API, admission, call log.

Created with the app and started in its lifespan, so a relay that cannot reach Redis or the
control API at start-up still starts (``/ready`` reports it) and connects once they are back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field

import httpx
import redis.asyncio as aioredis

from relay.admission import ConnectionRateLimiter, TenantCallCap
from relay.bridge import BridgeOptions, BridgeServices, Emitter
from relay.call_log import CallLogProducer
from relay.drain import Drain
from relay.jwks import CallTokenVerifier
from relay.registry import CallRegistry
from relay.sessions import SessionClient
from voicerelay.settings import Settings

log = logging.getLogger(__name__)

CALL_LOG_CLOSE_SECONDS = 5.0


@dataclass(frozen=True)
class RelayOptions:
    bridge: BridgeOptions = field(default_factory=BridgeOptions)


class RelayRuntime:
    def __init__(self, settings: Settings, options: RelayOptions) -> None:
        self.settings = settings
        self.options = options
        self.relay_id = settings.relay_id or f"{socket.gethostname()}-{os.getpid()}"
        self.registry = CallRegistry()
        self.drain = Drain(self.registry)
        self._started = False
        self._call_log_task: asyncio.Task[None] | None = None

    async def start(self, emitter: Emitter) -> None:
        settings = self.settings
        self.redis = aioredis.Redis.from_url(
            settings.require("redis_url"),
            socket_connect_timeout=2.0,
            socket_timeout=5.0,
            health_check_interval=15,
        )
        self.http = httpx.AsyncClient(timeout=settings.control_api_timeout_seconds)
        self.verifier = CallTokenVerifier.from_settings(self.http, settings)
        self.sessions = SessionClient.from_settings(self.http, settings)
        self.cap = TenantCallCap(self.redis, settings)
        self.rate_limiter = ConnectionRateLimiter(self.redis, settings)
        self.call_log = CallLogProducer(self.redis, settings)
        self._call_log_task = asyncio.create_task(self.call_log.run(), name="call-log-producer")
        self.bridge_services = BridgeServices(
            settings=settings,
            emitter=emitter,
            registry=self.registry,
            call_log=self.call_log,
            cap=self.cap,
            options=self.options.bridge,
        )
        self._started = True
        log.info("relay %s started", self.relay_id)

    async def stop(self) -> None:
        """End what is left (reason shutdown), flush the call log, close the clients."""
        if not self._started:
            return
        self._started = False
        self.drain.begin()
        await self.drain.end_all()
        await self.call_log.close(CALL_LOG_CLOSE_SECONDS)
        if self._call_log_task is not None:
            self._call_log_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._call_log_task
        await self.verifier.aclose()
        await self.http.aclose()
        await self.redis.aclose()

    async def readiness(self) -> dict[str, str]:
        """What /ready reports: each dependency ("ok" or "unreachable") and draining."""
        checks: dict[str, str] = {}
        try:
            async with asyncio.timeout(2):
                await self.redis.ping()
            checks["redis"] = "ok"
        except Exception:
            checks["redis"] = "unreachable"
        try:
            response = await self.http.get(
                self.settings.control_api_internal_url + "/health", timeout=2.0
            )
            checks["control_api"] = "ok" if response.status_code == 200 else "unreachable"
        except httpx.HTTPError:
            checks["control_api"] = "unreachable"
        if self.drain.draining:
            checks["draining"] = "true"
        return checks
