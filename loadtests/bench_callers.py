"""A load-generator process for the relay benchmark: many concurrent callers in one event loop.

Started by ``loadtests.bench_relay`` (``python -m loadtests.bench_callers``); it talks to its
parent over stdin/stdout, one JSON object per line:

1. stdin: the plan, ``{"frame_ms", "talk_frames", "silence_frames", "connect_timeout",
   "calls": [target, ...]}`` where a target is ``{"kind": "relay", "url", "token"}``
   (Socket.IO through voicerelay), ``{"kind": "floor", "url"}`` (binary WebSocket through the
   floor relay) or ``{"kind": "direct", "url"}`` (the emulator's conversation socket itself).
2. stdout: ``{"event": "connected", "ok": {kind: n}, "errors": [...]}`` once every call is up
   or has failed.
3. stdin: ``{"start_at", "measure_from", "measure_until"}`` (wall-clock seconds).
4. stdout: ``{"event": "result", "rtt_ms": {kind: [...]}, "expected": {kind: n},
   "echoed": {kind: n}, "interruptions": {kind: n}, "errors": [...]}``.

Every call streams frames in real time from ``start_at`` (calls are spread over one frame
period, like independent callers) following ``bench_audio.TalkPattern``, and times the echoes
of the turns that ended inside the measurement window (``bench_audio.EchoTimer``).
"""

from __future__ import annotations

import abc
import asyncio
import base64
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import socketio
import websockets
from websockets.asyncio.client import ClientConnection, connect

from loadtests.bench_audio import EchoTimer, MarkerScanner, TalkPattern

DRAIN_SECONDS = 1.5
HANGUP_SECONDS = 3.0


class Caller(abc.ABC):
    """One call: connect, send frames, time the echoes of its voiced frames."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._scanner = MarkerScanner()
        self.timer: EchoTimer | None = None
        self.interruptions = 0
        self.error: str | None = None

    def on_audio(self, chunk: bytes) -> None:
        seqs = self._scanner.feed(chunk)
        if seqs and self.timer is not None:
            self.timer.received(seqs, time.monotonic())

    @abc.abstractmethod
    async def connect(self, within: float) -> None: ...

    @abc.abstractmethod
    async def send(self, frame: bytes) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


def _http_url(url: str) -> str:
    """python-socketio wants http(s) URLs; the control API hands out the relay's ws(s) URL."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, *parts[1:]))


class RelayCaller(Caller):
    """A browser-like caller: Socket.IO over WebSocket only, ``auth={"token": ...}``."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__("relay")
        self._url = _http_url(url)
        self._token = token
        self._sio = socketio.AsyncClient(reconnection=False, handle_sigint=False)
        self._ready = asyncio.Event()
        self._ended = asyncio.Event()
        self._sio.on("call.ready", self._on_ready)
        self._sio.on("audio", self._on_binary)
        self._sio.on("interruption", self._on_interruption)
        self._sio.on("call.ended", self._on_ended)
        self._sio.on("error", self._on_error)
        self._sio.on("disconnect", self._on_disconnect)

    async def _on_ready(self, data: Any) -> None:
        self._ready.set()

    async def _on_binary(self, data: Any) -> None:
        if isinstance(data, bytes | bytearray):
            self.on_audio(bytes(data))

    async def _on_interruption(self, data: Any = None) -> None:
        self.interruptions += 1

    async def _on_ended(self, data: Any = None) -> None:
        if not self._ended.is_set() and self.error is None and isinstance(data, dict):
            reason = data.get("reason")
            if reason not in (None, "caller_hangup"):
                self.error = f"call.ended {reason}/{data.get('code')}"
        self._ended.set()

    async def _on_error(self, data: Any = None) -> None:
        self.error = f"error event {data}"

    async def _on_disconnect(self, *args: Any) -> None:
        self._ended.set()

    async def connect(self, within: float) -> None:
        try:
            await self._sio.connect(
                self._url,
                transports=["websocket"],
                auth={"token": self._token},
                wait_timeout=within,
            )
        except socketio.exceptions.ConnectionError as exc:
            raise ConnectionError(f"relay refused the connection: {exc}") from None
        await asyncio.wait_for(self._ready.wait(), within)

    async def send(self, frame: bytes) -> None:
        if self._sio.connected and not self._ended.is_set():
            await self._sio.emit("audio", frame)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._sio.connected and not self._ended.is_set():
                await self._sio.emit("call.end")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ended.wait(), HANGUP_SECONDS)
        with contextlib.suppress(Exception):
            await self._sio.disconnect()


class _WebSocketCaller(Caller):
    def __init__(self, kind: str, url: str) -> None:
        super().__init__(kind)
        self._url = url
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None

    async def _open(self, within: float) -> ClientConnection:
        self._ws = await connect(
            self._url, compression=None, open_timeout=within, max_size=16 * 1024 * 1024
        )
        return self._ws

    def _start_reader(self, handle: Callable[[str | bytes], Awaitable[None]]) -> None:
        ws = self._ws
        assert ws is not None

        async def read() -> None:
            try:
                async for message in ws:
                    await handle(message)
            except websockets.ConnectionClosed:
                pass

        self._reader = asyncio.create_task(read())

    async def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(), HANGUP_SECONDS)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader


class FloorCaller(_WebSocketCaller):
    """A raw-WebSocket caller of the floor relay: binary audio each way, nothing else."""

    def __init__(self, url: str) -> None:
        super().__init__("floor", url)

    async def connect(self, within: float) -> None:
        ws = await self._open(within)
        # The floor says "ready" once its upstream conversation has started.
        ready = await asyncio.wait_for(ws.recv(), within)
        if ready != "ready":
            raise ConnectionError(f"floor relay answered {ready!r}")
        self._start_reader(self._handle)

    async def _handle(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self.on_audio(message)

    async def send(self, frame: bytes) -> None:
        if self._ws is not None:
            with contextlib.suppress(websockets.ConnectionClosed):
                await self._ws.send(frame)


class DirectCaller(_WebSocketCaller):
    """Speaks the ConvAI protocol to the emulator itself: the round trip without any relay."""

    def __init__(self, url: str) -> None:
        super().__init__("direct", url)

    async def connect(self, within: float) -> None:
        ws = await self._open(within)
        await ws.send(
            orjson.dumps(
                {
                    "type": "conversation_initiation_client_data",
                    "conversation_config_override": {},
                    "dynamic_variables": {},
                }
            ).decode()
        )
        first = orjson.loads(await asyncio.wait_for(ws.recv(), within))
        if first.get("type") != "conversation_initiation_metadata":
            raise ConnectionError(f"emulator's first message was {first.get('type')!r}")
        self._start_reader(self._handle)

    async def _handle(self, message: str | bytes) -> None:
        event = orjson.loads(message)
        kind = event.get("type")
        if kind == "audio":
            self.on_audio(base64.b64decode(event["audio_event"]["audio_base_64"]))
        elif kind == "ping":
            pong = {"type": "pong", "event_id": event["ping_event"]["event_id"]}
            await self._send_text(orjson.dumps(pong).decode())
        elif kind == "interruption":
            self.interruptions += 1

    async def _send_text(self, text: str) -> None:
        if self._ws is not None:
            with contextlib.suppress(websockets.ConnectionClosed):
                await self._ws.send(text)

    async def send(self, frame: bytes) -> None:
        chunk = {"user_audio_chunk": base64.b64encode(frame).decode()}
        await self._send_text(orjson.dumps(chunk).decode())


def make_caller(target: dict[str, Any]) -> Caller:
    kind = target["kind"]
    if kind == "relay":
        return RelayCaller(target["url"], target["token"])
    if kind == "floor":
        return FloorCaller(target["url"])
    if kind == "direct":
        return DirectCaller(target["url"])
    raise ValueError(f"unknown caller kind {kind!r}")


async def stream(caller: Caller, pattern: TalkPattern, start: float, until: float) -> None:
    """Send frames on an absolute real-time schedule (a late frame goes out at once, then the
    schedule continues), until ``until`` (monotonic)."""
    period = pattern.frame_ms / 1000
    index = 0
    next_at = start
    while next_at < until:
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        frame = pattern.frame(index)
        if caller.timer is not None:
            caller.timer.sent(frame, time.monotonic())
        try:
            await caller.send(frame.audio)
        except Exception as exc:
            caller.error = caller.error or f"send failed: {type(exc).__name__}: {exc}"
            return
        index += 1
        next_at += period


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _read_line() -> dict[str, Any]:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if not line:
        raise SystemExit("the benchmark closed our stdin")
    parsed: dict[str, Any] = json.loads(line)
    return parsed


async def _connect_all(callers: list[Caller], within: float) -> list[str]:
    # Bounded concurrency: the relay's per-call set-up (token check, session fetch, upstream
    # connect) is not what is measured, and a thundering herd would only time it out.
    gate = asyncio.Semaphore(20)

    async def one(caller: Caller) -> None:
        async with gate:
            try:
                await caller.connect(within)
            except Exception as exc:
                caller.error = f"{caller.kind}: connect failed: {type(exc).__name__}: {exc}"

    await asyncio.gather(*(one(c) for c in callers))
    return [c.error for c in callers if c.error is not None]


async def run_plan() -> None:
    plan = await _read_line()
    pattern = TalkPattern(
        frame_ms=int(plan["frame_ms"]),
        talk_frames=int(plan["talk_frames"]),
        silence_frames=int(plan["silence_frames"]),
    )
    callers = [make_caller(target) for target in plan["calls"]]
    errors = await _connect_all(callers, float(plan["connect_timeout"]))
    live = [c for c in callers if c.error is None]
    _emit({"event": "connected", "ok": dict(Counter(c.kind for c in live)), "errors": errors})

    go = await _read_line()
    offset = time.monotonic() - time.time()  # wall clock -> monotonic
    start = go["start_at"] + offset
    window = (go["measure_from"] + offset, go["measure_until"] + offset)
    for caller in live:
        caller.timer = EchoTimer(pattern, window)
    # Callers start at different instants of a frame period, like independent people.
    period = pattern.frame_ms / 1000
    spread = [start + period * i / max(1, len(live)) for i in range(len(live))]
    await asyncio.gather(
        *(stream(c, pattern, at, window[1]) for c, at in zip(live, spread, strict=True))
    )
    await asyncio.sleep(DRAIN_SECONDS)  # echoes of the last turns are still on their way
    await asyncio.gather(*(c.close() for c in callers), return_exceptions=True)

    result: dict[str, Any] = {"event": "result", "rtt_ms": {}, "expected": {}, "echoed": {}}
    result["interruptions"] = {}
    for caller in live:
        timer, kind = caller.timer, caller.kind
        assert timer is not None
        result["rtt_ms"].setdefault(kind, []).extend(round(r * 1000, 3) for r in timer.samples)
        for key, value in (
            ("expected", timer.frames_expected),
            ("echoed", timer.frames_echoed),
            ("interruptions", caller.interruptions),
        ):
            result[key][kind] = result[key].get(kind, 0) + value
    result["errors"] = [f"{c.kind}: {c.error}" for c in live if c.error is not None]
    _emit(result)


def main() -> None:
    from voicerelay.serving import run

    run(run_plan())


if __name__ == "__main__":
    main()
