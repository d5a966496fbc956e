"""`python -m relay.demo`: one complete call through the relay, against `make run`'s stack.

Without flags it reads the running stack from ``.voicerelay/stack.env`` (the control API's
address) and ``.voicerelay/demo-tenant.json`` (the demo tenant's API key), both written by
``voicerelay up``. If the tenant has no agent yet it stores the emulator's ElevenLabs key as a
credential and creates an agent. Then it creates a call (``POST /v1/calls``), connects to the
relay with the call token like a browser (Socket.IO, WebSocket only), speaks a short
speech-like signal in real time, sends a ``user_message``, hangs up with ``call.end``, and
waits until the call log shows the call ended. It prints what happens along the way and exits
0 on success, 1 with the reason otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import socketio

SAMPLE_RATE = 16_000
FRAME_MS = 20
CLIENT_FORMAT = "pcm_16000"
DEMO_AGENT_NAME = "relay demo"
# The key the local ElevenLabs emulator accepts (voicerelay/emulators/elevenlabs.py).
EMULATOR_API_KEY = "sk_emulator_local_development_key"
USER_MESSAGE = "Hello from relay.demo!"


class DemoFailed(Exception):
    """The demo cannot complete; the message says why and what to check."""


# --- Where the stack is -----------------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """``NAME='value'`` lines as written by `voicerelay up` (quotes optional)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.strip().partition("=")
        if not sep or name.startswith("#"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name.strip()] = value
    return values


def resolve_target(api_url: str | None, api_key: str | None, state_dir: Path) -> tuple[str, str]:
    """The control API's URL and an API key: the flags, else what `voicerelay up` wrote."""
    import json

    if api_url is None:
        stack_env = state_dir / "stack.env"
        try:
            api_url = read_env_file(stack_env).get("PUBLIC_API_URL")
        except OSError:
            raise DemoFailed(
                f"cannot read {stack_env}: start the stack with `make run` first, "
                "or pass --api-url and --api-key"
            ) from None
        if not api_url:
            raise DemoFailed(f"{stack_env} names no PUBLIC_API_URL; pass --api-url")
    if api_key is None:
        demo_file = state_dir / "demo-tenant.json"
        try:
            api_key = json.loads(demo_file.read_text())["api_key"]
        except (OSError, ValueError, KeyError, TypeError):
            raise DemoFailed(
                f"cannot read the demo tenant's API key from {demo_file}: "
                "run `make run` (without --no-demo) or pass --api-key"
            ) from None
    assert api_key is not None
    return api_url.rstrip("/"), api_key


# --- Control API ------------------------------------------------------------------------------


def _check(response: httpx.Response, what: str, expected: int = 200) -> dict[str, Any]:
    if response.status_code != expected:
        detail = response.text[:300]
        raise DemoFailed(f"{what}: the control API answered {response.status_code}: {detail}")
    body: dict[str, Any] = response.json()
    return body


async def find_or_create_agent(http: httpx.AsyncClient, agent_id: str | None) -> str:
    if agent_id is not None:
        _check(await http.get(f"/v1/agents/{agent_id}"), f"agent {agent_id}")
        return agent_id
    agents = _check(await http.get("/v1/agents", params={"limit": 100}), "listing agents")
    for agent in agents["items"]:
        if agent["name"] == DEMO_AGENT_NAME:
            found: str = agent["id"]
            return found
    if agents["items"]:
        first: str = agents["items"][0]["id"]
        return first
    credential = _check(
        await http.post(
            "/v1/credentials",
            json={"provider": "elevenlabs", "name": "emulator", "api_key": EMULATOR_API_KEY},
        ),
        "storing the emulator's ElevenLabs key",
        201,
    )
    agent = _check(
        await http.post(
            "/v1/agents",
            json={
                "name": DEMO_AGENT_NAME,
                "elevenlabs_agent_id": "agent_relay_demo",
                "credential_id": credential["id"],
                "input_audio_format": CLIENT_FORMAT,
                "output_audio_format": CLIENT_FORMAT,
            },
        ),
        "creating the demo agent",
        201,
    )
    print(f"created credential {credential['id']} and agent {agent['id']} ({DEMO_AGENT_NAME})")
    created: str = agent["id"]
    return created


async def wait_for_call_log(http: httpx.AsyncClient, call_id: str, within: float) -> dict[str, Any]:
    """The call's log once the relay's `ended` event has reached it."""
    deadline = time.monotonic() + within
    while True:
        call = _check(await http.get(f"/v1/calls/{call_id}"), "reading the call log")
        if call["status"] in ("ended", "failed"):
            return call
        if time.monotonic() > deadline:
            raise DemoFailed(
                f"the call log still says {call['status']!r} after {within:g} s "
                "(is the control API's call-log consumer running?)"
            )
        await asyncio.sleep(0.25)


# --- Audio ------------------------------------------------------------------------------------


def speech_like(seconds: float) -> bytes:
    """PCM16 16 kHz: a 150 Hz voice with two harmonics, its loudness rising and falling four
    times a second like syllables."""
    count = int(seconds * SAMPLE_RATE)
    samples = []
    for i in range(count):
        t = i / SAMPLE_RATE
        voice = (
            math.sin(2 * math.pi * 150 * t)
            + 0.5 * math.sin(2 * math.pi * 300 * t)
            + 0.25 * math.sin(2 * math.pi * 450 * t)
        )
        envelope = 0.6 + 0.4 * math.sin(2 * math.pi * 4 * t)
        samples.append(int(5000 * envelope * voice))
    return struct.pack(f"<{count}h", *samples)


def frames(audio: bytes) -> list[bytes]:
    size = SAMPLE_RATE * FRAME_MS // 1000 * 2
    return [audio[i : i + size] for i in range(0, len(audio), size)]


# --- The call ---------------------------------------------------------------------------------


@dataclass
class CallEvents:
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    agent_spoke: asyncio.Event = field(default_factory=asyncio.Event)
    replies: int = 0
    audio_bytes: int = 0
    audio_chunks: int = 0
    ended_with: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


def _http_url(url: str) -> str:
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, *parts[1:]))


def _client(events: CallEvents) -> Any:
    sio = socketio.AsyncClient(reconnection=False, handle_sigint=False)

    async def on_ready(data: dict[str, Any]) -> None:
        print(
            f"← call.ready: conversation {data.get('conversation_id')}, "
            f"input {data.get('input_format')}, output {data.get('output_format')}"
        )
        events.ready.set()

    async def on_audio(data: Any) -> None:
        if isinstance(data, bytes | bytearray):
            events.audio_bytes += len(data)
            events.audio_chunks += 1

    async def on_user_transcript(data: dict[str, Any]) -> None:
        print(f"← user_transcript: {data.get('text')}")

    async def on_agent_response(data: dict[str, Any]) -> None:
        events.replies += 1
        print(f"← agent_response: {data.get('text')}")
        events.agent_spoke.set()

    async def on_interruption(data: Any = None) -> None:
        print("← interruption")

    async def on_ended(data: dict[str, Any]) -> None:
        events.ended_with = data
        print(f"← call.ended: reason {data.get('reason')}, code {data.get('code')}")
        events.ended.set()

    async def on_error(data: dict[str, Any]) -> None:
        events.error = data
        print(f"← error: {data.get('code')}: {data.get('message')}")

    async def on_disconnect(*args: Any) -> None:
        events.ended.set()

    for event, handler in (
        ("call.ready", on_ready),
        ("audio", on_audio),
        ("user_transcript", on_user_transcript),
        ("agent_response", on_agent_response),
        ("interruption", on_interruption),
        ("call.ended", on_ended),
        ("error", on_error),
        ("disconnect", on_disconnect),
    ):
        sio.on(event, handler)
    return sio


def _audio(events: CallEvents) -> str:
    seconds = events.audio_bytes / (SAMPLE_RATE * 2)
    return f"{events.audio_bytes} bytes in {events.audio_chunks} chunks, {seconds:.2f} s"


async def _speak(sio: Any, audio: bytes, events: CallEvents) -> None:
    """Send ``audio`` in real time, 20 ms per frame, as a microphone would."""
    period = FRAME_MS / 1000
    next_at = time.monotonic()
    for frame in frames(audio):
        if events.ended.is_set():
            return
        await sio.emit("audio", frame)
        next_at += period
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def _keep_quiet(sio: Any, events: CallEvents) -> None:
    """Silence until cancelled: it ends the caller's turn, and a live microphone never stops."""
    second_of_silence = bytes(SAMPLE_RATE * 2)
    while not events.ended.is_set():
        await _speak(sio, second_of_silence, events)


async def _wait(event: asyncio.Event, within: float, what: str) -> None:
    try:
        await asyncio.wait_for(event.wait(), within)
    except TimeoutError:
        raise DemoFailed(f"no {what} within {within:g} s") from None


async def talk(relay_url: str, token: str, within: float) -> CallEvents:
    events = CallEvents()
    sio = _client(events)
    try:
        await sio.connect(
            _http_url(relay_url), transports=["websocket"], auth={"token": token}, wait_timeout=10
        )
    except socketio.exceptions.ConnectionError as exc:
        raise DemoFailed(f"the relay refused the connection: {exc}") from None
    listening: asyncio.Task[None] | None = None
    try:
        await _wait(events.ready, within, "call.ready from the relay")
        print("→ audio: 1.5 s of speech-like sound, then silence while the agent answers")
        await _speak(sio, speech_like(1.5), events)
        listening = asyncio.create_task(_keep_quiet(sio, events))
        await _wait(events.agent_spoke, within, "answer from the agent")
        await asyncio.sleep(2.0)  # the echo lasts as long as we spoke; talking over it interrupts
        print(f"← audio: {_audio(events)} so far")
        print(f"→ user_message: {USER_MESSAGE}")
        replies = events.replies
        events.agent_spoke.clear()
        await sio.emit("user_message", {"text": USER_MESSAGE})
        while events.replies == replies:
            await _wait(events.agent_spoke, within, "answer to the user_message")
        await asyncio.sleep(1.5)
        listening.cancel()
        print(f"← audio: {_audio(events)} in all")
        print("→ call.end")
        await sio.emit("call.end")
        await _wait(events.ended, within, "call.ended after call.end")
    finally:
        if listening is not None:
            listening.cancel()
        await sio.disconnect()
    if events.error is not None and events.ended_with is None:
        raise DemoFailed(f"the relay reported an error: {events.error}")
    return events


def describe_call(call: dict[str, Any]) -> list[str]:
    usage = call.get("usage") or {}
    duration = call.get("duration_ms")
    lines = [
        f"call log: {call['status']}, "
        + (f"{duration / 1000:.1f} s" if duration is not None else "no duration")
        + f", ended by {call.get('ended_by')} ({call.get('end_reason')}, {call.get('end_code')})",
        f"  conversation ids: {', '.join(call.get('conversation_ids') or []) or 'none'}",
        f"  usage: caller audio {usage.get('audio_in_seconds', 0):.2f} s"
        f" ({usage.get('frames_in', 0)} frames, {usage.get('bytes_in', 0)} bytes),"
        f" agent audio {usage.get('audio_out_seconds', 0):.2f} s"
        f" ({usage.get('frames_out', 0)} frames, {usage.get('bytes_out', 0)} bytes)",
    ]
    for line in call.get("transcript") or []:
        lines.append(f"  {line['role']:>5}: {line['text']}")
    return lines


async def run_demo(
    api_url: str, api_key: str, agent_id: str | None, within: float
) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=15) as http:
        try:
            await http.get("/ready")
        except httpx.TransportError:
            raise DemoFailed(f"no control API at {api_url}: is `make run` running?") from None
        agent = await find_or_create_agent(http, agent_id)
        call = _check(
            await http.post(
                "/v1/calls",
                json={
                    "agent_id": agent,
                    "client_audio_format": CLIENT_FORMAT,
                    "metadata": {"source": "relay.demo"},
                },
            ),
            "creating the call",
            201,
        )
        print(f"call {call['call_id']} created; connecting to the relay at {call['relay_url']}")
        events = await talk(call["relay_url"], call["token"], within)
        if events.audio_bytes == 0:
            raise DemoFailed("the call ended without any agent audio reaching us")
        logged = await wait_for_call_log(http, call["call_id"], within)
        for line in describe_call(logged):
            print(line)
        if logged["status"] != "ended":
            raise DemoFailed(f"the call log says the call {logged['status']}")
        return logged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relay.demo", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--api-url", help="Control API (default: PUBLIC_API_URL of stack.env).")
    parser.add_argument("--api-key", help="A tenant admin API key (default: the demo tenant's).")
    parser.add_argument("--agent-id", help="The agent to call (default: found or created).")
    parser.add_argument(
        "--state-dir", type=Path, default=Path(".voicerelay"), help="`voicerelay up`'s state."
    )
    parser.add_argument(
        "--timeout", type=float, default=20.0, help="Seconds to wait for each step."
    )
    args = parser.parse_args(argv)
    from voicerelay.serving import run

    try:
        api_url, api_key = resolve_target(args.api_url, args.api_key, args.state_dir)
        run(run_demo(api_url, api_key, args.agent_id, args.timeout))
    except DemoFailed as exc:
        print(f"relay.demo failed: {exc}", file=sys.stderr)
        return 1
    print("relay.demo: the call completed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
