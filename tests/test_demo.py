"""`python -m relay.demo` completes a call against a stack served by `voicerelay up`, finding
everything it needs in the state directory, as after `make run` on a fresh checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay.demo import main, read_env_file
from tests.conftest import TestDatabase
from tests.test_up import clean_env, voicerelay_up
from voicerelay.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay.demo", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_demo_completes_a_call_against_the_running_stack(
    settings: Settings, database: TestDatabase, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    env = clean_env(
        DATABASE_URL=database.app_dsn,
        MIGRATION_DATABASE_URL=database.owner_dsn,
        REDIS_URL=settings.require("redis_url"),
        REDIS_KEY_PREFIX=settings.redis_key_prefix,
        DATABASE_POOL_MAX_SIZE="2",
    )
    with voicerelay_up(env, state, tmp_path) as run:
        assert "relay" in run.banner
        first = run_demo(f"--state-dir={state}")
        assert first.returncode == 0, first.stdout + first.stderr
        out = first.stdout
        assert "created credential" in out  # the demo tenant had no agent yet
        assert "← call.ready: conversation conv_" in out
        assert "← user_transcript: Hello from relay.demo!" in out
        assert "← call.ended: reason caller_hangup" in out
        assert "call log: ended" in out
        assert "ended by caller (caller_hangup, normal)" in out
        assert "relay.demo: the call completed" in out

        # A second run reuses the agent it created.
        second = run_demo(f"--state-dir={state}")
        assert second.returncode == 0, second.stdout + second.stderr
        assert "created credential" not in second.stdout
        assert "call log: ended" in second.stdout


def test_demo_without_a_stack_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([f"--state-dir={tmp_path}"]) == 1
    assert "start the stack with `make run` first" in capsys.readouterr().err


def test_stack_env_values_are_read_with_or_without_quotes(tmp_path: Path) -> None:
    path = tmp_path / "stack.env"
    path.write_text(
        "# comment\nPUBLIC_API_URL='http://127.0.0.1:8080'\nA=b\nB=\"c d\"\nnot a line\n"
    )
    assert read_env_file(path) == {"PUBLIC_API_URL": "http://127.0.0.1:8080", "A": "b", "B": "c d"}
