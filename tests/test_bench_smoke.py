"""The relay benchmark (`make bench`) cannot rot: its pure parts are unit-tested, and a tiny run
(2 calls, 3 seconds) goes through the whole harness. Nothing here asserts on timings."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.bench_audio import (
    MARKER_BYTES,
    EchoTimer,
    MarkerScanner,
    TalkPattern,
    frame_bytes,
    marker,
    percentile,
)
from loadtests.bench_phone import stream_url_on
from loadtests.bench_relay import Measurement, phone_table, table

ROOT = Path(__file__).resolve().parent.parent


# --- Pure parts -------------------------------------------------------------------------------


def test_talk_pattern_numbers_voiced_frames_and_marks_turn_ends() -> None:
    pattern = TalkPattern(frame_ms=20, talk_frames=3, silence_frames=2)
    frames = [pattern.frame(i) for i in range(10)]
    assert [f.seq for f in frames] == [0, 1, 2, None, None, 3, 4, 5, None, None]
    assert [i for i, f in enumerate(frames) if f.turn_end] == [2, 7]
    assert all(len(f.audio) == frame_bytes(20) == 640 for f in frames)
    assert frames[3].audio == bytes(640)  # silence is below any voice threshold
    assert frames[5].audio.startswith(marker(3))


def test_scanner_finds_markers_across_any_chunk_boundary() -> None:
    pattern = TalkPattern(frame_ms=20, talk_frames=4, silence_frames=0)
    stream = b"".join(pattern.frame(i).audio for i in range(6))
    for size in (1, 5, 11, 12, 13, 100, 640, 1000, len(stream)):
        scanner = MarkerScanner()
        found: list[int] = []
        for at in range(0, len(stream), size):
            found += scanner.feed(stream[at : at + size])
        assert found == list(range(6)), size


def test_scanner_rejects_a_marker_whose_check_does_not_match() -> None:
    forged = marker(7)[: MARKER_BYTES - 1] + b"\x00"
    assert MarkerScanner().feed(b"xx" + forged + marker(8)) == [8]


def test_echo_timer_measures_from_the_turn_end_and_the_frames_place_in_the_reply() -> None:
    pattern = TalkPattern(frame_ms=20, talk_frames=3, silence_frames=3)
    timer = EchoTimer(pattern, window=(10.0, 20.0))
    for index in range(12):
        timer.sent(pattern.frame(index), at=10.0 + index * 0.02)
    # Turn 0 ended with frame index 2 at 10.04; the agent replies 5 ms later, one frame per 20 ms.
    timer.received([0], at=10.045)
    timer.received([1, 2], at=10.045 + 0.02)
    assert timer.frames_expected == 6
    assert timer.frames_echoed == 3
    assert [round(s, 6) for s in timer.samples] == [0.005, 0.005, -0.015]
    # Frames from turns outside the window, or never sent, are not timed.
    timer.received([99], at=11.0)
    assert timer.frames_echoed == 3


def test_turns_ending_outside_the_window_are_not_timed() -> None:
    pattern = TalkPattern(frame_ms=20, talk_frames=2, silence_frames=0)
    timer = EchoTimer(pattern, window=(1.0, 2.0))
    timer.sent(pattern.frame(1), at=0.5)
    timer.received([0, 1], at=0.6)
    assert (timer.frames_expected, timer.samples) == (0, [])


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0
    assert math.isnan(percentile([], 0.5))


def test_table_puts_each_setup_next_to_the_floor_of_its_step() -> None:
    floor = Measurement(
        setup="floor",
        calls=2,
        connected=2,
        window_seconds=60.0,
        cpu_seconds=1.0,
        rtt_p50_ms=3.0,
        direct_p50_ms=2.0,
        rtt_p99_ms=9.0,
        direct_p99_ms=5.0,
    )
    relay = Measurement(
        setup="voicerelay",
        calls=2,
        connected=2,
        window_seconds=60.0,
        cpu_seconds=3.0,
        rtt_p50_ms=4.0,
        direct_p50_ms=2.0,
        rtt_p99_ms=15.0,
        direct_p99_ms=5.0,
    )
    rendered = table([floor, relay])
    relay_row = rendered.splitlines()[-1]
    assert "voicerelay" in relay_row
    assert "1.500" in relay_row  # CPU seconds per call-minute: 3 s over 2 call-minutes
    assert "2.0 ms" in relay_row
    assert "10.0 ms" in relay_row
    assert "3.0x" in relay_row
    assert "2.0x" in relay_row


def test_phone_streams_go_to_the_steps_own_replica() -> None:
    twiml_url = "ws://127.0.0.1:8090/twilio/stream"
    assert stream_url_on("http://127.0.0.1:5123", twiml_url) == "ws://127.0.0.1:5123/twilio/stream"
    assert stream_url_on("https://relay.example", twiml_url) == "wss://relay.example/twilio/stream"


def test_phone_table_lists_voicerelay_steps_with_phone_calls() -> None:
    measured = Measurement(
        setup="voicerelay",
        calls=50,
        replicas=3,
        connected=50,
        phone_calls=5,
        phone_first_audio_p50_ms=40.0,
        phone_first_audio_p99_ms=90.0,
    )
    rendered = phone_table([Measurement(setup="floor", calls=50), measured])
    assert rendered.splitlines()[-1].split("|")[1:-1] == [
        " voicerelay ",
        " 3        ",
        " 50            ",
        " 5           ",
        " 40.0 ms                 ",
        " 90.0 ms ",
    ]
    assert phone_table([Measurement(setup="floor", calls=50)]) == ""


# --- The whole harness, tiny ------------------------------------------------------------------


@pytest.mark.slow
def test_benchmark_runs_end_to_end_and_reports_numbers(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    logs = tmp_path / "logs"
    command = [
        sys.executable,
        "-m",
        "loadtests.bench_relay",
        "--calls=2",
        "--seconds=3",
        "--warmup=1",
        "--generators=1",
        "--talk-ms=400",
        "--replicas=1",
        "--replicas=2",
        f"--json={report}",
        f"--logs={logs}",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    logs_text = "\n".join(f"{p.name}:\n{p.read_text()[-2000:]}" for p in logs.glob("*.log"))
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{logs_text}"
    assert "CPU s per call-minute" in done.stdout

    results = json.loads(report.read_text())
    assert results["machine"]["nproc"] >= 1
    measured = {(m["setup"], m["replicas"]): m for m in results["measurements"]}
    expected = {("floor", 1)}
    if importlib.util.find_spec("relay.app") is not None:
        expected |= {("voicerelay", 1), ("voicerelay", 2)}
    assert set(measured) == expected
    phones = not any("phone calls: not measured" in note for note in results["notes"])
    for (setup, _), m in measured.items():
        if setup == "voicerelay" and phones:
            assert m["phone_calls"] == 2, m
            assert math.isfinite(m["phone_first_audio_p50_ms"]), m
        assert m["connected"] == 2, m
        assert m["errors"] == [], m
        assert m["samples"] > 0, m
        assert m["direct_samples"] > 0, m
        for key in ("cpu_per_call_minute", "added_p50_ms", "added_p99_ms"):
            assert math.isfinite(m[key]), (key, m)
        assert m["cpu_seconds"] >= 0
