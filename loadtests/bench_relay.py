"""`make bench`: the relay's CPU per call-minute, added latency and memory per call, next to a
plain `websockets` relay (the floor), measured in one run on one machine.

    python -m loadtests.bench_relay [--calls 50 --calls 100] [--replicas 1 --replicas 3]
                                    [--seconds 30] [--json out.json]

For each step (number of concurrent calls) and each setup (the floor; voicerelay with 1 and with
3 replicas), it starts fresh relay processes, connects that many callers (load-generator
processes, see bench_callers.py; dealt round-robin over the replicas, as by a balancer without
affinity), has each stream 20 ms PCM16 16 kHz frames in real time through the relay to the
ElevenLabs emulator's echo agent, and measures:

- CPU: the relay processes' user+system seconds over the steady-state window (after the calls
  are up and a warm-up), summed over replicas, per call-minute of audio carried.
- Added latency: the round trip of each frame through the relay (caller -> relay -> agent echo
  -> relay -> caller) minus the round trip of probe calls that talk to the emulator directly at
  the same time (same machine load), at p50 and p99.
- Memory: the relay processes' peak RSS (summed over replicas) during the step minus their RSS
  before the calls, per call.
- Phone calls (voicerelay only, when the control API has the Twilio voice webhook): during the
  warm-up, N/10 calls come in as Twilio places them (bench_phone.py), and the time from their
  Media Stream's ``start`` to the agent's first audio is measured (p50/p99).

Everything runs on loopback and is stopped at the end; nothing here is a test (machines are
noisy): read ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]

from loadtests.bench_audio import percentile
from loadtests.bench_phone import PhoneResults, phone_probes
from loadtests.bench_stack import (
    BenchStack,
    ServiceProcess,
    StackError,
    bench_stack,
    relay_command,
)
from loadtests.report import finish, markdown_table

FLOOR = "floor"
VOICERELAY = "voicerelay"
START_DELAY_SECONDS = 0.5
RESULT_GRACE_SECONDS = 30.0
SILENCE_MARGIN_MS = 500
FELL_BEHIND_LOST = 0.01
# A generator's result line carries every round trip it timed (about 10 bytes each).
RESULT_LINE_LIMIT = 256 * 1024 * 1024


@dataclass(frozen=True)
class Options:
    steps: list[int]
    seconds: float
    warmup: float
    generators: int
    frame_ms: int
    talk_ms: int
    probes: int | None
    connect_timeout: float
    replicas: list[int] = field(default_factory=lambda: [1])
    phone_calls: int | None = None

    @property
    def talk_frames(self) -> int:
        return max(1, self.talk_ms // self.frame_ms)

    @property
    def silence_frames(self) -> int:
        # The agent's real-time answer lasts as long as the turn; talking over it would
        # interrupt it, so the caller stays quiet that long plus a margin for slow round trips.
        return self.talk_frames + max(1, SILENCE_MARGIN_MS // self.frame_ms)


@dataclass
class Measurement:
    setup: str
    calls: int
    replicas: int = 1
    connected: int = 0
    window_seconds: float = 0.0
    cpu_seconds: float = 0.0
    rss_before_bytes: int = 0
    rss_peak_bytes: int = 0
    rtt_p50_ms: float = math.nan
    rtt_p99_ms: float = math.nan
    direct_p50_ms: float = math.nan
    direct_p99_ms: float = math.nan
    samples: int = 0
    direct_samples: int = 0
    frames_expected: int = 0
    frames_echoed: int = 0
    interruptions: int = 0
    # CPU use of the other processes during the window (percent of one core): is the machine
    # saturated, which would inflate every latency?
    other_cpu_percent: dict[str, float] = field(default_factory=dict)
    # voicerelay's own /metrics after the step: time inside the relay (bucket bounds) and drops.
    relay_metrics: dict[str, float] = field(default_factory=dict)
    # Phone calls placed during the warm-up: Twilio ``start`` -> first agent audio.
    phone_calls: int = 0
    phone_first_audio_p50_ms: float = math.nan
    phone_first_audio_p99_ms: float = math.nan
    errors: list[str] = field(default_factory=list)

    @property
    def cpu_per_call_minute(self) -> float:
        call_minutes = self.connected * self.window_seconds / 60
        return self.cpu_seconds / call_minutes if call_minutes else math.nan

    @property
    def added_p50_ms(self) -> float:
        return self.rtt_p50_ms - self.direct_p50_ms

    @property
    def added_p99_ms(self) -> float:
        return self.rtt_p99_ms - self.direct_p99_ms

    @property
    def rss_per_call_bytes(self) -> float:
        if not self.connected:
            return math.nan
        return max(0, self.rss_peak_bytes - self.rss_before_bytes) / self.connected

    @property
    def lost_fraction(self) -> float:
        if not self.frames_expected:
            return math.nan
        return max(0.0, 1 - self.frames_echoed / self.frames_expected)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            cpu_per_call_minute=self.cpu_per_call_minute,
            added_p50_ms=self.added_p50_ms,
            added_p99_ms=self.added_p99_ms,
            rss_per_call_bytes=self.rss_per_call_bytes,
            lost_fraction=self.lost_fraction,
        )
        return data


# --- One measurement --------------------------------------------------------------------------


def _cpu_seconds(process: psutil.Process) -> float:
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def _rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


async def _targets(
    stack: BenchStack, servers: list[ServiceProcess], setup: str, calls: int, probes: int
) -> list[dict[str, Any]]:
    gate = asyncio.Semaphore(10)
    async with httpx.AsyncClient(timeout=30) as http:

        async def relay_target(index: int) -> dict[str, Any]:
            async with gate:
                token = await stack.call_token(http)
            # The relay processes of this step, not the API's RELAY_PUBLIC_URL; round-robin.
            url = servers[index % len(servers)].url
            return {"kind": "relay", "url": url, "token": token["token"]}

        async def direct_target() -> dict[str, Any]:
            async with gate:
                return {"kind": "direct", "url": await stack.signed_url(http)}

        if setup == VOICERELAY:
            targets = list(await asyncio.gather(*(relay_target(i) for i in range(calls))))
        else:
            floor_url = servers[0].url.replace("http://", "ws://") + "/"
            targets = [{"kind": "floor", "url": floor_url} for _ in range(calls)]
        targets += await asyncio.gather(*(direct_target() for _ in range(probes)))
    return targets


class Generator:
    """One load-generator process and its line protocol (see bench_callers.py)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, log: Path) -> Generator:
        with log.open("ab") as err:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "loadtests.bench_callers",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                limit=RESULT_LINE_LIMIT,
            )
        return cls(process)

    async def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        await self.process.stdin.drain()

    async def receive(self, within: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), within)
        if not line:
            raise RuntimeError("a load generator exited early (see its log)")
        message: dict[str, Any] = json.loads(line)
        return message

    async def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


def _bucket_quantile(buckets: list[tuple[float, float]], fraction: float) -> float:
    """Upper bound of the histogram bucket holding the ``fraction`` quantile."""
    total = buckets[-1][1] if buckets else 0.0
    for bound, count in buckets:
        if total and count >= fraction * total:
            return bound
    return math.nan


async def _relay_metrics(urls: list[str]) -> dict[str, float]:
    """Summed over the replicas: drop counters and the added-latency histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, float] = {}
    by_bound: dict[float, float] = {}
    async with httpx.AsyncClient(timeout=10) as http:
        for url in urls:
            try:
                text = (await http.get(f"{url}/metrics")).text
            except httpx.HTTPError:
                return {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "voicerelay_relay_added_latency_seconds_bucket":
                        bound = float(sample.labels["le"])
                        by_bound[bound] = by_bound.get(bound, 0.0) + sample.value
                    elif sample.name in (
                        "voicerelay_relay_client_queue_dropped_total",
                        "voicerelay_relay_stale_audio_dropped_total",
                    ):
                        name = sample.name.removeprefix("voicerelay_relay_")
                        found[name] = found.get(name, 0.0) + sample.value
    buckets = sorted(by_bound.items())
    found["inside_p50_ms_at_most"] = _bucket_quantile(buckets, 0.5) * 1000
    found["inside_p99_ms_at_most"] = _bucket_quantile(buckets, 0.99) * 1000
    return found


def _others(stack: BenchStack, generators: list[Generator]) -> dict[str, psutil.Process]:
    found: dict[str, psutil.Process] = {}
    for name, service in (("emulator", stack.emulator), ("control API", stack.api)):
        if service is not None:
            found[name] = psutil.Process(service.pid)
    for i, generator in enumerate(generators):
        found[f"generator {i}"] = psutil.Process(generator.process.pid)
    return found


def _total_cpu(processes: list[psutil.Process]) -> float:
    return sum(_cpu_seconds(p) for p in processes)


def _total_rss(processes: list[psutil.Process]) -> int:
    return sum(_rss(p) for p in processes)


async def _sample_rss(processes: list[psutil.Process], until: float, peak: list[int]) -> None:
    while time.time() < until:
        peak[0] = max(peak[0], _total_rss(processes))
        await asyncio.sleep(0.2)


def _phone_count(options: Options, calls: int) -> int:
    return options.phone_calls if options.phone_calls is not None else max(2, calls // 10)


async def _phone_during_warmup(
    stack: BenchStack, servers: list[ServiceProcess], options: Options, calls: int, at: float
) -> PhoneResults:
    await asyncio.sleep(max(0.0, at - time.time()))
    assert stack.phone is not None
    return await phone_probes(
        stack.phone,
        [s.url for s in servers],
        _phone_count(options, calls),
        spread=options.warmup * 0.8,
        within=options.connect_timeout,
    )


async def _measure(
    stack: BenchStack, servers: list[ServiceProcess], setup: str, calls: int, options: Options
) -> Measurement:
    result = Measurement(setup=setup, calls=calls, replicas=len(servers))
    watched = [psutil.Process(server.pid) for server in servers]
    probes = options.probes if options.probes is not None else max(2, calls // 10)
    targets = await _targets(stack, servers, setup, calls, probes)
    count = max(1, min(options.generators, len(targets)))
    # Before any caller connects: what a call costs includes its connection and its bridge.
    result.rss_before_bytes = _total_rss(watched)
    generators = [await Generator.start(stack.logs / f"generator-{i}.log") for i in range(count)]
    try:
        for i, generator in enumerate(generators):
            plan = {
                "frame_ms": options.frame_ms,
                "talk_frames": options.talk_frames,
                "silence_frames": options.silence_frames,
                "connect_timeout": options.connect_timeout,
                "calls": targets[i::count],
            }
            await generator.send(plan)
        measured_kind = "relay" if setup == VOICERELAY else "floor"
        connect_budget = options.connect_timeout * 3 + 30
        for generator in generators:
            connected = await generator.receive(connect_budget)
            result.connected += connected["ok"].get(measured_kind, 0)
            result.errors += connected["errors"]

        start_at = time.time() + START_DELAY_SECONDS
        measure_from = start_at + options.warmup
        measure_until = measure_from + options.seconds
        go = {"start_at": start_at, "measure_from": measure_from, "measure_until": measure_until}
        for generator in generators:
            await generator.send(go)
        phone: asyncio.Task[PhoneResults] | None = None
        if setup == VOICERELAY and stack.phone is not None and _phone_count(options, calls):
            phone = asyncio.create_task(
                _phone_during_warmup(stack, servers, options, calls, start_at)
            )
        peak = [result.rss_before_bytes]
        sampler = asyncio.create_task(_sample_rss(watched, measure_until + 1, peak))
        await asyncio.sleep(max(0.0, measure_from - time.time()))
        others = _others(stack, generators)
        others_before = {name: _cpu_seconds(p) for name, p in others.items()}
        cpu_before, began = _total_cpu(watched), time.monotonic()
        await asyncio.sleep(max(0.0, measure_until - time.time()))
        cpu_after, ended = _total_cpu(watched), time.monotonic()
        for name, process in others.items():
            used = _cpu_seconds(process) - others_before[name]
            result.other_cpu_percent[name] = round(100 * used / (ended - began), 1)
        await sampler
        if setup == VOICERELAY:
            result.relay_metrics = await _relay_metrics([s.url for s in servers])
        if phone is not None:
            answered = await phone
            answered.first_audio_ms.sort()
            result.phone_calls = len(answered.first_audio_ms)
            result.phone_first_audio_p50_ms = percentile(answered.first_audio_ms, 0.5)
            result.phone_first_audio_p99_ms = percentile(answered.first_audio_ms, 0.99)
            result.errors += answered.errors
        result.cpu_seconds = cpu_after - cpu_before
        result.window_seconds = ended - began
        result.rss_peak_bytes = peak[0]

        through: list[float] = []
        direct: list[float] = []
        for generator in generators:
            report = await generator.receive(options.seconds + RESULT_GRACE_SECONDS)
            through += report["rtt_ms"].get(measured_kind, [])
            direct += report["rtt_ms"].get("direct", [])
            result.frames_expected += report["expected"].get(measured_kind, 0)
            result.frames_echoed += report["echoed"].get(measured_kind, 0)
            result.interruptions += report["interruptions"].get(measured_kind, 0)
            result.errors += report["errors"]
    finally:
        await asyncio.gather(*(g.stop() for g in generators))
    through.sort()
    direct.sort()
    result.samples, result.direct_samples = len(through), len(direct)
    result.rtt_p50_ms, result.rtt_p99_ms = percentile(through, 0.5), percentile(through, 0.99)
    result.direct_p50_ms, result.direct_p99_ms = percentile(direct, 0.5), percentile(direct, 0.99)
    return result


def measure(
    stack: BenchStack, setup: str, calls: int, options: Options, replicas: int = 1
) -> Measurement:
    servers: list[ServiceProcess] = []
    try:
        if setup == VOICERELAY:
            command = relay_command()
            assert command is not None
            for index in range(replicas):
                servers.append(stack.start_relay(command, f"bench-relay-{index + 1}"))
        else:
            servers.append(stack.start_floor())
    except StackError as exc:
        for server in servers:
            server.stop()
        return Measurement(setup=setup, calls=calls, replicas=replicas, errors=[str(exc)])
    try:
        time.sleep(1.0)  # let start-up work (imports, first connections) settle out of the baseline
        return asyncio.run(_measure(stack, servers, setup, calls, options))
    finally:
        for server in servers:
            server.stop()


# --- Report -----------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.1f} ms"


def _ratio(value: float, floor: float) -> str:
    if math.isnan(value) or math.isnan(floor) or floor <= 0:
        return "—"
    return f"{value / floor:.1f}x"


def _kib(value: float) -> str:
    return "—" if math.isnan(value) else f"{value / 1024:.0f} KiB"


def table(measurements: list[Measurement]) -> str:
    floors = {m.calls: m for m in measurements if m.setup == FLOOR}
    header = (
        "setup",
        "replicas",
        "calls",
        "CPU s per call-minute",
        "added latency p50",
        "p99",
        "peak RSS per call",
        "CPU x floor",
        "p50 x floor",
        "frames lost",
    )
    rows = [header]
    for m in measurements:
        floor = floors.get(m.calls)
        rows.append(
            (
                m.setup,
                str(m.replicas),
                f"{m.connected}/{m.calls}",
                "—" if math.isnan(m.cpu_per_call_minute) else f"{m.cpu_per_call_minute:.3f}",
                _ms(m.added_p50_ms),
                _ms(m.added_p99_ms),
                _kib(m.rss_per_call_bytes),
                _ratio(m.cpu_per_call_minute, floor.cpu_per_call_minute) if floor else "—",
                _ratio(m.added_p50_ms, floor.added_p50_ms) if floor else "—",
                "—" if math.isnan(m.lost_fraction) else f"{m.lost_fraction:.2%}",
            )
        )
    return markdown_table(rows)


def _label(m: Measurement) -> str:
    return m.setup if m.setup == FLOOR else f"{m.setup} x{m.replicas}"


def phone_table(measurements: list[Measurement]) -> str:
    """Twilio ``start`` -> first agent audio, next to the browser load it ran under."""
    rows = [("setup", "replicas", "browser calls", "phone calls", "start → first audio p50", "p99")]
    for m in measurements:
        if m.setup == VOICERELAY and m.phone_calls:
            rows.append(
                (
                    m.setup,
                    str(m.replicas),
                    str(m.connected),
                    str(m.phone_calls),
                    _ms(m.phone_first_audio_p50_ms),
                    _ms(m.phone_first_audio_p99_ms),
                )
            )
    return markdown_table(rows) if len(rows) > 1 else ""


def round_trips(measurements: list[Measurement]) -> str:
    lines = ["Round trips (through the relay / straight to the emulator, same moment):"]
    for m in measurements:
        lines.append(
            f"  {_label(m):<13} {m.calls:>4} calls: p50 {_ms(m.rtt_p50_ms)}"
            f" / {_ms(m.direct_p50_ms)}, p99 {_ms(m.rtt_p99_ms)} / {_ms(m.direct_p99_ms)}"
        )
    return "\n".join(lines)


def machine_load(measurements: list[Measurement]) -> str:
    lines = ["CPU of the other processes during each window (% of one core):"]
    for m in measurements:
        used = ", ".join(f"{name} {pct:.0f}%" for name, pct in m.other_cpu_percent.items())
        relay_pct = 100 * m.cpu_seconds / m.window_seconds if m.window_seconds else math.nan
        lines.append(f"  {_label(m):<13} {m.calls:>4} calls: relay {relay_pct:.0f}%, {used}")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        # Anything else running skews every number: say how busy the machine was.
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
    }


# --- Command line -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[Options, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench_relay", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--calls",
        type=int,
        action="append",
        help="Concurrent calls of one step; repeatable (default: 50 and 100).",
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="Measured window per step.")
    parser.add_argument("--warmup", type=float, default=3.0, help="Streaming before measuring.")
    parser.add_argument("--generators", type=int, default=2, help="Load-generator processes.")
    parser.add_argument("--frame-ms", type=int, default=20, help="Audio frame length.")
    parser.add_argument(
        "--talk-ms", type=int, default=1000, help="Length of each caller turn (then silence)."
    )
    parser.add_argument(
        "--probes", type=int, default=None, help="Direct emulator calls per step (default N/10)."
    )
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument(
        "--replicas",
        type=int,
        action="append",
        help="Relay replicas of a voicerelay setup; repeatable (default: 1 and 3).",
    )
    parser.add_argument(
        "--phone-calls",
        type=int,
        default=None,
        help="Phone calls placed during each voicerelay warm-up (default N/10; 0: none).",
    )
    parser.add_argument(
        "--setups", default=f"{FLOOR},{VOICERELAY}", help="Comma-separated: floor, voicerelay."
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--logs", type=Path, default=None, help="Keep service logs here.")
    args = parser.parse_args(argv)
    replicas = args.replicas or [1, 3]
    if min(replicas) < 1 or (args.phone_calls is not None and args.phone_calls < 0):
        parser.error("--replicas >= 1 and --phone-calls >= 0")
    if args.seconds <= 0 or args.warmup < 0 or args.generators < 1 or args.frame_ms < 10:
        parser.error("--seconds > 0, --warmup >= 0, --generators >= 1, --frame-ms >= 10")
    options = Options(
        steps=args.calls or [50, 100],
        seconds=args.seconds,
        warmup=args.warmup,
        generators=args.generators,
        frame_ms=args.frame_ms,
        talk_ms=args.talk_ms,
        probes=args.probes,
        connect_timeout=args.connect_timeout,
        replicas=replicas,
        phone_calls=args.phone_calls,
    )
    return options, args


def run_benchmark(
    options: Options, setups: list[str], logs: Path, notes: list[str]
) -> list[Measurement]:
    measurements: list[Measurement] = []
    with bench_stack(logs, frame_ms=options.frame_ms, talk_frames=options.talk_frames) as stack:
        if VOICERELAY in setups and stack.phone is None:
            notes.append("phone calls: not measured, the control API has no Twilio voice webhook")
        for calls in options.steps:
            for setup in setups:
                for replicas in options.replicas if setup == VOICERELAY else [1]:
                    shown = f"{setup} x{replicas}" if setup == VOICERELAY else setup
                    print(f"… {shown}, {calls} calls", file=sys.stderr, flush=True)
                    measurements.append(measure(stack, setup, calls, options, replicas))
    return measurements


def main(argv: list[str] | None = None) -> int:
    options, args = parse_args(argv)
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = set(setups) - {FLOOR, VOICERELAY}
    if unknown:
        sys.exit(f"unknown setup(s): {', '.join(sorted(unknown))}")
    notes: list[str] = []
    if VOICERELAY in setups and relay_command() is None:
        setups.remove(VOICERELAY)
        notes.append("voicerelay: not measured, the relay (relay/app.py) is not built yet")
    with contextlib.ExitStack() as cleanup:
        logs = args.logs or Path(cleanup.enter_context(tempfile.TemporaryDirectory()))
        logs.mkdir(parents=True, exist_ok=True)
        measurements = run_benchmark(options, setups, logs, notes)
    info = machine()
    print()
    print(
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, {info['system']},"
        f" load average {info['load_average_1m_at_end']:g};"
        f" {options.seconds:g} s measured per step after {options.warmup:g} s warm-up,"
        f" {options.frame_ms} ms PCM16 16 kHz frames in real time"
    )
    print(table(measurements))
    phones = phone_table(measurements)
    if phones:
        print()
        print("Phone calls (Twilio Media Streams), placed during each warm-up:")
        print(phones)
    print(round_trips(measurements))
    print(machine_load(measurements))
    for m in measurements:
        if m.relay_metrics:
            rm = m.relay_metrics
            print(
                f"voicerelay's /metrics, {_label(m)}, {m.calls} calls: time inside the relay p50"
                f" <= {_ms(rm.get('inside_p50_ms_at_most', math.nan))},"
                f" p99 <= {_ms(rm.get('inside_p99_ms_at_most', math.nan))};"
                f" audio dropped for slow clients {rm.get('client_queue_dropped_total', 0):.0f},"
                f" stale {rm.get('stale_audio_dropped_total', 0):.0f}"
            )
    for m in measurements:
        if m.lost_fraction > FELL_BEHIND_LOST:
            print(
                f"{_label(m)} {m.calls} calls fell behind real time: {m.lost_fraction:.0%} of the"
                " echoed frames did not come back before the end of the run, so its CPU figure"
                " covers only the audio it managed to carry."
            )
    for note in notes:
        print(note)
    for m in measurements:
        for error in sorted(set(m.errors))[:5]:
            print(f"{_label(m)} {m.calls} calls: {error}")
    return finish(
        measurements,
        json_path=args.json,
        logs=args.logs,
        machine=info,
        options=asdict(options),
        notes=notes,
    )


if __name__ == "__main__":
    sys.exit(main())
