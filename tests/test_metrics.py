"""Request metrics: labelled by route template and status class, never by raw path."""

from __future__ import annotations

import uuid

import httpx
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from control_api.metrics import (
    UNMATCHED_ROUTE,
    MetricsMiddleware,
    method_label,
    status_class,
)

COUNTER = "control_api_http_requests_total"


def _count(method: str, route: str, status: str) -> float:
    value = REGISTRY.get_sample_value(COUNTER, {"method": method, "route": route, "status": status})
    return value or 0.0


def _in_flight() -> float:
    return REGISTRY.get_sample_value("control_api_http_requests_in_flight") or 0.0


def _all_label_values() -> set[str]:
    return {
        value
        for metric in REGISTRY.collect()
        for sample in metric.samples
        for value in sample.labels.values()
    }


async def _agent(request: Request) -> Response:
    return JSONResponse({"id": request.path_params["id"]})


async def _boom(request: Request) -> Response:
    raise RuntimeError("handler failed")


def _app() -> Starlette:
    return Starlette(
        routes=[
            Route("/v1/agents/{id}", _agent, methods=["GET"]),
            Route("/v1/boom", _boom, methods=["GET"]),
        ],
        middleware=[Middleware(MetricsMiddleware)],
    )


def _client() -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=_app(), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_counts_by_route_template_not_raw_path() -> None:
    agent_id = str(uuid.uuid4())
    before = _count("GET", "/v1/agents/{id}", "2xx")
    in_flight_before = _in_flight()
    async with _client() as client:
        r = await client.get(f"/v1/agents/{agent_id}")
    assert r.status_code == 200
    assert _count("GET", "/v1/agents/{id}", "2xx") == before + 1
    assert _in_flight() == in_flight_before
    assert not any(agent_id in value for value in _all_label_values())


async def test_unmatched_paths_share_one_label() -> None:
    probe = f"/wp-admin/{uuid.uuid4()}"
    before = _count("GET", UNMATCHED_ROUTE, "4xx")
    async with _client() as client:
        r = await client.get(probe)
    assert r.status_code == 404
    assert _count("GET", UNMATCHED_ROUTE, "4xx") == before + 1
    assert not any(probe in value for value in _all_label_values())


async def test_wrong_method_keeps_template_and_odd_methods_are_grouped() -> None:
    before_405 = _count("POST", "/v1/agents/{id}", "4xx")
    before_other = _count("OTHER", "/v1/agents/{id}", "4xx")
    async with _client() as client:
        assert (await client.post(f"/v1/agents/{uuid.uuid4()}")).status_code == 405
        assert (await client.request("BREW", f"/v1/agents/{uuid.uuid4()}")).status_code == 405
    assert _count("POST", "/v1/agents/{id}", "4xx") == before_405 + 1
    assert _count("OTHER", "/v1/agents/{id}", "4xx") == before_other + 1


async def test_handler_exception_counts_as_5xx() -> None:
    before = _count("GET", "/v1/boom", "5xx")
    async with _client() as client:
        r = await client.get("/v1/boom")
    assert r.status_code == 500
    assert _count("GET", "/v1/boom", "5xx") == before + 1


def test_labels() -> None:
    assert status_class(204) == "2xx"
    assert status_class(503) == "5xx"
    assert status_class(42) == "other"
    assert method_label("get") == "GET"
    assert method_label("PROPFIND") == "OTHER"


async def test_control_api_exposes_its_request_metrics(http: httpx.AsyncClient) -> None:
    assert (await http.get("/health")).status_code == 200
    r = await http.get("/metrics")
    assert r.status_code == 200
    assert 'control_api_http_requests_total{method="GET",route="/health",status="2xx"}' in r.text
    assert "control_api_http_requests_in_flight" in r.text
    assert "control_api_http_request_duration_seconds_bucket" in r.text
