"""Prometheus request metrics for the control API, as a pure-ASGI middleware.

Requests are labelled by method, route template (``/v1/agents/{id}``) and status class (``2xx``).
Never by the raw path: ids in paths would make every resource its own time series, and a
scanner probing random URLs could grow the registry without bound. Unmatched paths share one
label, as do unusual methods.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import asyncpg
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED_ROUTE = "<unmatched>"
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

REQUESTS = Counter(
    "control_api_http_requests_total",
    "HTTP requests answered by the control API.",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "control_api_http_request_duration_seconds",
    "Time from receiving a request to sending the end of its response.",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
IN_FLIGHT = Gauge(
    "control_api_http_requests_in_flight",
    "HTTP requests the control API is handling right now.",
)


def route_label(scope: Scope) -> str:
    """The template of the route Starlette's router matched, or one shared label for none."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    return template if isinstance(template, str) and template else UNMATCHED_ROUTE


def method_label(method: str) -> str:
    upper = method.upper()
    return upper if upper in _KNOWN_METHODS else "OTHER"


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


class MetricsMiddleware:
    """Counts and times every HTTP request; install it outermost so rejections count too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before responding

        async def observing_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, observing_send)
        finally:
            IN_FLIGHT.dec()
            labels = (method_label(scope["method"]), route_label(scope), status_class(status))
            REQUESTS.labels(*labels).inc()
            LATENCY.labels(*labels).observe(time.perf_counter() - started)


# --- dependencies -----------------------------------------------------------------------------
DEPENDENCY_UP = Gauge(
    "control_api_dependency_up",
    "1 if the dependency answered the last check (every scrape and /ready probe), else 0.",
    ["dependency"],
)


class PoolStats(Collector):
    """``control_api_db_pool_connections{state}`` (idle, in_use) and ``control_api_db_pool_max``,
    read from the process's asyncpg pools at scrape time. Absent while no pool is open."""

    def __init__(self) -> None:
        # asyncpg pools cannot be weakly referenced: closed ones are forgotten at the next scrape.
        self._pools: list[asyncpg.Pool] = []

    def track(self, pool: asyncpg.Pool) -> None:
        self._pools.append(pool)

    def collect(self) -> Iterable[Metric]:
        self._pools = pools = [pool for pool in self._pools if not pool.is_closing()]
        if not pools:
            return
        connections = GaugeMetricFamily(
            "control_api_db_pool_connections",
            "PostgreSQL connections the pool holds, by state (idle, in_use).",
            labels=["state"],
        )
        idle = sum(pool.get_idle_size() for pool in pools)
        connections.add_metric(["idle"], idle)
        connections.add_metric(["in_use"], sum(pool.get_size() for pool in pools) - idle)
        yield connections
        yield GaugeMetricFamily(
            "control_api_db_pool_max",
            "Most connections the pool may open (DATABASE_POOL_MAX_SIZE).",
            value=sum(pool.get_max_size() for pool in pools),
        )


DB_POOL = PoolStats()
REGISTRY.register(DB_POOL)

STALE_CALLS_REAPED = Counter(
    "control_api_stale_calls_reaped_total",
    "Connecting or active calls ended as relay_lost (code stale) because no call-log event had "
    "arrived for CALL_STALE_AFTER_SECONDS: their relay replica died and nobody took them over.",
)
UNCONNECTED_CALLS_EXPIRED = Counter(
    "control_api_unconnected_calls_expired_total",
    "Created calls ended as never_connected (code expired) because their caller token's connect "
    "window (CALL_TOKEN_CONNECT_WINDOW_SECONDS) had passed without the caller reaching the relay.",
)
