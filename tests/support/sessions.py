"""Signing in through the real API in tests.

Each login and refresh comes from its own made-up client address (X-Forwarded-For, trusted from the
loopback test client) so that the per-IP login limit of the shared test server never trips
tests that are not about rate limits.
"""

from __future__ import annotations

import random
import uuid
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


async def refresh_response(http: httpx.AsyncClient, refresh_token: str) -> httpx.Response:
    """Like a login, from an address of its own: refreshes are limited per client address too."""
    return await http.post(
        "/v1/auth/refresh", json={"refresh_token": refresh_token}, headers=from_ip()
    )


async def login(http: httpx.AsyncClient, email: str, password: str, **extra: Any) -> dict[str, Any]:
    r = await login_response(http, email, password, **extra)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def first_sign_in(
    http: httpx.AsyncClient, email: str, one_time_password: str
) -> dict[str, Any]:
    """Signs in with a one-time password and replaces it, as the API requires before anything
    else; returns the session the change answers with (the login's tokens are revoked)."""
    session = await login(http, email, one_time_password)
    r = await http.post(
        "/v1/users/me/password",
        json={"current_password": one_time_password, "new_password": f"chosen-{uuid.uuid4()}"},
        headers=bearer(session["access_token"]),
    )
    assert r.status_code == 200, r.text
    changed: dict[str, Any] = r.json()
    return changed
