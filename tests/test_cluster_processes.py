"""Scale-out, proven with processes: three `voicerelay relay` replicas on one Redis behind a
round-robin balancer with no affinity (tests/support/cluster.py).

Every cluster test talks in turns to the emulator's echo agent (same audio format everywhere,
so nothing is transcoded): each turn's echo must come back byte for byte, one ``audio`` event
per 20 ms frame, and all the audio a caller heard over all its connections must be exactly its
turns' echoes. The cluster is shared by the module; each test starts from three ready replicas
in rotation, whatever the previous test killed or rolled. The module ends with the pure parts
of `make bench-scale` and a tiny run of it.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtests.bench_scale import Measurement, cross_replica, plan_targets, ratios, table
from tests.support.cluster import (
    FRAME_BYTES,
    TURN_END_FRAMES,
    Cluster,
    ClusterCaller,
    Turn,
    callers,
    cluster,
    echo_turn,
)
from tests.support.tenants import make_tenant
from voicerelay.settings import Settings

VOICED = 5  # voiced frames per turn
REPLICAS = 3


@pytest.fixture(scope="module")
async def running(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Cluster]:
    logs = tmp_path_factory.mktemp("cluster-logs")
    print(f"relay replica logs: {logs}")
    async with cluster(settings, logs, replicas=REPLICAS) as started:
        yield started


@pytest.fixture
async def cl(running: Cluster) -> Cluster:
    await running.ensure(REPLICAS)
    return running


@pytest.fixture
async def api(running: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=running.api_url, timeout=15) as client:
        yield client


def check_turn(turn: Turn, what: str, cl: Cluster) -> None:
    assert turn.exact, f"{what}: echo differs from what was said\n{cl.describe()}"
    assert len(turn.echoed) == len(turn.sent), f"{what}: {len(turn.echoed)} audio events"
    assert all(len(chunk) == FRAME_BYTES for chunk in turn.echoed), what


def check_clean(caller: ClusterCaller) -> None:
    """No rejected event, no failed reconnection, exactly one call.ended: the caller's own."""
    assert caller.named("error") == [], caller.named("error")
    assert caller.reconnect_failures == [], caller.reconnect_failures
    ends = caller.named("call.ended")
    assert [e.data.get("reason") for e in ends] == ["caller_hangup"], ends


def said_and_heard(caller: ClusterCaller, turns: list[Turn]) -> None:
    """All the agent audio this caller got, over every connection, is exactly its turns'
    echoes: nothing duplicated by routing, nothing from another call."""
    assert b"".join(caller.audio()) == b"".join(b"".join(t.sent) for t in turns)


@pytest.mark.slow
async def test_audio_crosses_replicas_both_ways_after_a_reconnect_elsewhere(
    cl: Cluster, api: httpx.AsyncClient, tenant: Any
) -> None:
    a, b, _ = cl.serving
    agent = await cl.echo_agent(api, tenant)
    call = await cl.call(api, tenant, agent)
    async with callers(cl.lb) as make:
        caller = make(call["token"], "caller")
        await caller.connect(a.url)
        ready = (await caller.wait_for("call.ready")).data
        assert ready["resumed"] is False
        conversation = ready["conversation_id"]
        first = await echo_turn(caller, "same-replica", frames=VOICED)
        check_turn(first, "on the owner", cl)

        mark = caller.mark()
        await caller.drop()
        await caller.connect(b.url)
        resumed = (await caller.wait_ready_after(mark)).data
        assert resumed["resumed"] is True, resumed
        assert resumed["conversation_id"] == conversation  # the bridge stayed on a
        second = await echo_turn(caller, "cross-replica", frames=VOICED)
        check_turn(second, "caller on b, bridge on a", cl)

        assert await caller.hang_up() == {"reason": "caller_hangup", "code": "normal"}
        check_clean(caller)
        said_and_heard(caller, [first, second])
    assert caller.urls == [a.url, b.url]
    stats = cl.conversation(conversation)
    frames_said = 2 * (VOICED + TURN_END_FRAMES)
    assert stats.audio_chunks_in == frames_said
    assert stats.audio_bytes_in == frames_said * FRAME_BYTES
    assert stats.audio_chunks_out == 2 * VOICED
    assert stats.turns == 2
    assert stats.interruptions == 0


@pytest.mark.slow
async def test_monitor_on_a_third_replica_hears_both_sides(
    cl: Cluster, api: httpx.AsyncClient, tenant: Any
) -> None:
    a, b, c = cl.serving
    agent = await cl.echo_agent(api, tenant)
    call = await cl.call(api, tenant, agent)
    async with callers(cl.lb) as make:
        caller = make(call["token"], "caller")
        await caller.connect(b.url)  # the bridge lives on b
        conversation = (await caller.wait_for("call.ready")).data["conversation_id"]
        mark = caller.mark()
        await caller.drop()
        await caller.connect(a.url)  # the caller now talks through a
        assert (await caller.wait_ready_after(mark)).data["conversation_id"] == conversation

        token = await cl.monitor_token(api, tenant, call["call_id"])
        monitor = make(token["token"], "monitor")
        await monitor.connect(c.url)
        await monitor.wait_for("call.ready")
        heard_from = monitor.mark()

        turn = await echo_turn(caller, "monitored", frames=VOICED)
        check_turn(turn, "caller on a, bridge on b", cl)
        agent_side = await monitor.wait_audio_bytes(VOICED * FRAME_BYTES, after=heard_from)
        caller_side = await monitor.wait_audio_bytes(
            (VOICED + TURN_END_FRAMES) * FRAME_BYTES, after=heard_from, name="caller_audio"
        )
        assert b"".join(agent_side) == b"".join(turn.sent)
        assert len(agent_side) == VOICED
        assert b"".join(caller_side) == b"".join(turn.sent) + bytes(TURN_END_FRAMES * FRAME_BYTES)

        await caller.hang_up()
        ended = await monitor.wait_for("call.ended")
        assert ended.data["reason"] == "caller_hangup"
        check_clean(caller)
        assert monitor.named("error") == []
    assert monitor.urls == [c.url]
    assert cl.conversation(conversation).audio_chunks_out == VOICED


@pytest.mark.slow
async def test_kill_9_of_the_owner_resumes_the_call_on_another_replica(
    cl: Cluster, api: httpx.AsyncClient, tenant: Any
) -> None:
    owner = cl.serving[0]
    agent = await cl.echo_agent(api, tenant)
    call = await cl.call(api, tenant, agent)
    async with callers(cl.lb) as make:
        caller = make(call["token"], "caller")
        await caller.connect(owner.url)
        first_conversation = (await caller.wait_for("call.ready")).data["conversation_id"]
        before = await echo_turn(caller, "before-the-crash", frames=VOICED)
        check_turn(before, "before the crash", cl)

        mark = caller.mark()
        cl.kill(owner)
        killed_at = time.monotonic()
        # The caller's transport closes; it reconnects through the balancer by itself.
        ready = await caller.wait_ready_after(mark, timeout=30)
        assert ready.data["resumed"] is True, ready.data
        second_conversation = ready.data["conversation_id"]
        assert second_conversation != first_conversation
        assert caller.url != owner.url
        reconnected = caller.named("_connected", mark)[-1]

        after = await echo_turn(caller, "after-the-crash", frames=VOICED)
        check_turn(after, "after the crash", cl)
        assert after.first_audio_at is not None
        heard_again = after.first_audio_at - reconnected.at
        print(
            f"kill -9: reconnected {reconnected.at - killed_at:.2f} s after the kill,"
            f" agent heard {heard_again:.2f} s after the reconnect"
        )
        assert heard_again < 2.0, (
            f"agent audio {heard_again:.2f} s after the reconnect"
            f" ({after.first_audio_at - killed_at:.2f} s after the kill)"
        )
        assert await caller.hang_up() == {"reason": "caller_hangup", "code": "normal"}
        check_clean(caller)
        said_and_heard(caller, [before, after])
    assert owner.process.wait(5) == -9

    # The call log links both conversations to the one call.
    async with asyncio.timeout(20):
        while True:
            ids = await cl.conversation_ids(api, tenant, call["call_id"])
            if {first_conversation, second_conversation} <= set(ids):
                break
            await asyncio.sleep(0.2)
    assert cl.conversation(second_conversation).audio_chunks_out == VOICED


ROLLING_CALLS = 30


@pytest.mark.slow
async def test_rolling_sigterm_of_every_replica_drops_no_call(
    cl: Cluster, api: httpx.AsyncClient, database: Any
) -> None:
    tenant = await make_tenant(database.owner_dsn, max_concurrent_calls=ROLLING_CALLS + 10)
    agent = await cl.echo_agent(api, tenant)
    calls = [await cl.call(api, tenant, agent) for _ in range(ROLLING_CALLS)]
    async with callers(cl.lb) as make:
        everyone = [make(c["token"], f"caller-{i}") for i, c in enumerate(calls)]
        gate = asyncio.Semaphore(10)

        async def join(caller: ClusterCaller) -> str:
            async with gate:
                await caller.connect()
                ready = await caller.wait_for("call.ready", timeout=20)
                assert ready.data["resumed"] is False
                conversation: str = ready.data["conversation_id"]
                return conversation

        conversations = dict(
            zip(everyone, await asyncio.gather(*(join(c) for c in everyone)), strict=True)
        )
        turns: dict[ClusterCaller, list[Turn]] = {c: [] for c in everyone}

        async def everyone_talks(tag: str) -> None:
            done = await asyncio.gather(
                *(echo_turn(c, f"{tag}/{c.label}", frames=VOICED) for c in everyone)
            )
            for caller, turn in zip(everyone, done, strict=True):
                check_turn(turn, f"{caller.label} {tag}", cl)
                turns[caller].append(turn)

        await everyone_talks("before the rolls")
        originals = cl.serving
        assert {c.url for c in everyone} == {r.url for r in originals}
        for replica in originals:
            moving = [c for c in everyone if c.url == replica.url]
            marks = {c: c.mark() for c in moving}
            cl.terminate(replica)
            replacement = asyncio.create_task(cl.start_replicas(1))
            for caller in moving:
                told = await caller.wait_for("relay.reconnect", after=marks[caller], timeout=15)
                assert told.data == {"reason": "draining"}
                ready = await caller.wait_ready_after(marks[caller], timeout=30)
                assert ready.data["resumed"] is True
                assert ready.data["conversation_id"] == conversations[caller]
                assert caller.url != replica.url
            await replacement
            await everyone_talks(f"after SIGTERM to {replica.relay_id}")

        ends = await asyncio.gather(*(c.hang_up() for c in everyone))
        assert [e["reason"] for e in ends] == ["caller_hangup"] * ROLLING_CALLS
        for caller in everyone:
            check_clean(caller)
            said_and_heard(caller, turns[caller])
            readies = caller.named("call.ready")
            assert {e.data["conversation_id"] for e in readies} == {conversations[caller]}
    for replica in originals:
        assert await replica.wait_exit(30) == 0, cl.describe()


@pytest.mark.slow
async def test_redis_restart_mid_call_keeps_every_call_going(
    cl: Cluster, api: httpx.AsyncClient, tenant: Any
) -> None:
    """Calls whose caller is on the bridge's replica keep talking while Redis is down and after;
    a call whose caller is on another replica talks again once Redis is back; and routing works
    again afterwards: a caller reconnects to another replica and continues its conversation."""
    replicas = cl.serving
    agent = await cl.echo_agent(api, tenant)
    async with callers(cl.lb) as make:
        local: list[ClusterCaller] = []
        for replica in replicas:
            call = await cl.call(api, tenant, agent)
            caller = make(call["token"], f"local-{replica.relay_id}")
            await caller.connect(replica.url)
            await caller.wait_for("call.ready")
            local.append(caller)
        call = await cl.call(api, tenant, agent)
        remote = make(call["token"], "remote")
        await remote.connect(replicas[0].url)
        await remote.wait_for("call.ready")
        mark = remote.mark()
        await remote.drop()
        await remote.connect(replicas[1].url)
        await remote.wait_ready_after(mark)
        remote_turns = [await echo_turn(remote, "remote before", frames=VOICED)]

        turns: dict[ClusterCaller, list[Turn]] = {c: [] for c in local}
        stop = asyncio.Event()

        async def keep_talking(caller: ClusterCaller) -> None:
            n = 0
            while not stop.is_set():
                turns[caller].append(await echo_turn(caller, f"{caller.label}/{n}", frames=3))
                n += 1
                await asyncio.sleep(0.05)

        talkers = [asyncio.create_task(keep_talking(c)) for c in local]
        try:
            await asyncio.sleep(1.0)
            down_at = time.monotonic()
            await asyncio.to_thread(cl.redis.stop)
            await asyncio.sleep(2.0)
            await asyncio.to_thread(cl.redis.start)
            up_at = time.monotonic()
            await cl.all_ready(timeout=30)
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            results = await asyncio.gather(*talkers, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert not failed, f"{failed}\n{cl.describe()}"
        for caller, said in turns.items():
            for turn in said:
                check_turn(turn, caller.label, cl)
            during = [
                t for t in said if down_at <= t.started_at and (t.first_audio_at or up_at) < up_at
            ]
            after = [t for t in said if t.started_at > up_at]
            assert during, f"{caller.label}: no turn while Redis was down"
            assert after, f"{caller.label}: no turn after Redis came back"

        remote_turns.append(await echo_turn(remote, "remote after", frames=VOICED))
        check_turn(remote_turns[-1], "cross-replica after the restart", cl)

        # Routing works again: a local caller moves to the next replica.
        mover = local[0]
        conversation = mover.named("call.ready")[0].data["conversation_id"]
        mark = mover.mark()
        await mover.drop()
        await mover.connect(replicas[1].url)
        moved = (await mover.wait_ready_after(mark)).data
        assert moved["resumed"] is True
        assert moved["conversation_id"] == conversation
        turns[mover].append(await echo_turn(mover, "moved after the restart", frames=VOICED))
        check_turn(turns[mover][-1], "moved after the restart", cl)

        for caller in [*local, remote]:
            assert (await caller.hang_up())["reason"] == "caller_hangup"
            check_clean(caller)
        for caller in local:
            said_and_heard(caller, turns[caller])
        said_and_heard(remote, remote_turns)


# --- make bench-scale cannot rot -----------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def test_bench_mix_sends_one_call_in_k_through_the_next_replica() -> None:
    assert [cross_replica(i, 0.25, 1) for i in range(8)] == [False, False, False, True] * 2
    assert not any(cross_replica(i, 0.0, 3) for i in range(8))
    for replicas in (1, 2, 3, 4, 8):
        crossing = [i for i in range(48) if cross_replica(i, 0.25, replicas)]
        assert len(crossing) == 12, replicas
        assert {i % replicas for i in crossing} == set(range(replicas)), replicas
    targets = plan_targets(["a", "b", "c"], [f"t{i}" for i in range(8)], 0.25)
    assert [t["url"] for t in targets] == ["a", "b", "c", "a", "b", "a", "a", "c"]
    hops = [t for t in targets if t["kind"] == "relay-hop"]
    assert [(t["first_url"], t["url"], t["token"]) for t in hops] == [
        ("c", "a", "t5"),
        ("b", "c", "t7"),
    ]
    alone = plan_targets(["a"], ["t0", "t1", "t2", "t3"], 0.25)
    assert alone[3] == {"kind": "relay-hop", "first_url": "a", "url": "a", "token": "t3"}


def test_bench_table_reports_the_sum_per_replica_spread_and_ratio_to_one_replica() -> None:
    one = Measurement("targeted", 1, 48, 12, connected=48, window_seconds=60.0)
    one.replica_cpu_seconds = [24.0]
    four = Measurement("targeted", 4, 48, 12, connected=48, window_seconds=60.0)
    four.replica_cpu_seconds = [6.0, 6.0, 7.2, 7.2]
    stock = Measurement("stock", 4, 48, 12, connected=48, window_seconds=60.0)
    stock.replica_cpu_seconds = [24.0, 24.0, 24.0, 24.0]
    four.replica_wakeups = [36_000, 36_000, 36_000, 36_000]
    assert one.cpu_per_call_minute == 0.5
    assert four.wakeups_per_call_second == 50.0
    assert math.isnan(one.wakeups_per_call_second)
    assert math.isclose(four.cpu_per_call_minute, 0.55)
    assert four.per_replica_range == (0.5, 0.6)
    rows = table([one, four, stock]).splitlines()
    assert "1.10x" in rows[3]
    assert "0.500 to 0.600" in rows[3]
    assert "48/48 (12)" in rows[3]
    assert "| 50.0 " in rows[3]
    summary = ratios([one, four, stock])
    assert "targeted: vs 1 replica: 4 replicas 1.10x" in summary
    assert "4 replicas: stock costs 3.64x targeted" in summary
    # With several totals, the single replica carrying the most calls is the baseline.
    sparse = Measurement("targeted", 1, 16, 4, connected=16, window_seconds=60.0)
    sparse.replica_cpu_seconds = [12.0]
    assert "targeted: vs 1 replica: 1 replicas (16 calls) 1.50x" in ratios([sparse, one])
    assert "1.50x" in table([sparse, one]).splitlines()[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_scale_runs_end_to_end(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    logs = tmp_path / "logs"
    command = [
        sys.executable,
        "-m",
        "loadtests.bench_scale",
        "--replicas=2",
        "--managers=targeted,stock,floor",
        "--calls=2",
        "--cross=0.5",
        "--seconds=2",
        "--warmup=0.5",
        "--generators=1",
        "--talk-ms=200",
        f"--json={report}",
        f"--logs={logs}",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280)
    tails = "\n".join(f"{p.name}:\n{p.read_text()[-1500:]}" for p in logs.glob("*.log"))
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{tails}"
    assert "relay CPU s per call-minute" in done.stdout
    measured = json.loads(report.read_text())["measurements"]
    assert [(m["manager"], m["replicas"]) for m in measured] == [
        ("targeted", 2),
        ("stock", 2),
        ("floor", 2),
    ]
    for m in measured:
        assert m["connected"] == 2, m
        assert m["cross_calls"] == (0 if m["manager"] == "floor" else 1), m
        assert m["errors"] == [], m
        assert len(m["replica_cpu_seconds"]) == 2, m
        assert math.isfinite(m["cpu_per_call_minute"]), m
        assert m["frames_echoed"] > 0, m
        assert len(m["replica_wakeups"]) == 2, m
        assert m["wakeups_per_call_second"] > 0, m
