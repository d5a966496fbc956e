"""`make loadtest`: locust, headless and bounded, against a local stack, with its CSV and HTML
report in one folder.

    python -m loadtests.run_local [--users 6] [--spawn-rate 2] [--run-time 60s]
                                  [--out .voicerelay/loadtest] [--state-dir .voicerelay]
                                  [-- extra locust arguments]

Uses the stack `make run` is running (found through ``<state dir>/stack.env``); when none
answers, starts one the same way (``voicerelay up``, loopback only, its log in the report
folder) and stops it at the end. Then provisions the load-test tenant (loadtests/provision.py)
and runs ``locust --headless`` with ``LOADTEST_TARGET_FILE`` pointing at it. Exits with
locust's status (1 when any request failed). To load a real deployment, run locust yourself
with the ``LOADTEST_*`` variables instead (loadtests/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from loadtests.load_target import TARGET_FILE_VARIABLE
from loadtests.provision import ProvisionError, ensure_target
from relay.demo import read_env_file

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
# A first run on a fresh machine initialises the embedded PostgreSQL: give it time.
STACK_START_SECONDS = 180.0
STACK_STOP_SECONDS = 60.0
LOOPBACK = "127.0.0.1"
# Every locust user connects from the same address: per-address limits that protect a real
# deployment would refuse a load test's calls. Used for a stack started here, unless set.
LOAD_LIMITS = {
    "RELAY_CONNECT_RATE_PER_MINUTE_PER_IP": "100000",
    "RELAY_CONNECT_RATE_PER_MINUTE_PER_TENANT": "100000",
    "RATE_LIMIT_API_PER_SECOND": "1000",
    "RATE_LIMIT_API_BURST": "2000",
}


class StackUnavailable(RuntimeError):
    pass


def _http(url: str) -> str:
    return url.replace("ws://", "http://", 1).replace("wss://", "https://", 1).rstrip("/")


def stack_urls(state_dir: Path) -> tuple[str, str] | None:
    """The control API's and the relay's base URLs from ``stack.env``, if it exists."""
    try:
        env = read_env_file(state_dir / "stack.env")
    except OSError:
        return None
    api, relay = env.get("PUBLIC_API_URL"), env.get("RELAY_PUBLIC_URL")
    if not api or not relay:
        return None
    return _http(api), _http(relay)


def stack_ready(state_dir: Path) -> bool:
    urls = stack_urls(state_dir)
    if urls is None:
        return False
    try:
        return all(httpx.get(f"{url}/ready", timeout=2).status_code == 200 for url in urls)
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def local_stack(state_dir: Path, log_path: Path, up_args: list[str]) -> Iterator[bool]:
    """Yields whether it started the stack (False: one was already running)."""
    if stack_ready(state_dir):
        yield False
        return
    # stack.env is rewritten by the new `up`: an old one must not look ready.
    (state_dir / "stack.env").unlink(missing_ok=True)
    command = [sys.executable, "-m", "voicerelay", "up", f"--state-dir={state_dir}", *up_args]
    print(f"loadtest: no stack answers; starting `{' '.join(command[2:])}`", file=sys.stderr)
    # Loopback only, whatever the shell's settings say: a load test opens no port to the network.
    env = dict(LOAD_LIMITS, **os.environ)
    env.update(API_HOST=LOOPBACK, RELAY_HOST=LOOPBACK, EMULATOR_HOST=LOOPBACK)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env=env,
        )
    try:
        deadline = time.monotonic() + STACK_START_SECONDS
        while not stack_ready(state_dir):
            if process.poll() is not None or time.monotonic() > deadline:
                raise StackUnavailable(f"`voicerelay up` did not come up; see {log_path}")
            time.sleep(0.5)
        yield True
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STACK_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def locust_command(args: argparse.Namespace, out: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        f"--users={args.users}",
        f"--spawn-rate={args.spawn_rate}",
        f"--run-time={args.run_time}",
        # Calls in progress when the time is up finish (and hang up) instead of being cut.
        f"--stop-timeout={args.stop_timeout}",
        f"--csv={out / 'locust'}",
        f"--html={out / 'report.html'}",
        "--only-summary",
        *extra,
    ]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.run_local", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--users", type=int, default=6, help="Concurrent locust users.")
    parser.add_argument("--spawn-rate", type=float, default=2.0, help="Users started per second.")
    parser.add_argument("--run-time", default="60s", help="How long users keep starting work.")
    parser.add_argument("--stop-timeout", type=int, default=30, help="Seconds to finish calls.")
    parser.add_argument("--out", type=Path, default=Path(".voicerelay/loadtest"))
    parser.add_argument("--state-dir", type=Path, default=Path(".voicerelay"))
    for port in ("api", "relay", "emulator"):
        parser.add_argument(f"--{port}-port", type=int, default=None, help="For a started stack.")
    raw = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in raw:
        at = raw.index("--")
        raw, extra = raw[:at], raw[at + 1 :]
    return parser.parse_args(raw), extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    state_dir, out = args.state_dir.resolve(), args.out.resolve()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    out.mkdir(parents=True, exist_ok=True)
    up_args = [
        f"--{name}-port={value}"
        for name, value in (
            ("api", args.api_port),
            ("relay", args.relay_port),
            ("emulator", args.emulator_port),
        )
        if value is not None
    ]
    try:
        with local_stack(state_dir, out / "stack.log", up_args):
            target = asyncio.run(ensure_target(state_dir))
            env = dict(os.environ, **{TARGET_FILE_VARIABLE: str(target)})
            print(f"loadtest: locust against {stack_urls(state_dir)}", file=sys.stderr)
            status = subprocess.call(locust_command(args, out, extra), env=env, cwd=ROOT)
    except (StackUnavailable, ProvisionError) as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    print(f"loadtest: report in {out / 'report.html'}, CSV in {out}/locust_*.csv")
    return status


if __name__ == "__main__":
    sys.exit(main())
