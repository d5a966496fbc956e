"""The control API application: lifespan, middleware and routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from control_api import db, metrics
from control_api.calllog.consumer import run_call_log_consumer
from control_api.calllog.maintenance import run_call_log_maintenance
from control_api.metrics import MetricsMiddleware
from control_api.middleware import BodySizeLimitMiddleware, RequestContextMiddleware
from control_api.openapi import build_openapi
from control_api.problems import EXCEPTION_HANDLERS
from control_api.routes import all_endpoints
from control_api.security.signing import SigningKeyring
from control_api.state import AppState
from control_api.vault import Vault
from voicerelay.cancellation import cancel_until_done
from voicerelay.settings import Settings

log = logging.getLogger(__name__)

API_VERSION = "1.0.0"


def create_app(settings: Settings) -> Starlette:
    endpoints = all_endpoints()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        signing = SigningKeyring(settings.signing_keyring())
        vault = Vault(settings.encryption_keyring()) if settings.encryption_keys else None
        pool = await db.create_pool(settings)
        metrics.DB_POOL.track(pool)
        redis: Redis = Redis.from_url(settings.require("redis_url"), health_check_interval=30)
        http = httpx.AsyncClient(timeout=settings.elevenlabs_timeout_seconds)
        try:
            async with pool.acquire() as conn:
                await db.check_isolation_guardrails(conn)
            state = AppState(
                settings=settings, pool=pool, redis=redis, signing=signing, vault=vault, http=http
            )
            app.state.api = state
            state.tasks.append(
                asyncio.create_task(run_call_log_consumer(state), name="call-log-consumer")
            )
            state.tasks.append(
                asyncio.create_task(run_call_log_maintenance(state), name="call-log-maintenance")
            )
            log.info("control API ready")
            yield
            state.draining = True
            stopping = [*state.tasks, *state.background]
            await cancel_until_done(stopping)
            for task in stopping:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            await http.aclose()
            await redis.aclose()
            await pool.close()

    middleware = [
        Middleware(MetricsMiddleware),
        Middleware(RequestContextMiddleware),
        Middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_body_bytes),
    ]
    if settings.cors_allowed_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_allowed_origins,
                allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                allow_headers=["authorization", "content-type", "x-request-id"],
                expose_headers=["x-request-id", "retry-after"],
                max_age=600,
            )
        )
    app = Starlette(
        routes=[e.route() for e in endpoints],
        middleware=middleware,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.openapi = build_openapi(
        endpoints,
        title="voicerelay control API",
        version=API_VERSION,
        server_url=settings.public_api_url,
    )
    return app
