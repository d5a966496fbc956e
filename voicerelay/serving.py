"""Runs the ASGI apps under uvicorn on uvloop, stopping them gracefully on SIGTERM or Ctrl-C.

Several servers can share one process (`voicerelay up`): they start together, and on a signal
they stop one after another in reverse order, so a service stops before the ones it calls.
A process stopped by a signal exits with status 0; a server that fails to start is an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import uvicorn

from voicerelay.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

GRACEFUL_SHUTDOWN_SECONDS = 20


class ServerFailed(RuntimeError):
    """A server exited without serving (port taken, application start-up failed)."""


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on uvloop (asyncio where uvloop is unavailable)."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(coro)


class _Server(uvicorn.Server):
    # uvicorn's own handlers re-raise the signal once shut down, so the process would end
    # "killed by SIGTERM" rather than exit 0, and only one server per process could own them.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Service:
    name: str
    server: uvicorn.Server
    url: str
    # Run on SIGTERM/SIGINT before the server is told to exit (the relay drains its calls here:
    # uvicorn's own shutdown would close every WebSocket at once). A second signal cuts it short.
    drain: Callable[[], Awaitable[None]] | None = None
    # Already bound (and listening): served as they are instead of binding host:port at start-up.
    sockets: list[socket.socket] | None = None


def make_service(
    name: str,
    app: Any,
    *,
    host: str,
    port: int,
    settings: Settings,
    scheme: str = "http",
    **config: Any,
) -> Service:
    uvicorn_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http="httptools",
        lifespan="on",
        access_log=False,  # request lines can carry tokens in query strings
        log_config=None,
        # X-Forwarded-For is interpreted in one place only (control_api/client_ip.py and the
        # relay's admission), against TRUSTED_PROXIES; uvicorn must not rewrite the peer first.
        proxy_headers=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        **config,
    )
    drain = getattr(app, "drain", None)
    return Service(
        name=name,
        server=_Server(uvicorn_config),
        url=f"{scheme}://{host}:{port}",
        drain=drain if callable(drain) else None,
    )


def api_service(settings: Settings, host: str, port: int) -> Service:
    from control_api.app import create_app

    return make_service(
        "control API", create_app(settings), host=host, port=port, settings=settings
    )


async def _serve(service: Service) -> None:
    try:
        await service.server.serve(sockets=service.sockets)
    except SystemExit:
        # uvicorn calls sys.exit() when it cannot bind or the app's start-up fails.
        raise ServerFailed(f"{service.name} failed to start (see the log above)") from None
    if not service.server.started:
        raise ServerFailed(f"{service.name} failed to start (see the log above)")


async def serve_until_stopped(
    services: Sequence[Service],
    *,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or until one server exits), then stop all of them in turn.

    A second signal forces the servers to close without waiting for open connections.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    forced = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            forced.set()
            for service in services:
                service.server.force_exit = True
        stop.set()

    installed = _install_signal_handlers(loop, on_signal)
    tasks = [asyncio.create_task(_serve(s), name=s.name) for s in services]
    stop_wait = asyncio.create_task(stop.wait())
    try:
        if on_started is not None:
            await _wait_started(services, tasks, stop)
            if not stop.is_set() and all(s.server.started for s in services):
                on_started()
        await asyncio.wait([*tasks, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            log.info("stopping")
        for service, task in reversed(list(zip(services, tasks, strict=True))):
            if stop.is_set() and service.drain is not None and not task.done():
                await _drain(service, service.drain, forced)
            service.server.should_exit = True
            await asyncio.wait([task])
    finally:
        stop_wait.cancel()
        for sig in installed:
            loop.remove_signal_handler(sig)
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        failure = None if task.cancelled() else task.exception()
        if failure is not None:
            raise failure


async def _drain(
    service: Service, drain: Callable[[], Awaitable[None]], forced: asyncio.Event
) -> None:
    async def run() -> None:
        await drain()

    draining = asyncio.create_task(run(), name=f"{service.name} drain")
    forcing = asyncio.create_task(forced.wait())
    try:
        await asyncio.wait([draining, forcing], return_when=asyncio.FIRST_COMPLETED)
    finally:
        forcing.cancel()
        if not draining.done():
            log.warning("%s: drain cut short by a second signal", service.name)
            draining.cancel()
        await asyncio.gather(draining, return_exceptions=True)
    if not draining.cancelled() and draining.exception() is not None:
        log.error("%s: drain failed", service.name, exc_info=draining.exception())


async def _wait_started(
    services: Sequence[Service], tasks: Sequence[asyncio.Task[None]], stop: asyncio.Event
) -> None:
    while not all(s.server.started for s in services):
        if stop.is_set() or any(t.done() for t in tasks):
            return
        await asyncio.sleep(0.02)


def _install_signal_handlers(
    loop: asyncio.AbstractEventLoop, handler: Callable[[], None]
) -> list[signal.Signals]:
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, handler)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows, threads
            continue
        installed.append(sig)
    return installed


async def serve_api(settings: Settings, host: str, port: int) -> None:
    await serve_until_stopped([api_service(settings, host, port)])


def relay_service(settings: Settings, host: str, port: int) -> Service:
    from relay.app import create_app
    from relay.sio_server import FRAME_OVERHEAD_BYTES

    # uvicorn buffers a whole WebSocket message (16 MiB by default) before the app can refuse
    # it: cap it just above the largest message either endpoint accepts.
    largest = max(
        settings.relay_max_audio_chunk_bytes + FRAME_OVERHEAD_BYTES,
        settings.relay_twilio_max_message_bytes,
    )
    return make_service(
        "relay",
        create_app(settings),
        host=host,
        port=port,
        settings=settings,
        ws_per_message_deflate=False,  # audio gains nothing from compression; it costs CPU
        ws_max_size=largest + 1024,
    )


async def serve_relay(settings: Settings, host: str, port: int) -> None:
    """Serve the relay; on SIGTERM it drains (see relay/drain.py) before the server stops."""
    await serve_until_stopped([relay_service(settings, host, port)])
