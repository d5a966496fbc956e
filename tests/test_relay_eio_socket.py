"""relay.eio_socket: Engine.IO's WebSocket loop without a task and a timer per packet, on a real
uvicorn server with real Socket.IO and raw WebSocket clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import socketio
import websockets
from engineio import packet as eio_packet

from relay.eio_socket import RelayEngineIOSocket, RelaySocketIOServer, _ReadDeadline
from tests.support.servers import serve

MAX_PACKET = 4096
GONE_WITHIN = 15.0  # generous: only that a silent client is dropped at all


class EchoServer:
    def __init__(self, *, ping: float = 25.0) -> None:
        self.sio = RelaySocketIOServer(
            async_mode="asgi",
            transports=["websocket"],
            async_handlers=False,
            max_http_buffer_size=MAX_PACKET,
            ping_interval=ping,
            ping_timeout=ping,
        )
        self.disconnected: asyncio.Queue[str] = asyncio.Queue()
        self.sio.on("audio", self._audio)
        self.sio.on("text", self._text)
        self.sio.on("disconnect", self._disconnect)

    async def _audio(self, sid: str, data: bytes) -> None:
        await self.sio.emit("audio", data, to=sid)

    async def _text(self, sid: str, data: Any) -> None:
        await self.sio.emit("text", data, to=sid)

    async def _disconnect(self, sid: str, reason: Any = None) -> None:
        self.disconnected.put_nowait(sid)


@contextlib.asynccontextmanager
async def running(server: EchoServer) -> AsyncIterator[str]:
    async with serve(socketio.ASGIApp(server.sio)) as url:
        yield url


async def test_frames_echo_in_order_and_byte_exact() -> None:
    server = EchoServer()
    async with running(server) as url:
        client = socketio.AsyncClient()
        got: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        client.on("audio", lambda data: got.put_nowait(("audio", data)))
        client.on("text", lambda data: got.put_nowait(("text", data)))
        await client.connect(url, transports=["websocket"])
        try:
            sent: list[tuple[str, Any]] = []
            for i in range(300):
                if i % 5 == 4:
                    item: tuple[str, Any] = ("text", {"n": i})
                else:
                    item = ("audio", bytes([i % 256]) * (320 + i))
                sent.append(item)
                await client.emit(*item)
            received = [await asyncio.wait_for(got.get(), 10) for _ in sent]
            assert received == sent
            sockets = list(server.sio.eio.sockets.values())
            assert sockets
            assert all(type(s) is RelayEngineIOSocket for s in sockets)
        finally:
            await client.disconnect()
        assert await asyncio.wait_for(server.disconnected.get(), 10)


async def _open_raw(url: str) -> websockets.ClientConnection:
    ws_url = url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
    ws = await websockets.connect(ws_url)
    opened = await asyncio.wait_for(ws.recv(), 10)
    assert isinstance(opened, str)
    assert opened.startswith("0")
    await ws.send("40")
    connected = await asyncio.wait_for(ws.recv(), 10)
    assert isinstance(connected, str)
    assert connected.startswith("40")
    return ws


async def _closed(ws: websockets.ClientConnection) -> None:
    """Reads (ignoring the server's pings) until the server closes the connection."""
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            await ws.recv()


async def test_a_silent_client_is_dropped() -> None:
    server = EchoServer(ping=0.3)
    async with running(server) as url:
        ws = await _open_raw(url)
        await asyncio.wait_for(_closed(ws), GONE_WITHIN)
        assert await asyncio.wait_for(server.disconnected.get(), GONE_WITHIN)
        assert not server.sio.eio.sockets


async def test_an_oversized_packet_closes_the_connection() -> None:
    server = EchoServer()
    async with running(server) as url:
        ws = await _open_raw(url)
        await ws.send("42" + json.dumps(["text", "x" * (MAX_PACKET + 1)]))
        await asyncio.wait_for(_closed(ws), 10)
        assert await asyncio.wait_for(server.disconnected.get(), 10)


async def test_a_client_that_closes_is_disconnected() -> None:
    server = EchoServer()
    async with running(server) as url:
        ws = await _open_raw(url)
        await ws.close()
        assert await asyncio.wait_for(server.disconnected.get(), 10)


# --- the read deadline on its own -----------------------------------------------------------


@contextlib.asynccontextmanager
async def deadline_on_a_reader(timeout: float) -> AsyncIterator[tuple[asyncio.Task[Any], Any]]:
    """A reader task that waits forever, under a read deadline of ``timeout``."""
    loop = asyncio.get_running_loop()
    reader = asyncio.create_task(asyncio.Event().wait())
    deadline = _ReadDeadline(loop, reader, timeout)
    try:
        yield reader, deadline
    finally:
        deadline.cancel()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def _cancelled_by(reader: asyncio.Task[Any], deadline: Any) -> None:
    await asyncio.wait([reader], timeout=GONE_WITHIN)
    assert reader.cancelled()
    assert deadline.expired


@pytest.mark.parametrize("waiting", [True, False])
async def test_read_deadline_cancels_only_a_reader_waiting_for_a_packet(waiting: bool) -> None:
    async with deadline_on_a_reader(0.05) as (reader, deadline):
        deadline.waiting = waiting
        if waiting:
            await _cancelled_by(reader, deadline)
            return
        await asyncio.sleep(0.5)  # handling a packet: many deadlines pass
        assert not reader.done()
        assert not deadline.expired
        deadline.waiting = True  # the handler finished its packet and waits again
        await _cancelled_by(reader, deadline)


async def test_read_deadline_rearms_from_the_last_read() -> None:
    loop = asyncio.get_running_loop()
    async with deadline_on_a_reader(2.0) as (reader, deadline):
        deadline.waiting = True
        for _ in range(5):  # reads keep coming: never cancelled
            await asyncio.sleep(0.02)
            deadline.last = loop.time()
        assert not reader.done()
        assert not deadline.expired
        await _cancelled_by(reader, deadline)


# --- the loop's ending, over an in-memory connection ----------------------------------------


class MemoryWebSocket:
    """What Engine.IO's ASGI driver hands the loop (wait/send/close), kept in memory."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.sent: list[str | bytes] = []
        self.closed = asyncio.Event()

    async def wait(self) -> str | bytes | None:
        return await self.incoming.get()

    async def send(self, message: str | bytes) -> None:
        self.sent.append(message)

    async def close(self) -> None:
        self.closed.set()


@pytest.mark.parametrize("how", ["cancelled", "deadline", "client_closed"])
async def test_the_loop_ends_cleanly_however_the_connection_ends(how: str) -> None:
    ping = 0.05 if how == "deadline" else 25.0
    server = RelaySocketIOServer(async_mode="asgi", ping_interval=ping, ping_timeout=ping).eio
    disconnected: list[str] = []

    async def on_disconnect(sid: str, reason: Any) -> None:
        disconnected.append(sid)

    server.on("disconnect", on_disconnect)
    sock = RelayEngineIOSocket(server, "sid-1")
    server.sockets["sid-1"] = sock
    ws = MemoryWebSocket()
    loop_task = asyncio.create_task(sock._websocket_handler(ws))
    received: list[Any] = []
    server.on("message", lambda sid, data: received.append(data))
    await ws.incoming.put("4hello")  # a message from the client, handled in the loop
    await sock.send(eio_packet.Packet(eio_packet.MESSAGE, "hi"))  # and one to it, by the writer
    async with asyncio.timeout(GONE_WITHIN):
        while not (ws.sent and received):
            await asyncio.sleep(0.01)
    assert (ws.sent, received) == (["4hi"], ["hello"])
    if how == "cancelled":
        loop_task.cancel()  # the server shutting the connection down
    elif how == "client_closed":
        await ws.incoming.put(None)
    await asyncio.wait_for(loop_task, GONE_WITHIN)
    # Engine.IO's own loop ends this way too: writer stopped, connection closed, disconnect
    # reported once, and the task ends without re-raising.
    assert not loop_task.cancelled()
    assert ws.closed.is_set()
    assert sock.closed
    assert disconnected == ["sid-1"]
