"""HTTP hardening of the control API: security headers on every answer, CORS closed by default and
open only to the configured dashboard origins, and one JSON log line per request carrying its
request id and tenant id (and no secret)."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from control_api.app import create_app
from control_api.bootstrap import NewTenant
from control_api.middleware import SECURITY_HEADERS
from tests.support.servers import serve
from tests.support.tenants import auth
from voicerelay.logs import JsonFormatter
from voicerelay.settings import Settings

DASHBOARD = "https://dashboard.example"
STRANGER = "https://evil.example"
MISSING = "0190abcd-0000-7000-8000-00000000beef"


def assert_security_headers(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS:
        assert response.headers.get(name.decode()) == value.decode(), (response.url, name)


async def test_security_headers_on_success_and_on_every_kind_of_error(
    http: httpx.AsyncClient, tenant: NewTenant, settings: Settings
) -> None:
    answers = [
        await http.get("/health"),
        await http.get("/openapi.json"),
        await http.get("/v1/agents", headers=auth(tenant)),
        await http.get("/v1/agents"),  # 401
        await http.get("/v1/nope"),  # 404
        await http.delete("/health"),  # 405
        await http.post(
            "/v1/agents",
            content=b"{" * (settings.max_request_body_bytes + 1),
            headers={**auth(tenant), "content-type": "application/json"},
        ),  # 413
    ]
    assert [r.status_code for r in answers] == [200, 200, 200, 401, 404, 405, 413]
    for response in answers:
        assert_security_headers(response)


async def test_request_id_is_echoed_when_sane_and_replaced_otherwise(
    http: httpx.AsyncClient,
) -> None:
    r = await http.get("/health", headers={"x-request-id": "audit-7.a_b"})
    assert r.headers["x-request-id"] == "audit-7.a_b"
    for unsafe in ("a b", "x" * 65, "<script>", ""):
        r = await http.get("/health", headers={"x-request-id": unsafe})
        assert r.headers["x-request-id"] != unsafe
        assert len(r.headers["x-request-id"]) == 32


async def preflight_from(client: httpx.AsyncClient, origin: str) -> httpx.Response:
    """What a browser sends before a dashboard's authenticated JSON POST."""
    return await client.options(
        "/v1/agents",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )


async def test_cors_is_closed_by_default(http: httpx.AsyncClient, settings: Settings) -> None:
    assert settings.cors_allowed_origins == []
    preflight = await preflight_from(http, DASHBOARD)
    assert preflight.status_code in (401, 404, 405)
    assert not any(h.startswith("access-control-") for h in preflight.headers)
    r = await http.get("/health", headers={"origin": DASHBOARD})
    assert r.status_code == 200
    assert not any(h.startswith("access-control-") for h in r.headers)


@pytest.fixture(scope="module")
async def cors_api_url(settings: Settings) -> AsyncIterator[str]:
    configured = settings.model_copy(update={"cors_allowed_origins": [DASHBOARD]})
    async with serve(create_app(configured)) as url:
        yield url


async def test_cors_admits_only_the_allowed_dashboard_origins(
    cors_api_url: str, tenant: NewTenant
) -> None:
    async with httpx.AsyncClient(base_url=cors_api_url, timeout=10) as client:
        preflight = await preflight_from(client, DASHBOARD)
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == DASHBOARD
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        # Bearer tokens, not cookies: the browser is never told to send credentials.
        assert "access-control-allow-credentials" not in preflight.headers

        r = await client.get("/v1/agents", headers={**auth(tenant), "origin": DASHBOARD})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == DASHBOARD
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        assert_security_headers(r)

        refused = await preflight_from(client, STRANGER)
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers
        r = await client.get("/v1/agents", headers={**auth(tenant), "origin": STRANGER})
        assert "access-control-allow-origin" not in r.headers


async def test_json_request_logs_carry_request_and_tenant_ids(
    http: httpx.AsyncClient, tenant: NewTenant
) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        authenticated = await http.get(
            "/v1/agents?limit=5",
            headers={**auth(tenant), "x-request-id": "audit-log-1"},
        )
        anonymous = await http.get("/v1/agents", headers={"x-request-id": "audit-log-2"})
        missing = await http.get(
            f"/v1/agents/{MISSING}",
            headers={**auth(tenant), "x-request-id": "audit-log-3"},
        )
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
    assert (authenticated.status_code, anonymous.status_code, missing.status_code) == (
        200,
        401,
        404,
    )
    entries = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    # The test's own HTTP client logs too; only what the service wrote counts.
    ours = [e for e in entries if str(e["logger"]).startswith("control_api")]
    text = orjson.dumps(ours).decode()
    by_request = {e.get("request_id"): e for e in ours if e["logger"] == "control_api.middleware"}

    first = by_request["audit-log-1"]
    assert first["tenant_id"] == str(tenant.tenant_id)
    assert (first["method"], first["route"], first["status"]) == ("GET", "/v1/agents", 200)
    assert first["level"] == "info"
    assert isinstance(first["duration_ms"], float)

    second = by_request["audit-log-2"]
    assert "tenant_id" not in second  # nobody was authenticated
    assert second["status"] == 401

    third = by_request["audit-log-3"]
    assert third["tenant_id"] == str(tenant.tenant_id)
    assert (third["route"], third["status"]) == ("/v1/agents/{id}", 404)

    # Route templates only: neither the raw path nor the bearer secret is ever written.
    assert MISSING not in text
    assert tenant.api_key not in text
    assert tenant.api_key.split("_", 3)[3] not in text  # the secret (it may contain "_")


async def test_no_platform_secret_in_any_public_document(
    http: httpx.AsyncClient, settings: Settings, tenant: NewTenant
) -> None:
    secrets = [
        settings.require("internal_service_token"),
        *_key_materials(settings.require("signing_keys")),
        *_key_materials(settings.require("encryption_keys")),
    ]
    responses = [
        await http.get(path)
        for path in ("/openapi.json", "/.well-known/jwks.json", "/metrics", "/ready", "/v1/nope")
    ]
    responses.append(await http.get("/v1/tenant", headers=auth(tenant)))
    responses.append(await http.post("/v1/agents", json={"name": 1}, headers=auth(tenant)))
    for response in responses:
        for secret in secrets:
            assert secret not in response.text, response.url
    # Public halves only: whoever reads the JWKS (the relay) can verify but never mint.
    for jwk in responses[1].json()["keys"]:
        assert set(jwk) == {"kty", "crv", "x", "kid", "alg", "use"}


def _key_materials(keyring: str) -> list[str]:
    """The key material of each configured ``kid:material`` entry."""
    return [entry.split(":", 1)[1] for entry in keyring.split(",")]
