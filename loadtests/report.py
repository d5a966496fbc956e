"""Output shared by the benchmarks: Markdown tables, the JSON record and the exit status."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol


class Measured(Protocol):
    calls: int
    connected: int
    errors: list[str]

    def as_dict(self) -> dict[str, Any]: ...


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, columns padded to their widest cell; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def finish(
    measurements: Sequence[Measured],
    *,
    json_path: Path | None,
    logs: Path | None,
    **record: Any,
) -> int:
    """Write the JSON record if asked, say where the logs went, and return the exit status:
    0 only if every step connected every call without errors."""
    if json_path is not None:
        body = {**record, "measurements": [m.as_dict() for m in measurements]}
        json_path.write_text(json.dumps(body, indent=2, default=str))
    complete = all(m.connected == m.calls and not m.errors for m in measurements)
    if not complete and logs is None:
        print("Service logs were in a temporary directory: rerun with --logs DIR to keep them.")
    return 0 if complete else 1
