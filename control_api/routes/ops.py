"""Endpoints: health, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

from control_api.endpoints import ApiCall, EndpointGroup
from control_api.metrics import DEPENDENCY_UP
from control_api.state import AppState

group = EndpointGroup("operations")


@group("GET", "/health", summary="The process is up", auth=False, include_in_schema=False)
async def health(call: ApiCall[Any, Any]) -> Response:
    return JSONResponse({"status": "ok"})


async def check_dependencies(state: AppState) -> dict[str, str]:
    """Ping Postgres and Redis ("ok" or "unreachable" each) and record it in
    ``control_api_dependency_up``: on every /ready probe and every Prometheus scrape, so the
    alerts see an outage even where nothing probes /ready."""
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(2):
            await state.pool.fetchval("SELECT 1")
        checks["postgres"] = "ok"
    except Exception:
        checks["postgres"] = "unreachable"
    try:
        async with asyncio.timeout(2):
            await state.redis.ping()
        checks["redis"] = "ok"
    except Exception:
        checks["redis"] = "unreachable"
    for dependency, result in checks.items():
        DEPENDENCY_UP.labels(dependency).set(result == "ok")
    return checks


@group(
    "GET", "/ready", summary="Postgres and Redis are reachable", auth=False, include_in_schema=False
)
async def ready(call: ApiCall[Any, Any]) -> Response:
    state = call.state
    checks = await check_dependencies(state)
    if state.draining:
        checks["draining"] = "true"
    ok = all(v == "ok" for k, v in checks.items() if k != "draining") and not state.draining
    return JSONResponse(
        {"status": "ready" if ok else "not_ready", "checks": checks}, status_code=200 if ok else 503
    )


@group("GET", "/metrics", summary="Prometheus metrics", auth=False, include_in_schema=False)
async def metrics(call: ApiCall[Any, Any]) -> Response:
    await check_dependencies(call.state)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@group("GET", "/openapi.json", summary="This document", auth=False, include_in_schema=False)
async def openapi(call: ApiCall[Any, Any]) -> Response:
    return JSONResponse(call.request.app.state.openapi)
