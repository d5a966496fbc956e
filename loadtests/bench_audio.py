"""Benchmark audio and echo timing (pure, no I/O).

A benchmark caller talks in turns, like a person: ``talk_frames`` voiced 20 ms PCM16 frames,
then silence while the agent answers. The emulator's echo agent is configured (see
``bench_stack.echo_agent``) to end a turn on the last voiced frame and to reply at once with
the same audio, one frame per ``audio`` event, paced in real time. So frame ``j`` of a turn is
due back ``j`` frame periods after the turn's reply starts, and its echo round trip is

    arrival(j) - sent(last frame of the turn) - j * frame period

which is the time the turn's last frame took to reach the agent plus the time frame ``j`` of
the reply took to come back (including any lateness in the agent's own pacing, which the
benchmark cancels by timing calls that reach the emulator directly at the same moment).

Voiced frames start with a 12-byte marker (``MAGIC``, the frame's sequence number and its
complement, so a chance match in audio is rejected); the scanner finds markers again in the
echoed stream whatever the chunk boundaries. Silent frames are zeros: below the agent's voice
threshold, so they never start a turn or interrupt a reply.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

SAMPLE_RATE = 16_000
BYTES_PER_SAMPLE = 2
FRAME_MS = 20
MAGIC = b"VRbn"
_MARKER = struct.Struct("<4sII")
MARKER_BYTES = _MARKER.size
_MASK = 0xFFFFFFFF


def frame_bytes(frame_ms: int = FRAME_MS, sample_rate: int = SAMPLE_RATE) -> int:
    return sample_rate * frame_ms // 1000 * BYTES_PER_SAMPLE


def tone(nbytes: int, *, sample_rate: int = SAMPLE_RATE, amplitude: int = 4000) -> bytes:
    """A 220 Hz + 330 Hz tone of ``nbytes`` PCM16 little-endian bytes (RMS about amplitude/2)."""
    samples = nbytes // BYTES_PER_SAMPLE
    values = (
        int(
            amplitude
            * 0.5
            * (
                math.sin(2 * math.pi * 220 * i / sample_rate)
                + math.sin(2 * math.pi * 330 * i / sample_rate)
            )
        )
        for i in range(samples)
    )
    return struct.pack(f"<{samples}h", *values)


def marker(seq: int) -> bytes:
    seq &= _MASK
    return _MARKER.pack(MAGIC, seq, seq ^ _MASK)


@dataclass(frozen=True)
class Frame:
    audio: bytes
    # Sequence number of a voiced frame (None for silence) and whether it ends its turn.
    seq: int | None
    turn_end: bool


class TalkPattern:
    """Frame ``i`` of a call: ``talk_frames`` voiced frames, then ``silence_frames`` silent ones,
    repeated. Voiced frames are numbered 0, 1, 2, ... across turns."""

    def __init__(self, *, frame_ms: int, talk_frames: int, silence_frames: int) -> None:
        size = frame_bytes(frame_ms)
        if size <= MARKER_BYTES or talk_frames < 1 or silence_frames < 0:
            raise ValueError("frames must be longer than the marker, and turns not empty")
        self.frame_ms = frame_ms
        self.talk_frames = talk_frames
        self.silence_frames = silence_frames
        self._voice = tone(size)[MARKER_BYTES:]
        self._silence = bytes(size)

    @property
    def cycle(self) -> int:
        return self.talk_frames + self.silence_frames

    def frame(self, index: int) -> Frame:
        turn, position = divmod(index, self.cycle)
        if position >= self.talk_frames:
            return Frame(self._silence, None, False)
        seq = turn * self.talk_frames + position
        return Frame(marker(seq) + self._voice, seq, position == self.talk_frames - 1)


class MarkerScanner:
    """Feed it received audio chunks; it returns the sequence numbers of the markers completed.

    Chunks may split a marker anywhere: up to ``MARKER_BYTES - 1`` trailing bytes are kept for
    the next chunk.
    """

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> list[int]:
        data = self._tail + chunk if self._tail else chunk
        found: list[int] = []
        start = 0
        while True:
            at = data.find(MAGIC, start)
            if at < 0 or at + MARKER_BYTES > len(data):
                break
            _, seq, check = _MARKER.unpack_from(data, at)
            if seq ^ _MASK == check:
                found.append(seq)
                start = at + MARKER_BYTES
            else:
                start = at + 1
        # Keep what could still be the start of a marker split across chunks.
        self._tail = bytes(data[max(start, len(data) - (MARKER_BYTES - 1)) :])
        return found


class EchoTimer:
    """Echo round trips of one call's frames (see the module docstring), in seconds.

    Only turns whose last frame was sent inside the measurement window count.
    """

    def __init__(self, pattern: TalkPattern, window: tuple[float, float]) -> None:
        self._talk = pattern.talk_frames
        self._period = pattern.frame_ms / 1000
        self._window = window
        self._turn_end_at: dict[int, float] = {}
        self.frames_expected = 0
        self.frames_echoed = 0
        self.samples: list[float] = []

    def sent(self, frame: Frame, at: float) -> None:
        if frame.turn_end and frame.seq is not None and self._window[0] <= at < self._window[1]:
            self._turn_end_at[frame.seq // self._talk] = at
            self.frames_expected += self._talk

    def received(self, seqs: Sequence[int], at: float) -> None:
        for seq in seqs:
            turn, position = divmod(seq, self._talk)
            ended = self._turn_end_at.get(turn)
            if ended is not None:
                self.samples.append(at - ended - position * self._period)
                self.frames_echoed += 1


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (NaN when it is empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])
