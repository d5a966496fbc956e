"""Draining on SIGTERM: stop taking calls, let active ones finish, end the rest at a deadline.

The order matters and is why this runs *before* uvicorn is told to exit: uvicorn's own shutdown
closes every WebSocket at once (code 1012). While draining the relay keeps listening, so load
balancer probes see ``/ready`` fail and new Socket.IO connections are refused with ``draining``
(clients retry and land on another replica), while calls in progress carry on. At the deadline
the remaining calls end with reason ``shutdown``, each with its ``call.ended``.

With several replicas, when another replica is up and not draining, every client connected
here is told to reconnect (``hand_off``: ``relay.reconnect`` {reason: "draining"}, then its
transport closes and its Socket.IO client reconnects through the load balancer to a replica that
is not draining). The bridges this replica owns stay here until their calls end: their clients,
now elsewhere, reach them through routing. A lone replica keeps its clients (there is nowhere
else for them to go).

Phone calls (relay.phone) are never handed off: their caller is a Twilio Media Stream connected
to this replica, which Twilio cannot reopen elsewhere. They finish in place like any call kept
here, within the deadline; their Socket.IO monitors are handed off like other clients. So the
pod's termination grace period must exceed the preStop pause + DRAIN_DEADLINE_SECONDS +
END_CALLS_SECONDS, or the last phone calls are cut by SIGKILL instead of ending with ``shutdown``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from relay import metrics
from relay.protocol.close_codes import SHUTDOWN
from relay.registry import CallRegistry

log = logging.getLogger(__name__)

# After the deadline, how long ending the remaining calls may take (call.ended, upstream close).
END_CALLS_SECONDS = 10.0


class Drain:
    def __init__(self, registry: CallRegistry) -> None:
        self._registry = registry
        self.draining = False
        # Tells the clients connected here to reconnect elsewhere; returns how many.
        self.hand_off: Callable[[], Awaitable[int]] | None = None
        self.on_begin: list[Callable[[], None]] = []

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            metrics.DRAINING.set(1)
            for callback in self.on_begin:
                callback()

    async def run(self, deadline_seconds: float) -> None:
        """Drain: returns when no call is left (ended by their parties or at the deadline)."""
        self.begin()
        deadline = time.monotonic() + deadline_seconds
        log.info(
            "draining: refusing new calls; %d active may continue for up to %.0f s",
            len(self._registry),
            deadline_seconds,
        )
        if self.hand_off is not None:
            try:
                moved = await self.hand_off()
            except Exception:
                log.exception("telling clients to reconnect elsewhere failed")
            else:
                if moved:
                    log.info("told %d client(s) to reconnect to another replica", moved)
        while len(self._registry) and (remaining := deadline - time.monotonic()) > 0:
            waits = [asyncio.ensure_future(b.wait_ended()) for b in self._registry.bridges()]
            try:
                # A new bridge may still appear (a connect that was admitted just before the
                # drain began), so look again at least every second.
                await asyncio.wait(
                    waits, timeout=min(remaining, 1.0), return_when="FIRST_COMPLETED"
                )
            finally:
                for wait in waits:
                    wait.cancel()
        await self.end_all()

    async def end_all(self) -> None:
        """End every remaining call with reason ``shutdown`` and wait (bounded) for them."""
        bridges = self._registry.bridges()
        if not bridges:
            log.info("drained: no calls left")
            return
        log.info("drain deadline: ending %d call(s) with reason shutdown", len(bridges))
        for bridge in bridges:
            bridge.end(SHUTDOWN)
        _, pending = await asyncio.wait(
            [asyncio.ensure_future(b.wait_ended()) for b in bridges], timeout=END_CALLS_SECONDS
        )
        for wait in pending:
            wait.cancel()
        if pending:
            log.error("%d call(s) did not finish ending in time", len(pending))
