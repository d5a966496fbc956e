"""The relay's ASGI app: Socket.IO at /socket.io (WebSocket only), Twilio Media Streams at
/twilio/stream (phone calls, relay.phone.stream), plus /health, /ready, /metrics.

``create_app(settings)`` is what `voicerelay relay` and `voicerelay up` serve. The app object also
carries ``drain()``, which the server runs on SIGTERM before it stops (see voicerelay/serving.py).
``/ready`` fails while draining, while Redis or the control API is unreachable, and while the
cluster pub/sub listener is down (``pubsub: down``): a replica that cannot hear other replicas
must not take new clients.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import socketio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from relay.phone.stream import STREAM_PATH, TwilioStreamEndpoint
from relay.runtime import RelayOptions, RelayRuntime
from relay.sio_server import create_sio_server
from voicerelay.settings import Settings

SOCKETIO_PATH = "/socket.io"
WEBSOCKET_REQUIRED = JSONResponse(
    {
        "code": "websocket_required",
        "message": "The relay speaks Socket.IO over WebSocket only: connect with "
        "transports: ['websocket'] (HTTP long-polling would need sticky sessions).",
    },
    status_code=400,
)
STREAM_WEBSOCKET_REQUIRED = JSONResponse(
    {
        "code": "websocket_required",
        "message": "/twilio/stream is Twilio Media Streams: a WebSocket opened by Twilio "
        "(<Connect><Stream>).",
    },
    status_code=400,
)


class RelayApp:
    def __init__(self, settings: Settings, options: RelayOptions) -> None:
        self.runtime = RelayRuntime(settings, options)
        self.sio, self.emitter, self.handlers = create_sio_server(self.runtime)
        self._socketio = socketio.ASGIApp(self.sio, socketio_path=SOCKETIO_PATH.strip("/"))
        self._twilio = TwilioStreamEndpoint(self.runtime, self.handlers.placer)
        self._http = Starlette(
            routes=[
                Route("/health", self._health, methods=["GET"]),
                Route("/ready", self._ready, methods=["GET"]),
                Route("/metrics", self._metrics, methods=["GET"]),
            ],
            lifespan=self._lifespan,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if path == SOCKETIO_PATH or path.startswith(SOCKETIO_PATH + "/"):
            if scope["type"] == "websocket":
                await self._socketio(scope, receive, send)
                return
            if scope["type"] == "http":
                await WEBSOCKET_REQUIRED(scope, receive, send)
                return
        if path == STREAM_PATH:
            if scope["type"] == "websocket":
                await self._twilio(scope, receive, send)
                return
            if scope["type"] == "http":
                await STREAM_WEBSOCKET_REQUIRED(scope, receive, send)
                return
        await self._http(scope, receive, send)

    async def drain(self) -> None:
        """Stop taking calls, let active ones run up to the drain deadline, then end them."""
        await self.runtime.drain.run(self.runtime.settings.drain_deadline_seconds)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        await self.runtime.start(self.emitter, self.handlers.take_over)
        try:
            yield
        finally:
            await self.runtime.stop()
            await self.sio.shutdown()
            await self.runtime.close_manager()

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _ready(self, request: Request) -> Response:
        checks = await self.runtime.readiness()
        ok = all(v == "ok" for k, v in checks.items() if k != "draining") and (
            "draining" not in checks
        )
        return JSONResponse(
            {"status": "ready" if ok else "not_ready", "checks": checks},
            status_code=200 if ok else 503,
        )

    async def _metrics(self, request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings, options: RelayOptions | None = None) -> RelayApp:
    return RelayApp(settings, options or RelayOptions())
