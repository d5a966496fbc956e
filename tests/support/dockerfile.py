"""Dockerfiles without a Docker engine: parse them, build their context the way `docker build`
does (.dockerignore), and replay a stage's COPY and RUN steps into a directory standing in for
the image's root file system.

Parsing is deliberately simple: it covers the instructions voicerelay's Dockerfiles use (line
continuations, comments, exec-form JSON arrays, ``--flag=value`` options, ``KEY=value`` lists),
and raises on anything it does not understand rather than guessing.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

_FLAG = re.compile(r"--([a-z-]+)=(\S+)")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    arguments: str  # continuation lines joined, leading/trailing space stripped
    line: int

    def flags(self) -> dict[str, str]:
        """Leading ``--name=value`` options (RUN --mount, COPY --from, HEALTHCHECK --interval)."""
        return dict(_FLAG.findall(self._split_flags()[0]))

    def body(self) -> str:
        """The arguments after the leading ``--name=value`` options."""
        return self._split_flags()[1]

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form ENTRYPOINT/CMD/RUN, or None for shell form."""
        body = self.body()
        if not body.startswith("["):
            return None
        value = json.loads(body)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"line {self.line}: exec form must be a JSON array of strings")
        return value

    def healthcheck_command(self) -> list[str] | None:
        """The exec-form command of ``HEALTHCHECK [options] CMD [...]``, else None."""
        keyword, _, command = self.body().partition(" ")
        if self.keyword != "HEALTHCHECK" or keyword != "CMD":
            return None
        return Instruction("CMD", command, self.line).exec_form()

    def pairs(self) -> dict[str, str]:
        """``KEY=value`` items of ENV, LABEL and ARG (values may be quoted)."""
        items: dict[str, str] = {}
        for token in shlex.split(self.arguments):
            key, sep, value = token.partition("=")
            if not sep and self.keyword != "ARG":
                raise ValueError(f"line {self.line}: {self.keyword} needs KEY=value, got {token!r}")
            items[key] = value
        return items

    def _split_flags(self) -> tuple[str, str]:
        rest = self.arguments
        flags: list[str] = []
        while rest.startswith("--"):
            token, _, rest = rest.partition(" ")
            flags.append(token)
            rest = rest.lstrip()
        return " ".join(flags), rest


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for instruction in self.all("ENV"):
            merged.update(instruction.pairs())
        return merged

    def labels(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for instruction in self.all("LABEL"):
            merged.update(instruction.pairs())
        return merged

    def args(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for instruction in self.all("ARG"):
            merged.update(instruction.pairs())
        return merged


def logical_lines(text: str) -> Iterable[tuple[int, str]]:
    """(first line number, instruction text) with comments dropped and continuations joined."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # Docker drops comment lines, even inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        yield start, " ".join(part for part in pending if part)
        pending = []
    if pending:
        raise ValueError(f"line {start}: the last instruction ends with a line continuation")


def parse_dockerfile(text: str) -> list[Stage]:
    stages: list[Stage] = []
    for line, instruction_text in logical_lines(text):
        keyword, _, arguments = instruction_text.partition(" ")
        instruction = Instruction(keyword.upper(), arguments.strip(), line)
        if instruction.keyword == "FROM":
            words = instruction.body().split()
            if len(words) == 3 and words[1].upper() == "AS":
                stages.append(Stage(base=words[0], name=words[2]))
            elif len(words) == 1:
                stages.append(Stage(base=words[0], name=None))
            else:
                raise ValueError(f"line {line}: cannot read FROM {arguments!r}")
            continue
        if not stages:
            raise ValueError(f"line {line}: {instruction.keyword} before the first FROM")
        stages[-1].instructions.append(instruction)
    return stages


# --- the build context -----------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


class DockerIgnore:
    """.dockerignore rules: the last pattern matching a path (or one of its parent directories)
    decides, and a leading ``!`` re-includes."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            pattern = line[1:].strip() if negated else line
            pattern = pattern.removeprefix("./").strip("/")
            self.rules.append((negated, _pattern_regex(pattern)))

    def excluded(self, path: str) -> bool:
        parts = path.split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        verdict = False
        for negated, regex in self.rules:
            if any(regex.fullmatch(candidate) for candidate in candidates):
                verdict = not negated
        return verdict


def build_context(repo: Path) -> list[str]:
    """Files `docker build` would receive from this working tree: tracked and new files that git
    does not ignore, minus what .dockerignore excludes (sorted, relative POSIX paths)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        check=True,
        capture_output=True,
    ).stdout.decode()
    ignore = DockerIgnore((repo / ".dockerignore").read_text())
    return sorted(
        path
        for path in set(listed.split("\0"))
        if path and (repo / path).is_file() and not ignore.excluded(path)
    )


# --- replaying a stage -----------------------------------------------------------------------


@dataclass
class ImageRoot:
    """A directory standing in for an image's ``/``."""

    root: Path

    def path(self, absolute: str) -> Path:
        if not absolute.startswith("/"):
            raise ValueError(f"not an absolute path: {absolute!r}")
        return self.root / absolute.lstrip("/")


def workdir(stage: Stage, before: Instruction) -> str:
    """The stage's WORKDIR in effect at ``before`` (absolute; "/" when none was set)."""
    current = "/"
    for instruction in stage.instructions:
        if instruction is before:
            break
        if instruction.keyword == "WORKDIR":
            target = instruction.body()
            current = target if target.startswith("/") else f"{current.rstrip('/')}/{target}"
    return current


def apply_copy(
    instruction: Instruction,
    stage: Stage,
    *,
    repo: Path,
    context: Iterable[str],
    image: ImageRoot,
) -> list[Path]:
    """COPY sources from the build context into the image root, with Docker's rules: a directory
    source copies its contents; several sources, or a destination ending in "/", mean a
    directory destination. Returns the files written."""
    if "from" in instruction.flags():
        raise ValueError(f"line {instruction.line}: COPY --from is not a context copy")
    words = instruction.exec_form() or shlex.split(instruction.body())
    *sources, destination = words
    if not sources:
        raise ValueError(f"line {instruction.line}: COPY needs a source and a destination")
    if not destination.startswith("/"):
        destination = f"{workdir(stage, instruction).rstrip('/')}/{destination}"
    into_directory = destination.endswith("/") or len(sources) > 1
    files = list(context)
    written: list[Path] = []
    for source in sources:
        source = source.removeprefix("./").rstrip("/")
        if source in files:
            target = image.path(destination)
            if into_directory or target.is_dir():
                target = target / Path(source).name
            written.append(_copy_file(repo / source, target))
            continue
        inside = [f for f in files if f.startswith(source + "/")]
        if not inside:
            raise FileNotFoundError(
                f"line {instruction.line}: COPY source {source!r} is not in the build context"
            )
        for relative in inside:
            target = image.path(destination) / relative[len(source) + 1 :]
            written.append(_copy_file(repo / relative, target))
    return written


def _copy_file(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)
    return target


def run_step(
    instruction: Instruction,
    stage: Stage,
    *,
    image: ImageRoot,
    env: Mapping[str, str],
    timeout: float,
) -> subprocess.CompletedProcess[str]:
    """A shell-form RUN, its ``--mount`` options dropped, in the image root's WORKDIR."""
    if instruction.keyword != "RUN" or instruction.exec_form() is not None:
        raise ValueError(f"line {instruction.line}: not a shell-form RUN")
    cwd = image.path(workdir(stage, instruction))
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        ["/bin/sh", "-c", instruction.body()],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
