"""The Twilio Media Streams client emulator: its sans-I/O core (message shapes, playback clock,
server message checks) without sockets, and the WebSocket client against a tiny local server
that acts as a Media Streams endpoint. Nothing here asserts on timing."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from voicerelay.emulators.twilio_media import (
    FRAME_BYTES,
    InvalidServerMessage,
    MediaStreamsCaller,
    PlaybackClock,
    ServerClear,
    ServerMark,
    ServerMedia,
    StreamMessages,
    frames,
    parse_server_message,
)

# --- Messages Twilio sends ----------------------------------------------------------------------


def test_start_has_twilios_exact_shape() -> None:
    messages = StreamMessages(stream_sid="MZ1", call_sid="CA1", account_sid="AC1")
    assert messages.connected() == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert messages.start({"token": "t"}) == {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": "AC1",
            "streamSid": "MZ1",
            "callSid": "CA1",
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {"token": "t"},
        },
        "streamSid": "MZ1",
    }


def test_media_numbers_are_strings_counting_chunks_and_stream_milliseconds() -> None:
    messages = StreamMessages(stream_sid="MZ1")
    messages.start({})
    first, second = messages.media(b"\x01" * 160), messages.media(b"\x02" * 160)
    assert first == {
        "event": "media",
        "sequenceNumber": "2",
        "media": {
            "track": "inbound",
            "chunk": "1",
            "timestamp": "0",
            "payload": base64.b64encode(b"\x01" * 160).decode(),
        },
        "streamSid": "MZ1",
    }
    assert (second["sequenceNumber"], second["media"]["chunk"]) == ("3", "2")
    assert second["media"]["timestamp"] == "20"
    assert messages.media_bytes == 320


def test_dtmf_mark_and_stop_shapes() -> None:
    messages = StreamMessages(stream_sid="MZ1", call_sid="CA1", account_sid="AC1")
    assert messages.dtmf("5") == {
        "event": "dtmf",
        "streamSid": "MZ1",
        "sequenceNumber": "1",
        "dtmf": {"track": "inbound_track", "digit": "5"},
    }
    assert messages.mark("m1") == {
        "event": "mark",
        "sequenceNumber": "2",
        "streamSid": "MZ1",
        "mark": {"name": "m1"},
    }
    assert messages.stop() == {
        "event": "stop",
        "sequenceNumber": "3",
        "stop": {"accountSid": "AC1", "callSid": "CA1"},
        "streamSid": "MZ1",
    }
    with pytest.raises(ValueError, match="DTMF"):
        messages.dtmf("55")


def test_generated_sids_look_like_twilios() -> None:
    messages = StreamMessages()
    for sid, prefix in (
        (messages.stream_sid, "MZ"),
        (messages.call_sid, "CA"),
        (messages.account_sid, "AC"),
    ):
        assert sid.startswith(prefix)
        assert len(sid) == 34
    assert StreamMessages().stream_sid != messages.stream_sid


def test_frames_are_20_ms_and_the_tail_is_not_padded() -> None:
    audio = bytes(range(256)) * 2
    cut = frames(audio)
    assert [len(f) for f in cut] == [FRAME_BYTES, FRAME_BYTES, FRAME_BYTES, 32]
    assert b"".join(cut) == audio


# --- Messages a server sends Twilio -------------------------------------------------------------


def test_parse_server_messages() -> None:
    payload = base64.b64encode(b"\x7f\x00").decode()
    media = json.dumps({"event": "media", "streamSid": "MZ1", "media": {"payload": payload}})
    mark = json.dumps({"event": "mark", "streamSid": "MZ1", "mark": {"name": "a"}})
    clear = json.dumps({"event": "clear", "streamSid": "MZ1"})
    assert parse_server_message(media, "MZ1") == ServerMedia(b"\x7f\x00")
    assert parse_server_message(mark, "MZ1") == ServerMark("a")
    assert parse_server_message(clear, "MZ1") == ServerClear()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x00", "binary"),
        ("{", "not JSON"),
        ("[]", "not a JSON object"),
        ('{"event":"clear","streamSid":"MZ2"}', "streamSid"),
        ('{"event":"clear"}', "streamSid"),
        ('{"event":"media","streamSid":"MZ1","media":{}}', "payload"),
        ('{"event":"media","streamSid":"MZ1","media":{"payload":"@@"}}', "base64"),
        ('{"event":"mark","streamSid":"MZ1","mark":{"name":1}}', "mark.name"),
        ('{"event":"hello","streamSid":"MZ1"}', "unknown event"),
    ],
)
def test_parse_rejects_what_twilio_would_not_accept(raw: str | bytes, reason: str) -> None:
    parsed = parse_server_message(raw, "MZ1")
    assert isinstance(parsed, InvalidServerMessage)
    assert reason in parsed.reason


# --- Playback -----------------------------------------------------------------------------------


def test_a_mark_is_due_when_the_audio_before_it_has_played() -> None:
    clock = PlaybackClock()
    clock.audio(8000, now=10.0)  # one second
    clock.mark("one", now=10.0)
    clock.audio(4000, now=10.2)  # queued behind the first second
    clock.mark("two", now=10.2)
    assert clock.due(10.99) == []
    assert clock.next_due() == pytest.approx(11.0)
    assert clock.due(11.0) == ["one"]
    assert clock.due(11.49) == []
    assert clock.due(11.5) == ["two"]
    assert clock.next_due() is None
    assert clock.played_bytes(20.0) == 12000


def test_a_mark_after_played_audio_is_due_at_once() -> None:
    clock = PlaybackClock()
    clock.audio(160, now=1.0)
    clock.mark("late", now=5.0)
    assert clock.due(5.0) == ["late"]
    clock.mark("no audio at all", now=6.0)
    assert clock.due(6.0) == ["no audio at all"]


def test_clear_echoes_every_pending_mark_and_drops_unplayed_audio() -> None:
    clock = PlaybackClock()
    clock.audio(8000, now=0.0)
    clock.mark("a", now=0.0)
    clock.audio(8000, now=0.0)
    clock.mark("b", now=0.0)
    cleared = clock.clear(now=0.5)
    assert cleared.marks == ["a", "b"]
    assert cleared.discarded_bytes == 12000
    assert clock.played_bytes(0.5) == 4000
    assert clock.pending_marks == 0
    # New audio after the clear plays at once.
    clock.audio(800, now=0.6)
    clock.mark("c", now=0.6)
    assert clock.due(0.69) == []
    assert clock.due(0.7) == ["c"]
    assert clock.played_bytes(1.0) == 4800


# --- Against a real WebSocket server ------------------------------------------------------------


class TinyStreamServer:
    """A Media Streams endpoint that records what it got and plays a script of replies."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.not_json: list[str | bytes] = []
        self.got_start = asyncio.Event()
        self.got_media = asyncio.Event()
        self.media_bytes = bytearray()
        self.echoed_marks: list[str] = []
        self.connection: ServerConnection | None = None
        self.request_headers: dict[str, str] = {}

    async def handle(self, ws: ServerConnection) -> None:
        self.connection = ws
        assert ws.request is not None
        self.request_headers = dict(ws.request.headers)
        async for raw in ws:
            try:
                message = json.loads(raw)
            except ValueError:
                self.not_json.append(raw)
                continue
            self.received.append(message)
            if message["event"] == "start":
                self.got_start.set()
            elif message["event"] == "media":
                self.media_bytes += base64.b64decode(message["media"]["payload"])
                self.got_media.set()
            elif message["event"] == "mark":
                self.echoed_marks.append(message["mark"]["name"])

    async def send(self, message: dict[str, Any]) -> None:
        assert self.connection is not None
        await self.connection.send(json.dumps(message))


async def until(predicate: Callable[[], bool]) -> None:
    """For the server's side, which the caller's waits do not see."""
    async with asyncio.timeout(10):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.fixture
async def stream_server() -> AsyncIterator[tuple[TinyStreamServer, str]]:
    server = TinyStreamServer()
    async with serve(server.handle, "127.0.0.1", 0, compression=None) as ws_server:
        port = next(iter(ws_server.sockets)).getsockname()[1]
        yield server, f"ws://127.0.0.1:{port}/twilio/stream"


async def test_a_call_against_a_real_socket(stream_server: tuple[TinyStreamServer, str]) -> None:
    server, url = stream_server
    async with MediaStreamsCaller.connect(
        url, custom_parameters={"token": "tok"}, additional_headers={"x-test": "1"}
    ) as caller:
        sid = caller.messages.stream_sid
        await asyncio.wait_for(server.got_start.wait(), 10)
        assert [m["event"] for m in server.received] == ["connected", "start"]
        assert server.received[1]["start"]["customParameters"] == {"token": "tok"}
        assert server.request_headers.get("x-test") == "1"
        assert "sec-websocket-extensions" not in server.request_headers  # compression off

        audio = bytes(range(256)) * 3  # 768 bytes: 4 full frames and a 128-byte tail
        await caller.send_audio(audio)
        await caller.send_dtmf("7")

        # The agent speaks 75 ms, marks it, then 30 s more with a mark: barge-in clears the rest.
        await server.send({"event": "media", "streamSid": sid, "media": {"payload": "AAAA" * 200}})
        await server.send({"event": "mark", "streamSid": sid, "mark": {"name": "first"}})
        second = base64.b64encode(b"\x55" * 240_000).decode()
        await server.send({"event": "media", "streamSid": sid, "media": {"payload": second}})
        await server.send({"event": "mark", "streamSid": sid, "mark": {"name": "second"}})
        await caller.wait_for(lambda: caller.stats.marks_echoed == 1, 10)
        assert caller.stats.echoed_marks == ["first"]
        await server.send({"event": "clear", "streamSid": sid})
        await caller.wait_for(lambda: caller.stats.marks_echoed == 2, 10)
        await server.send({"event": "clear", "streamSid": "MZ-not-this-one"})
        await caller.wait_for(lambda: caller.stats.invalid == 1, 10)

        assert [e.kind for e in caller.events] == [
            "media",
            "mark",
            "media",
            "mark",
            "clear",
            "invalid",
        ]
        assert caller.received_audio() == b"\x00" * 600 + b"\x55" * 240_000
        assert caller.playback.discarded_bytes > 0
        assert caller.first_audio_seconds is not None
        assert caller.first_audio_seconds >= 0
        await caller.stop()
        await caller.wait_closed(10)

    events = [m["event"] for m in server.received]
    assert events == ["connected", "start", *["media"] * 5, "dtmf", "mark", "mark", "stop"]
    assert bytes(server.media_bytes) == audio
    assert server.echoed_marks == ["first", "second"]
    numbers = [int(m["sequenceNumber"]) for m in server.received[1:]]
    assert numbers == list(range(1, len(numbers) + 1))
    assert all(m["streamSid"] == sid for m in server.received[1:])


async def test_without_handshake_nothing_is_sent_and_a_server_close_is_seen(
    stream_server: tuple[TinyStreamServer, str],
) -> None:
    server, url = stream_server
    async with MediaStreamsCaller.connect(url, handshake=False, playback=False) as caller:
        await caller.send_raw("garbage")
        await until(lambda: server.not_json == ["garbage"])
        assert server.connection is not None
        assert server.received == []
        await server.connection.close(4400, "bad stream")
        await caller.wait_closed(10)
        assert (caller.close_code, caller.close_reason) == (4400, "bad stream")
        assert caller.first_audio_seconds is None
