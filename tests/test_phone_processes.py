"""A phone call on a relay replica that receives SIGTERM completes: proven with processes.

Real `voicerelay relay` replicas on their own Redis (tests/support/cluster.py); the call is placed
through the control API's signed voice webhook and its Media Stream opened on one replica with the
Twilio Media Streams client emulator (tests/support/phone_cluster.py). Then that replica's process
gets SIGTERM. A phone leg cannot move (Twilio cannot reopen its stream elsewhere), so:

- the replica stops being ready and refuses new streams (close 4503 ``draining``), while the call
  in progress carries on, audio both ways byte for byte, until the caller hangs up; a Socket.IO
  monitor of the call is handed off to another replica and goes on hearing it from there; the
  process exits 0 on its own once the call ended, long before the drain deadline;
- a call still running at the drain deadline is ended with reason ``shutdown``: its stream closes
  1000 ``shutdown``, Twilio is asked to hang the call up, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
import websockets

from control_api.bootstrap import NewTenant
from relay.phone.stream import STREAM_PATH
from tests.support.cluster import Cluster, Replica, callers, cluster
from tests.support.phone_cluster import (
    PhoneTurn,
    TwilioCall,
    conversation_of,
    phone_line,
    place_call,
    speak,
)
from tests.test_relay_call import call_log, eventually
from voicerelay.emulators.twilio_media import FRAME_BYTES, ULAW_SILENCE, MediaStreamsCaller
from voicerelay.emulators.twilio_rest import RecordedRequest
from voicerelay.settings import Settings

REPLICAS = 2  # the call's replica and another one, up and ready, as in a rolling deploy
FRAMES = 15  # voiced 20 ms frames per turn
TURNS_WHILE_DRAINING = 4  # a few seconds of conversation after the SIGTERM
SHORT_DRAIN_DEADLINE_SECONDS = 3
EXIT_SECONDS = 30.0


@pytest.fixture(scope="module")
async def running(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Cluster]:
    logs = tmp_path_factory.mktemp("phone-cluster-logs")
    print(f"relay replica logs: {logs}")
    async with cluster(settings, logs, replicas=REPLICAS) as started:
        yield started


@pytest.fixture
async def api(running: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=running.api_url, timeout=15) as client:
        yield client


async def wait_ready_status(replica: Replica, status: int, within: float = 15.0) -> None:
    async with httpx.AsyncClient(timeout=5) as http, asyncio.timeout(within):
        while (await http.get(replica.url + "/ready")).status_code != status:
            await asyncio.sleep(0.05)


def check_turn(turn: PhoneTurn, what: str, cl: Cluster) -> None:
    assert turn.exact, f"{what}: the echo differs from what was said\n{cl.describe()}"
    assert turn.whole_frames, f"{what}: {[len(f) for f in turn.frames]}"


async def all_marks_echoed(caller: MediaStreamsCaller) -> None:
    await caller.wait_for(
        lambda: caller.stats.marks_echoed == len(caller.events_of("mark")), within=20
    )


def twilio_requests(cl: Cluster, call: TwilioCall) -> list[RecordedRequest]:
    return [r for r in cl.stack().twilio_rest.requests if r.call_sid == call.call_sid]


@pytest.mark.slow
async def test_sigterm_lets_a_phone_call_finish_in_place_then_the_process_exits_0(
    running: Cluster, api: httpx.AsyncClient, tenant: NewTenant
) -> None:
    cl = running
    await cl.ensure(REPLICAS)
    owner = cl.serving[0]
    line = await phone_line(cl, api, tenant)
    call = await place_call(cl, api, line)
    assert call.stream_url.endswith(STREAM_PATH)
    turns: list[PhoneTurn] = []
    async with call.dial(owner) as caller, callers(cl.lb) as make:
        turns.append(await speak(caller, "before the SIGTERM", FRAMES))
        check_turn(turns[-1], "before the SIGTERM", cl)
        token = await cl.monitor_token(api, line.phone.tenant, call.call_id)
        monitor = make(token["token"], "monitor")
        await monitor.connect(owner.url)
        await monitor.wait_for("call.ready")
        before_sigterm = monitor.mark()

        cl.terminate(owner)
        await wait_ready_status(owner, 503)
        # Twilio's next call would reach this replica only until the balancer notices: refused.
        later = await place_call(cl, api, line)
        async with later.dial(owner, handshake=False) as refused:
            await refused.wait_closed(within=15)
            assert (refused.close_code, refused.close_reason) == (4503, "draining")
        # A Socket.IO monitor of the call moves to another replica; the phone leg stays.
        told = await monitor.wait_for("relay.reconnect", after=before_sigterm, timeout=15)
        assert told.data == {"reason": "draining"}
        await monitor.wait_ready_after(before_sigterm)
        assert monitor.url != owner.url
        heard_from = monitor.mark()

        # The call in progress goes on, on this replica, both ways.
        for n in range(TURNS_WHILE_DRAINING):
            turns.append(await speak(caller, f"draining {n}", FRAMES))
            check_turn(turns[-1], f"turn {n} while draining", cl)
        await all_marks_echoed(caller)
        said_bytes = caller.messages.media_bytes
        conversation = conversation_of(cl, line.elevenlabs_agent_id)
        assert conversation is not None
        await eventually(lambda: conversation.audio_bytes_in == said_bytes, timeout=20)
        # Every Twilio frame reached the agent as one chunk, none dropped or merged.
        assert conversation.audio_chunks_in == caller.stats.media_sent
        assert owner.alive, cl.describe()  # it waits for its last call
        marks = len(caller.events_of("mark"))

        # The monitor, elsewhere, heard the agent's side of those turns through routing.
        draining_said = b"".join(t.said for t in turns[1:])
        agent_side = await monitor.wait_audio_bytes(
            len(draining_said), after=heard_from, timeout=20
        )
        assert b"".join(agent_side) == draining_said

        await caller.stop()
        await caller.wait_closed(within=15)
        assert caller.close_code == 1000
        ended_event = await monitor.wait_for("call.ended", after=heard_from, timeout=15)
        assert ended_event.data["reason"] == "caller_hangup"
        assert monitor.named("error") == []

    assert await owner.wait_exit(EXIT_SECONDS) == 0, cl.describe()
    log = owner.log_path.read_text(errors="replace")
    assert "drained: no calls left" in log, log[-3000:]
    assert "drain deadline" not in log, log[-3000:]

    # Nothing lost, nothing duplicated: all the caller heard is exactly its turns' echoes.
    assert caller.received_audio() == b"".join(t.said for t in turns)
    assert conversation.turns == len(turns)
    assert conversation.audio_chunks_out == len(turns) * FRAMES

    record = await call_log(api, line.phone.tenant, call.call_id)
    assert record["direction"] == "phone_inbound"
    assert record["end_reason"] == "caller_hangup"
    assert record["ended_by"] == "caller"
    assert record["usage"]["bytes_in"] == said_bytes
    assert record["usage"]["bytes_out"] == len(turns) * FRAMES * FRAME_BYTES
    ended = next(e for e in record["timeline"] if e["type"] == "ended")["data"]
    assert ended["marks_sent"] == ended["marks_echoed"] == marks
    assert ended["cut_off_ms"] == 0
    # The caller hung up: nobody asks Twilio to.
    assert twilio_requests(cl, call) == []


@pytest.mark.slow
async def test_a_phone_call_still_up_at_the_drain_deadline_ends_with_shutdown(
    running: Cluster, api: httpx.AsyncClient, tenant: NewTenant
) -> None:
    cl = running
    owner = cl.spawn(DRAIN_DEADLINE_SECONDS=str(SHORT_DRAIN_DEADLINE_SECONDS))
    await cl.wait_ready([owner])
    line = await phone_line(cl, api, tenant)
    call = await place_call(cl, api, line)
    async with call.dial(owner) as caller:
        first = await speak(caller, "before the SIGTERM", FRAMES)
        check_turn(first, "before the SIGTERM", cl)

        async def keep_the_line_open() -> None:
            # Twilio streams the caller's audio (here silence) for as long as the call lasts.
            with contextlib.suppress(websockets.ConnectionClosed):
                while not caller.closed:
                    await caller.send_audio(ULAW_SILENCE * FRAME_BYTES * 5)

        line_open = asyncio.create_task(keep_the_line_open())
        try:
            cl.terminate(owner)
            await caller.wait_closed(within=SHORT_DRAIN_DEADLINE_SECONDS + EXIT_SECONDS)
        finally:
            line_open.cancel()
            await asyncio.gather(line_open, return_exceptions=True)
        assert (caller.close_code, caller.close_reason) == (1000, "shutdown"), cl.describe()

    assert await owner.wait_exit(EXIT_SECONDS) == 0, cl.describe()
    log = owner.log_path.read_text(errors="replace")
    assert "drain deadline: ending 1 call(s) with reason shutdown" in log, log[-3000:]

    record = await call_log(api, line.phone.tenant, call.call_id)
    assert record["end_reason"] == "shutdown"
    assert record["ended_by"] == "relay"
    assert caller.received_audio() == first.said
    # The relay ended the call, so Twilio is asked to hang it up (with the tenant's account).
    twilio = cl.stack().twilio_rest
    [hangup] = await eventually(lambda: twilio_requests(cl, call), timeout=20)
    assert hangup.method == "POST"
    assert hangup.authenticated
    assert hangup.form == {"Status": "completed"}
    assert twilio.calls[call.call_sid].status == "completed"
