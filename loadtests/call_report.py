"""How a load-test call reports what it measured (locust request events, or anything else)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from loadtests.call_metrics import TurnEcho


class Report(Protocol):
    def __call__(
        self, name: str, seconds: float, *, length: int = 0, error: str | None = None
    ) -> None: ...


@dataclass(frozen=True)
class CallOptions:
    """One call: how long it talks and how patient it is."""

    turns: int = 3
    talk_ms: int = 1000
    # The echo agent answers after end_of_turn_ms (500 ms on `make run`'s emulator) and speaks
    # as long as the turn; the caller stays quiet that long plus a margin before its next turn.
    reply_margin_ms: int = 1500
    connect_timeout: float = 15.0
    greeting_timeout: float = 8.0
    hangup_timeout: float = 5.0

    def silence_frames(self, frame_ms: int) -> int:
        return (self.talk_ms + self.reply_margin_ms) // frame_ms


def report_echo(report: Report, echo: TurnEcho, unit: str) -> None:
    """One ``turn_echo`` per turn: failed when frames of the turn did not come back."""
    error = None
    if echo.lost:
        error = f"{echo.lost} of {echo.expected} {unit} of a turn's echo lost"
    report("turn_echo", 0.0, length=echo.echoed, error=error)
