"""What a load-test caller measures, without any I/O (times are seconds on a monotonic clock).

A caller first listens while the agent greets it (its first agent audio is timed), then talks in
turns: ``talk_frames`` voiced 20 ms frames, then silence while the agent echoes the turn
(the emulator's echo agent answers after its end-of-turn silence, ``end_of_turn_ms``).

- ``Greeting``: when the greeting is over (no agent audio for a while after the first), so that
  the caller does not talk over it (that would be a barge-in, not a turn).
- ``TurnTimer``: the round trip of a turn, from the caller's last voiced frame to the first
  agent audio after it; this includes the agent's own end-of-turn wait, like what a person hears.
- ``EchoLedger``: browser callers number their voiced frames (``bench_audio`` markers, which an
  echo agent with the caller's format sends back byte for byte): frames of a turn that never came
  back are lost; frames that come back twice, or after a newer turn's echo began, are stale.
- ``ByteEcho``: phone callers' audio is transcoded by the relay (μ-law 8 kHz to the agent's
  PCM and back), so markers do not survive: there a turn's echo is counted in bytes, and 20 ms
  frames missing from its length are lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

GREETING_QUIET_SECONDS = 0.6


class Greeting:
    """The agent's greeting is over once it has been quiet ``quiet`` seconds after speaking,
    or ``timeout`` seconds after the call started if it never spoke."""

    def __init__(
        self, started_at: float, *, quiet: float = GREETING_QUIET_SECONDS, timeout: float
    ) -> None:
        self.started_at = started_at
        self.first_audio_at: float | None = None
        self._last_audio_at: float | None = None
        self._quiet = quiet
        self._timeout = timeout

    def agent_audio(self, at: float) -> None:
        if self.first_audio_at is None:
            self.first_audio_at = at
        self._last_audio_at = at

    def over(self, now: float) -> bool:
        if self._last_audio_at is None:
            return now - self.started_at >= self._timeout
        return now - self._last_audio_at >= self._quiet

    @property
    def first_audio_seconds(self) -> float | None:
        if self.first_audio_at is None:
            return None
        return self.first_audio_at - self.started_at


class TurnTimer:
    """Round trip of each turn: last voiced frame sent → first agent audio after it."""

    def __init__(self) -> None:
        self._turn_ended_at: float | None = None

    def turn_ended(self, at: float) -> None:
        self._turn_ended_at = at

    def agent_audio(self, at: float) -> float | None:
        """The round trip this audio completes, if it is the first after a turn ended."""
        if self._turn_ended_at is None:
            return None
        round_trip = at - self._turn_ended_at
        self._turn_ended_at = None
        return round_trip


@dataclass(frozen=True, slots=True)
class TurnEcho:
    """How much of one turn came back."""

    expected: int
    echoed: int

    @property
    def lost(self) -> int:
        return max(0, self.expected - self.echoed)


class EchoLedger:
    """Voiced frames numbered across turns (turn = seq // talk_frames) and their echoes."""

    def __init__(self, talk_frames: int) -> None:
        if talk_frames < 1:
            raise ValueError("a turn has at least one frame")
        self._talk = talk_frames
        self._seen: set[int] = set()
        self._newest_turn = -1
        self.stale = 0

    def received(self, seqs: Sequence[int]) -> None:
        for seq in seqs:
            turn = seq // self._talk
            if seq in self._seen or turn < self._newest_turn:
                self.stale += 1
                continue
            self._seen.add(seq)
            self._newest_turn = turn

    def settle(self, turn: int) -> TurnEcho:
        """A turn whose echo is over (the next turn is starting): what came back of it."""
        first = turn * self._talk
        echoed = sum(1 for seq in range(first, first + self._talk) if seq in self._seen)
        self._seen.difference_update(range(first, first + self._talk))
        return TurnEcho(self._talk, echoed)


class ByteEcho:
    """A turn's echo counted in bytes (phone callers): ``frame_bytes`` of audio is one frame."""

    def __init__(self, frame_bytes: int) -> None:
        self._frame_bytes = frame_bytes
        self._received = 0
        self._expected_frames: int | None = None

    def turn_ended(self, voiced_frames: int) -> None:
        self._expected_frames = voiced_frames
        self._received = 0

    def agent_audio(self, nbytes: int) -> None:
        self._received += nbytes

    def settle(self) -> TurnEcho | None:
        """The echo of the last turn, once it is over; None before any turn ended."""
        if self._expected_frames is None:
            return None
        # Resampling both ways may shorten the echo by a few samples: round, do not floor.
        echo = TurnEcho(self._expected_frames, round(self._received / self._frame_bytes))
        self._expected_frames = None
        return echo
