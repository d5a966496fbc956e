"""The client's address of a Starlette request; the logic lives in voicerelay.client_ip."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.requests import Request

from voicerelay.client_ip import (
    IPAddress,
    IPNetwork,
    TrustedProxies,
    client_ip,
    parse_address,
    trusted_proxies,
)

__all__ = [
    "IPAddress",
    "IPNetwork",
    "TrustedProxies",
    "client_ip",
    "parse_address",
    "request_client_ip",
]


def request_client_ip(request: Request, trusted: Sequence[str]) -> str:
    peer = request.client.host if request.client else None
    return client_ip(
        peer, request.headers.getlist("x-forwarded-for"), trusted_proxies(tuple(trusted))
    )
