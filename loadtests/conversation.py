"""The talking half of a load-test call, shared by browser and phone callers (blocking code:
under locust, gevent makes ``time.sleep`` and sockets cooperative).

A call listens (sending silence, as an open microphone does) until the agent's greeting is
over, then talks whole turns in real time, 20 ms frames on an absolute schedule.
"""

from __future__ import annotations

import time
from typing import Protocol

from loadtests.bench_audio import Frame
from loadtests.call_metrics import Greeting

# Behind schedule by more than this (a stalled load generator), the schedule restarts instead
# of sending a burst of old frames that no microphone would produce.
MAX_LAG_SECONDS = 1.0


class Pattern(Protocol):
    frame_ms: int
    talk_frames: int
    silence_frames: int

    @property
    def cycle(self) -> int: ...

    def frame(self, index: int) -> Frame: ...


class Line(Protocol):
    """One call's connection, as the talking loop sees it."""

    @property
    def alive(self) -> bool: ...

    def send_audio(self, audio: bytes) -> None: ...

    def tick(self, now: float) -> None:
        """Called after every frame: time-driven work such as echoing played marks."""


class Turns(Protocol):
    def turn_ended(self, turn: int, at: float) -> None: ...

    def turn_settled(self, turn: int) -> None:
        """The turn's echo is over: the next turn starts now, or the call ends."""


class FrameClock:
    def __init__(self, period: float) -> None:
        self._period = period
        self._next = time.monotonic()

    def wait(self) -> float:
        """Sleep until the next frame is due; returns the time it was sent at."""
        now = time.monotonic()
        if now - self._next > MAX_LAG_SECONDS:
            self._next = now
        elif self._next > now:
            time.sleep(self._next - now)
            now = time.monotonic()
        self._next += self._period
        return now


def converse(line: Line, pattern: Pattern, greeting: Greeting, turns: Turns, cycles: int) -> int:
    """Listen through the greeting, then ``cycles`` turns; returns the turns completed."""
    clock = FrameClock(pattern.frame_ms / 1000)
    silence = pattern.frame(pattern.talk_frames).audio
    while line.alive:
        now = clock.wait()
        if greeting.over(now):
            break
        line.send_audio(silence)
        line.tick(now)
    for index in range(cycles * pattern.cycle):
        turn, position = divmod(index, pattern.cycle)
        if position == 0 and turn > 0:
            turns.turn_settled(turn - 1)
        if not line.alive:
            return turn
        frame = pattern.frame(index)
        now = clock.wait()
        line.send_audio(frame.audio)
        line.tick(now)
        if frame.turn_end:
            turns.turn_ended(turn, now)
    if cycles > 0:
        turns.turn_settled(cycles - 1)
    return cycles
