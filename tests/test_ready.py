"""/ready answers 503 while Postgres or Redis is unreachable and 200 again once it is back;
/health stays 200 throughout (the process is up)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx

from control_api.app import create_app
from tests.conftest import TestDatabase
from tests.support.servers import serve
from tests.support.services import free_port
from voicerelay.settings import Settings


class PostgresProxy:
    """A loopback TCP proxy in front of the test Postgres that can be cut and restored,
    standing in for a database outage without stopping the shared server."""

    def __init__(self, upstream_dsn: str) -> None:
        parts = urlsplit(upstream_dsn)
        socket_dir = parse_qs(parts.query).get("host", [None])[0]
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 5432
        self._unix_path = f"{socket_dir}/.s.PGSQL.{self._port}" if socket_dir else None
        self._dsn_parts = parts
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def dsn(self) -> str:
        parts = self._dsn_parts
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._unix_path:
            up_reader, up_writer = await asyncio.open_unix_connection(self._unix_path)
        else:
            up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        self._writers.update((writer, up_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers.difference_update((writer, up_writer))


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    for _ in range(200):
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not reached")


@contextlib.asynccontextmanager
async def _api(settings: Settings, **changes: object) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        serve(create_app(settings.model_copy(update=changes))) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        yield client


async def test_not_ready_while_redis_is_unreachable(settings: Settings) -> None:
    # Nothing listens on this port: every Redis command fails to connect.
    async with _api(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0") as client:
        r = await client.get("/ready")
        assert r.status_code == 503
        assert r.json() == {
            "status": "not_ready",
            "checks": {"postgres": "ok", "redis": "unreachable"},
        }
        assert (await client.get("/health")).status_code == 200


async def test_not_ready_while_postgres_is_unreachable_then_ready_again(
    settings: Settings, database: TestDatabase
) -> None:
    proxy = PostgresProxy(database.app_dsn)
    await proxy.start()
    try:
        await _outage_and_recovery(settings, proxy)
    finally:
        await proxy.cut()


async def _outage_and_recovery(settings: Settings, proxy: PostgresProxy) -> None:
    async with _api(
        settings, database_url=proxy.dsn, database_pool_min_size=1, database_pool_max_size=2
    ) as client:
        assert (await client.get("/ready")).status_code == 200
        await proxy.cut()
        r = await client.get("/ready")
        assert r.status_code == 503
        assert r.json()["checks"] == {"postgres": "unreachable", "redis": "ok"}
        assert (await client.get("/health")).status_code == 200

        await proxy.start()

        async def ready() -> bool:
            return (await client.get("/ready")).status_code == 200

        await _until(ready)
