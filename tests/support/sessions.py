"""Signing in through the real API in tests.

Each login comes from its own made-up client address (X-Forwarded-For, trusted from the
loopback test client) so that the per-IP login limit of the shared test server never trips
tests that are not about rate limits.
"""

from __future__ import annotations

import random
from typing import Any

import httpx


def random_client_ip() -> str:
    # 198.18.0.0/15 is reserved for benchmarking: never a real client.
    return f"198.{random.randint(18, 19)}.{random.randint(0, 255)}.{random.randint(1, 254)}"


def from_ip(ip: str | None = None) -> dict[str, str]:
    return {"x-forwarded-for": ip or random_client_ip()}


async def login_response(
    http: httpx.AsyncClient, email: str, password: str, **extra: Any
) -> httpx.Response:
    return await http.post(
        "/v1/auth/login", json={"email": email, "password": password, **extra}, headers=from_ip()
    )


async def login(http: httpx.AsyncClient, email: str, password: str, **extra: Any) -> dict[str, Any]:
    r = await login_response(http, email, password, **extra)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}
