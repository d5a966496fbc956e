"""The locust load tests cannot rot: their pure parts are unit-tested, and a very short headless
run (`make loadtest`'s runner, three users, a few seconds) goes through a real stack on loopback.
Nothing here asserts on timings."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]

from loadtests.bench_audio import TalkPattern
from loadtests.call_metrics import ByteEcho, EchoLedger, Greeting, TurnEcho, TurnTimer
from loadtests.conversation import converse
from loadtests.load_target import LoadTarget, PhoneTarget, TargetError, target_from_env
from loadtests.phone_caller import UlawTalk
from loadtests.twilio_webhook import (
    CallRefused,
    inbound_call_form,
    parse_connect_stream,
    signature,
)
from tests.support.services import Services, free_port
from voicerelay.settings import Settings

ROOT = Path(__file__).resolve().parent.parent

# --- Pure parts -------------------------------------------------------------------------------


def test_greeting_is_over_after_a_quiet_spell_or_a_timeout() -> None:
    greeting = Greeting(10.0, quiet=0.5, timeout=3.0)
    assert not greeting.over(12.9)
    assert greeting.over(13.0)  # the agent never spoke
    greeting.agent_audio(11.0)
    greeting.agent_audio(11.2)
    assert greeting.first_audio_seconds == pytest.approx(1.0)
    assert not greeting.over(11.6)
    assert greeting.over(11.7)


def test_turn_timer_times_the_first_agent_audio_after_a_turn() -> None:
    timer = TurnTimer()
    assert timer.agent_audio(1.0) is None  # the greeting: no turn yet
    timer.turn_ended(2.0)
    assert timer.agent_audio(2.7) == pytest.approx(0.7)
    assert timer.agent_audio(2.8) is None  # the rest of the same reply


def test_echo_ledger_counts_lost_and_stale_frames_per_turn() -> None:
    ledger = EchoLedger(talk_frames=4)
    ledger.received([0, 1, 3])  # turn 0, frame 2 lost
    ledger.received([4, 5, 6, 7])  # turn 1 complete
    ledger.received([2, 5])  # an old turn's frame after a newer turn's echo, and a duplicate
    assert ledger.stale == 2
    assert ledger.settle(0) == TurnEcho(expected=4, echoed=3)
    assert ledger.settle(1) == TurnEcho(expected=4, echoed=4)
    assert ledger.settle(0).lost == 4  # settled turns are forgotten
    with pytest.raises(ValueError, match="frame"):
        EchoLedger(0)


def test_byte_echo_counts_20_ms_frames_of_transcoded_audio() -> None:
    echo = ByteEcho(frame_bytes=160)
    assert echo.settle() is None
    echo.turn_ended(voiced_frames=50)
    echo.agent_audio(4000)
    echo.agent_audio(3990)  # resampling lost a few samples: still 50 frames
    assert echo.settle() == TurnEcho(50, 50)
    echo.turn_ended(voiced_frames=50)
    echo.agent_audio(1600)
    settled = echo.settle()
    assert settled is not None
    assert settled.lost == 40


def test_ulaw_talk_is_a_voiced_turn_then_silence() -> None:
    talk = UlawTalk(talk_frames=3, silence_frames=2)
    frames = [talk.frame(i) for i in range(10)]
    assert [f.turn_end for f in frames] == [False, False, True, False, False] * 2
    assert all(len(f.audio) == 160 for f in frames)
    assert frames[3].audio == b"\xff" * 160
    assert frames[0].audio != frames[3].audio


class FakeLine:
    def __init__(self, alive_for: int | None = None) -> None:
        self.sent: list[bytes] = []
        self.ticks = 0
        self._alive_for = alive_for
        self.events: list[tuple[str, int]] = []

    @property
    def alive(self) -> bool:
        return self._alive_for is None or len(self.sent) < self._alive_for

    def send_audio(self, audio: bytes) -> None:
        self.sent.append(audio)

    def tick(self, now: float) -> None:
        self.ticks += 1

    def turn_ended(self, turn: int, at: float) -> None:
        self.events.append(("ended", turn))

    def turn_settled(self, turn: int) -> None:
        self.events.append(("settled", turn))


def test_converse_talks_whole_turns_after_the_greeting() -> None:
    pattern = TalkPattern(frame_ms=10, talk_frames=2, silence_frames=1)
    line = FakeLine()
    greeting = Greeting(0.0, timeout=0.0)  # over at once
    assert converse(line, pattern, greeting, line, cycles=2) == 2
    assert len(line.sent) == 6
    assert line.ticks == 6
    assert line.events == [("ended", 0), ("settled", 0), ("ended", 1), ("settled", 1)]


def test_converse_stops_when_the_line_dies() -> None:
    pattern = TalkPattern(frame_ms=10, talk_frames=2, silence_frames=1)
    line = FakeLine(alive_for=4)
    assert converse(line, pattern, Greeting(0.0, timeout=0.0), line, cycles=5) == 1
    # Three frames make turn 0; the line dies one frame into turn 1, which is not settled.
    assert line.events == [("ended", 0), ("settled", 0)]


def test_webhook_signature_is_what_twilios_validator_accepts() -> None:
    form = inbound_call_form(
        account_sid="AC" + "1" * 32, call_sid="CA1", from_number="+12025550100", to_number="+1415"
    )
    url = "https://api.example.com/v1/twilio/voice"
    signed = signature("secret-token-123456", url, form)
    assert RequestValidator("secret-token-123456").validate(url, form, signed)
    assert not RequestValidator("another-token-12345").validate(url, form, signed)


def test_twiml_stream_and_parameters_are_read() -> None:
    twiml = (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
        '<Stream url="wss://relay.example.com/twilio/stream">'
        '<Parameter name="token" value="t.o.k"/><Parameter name="from" value="+1202"/>'
        "</Stream></Connect></Response>"
    )
    stream = parse_connect_stream(twiml)
    assert stream.url == "wss://relay.example.com/twilio/stream"
    assert stream.parameters == {"token": "t.o.k", "from": "+1202"}


@pytest.mark.parametrize(
    "twiml",
    [
        "<Response><Say>Sorry, this number is not in service.</Say><Hangup/></Response>",
        "not xml",
        "<Response><Connect><Stream/></Connect></Response>",
    ],
)
def test_anything_but_a_stream_is_a_refused_call(twiml: str) -> None:
    with pytest.raises(CallRefused):
        parse_connect_stream(twiml)


def test_target_from_variables_for_a_real_deployment() -> None:
    env = {
        "LOADTEST_API_URL": "https://api.example.com/",
        "LOADTEST_API_KEY": "vr_live_x",
        "LOADTEST_AGENT_ID": "a1",
        "LOADTEST_USER_EMAIL": "ops@example.com",
        "LOADTEST_USER_PASSWORD": "pw",
    }
    target = target_from_env(env)
    assert target == LoadTarget(
        "https://api.example.com", "vr_live_x", "a1", "ops@example.com", "pw"
    )
    phone = {
        "LOADTEST_PHONE_NUMBER": "+14155550100",
        "LOADTEST_TWILIO_ACCOUNT_SID": "AC1",
        "LOADTEST_TWILIO_AUTH_TOKEN": "tok",
    }
    assert target_from_env(env | phone).phone == PhoneTarget(
        "+14155550100", "AC1", "tok", "https://api.example.com/v1/twilio/voice"
    )
    with pytest.raises(TargetError, match="LOADTEST_TWILIO_AUTH_TOKEN"):
        target_from_env(env | {"LOADTEST_PHONE_NUMBER": "+14155550100"})
    with pytest.raises(TargetError, match="LOADTEST_API_KEY"):
        target_from_env({"LOADTEST_API_URL": "https://api.example.com"})


# --- A very short headless run ----------------------------------------------------------------

_SETTING_VARIABLES = {name.upper() for name in Settings.model_fields}


@pytest.fixture
def stack_env(database, services: Services) -> Iterator[dict[str, str]]:  # type: ignore[no-untyped-def]
    """What `voicerelay up` gets: the test database and Redis (a prefix of its own)."""
    prefix = f"vrlt:{uuid.uuid4().hex[:8]}:"
    env = {k: v for k, v in os.environ.items() if k.upper() not in _SETTING_VARIABLES}
    env.update(
        ENVIRONMENT="development",
        LOG_LEVEL="WARNING",
        DATABASE_URL=database.app_dsn,
        MIGRATION_DATABASE_URL=database.owner_dsn,
        REDIS_URL=services.redis_url,
        REDIS_KEY_PREFIX=prefix,
        LOADTEST_TURNS="1",
        LOADTEST_TALK_MS="600",
    )
    yield env
    client = redis.Redis.from_url(services.redis_url)
    for key in client.scan_iter(match=prefix + "*", count=500):
        client.delete(key)
    client.close()


def _stats(path: Path) -> dict[tuple[str, str], tuple[int, int]]:
    with path.open() as f:
        return {
            (row["Type"], row["Name"]): (int(row["Request Count"]), int(row["Failure Count"]))
            for row in csv.DictReader(f)
            if row["Name"] != "Aggregated"
        }


def _succeeded(stats: dict[tuple[str, str], tuple[int, int]], key: tuple[str, str]) -> bool:
    requests, failures = stats.get(key, (0, 0))
    return requests > failures


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_locust_runs_headless_against_a_local_stack(
    tmp_path: Path, stack_env: dict[str, str]
) -> None:
    out = tmp_path / "report"
    command = [
        sys.executable,
        "-m",
        "loadtests.run_local",
        f"--state-dir={tmp_path / 'state'}",
        f"--out={out}",
        f"--api-port={free_port()}",
        f"--relay-port={free_port()}",
        f"--emulator-port={free_port()}",
        "--users=3",
        "--spawn-rate=3",
        "--run-time=12s",
        "--stop-timeout=30",
    ]
    done = subprocess.run(
        command, cwd=ROOT, env=stack_env, capture_output=True, text=True, timeout=280
    )
    stack_log = (out / "stack.log").read_text()[-3000:] if (out / "stack.log").exists() else ""
    explained = f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}\n{stack_log}"
    assert (out / "report.html").exists(), explained
    stats = _stats(out / "locust_stats.csv")
    for key in [
        ("POST", "/v1/calls"),
        ("SIO", "connect"),
        ("SIO", "first_agent_audio"),
        ("SIO", "round_trip"),
        ("SIO", "turn_echo"),
        ("SIO", "call"),
        ("POST", "/v1/auth/login"),
        ("GET", "/v1/calls"),
    ]:
        assert _succeeded(stats, key), (key, stats, explained)
    if "phone callers skipped" in done.stderr:
        assert not any(kind == "PHONE" for kind, _ in stats), stats
    else:
        for name in ("stream_open", "first_agent_audio", "call"):
            assert _succeeded(stats, ("PHONE", name)), (name, stats, explained)
