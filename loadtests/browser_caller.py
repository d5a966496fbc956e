"""A browser caller for load tests: python-socketio's blocking client over WebSocket only (with
websocket-client, which gevent makes cooperative under locust), exactly the relay's client
contract: ``auth={"token"}``, ``call.ready``, binary ``audio`` both ways, ``call.end``.

Reports (``Report``): ``connect`` (Socket.IO connect until ``call.ready``), ``first_agent_audio``
(from the start of the connect to the agent's first audio: its greeting), ``round_trip`` (per
turn, see call_metrics.TurnTimer), ``turn_echo`` (per turn; failed when voiced frames did not
come back), ``stale_frames`` (failed, once per call that received any) and ``call`` (the whole
call; failed when it ended otherwise than by the caller hanging up).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import socketio

from loadtests.bench_audio import MarkerScanner, TalkPattern
from loadtests.bench_callers import _http_url
from loadtests.call_metrics import EchoLedger, Greeting, TurnTimer
from loadtests.call_report import CallOptions, Report, report_echo
from loadtests.conversation import converse

FRAME_MS = 20


class BrowserCall:
    """One call through the relay's Socket.IO endpoint; ``run`` blocks until it is over."""

    def __init__(self, report: Report, options: CallOptions) -> None:
        self._report = report
        self._options = options
        self._pattern = TalkPattern(
            frame_ms=FRAME_MS,
            talk_frames=options.talk_ms // FRAME_MS,
            silence_frames=options.silence_frames(FRAME_MS),
        )
        self._sio = socketio.Client(reconnection=False)
        self._ready = threading.Event()
        self._ended = threading.Event()
        self._ended_with: dict[str, Any] | None = None
        self._errors: list[str] = []
        self._scanner = MarkerScanner()
        self._ledger = EchoLedger(self._pattern.talk_frames)
        self._timer = TurnTimer()
        self._greeting = Greeting(time.monotonic(), timeout=options.greeting_timeout)
        for event, handler in (
            ("call.ready", self._on_ready),
            ("audio", self._on_audio),
            ("call.ended", self._on_ended),
            ("error", self._on_error),
            ("disconnect", self._on_disconnect),
        ):
            self._sio.on(event, handler)

    # --- Relay events (the client's reader) ---

    def _on_ready(self, data: Any = None) -> None:
        self._ready.set()

    def _on_audio(self, data: Any) -> None:
        if not isinstance(data, bytes | bytearray):
            return
        now = time.monotonic()
        first = self._greeting.first_audio_at is None
        self._greeting.agent_audio(now)
        if first:
            seconds = self._greeting.first_audio_seconds
            self._report("first_agent_audio", seconds or 0.0)
        round_trip = self._timer.agent_audio(now)
        if round_trip is not None:
            self._report("round_trip", round_trip)
        self._ledger.received(self._scanner.feed(bytes(data)))

    def _on_ended(self, data: Any = None) -> None:
        self._ended_with = data if isinstance(data, dict) else {}
        self._ended.set()

    def _on_error(self, data: Any = None) -> None:
        code = data.get("code") if isinstance(data, dict) else data
        self._errors.append(f"error event {code}")

    def _on_disconnect(self, *args: Any) -> None:
        self._ended.set()

    # --- conversation.Line and conversation.Turns ---

    @property
    def alive(self) -> bool:
        return self._sio.connected and not self._ended.is_set()

    def send_audio(self, audio: bytes) -> None:
        try:
            self._sio.emit("audio", audio)
        except socketio.exceptions.SocketIOError:
            self._ended.set()

    def tick(self, now: float) -> None:
        pass

    def turn_ended(self, turn: int, at: float) -> None:
        self._timer.turn_ended(at)

    def turn_settled(self, turn: int) -> None:
        report_echo(self._report, self._ledger.settle(turn), "frames")

    # --- The call ---

    def run(self, relay_url: str, token: str) -> None:
        options = self._options
        started = time.monotonic()
        self._greeting = Greeting(started, timeout=options.greeting_timeout)
        try:
            self._sio.connect(
                _http_url(relay_url),
                transports=["websocket"],
                auth={"token": token},
                wait_timeout=options.connect_timeout,
            )
            if not self._ready.wait(options.connect_timeout):
                raise TimeoutError(f"no call.ready within {options.connect_timeout:g} s")
        except (socketio.exceptions.ConnectionError, TimeoutError) as exc:
            self._report("connect", time.monotonic() - started, error=f"{exc}")
            self._disconnect()
            return
        self._report("connect", time.monotonic() - started)
        try:
            converse(self, self._pattern, self._greeting, self, options.turns)
        finally:
            self._hang_up()
        if self._ledger.stale:
            self._report(
                "stale_frames",
                0.0,
                length=self._ledger.stale,
                error=f"{self._ledger.stale} stale frames",
            )
        self._report("call", time.monotonic() - started, error=self._call_error())

    def _hang_up(self) -> None:
        if self.alive:
            try:
                self._sio.emit("call.end")
            except socketio.exceptions.SocketIOError:
                pass
            else:
                self._ended.wait(self._options.hangup_timeout)
                # The call.ended we waited for says how it ended; a hang-up is ours.
                if self._ended_with is None:
                    self._errors.append("no call.ended after call.end")
        self._disconnect()

    def _disconnect(self) -> None:
        try:
            self._sio.disconnect()
        except Exception as exc:
            self._errors.append(f"disconnect failed: {type(exc).__name__}")

    def _call_error(self) -> str | None:
        if self._ended_with is not None and self._ended_with.get("reason") != "caller_hangup":
            ended = self._ended_with
            return f"call.ended {ended.get('reason')}/{ended.get('code')}"
        if self._ended_with is None and not self._errors:
            return "the relay disconnected without call.ended"
        return "; ".join(sorted(set(self._errors))) or None
