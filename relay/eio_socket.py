"""Engine.IO's WebSocket loop for the relay: one long-lived read and one long-lived write per
connection, instead of a task and a timer for every packet.

python-engineio's ``AsyncSocket`` reads each packet through ``asyncio.wait_for`` on a new task
(the read deadline, ping interval + ping timeout) and its writer waits for each batch the same
way. On the audio path that is two tasks and two timers per frame each way, and each task step
is another trip round the event loop: measurable CPU per frame, and most of a thinly loaded
replica's cost. Here the read deadline is one timer per connection that re-arms itself only when
it fires (it checks the time of the last packet), and the writer simply waits on its queue (the
reader ends it on close, as before). Everything else (packet handling, close, pings) is
Engine.IO's own.

The relay accepts only the WebSocket transport, so every socket starts here already connected;
a socket upgrading from long-polling (never, with the relay's settings) keeps Engine.IO's loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import socketio
from engineio import async_socket, exceptions, packet


class RelayEngineIOSocket(async_socket.AsyncSocket):  # type: ignore[misc]
    async def _websocket_handler(self, ws: Any) -> Any:
        if self.connected:  # type: ignore[has-type]
            return await super()._websocket_handler(ws)
        self.connected = True
        self.upgraded = True
        server = self.server
        loop = asyncio.get_running_loop()
        writer = asyncio.ensure_future(self._write_until_closed(ws))
        reader = asyncio.current_task()
        assert reader is not None
        deadline = _ReadDeadline(loop, reader, server.ping_interval + server.ping_timeout)
        limit = server.max_http_buffer_size
        try:
            while True:
                deadline.waiting = True
                try:
                    data = await ws.wait()
                except asyncio.CancelledError:
                    if deadline.expired:
                        reader.uncancel()  # our own; a shutdown's, if any, stays counted
                    raise
                except Exception:  # the connection is gone (Engine.IO's loop does the same)
                    break
                finally:
                    deadline.waiting = False
                if data is None or len(data) > limit:
                    break
                deadline.last = loop.time()
                try:
                    await self.receive(packet.Packet(encoded_packet=data))
                except exceptions.UnknownPacketError:
                    pass
                except exceptions.SocketIsClosedError:
                    break
                except Exception:
                    server.logger.exception("Unknown receive error")
        except asyncio.CancelledError:
            # The read deadline, or the server cancelling the connection: either way the
            # connection ends below, as Engine.IO's own loop ends it (it does not re-raise).
            pass
        finally:
            deadline.cancel()
        await self.queue.put(None)  # the writer's end of stream
        await writer
        await self.close(wait=False, abort=True, reason=server.reason.TRANSPORT_CLOSE)

    async def _write_until_closed(self, ws: Any) -> None:
        queue = self.queue
        while True:
            pkt = await queue.get()
            queue.task_done()
            if pkt is None:
                break
            try:
                await ws.send(pkt.encode())
            except Exception:
                break
        await ws.close()


class _ReadDeadline:
    """Cancels ``reader`` once it has waited ``timeout`` seconds for a packet (never while it
    handles one). One timer per connection: it fires at most once per ``timeout`` and re-arms
    from the last read."""

    def __init__(self, loop: asyncio.AbstractEventLoop, reader: asyncio.Task[Any], timeout: float):
        self._loop = loop
        self._reader = reader
        self._timeout = timeout
        self.last = loop.time()
        self.waiting = False
        self.expired = False
        self._handle = loop.call_at(self.last + timeout, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        due = self.last + self._timeout
        if now >= due and self.waiting:
            self.expired = True
            self._reader.cancel()
        else:
            self._handle = self._loop.call_at(
                due if due > now else now + self._timeout, self._check
            )

    def cancel(self) -> None:
        self._handle.cancel()


class RelaySocketIOServer(socketio.AsyncServer):  # type: ignore[misc]
    """python-socketio's server, its Engine.IO sockets running :class:`RelayEngineIOSocket`."""

    async def _handle_eio_connect(self, eio_sid: str, environ: Any) -> Any:
        # Engine.IO has just made the socket and has not started its transport yet. Done here,
        # once per connection, rather than in a hook every packet passes through.
        sock = self.eio.sockets.get(eio_sid)
        if type(sock) is async_socket.AsyncSocket:
            sock.__class__ = RelayEngineIOSocket
        return await super()._handle_eio_connect(eio_sid, environ)
