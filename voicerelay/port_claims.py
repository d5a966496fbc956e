"""The ports `voicerelay up` serves on, bound before anything else starts.

Binding every port first means a port that is taken fails the run at once, with the setting to
change, before an embedded PostgreSQL or Redis has been started (or an application's start-up
has run); and the bound sockets are handed to the servers, so no other process can take a port
between this check and the server starting.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from dataclasses import dataclass

# As uvicorn's own listening sockets: enough for a burst of connections while services start.
_BACKLOG = 2048


class PortUnavailable(RuntimeError):
    """A port cannot be listened on; the message names it and the setting that chooses it."""


@dataclass(frozen=True)
class Listener:
    """One service's address, and how the operator chooses its port."""

    service: str
    host: str
    port: int
    setting: str
    option: str

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


def _refusal(listener: Listener, error: OSError) -> PortUnavailable:
    where = f"{listener.host}:{listener.port}"
    change = f"set {listener.setting} (or pass {listener.option}) to a free port"
    if error.errno == errno.EADDRINUSE:
        return PortUnavailable(
            f"port {listener.port} for the {listener.service} ({listener.setting}) is already"
            f" in use on {listener.host}: stop what is using it, or {change}"
        )
    return PortUnavailable(
        f"cannot listen on {where} for the {listener.service} ({listener.setting}):"
        f" {error.strerror or error}; {change}"
    )


def _bind(listener: Listener) -> socket.socket:
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As asyncio's servers do: a port left in TIME_WAIT by a previous run is reusable.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(listener.address)
        # Listening makes the claim exclusive (two bound-only SO_REUSEADDR sockets may share an
        # address on Linux); connections that arrive early wait in the backlog.
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise _refusal(listener, exc) from None
    return sock


def _refuse_shared_ports(listeners: Iterable[Listener]) -> None:
    seen: dict[tuple[str, int], Listener] = {}
    for listener in listeners:
        other = seen.setdefault(listener.address, listener)
        # Port 0 asks for any free port: never shared.
        if other is not listener and listener.port != 0:
            raise PortUnavailable(
                f"{other.setting} and {listener.setting} are both {listener.port}: the"
                f" {other.service} and the {listener.service} each need a port of their own"
            )


class PortClaims:
    """Bound, listening sockets by address, until ``close`` (servers close theirs themselves,
    closing again is harmless)."""

    def __init__(self) -> None:
        self._sockets: dict[tuple[str, int], socket.socket] = {}

    @classmethod
    def claim(cls, listeners: Iterable[Listener]) -> PortClaims:
        wanted = list(listeners)
        _refuse_shared_ports(wanted)
        claims = cls()
        try:
            for listener in wanted:
                claims._sockets[listener.address] = _bind(listener)
        except BaseException:
            claims.close()
            raise
        return claims

    def sockets_for(self, host: str, port: int) -> list[socket.socket] | None:
        """What a server on host:port serves on (None: not claimed, the server binds itself)."""
        sock = self._sockets.get((host, port))
        return None if sock is None else [sock]

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
