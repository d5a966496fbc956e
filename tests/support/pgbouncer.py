"""A throwaway PgBouncer (transaction pooling) in front of the test database, when one is installed."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from tests.support.ports import subprocess_port

# Debian installs it outside a normal user's PATH.
_EXTRA_LOCATIONS = ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer")


def find_pgbouncer() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return next((p for p in _EXTRA_LOCATIONS if os.access(p, os.X_OK)), None)


@dataclass(frozen=True)
class PgBouncer:
    port: int
    database: str

    def dsn(self, user: str) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{self.database}"


def _unprivileged_user() -> str | None:
    """PgBouncer refuses to run as root; it then needs `-u` with some other account."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root and no unprivileged account to run pgbouncer as")


def _server_target(dsn: str) -> tuple[str, int, str, str, str | None]:
    """(host or socket directory, port, database, user, password) of a libpq-style URL."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = parts.hostname or query.get("host", ["127.0.0.1"])[0]
    port = parts.port or int(query.get("port", ["5432"])[0])
    password = unquote(parts.password) if parts.password else None
    return host, port, unquote(parts.path.lstrip("/")), unquote(parts.username or ""), password


def _config(dsn: str, *, port: int, pool_size: int) -> tuple[str, str, str]:
    host, server_port, database, user, password = _server_target(dsn)
    for value in (host, database, user, password or ""):
        # The ini and userlist formats have no escaping worth relying on in a test helper.
        if any(c in value for c in " \"'\n;="):
            raise ValueError(f"unsupported character in {value!r}")
    server = f"host={host} port={server_port} dbname={database}"
    if password:
        server += f" password={password}"
    ini = f"""\
[databases]
{database} = {server}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {{userlist}}
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 200
ignore_startup_parameters = extra_float_digits
server_check_delay = 0
"""
    # auth_type=trust still wants every client user listed.
    userlist = f'"{user}" ""\n'
    return database, ini, userlist


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pgbouncer exited at start-up:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"pgbouncer did not listen on {port}:\n{log.read_text()}")


@contextmanager
def run_pgbouncer(binary: str, dsn: str, *, pool_size: int) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode on a free loopback port, forwarding ``dsn``'s database
    through at most ``pool_size`` server connections per (user, database)."""
    port = subprocess_port()
    database, ini, userlist = _config(dsn, port=port, pool_size=pool_size)
    workdir = Path(tempfile.mkdtemp(prefix="voicerelay-pgbouncer-"))
    # Readable by the account PgBouncer drops to when started as root.
    workdir.chmod(0o755)
    (workdir / "userlist.txt").write_text(userlist)
    (workdir / "pgbouncer.ini").write_text(ini.replace("{userlist}", str(workdir / "userlist.txt")))
    log = workdir / "pgbouncer.log"
    command = [binary]
    run_as = _unprivileged_user()
    if run_as:
        command += ["-u", run_as]
    command.append(str(workdir / "pgbouncer.ini"))
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_listening(proc, port, log)
        yield PgBouncer(port=port, database=database)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
