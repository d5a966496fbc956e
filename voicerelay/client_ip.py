"""The client's address for per-IP limits: X-Forwarded-For counts only when a trusted proxy sent it.

Anyone can write an X-Forwarded-For header, so it is read from the right: each hop appended by
a proxy we trust is skipped, and the first address not in the trusted set is the client. A
request that did not come from a trusted proxy is judged by its own peer address.

Shared by the control API (Starlette requests) and the relay (the ASGI scope of a Socket.IO
connection; python-socketio's environ has a fixed ``REMOTE_ADDR`` of 127.0.0.1, so the relay must
read the peer from the scope).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any, TypeAlias

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """Addresses and CIDR ranges from settings.trusted_proxies."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.networks: list[IPNetwork] = [
            ipaddress.ip_network(entry.strip(), strict=False) for entry in entries if entry.strip()
        ]

    def __contains__(self, address: IPAddress) -> bool:
        address = _unmapped(address)
        return any(address.version == n.version and address in n for n in self.networks)


def parse_address(raw: str) -> IPAddress | None:
    """An address as proxies write it: bare, ``v4:port``, ``[v6]`` or ``[v6]:port``."""
    text = raw.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return _unmapped(ipaddress.ip_address(text))
    except ValueError:
        return None


def client_ip(peer: str | None, forwarded_for: Sequence[str], trusted: TrustedProxies) -> str:
    """Resolve the client from the direct peer and the X-Forwarded-For header values (in order).

    Returns "unknown" only when the peer itself is missing or unparseable (e.g. a Unix socket).
    """
    current = parse_address(peer) if peer else None
    if current is None:
        return "unknown"
    hops = [hop for header in forwarded_for for hop in header.split(",") if hop.strip()]
    for raw in reversed(hops):
        if current not in trusted:
            break
        previous = parse_address(raw)
        if previous is None:
            # A garbled hop: the trusted proxy's own view is all we can rely on.
            break
        current = previous
    return str(current)


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@lru_cache(maxsize=8)
def trusted_proxies(entries: tuple[str, ...]) -> TrustedProxies:
    """Parsed once per distinct setting value."""
    return TrustedProxies(entries)


def scope_client_ip(scope: Mapping[str, Any], trusted: Sequence[str]) -> str:
    """The client of an ASGI HTTP or WebSocket connection (``scope["client"]`` and its headers)."""
    client = scope.get("client")
    peer = str(client[0]) if isinstance(client, list | tuple) and client else None
    forwarded = [
        value.decode("latin-1")
        for name, value in scope.get("headers") or ()
        if name.lower() == b"x-forwarded-for"
    ]
    return client_ip(peer, forwarded, trusted_proxies(tuple(trusted)))
