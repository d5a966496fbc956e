"""Runs the ASGI apps under uvicorn with uvloop, honouring SIGTERM for a graceful stop."""

from __future__ import annotations

import uvicorn

from voicerelay.settings import Settings


def _loop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover - non-Linux development machines
        return "asyncio"
    return "uvloop"


async def serve_api(settings: Settings, host: str, port: int) -> None:
    from control_api.app import create_app

    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        loop=_loop(),
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        proxy_headers=True,
        forwarded_allow_ips=",".join(settings.trusted_proxies),
        timeout_graceful_shutdown=20,
    )
    await uvicorn.Server(config).serve()
