"""Finds the PostgreSQL and Redis on 127.0.0.1, or starts embedded ones when they are absent."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import redis

from voicerelay.embedded import start_postgres, start_redis

DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass
class Services:
    admin_dsn: str
    redis_url: str
    embedded: list[Any] = field(default_factory=list)

    def stop(self) -> None:
        for handle in self.embedded:
            handle.stop()


def _postgres_reachable(dsn: str) -> bool:
    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(dsn, timeout=3)
        except Exception:
            return False
        try:
            return bool(
                await conn.fetchval(
                    "SELECT rolcreaterole AND rolcreatedb FROM pg_roles "
                    "WHERE rolname = current_user"
                )
            )
        finally:
            await conn.close()

    return asyncio.run(probe())


def _redis_reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except Exception:
        return False


def find_or_start_services() -> Services:
    embedded: list[Any] = []
    scratch = Path(tempfile.mkdtemp(prefix="voicerelay-tests-"))
    admin_dsn = os.environ.get("TEST_ADMIN_DATABASE_URL", DEFAULT_ADMIN_DSN)
    if not _postgres_reachable(admin_dsn):
        pg = start_postgres(scratch / "pg")
        embedded.append(pg)
        admin_dsn = pg.dsn()
    redis_url = os.environ.get("TEST_REDIS_URL", DEFAULT_REDIS_URL)
    if not _redis_reachable(redis_url):
        rd = start_redis(scratch / "redis")
        embedded.append(rd)
        redis_url = rd.url
    return Services(admin_dsn=admin_dsn, redis_url=redis_url, embedded=embedded)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
