"""The relay's long-lived objects: clients of Redis and the control API, admission, call log.

Created with the app and started in its lifespan, so a relay that cannot reach Redis or the
control API at start-up still starts (``/ready`` reports it) and connects once they are back.

The Socket.IO client manager follows ``RELAY_CLIENT_MANAGER``: ``targeted`` (the default) is
relay.cluster.manager's, and with it this replica joins the cluster: a heartbeat, the Redis call
registry (ownership of the calls it bridges) and remote participants (clients here of calls
owned elsewhere). ``local`` is python-socketio's in-process manager: a lone replica, no Redis
routing or registry. ``stock`` is python-socketio's AsyncRedisManager, kept for benchmarks: every
emit through one channel to every replica, calls bridged where their caller connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis.asyncio as aioredis
import socketio

from relay.admission import ConnectionRateLimiter, TenantCallCap
from relay.bridge import BridgeOptions, BridgeServices, Emitter
from relay.call_log import CallLogProducer
from relay.cluster.channels import Channels
from relay.cluster.manager import RelayClientManager
from relay.cluster.registry import ClusterRegistry, Heartbeat, RegistryUnavailable
from relay.cluster.remote import OwnerRouting, RemoteCalls, TakeOver
from relay.drain import Drain
from relay.jwks import CallTokenVerifier
from relay.registry import CallRegistry
from relay.sessions import SessionClient
from voicerelay.cancellation import cancel_until_done, failures
from voicerelay.settings import Settings

log = logging.getLogger(__name__)

CALL_LOG_CLOSE_SECONDS = 5.0


@dataclass(frozen=True)
class RelayOptions:
    bridge: BridgeOptions = field(default_factory=BridgeOptions)


def create_client_manager(settings: Settings, replica_id: str) -> Any:
    """The Socket.IO client manager for ``settings.relay_client_manager`` (None: in-process)."""
    mode = settings.relay_client_manager
    if mode == "targeted":
        return RelayClientManager(settings.require("redis_url"), settings, replica_id)
    if mode == "stock":
        return socketio.AsyncRedisManager(
            settings.require("redis_url"), channel=settings.redis_key("socketio")
        )
    return None


class RelayRuntime:
    def __init__(self, settings: Settings, options: RelayOptions) -> None:
        self.settings = settings
        self.options = options
        # Unique even for several relays in one process (tests).
        self.relay_id = (
            settings.relay_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        )
        self.registry = CallRegistry()
        self.drain = Drain(self.registry)
        self.manager = create_client_manager(settings, self.relay_id)
        self.cluster: ClusterRegistry | None = None
        self.remotes: RemoteCalls | None = None
        self.heartbeat: Heartbeat | None = None
        self.channels = Channels(settings.redis_key)
        self._started = False
        self._call_log_task: asyncio.Task[None] | None = None

    @property
    def routing(self) -> OwnerRouting:
        assert isinstance(self.manager, RelayClientManager)
        return self.manager

    async def start(self, emitter: Emitter, take_over: TakeOver | None = None) -> None:
        settings = self.settings
        self.redis = aioredis.Redis.from_url(
            settings.require("redis_url"),
            socket_connect_timeout=2.0,
            socket_timeout=5.0,
            health_check_interval=15,
        )
        if isinstance(self.manager, RelayClientManager) and take_over is not None:
            await self._join_cluster(emitter, take_over)
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
            cluster=self.cluster,
        )
        self._started = True
        log.info("relay %s started", self.relay_id)

    async def _join_cluster(self, emitter: Emitter, take_over: TakeOver) -> None:
        manager = self.manager
        assert isinstance(manager, RelayClientManager)
        self.cluster = ClusterRegistry(self.redis, self.settings, self.relay_id)
        self.heartbeat = Heartbeat(self.cluster)
        with contextlib.suppress(RegistryUnavailable):
            await self.heartbeat.beat()  # before the first call, if Redis is there
        self.heartbeat.start()
        self.heartbeat.on_restored.append(self._reassert)
        manager.on_reconnect(self._reassert)
        await manager.start()
        self.remotes = RemoteCalls(
            cluster=self.cluster,
            routing=manager,
            emitter=emitter,
            redis=self.redis,
            channels=self.channels,
            take_over=take_over,
        )
        self.drain.hand_off = self._hand_off
        self.drain.on_begin.append(self._mark_draining)

    async def _reassert(self) -> None:
        """Redis came back (perhaps empty): re-assert at once what this replica holds."""
        if self.heartbeat is not None:
            with contextlib.suppress(RegistryUnavailable):
                await self.heartbeat.beat()
        for bridge in self.registry.bridges():
            bridge.renew_soon()

    def _mark_draining(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.draining = True

    async def _hand_off(self) -> int:
        """Draining: tell every client here to reconnect, if another replica can take them.
        Bridges stay here until their calls end; the clients reach them through routing."""
        if self.cluster is None:
            return 0
        try:
            others = {
                replica
                for replica, info in (await self.cluster.live_replicas()).items()
                if replica != self.relay_id and not info.get("draining")
            }
        except RegistryUnavailable:
            others = set()
        if not others:
            log.info("draining: no other replica to take the clients; they stay here")
            return 0
        emitter = self.bridge_services.emitter
        sids = [participant.sid for participant in self.registry.participants()]
        for sid in sids:
            with contextlib.suppress(Exception):
                await emitter.hand_off(sid, "draining")
        return len(sids)

    async def stop(self) -> None:
        """End what is left (reason shutdown), flush the call log, close the clients."""
        if not self._started:
            return
        self._started = False
        self.drain.begin()
        await self.drain.end_all()
        if self.remotes is not None:
            await self.remotes.close()
        if self.heartbeat is not None:
            await self.heartbeat.stop()
        if self.cluster is not None:
            # A clean exit: whatever still names this replica may be claimed at once.
            with contextlib.suppress(RegistryUnavailable):
                await self.cluster.forget_replica()
        await self.call_log.close(CALL_LOG_CLOSE_SECONDS)
        if self._call_log_task is not None:
            # Cancelled until it has ended: a cancellation lost in a Redis command on 3.11
            # (voicerelay.cancellation) would otherwise hang the shutdown.
            await cancel_until_done([self._call_log_task])
            for error in failures([self._call_log_task]):
                log.error("call-log producer failed", exc_info=error)
        await self.verifier.aclose()
        await self.http.aclose()
        await self.redis.aclose()

    async def close_manager(self) -> None:
        """After the Socket.IO server has shut down (its disconnects go through the manager)."""
        close = getattr(self.manager, "close", None)
        if isinstance(self.manager, RelayClientManager) and close is not None:
            await close()

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
        healthy = getattr(self.manager, "healthy", None)
        if isinstance(healthy, bool):
            checks["pubsub"] = "ok" if healthy else "down"
        if self.drain.draining:
            checks["draining"] = "true"
        return checks
