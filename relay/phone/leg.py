"""PhoneLeg: a phone call's caller, as the bridge sees it (``relay.bridge.PhoneLink``).

One per Twilio Media Streams connection, owning the writing side of the socket:

* **Agent audio** (μ-law 8 kHz) is queued and written by one task: each chunk as a ``media``
  frame followed by a ``mark`` (mark accounting: relay.protocol.twilio.PlaybackTracker). A μ-law
  agent's base64 goes out exactly as the agent sent it. The queue is bounded like a Socket.IO
  client's outbox (oldest dropped and counted) for a Twilio side that stops reading.
* **Barge-in**: ``interrupt`` drops the queued audio and puts ``clear`` first in line, so at most
  the one frame already being written precedes it; the bridge's protocol drops stale audio by
  event id, so nothing from before the interruption follows.
* **Caller audio before the agent is ready** is held (``RELAY_PHONE_PREBUFFER_MS``, oldest
  dropped and counted; key presses are kept) and delivered in order by ``ready``: until the
  buffer is empty, newer frames queue behind it.
* **Key presses** (DTMF) go to the bridge (agent ``user_message`` and a ``dtmf`` event).
* **Client tools**: the transfer tool (``TWILIO_TRANSFER_TOOL_NAME``) asks the control API to
  transfer the call and answers the agent; any other client tool is answered with an error at
  once, since a phone call has no app to run it and the agent would wait for nothing.
* **The end**: when the agent ended the call, queued audio is written and given time to play
  (until its last mark is echoed, bounded) so the caller hears the goodbye; then the socket
  closes with a code from relay.phone.closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

from relay import metrics
from relay.phone.closes import NORMAL_CLOSE
from relay.phone.control import PhoneControl
from relay.protocol import client as wire
from relay.protocol.close_codes import CALLER_HANGUP, TRANSFERRED, CallEnd
from relay.protocol.elevenlabs import ClientToolCall
from relay.protocol.twilio import MULAW_BYTES_PER_MS, PlaybackTracker, TwilioStreamProtocol

if TYPE_CHECKING:
    from relay.bridge import CallBridge

log = logging.getLogger(__name__)

# How long the end of an agent-ended call waits, at most, for queued audio to play out.
MAX_PLAYOUT_WAIT_SECONDS: Final = 15.0
# Beyond the audio's own duration, for the network and Twilio's jitter buffer.
PLAYOUT_MARGIN_SECONDS: Final = 1.0
# Key presses held while the agent is not ready yet.
MAX_BUFFERED_DIGITS: Final = 32

_CLEAR: Final = object()


Send = Callable[[str], Awaitable[None]]
Close = Callable[[int, str], Awaitable[None]]


class PhoneLeg:
    def __init__(
        self,
        *,
        protocol: TwilioStreamProtocol,
        send: Send,
        close: Close,
        control: PhoneControl,
        token: str,
        transfer_tool: str,
        prebuffer_ms: int,
        max_queued_chunks: int,
    ) -> None:
        self._protocol = protocol
        self._send = send
        self._close = close
        self._control = control
        self._token = token
        self._transfer_tool = transfer_tool
        self._max_queued = max_queued_chunks
        self.bridge: CallBridge | None = None
        self.tracker = PlaybackTracker()
        # Outgoing: (frame, audio bytes, received_at) or _CLEAR.
        self._queue: deque[tuple[str, int, float] | object] = deque()
        self._queued_audio = 0
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self.peer_gone = False
        # A protocol error sets its own; otherwise 1000 with the call's end reason.
        self.close_code, self.close_reason = NORMAL_CLOSE, ""
        # Before the agent is ready: (audio, base64) chunks and key presses, in arrival order.
        self._buffering = True
        self._buffer: deque[tuple[bytes, str] | str] = deque()
        self._buffer_bytes = 0
        self._buffer_limit = prebuffer_ms * MULAW_BYTES_PER_MS
        self._buffered_digits = 0
        self.dtmf_digits = 0
        self._played_out = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._transfer: asyncio.Task[None] | None = None

    def attach(self, bridge: CallBridge) -> None:
        """Become ``bridge``'s caller (``relay.placement.Prepare``: before the bridge starts)."""
        self.bridge = bridge
        bridge.attach_phone(self)
        self._writer = asyncio.create_task(self._write(), name=f"call-{bridge.call_id}-phone")

    def discard(self) -> None:
        """Placement failed after ``attach``: stop the writer without ending any call."""
        if self._writer is not None:
            self._writer.cancel()

    @property
    def call_id(self) -> str:
        return str(self.bridge.call_id) if self.bridge is not None else ""

    # --- from the phone ------------------------------------------------------------------------
    async def caller_audio(self, audio: bytes, encoded: str) -> None:
        if self._buffering:
            self._hold(audio, encoded)
        elif self.bridge is not None:
            await self.bridge.phone_audio(audio, encoded)

    def _hold(self, audio: bytes, encoded: str) -> None:
        self._buffer.append((audio, encoded))
        self._buffer_bytes += len(audio)
        dropped = 0
        while self._buffer_bytes > self._buffer_limit:
            dropped += self._drop_oldest_audio()
        if dropped:
            metrics.PHONE_PREBUFFER_DROPPED.inc(dropped)

    def _drop_oldest_audio(self) -> int:
        for index, item in enumerate(self._buffer):
            if isinstance(item, tuple):
                del self._buffer[index]
                self._buffer_bytes -= len(item[0])
                return 1
        self._buffer_bytes = 0  # pragma: no cover - bytes counted means audio is there
        return 0

    async def dtmf(self, digit: str) -> None:
        self.dtmf_digits += 1
        if self._buffering:
            if self._buffered_digits < MAX_BUFFERED_DIGITS:
                self._buffer.append(digit)
                self._buffered_digits += 1
            return
        if self.bridge is not None:
            await self.bridge.dtmf(digit)

    def mark_echoed(self, name: str) -> None:
        self.tracker.echoed(name)
        if self.tracker.pending_ms == 0:
            self._played_out.set()

    def hung_up(self) -> None:
        """Twilio said ``stop`` or the socket closed: the caller is gone."""
        self.peer_gone = True
        self._wakeup.set()
        self._played_out.set()  # nobody is listening any more: stop waiting for play-out
        if self._transfer is not None and not self._transfer.done():
            return  # a transfer in flight moves the call away: its outcome says how it ended
        if self.bridge is not None:
            self.bridge.end(CALLER_HANGUP)

    def protocol_error(self, code: str, close_code: int) -> None:
        """The Twilio side broke the protocol: end the call and close with ``close_code``."""
        self.close_code, self.close_reason = close_code, code
        if self.bridge is not None:
            self.bridge.end(CallEnd("phone_protocol_error", code, "caller", True))

    # --- bridge.PhoneLink ----------------------------------------------------------------------
    async def ready(self) -> None:
        bridge = self.bridge
        assert bridge is not None
        buffer = self._buffer
        # Frames arriving meanwhile are appended behind these (still buffering), so order holds.
        while buffer:
            item = buffer.popleft()
            if isinstance(item, str):
                await bridge.dtmf(item)
            else:
                self._buffer_bytes -= len(item[0])
                await bridge.phone_audio(*item)
        self._buffering = False
        self._buffer_bytes = 0

    def play(self, audio: bytes, encoded: str, received_at: float) -> None:
        if self._closing:
            return
        protocol = self._protocol
        if encoded and _canonical_base64(encoded, len(audio)):
            frame = protocol.media_encoded(encoded)
        else:
            frame = protocol.media(audio)
        if self._queued_audio >= self._max_queued:
            self._drop_oldest_queued()
        self._queue.append((frame, len(audio), received_at))
        self._queued_audio += 1
        self._wakeup.set()

    def _drop_oldest_queued(self) -> None:
        for index, item in enumerate(self._queue):
            if isinstance(item, tuple):
                del self._queue[index]
                self._queued_audio -= 1
                self.tracker.discarded(item[1])
                metrics.CLIENT_QUEUE_DROPPED.inc()
                return

    def interrupt(self) -> None:
        dropped = 0
        for item in self._queue:
            if isinstance(item, tuple):
                self.tracker.discarded(item[1])
                dropped += 1
        self._queue.clear()
        self._queued_audio = 0
        if dropped:
            metrics.STALE_AUDIO_DROPPED.inc(dropped)
        self._queue.append(_CLEAR)
        self._wakeup.set()

    def tool_call(self, event: ClientToolCall) -> None:
        if event.tool_name != self._transfer_tool:
            self._spawn(self._answer(event, "This tool is not available on a phone call.", True))
        elif self._transfer is None:
            self._transfer = self._spawn(self._transfer_call(event))
        else:
            self._spawn(self._answer(event, "A transfer is already in progress.", True))

    def report(self) -> dict[str, int]:
        return {**self.tracker.report().fields(), "dtmf_digits": self.dtmf_digits}

    async def finish(self, how: CallEnd) -> None:
        self._closing = True
        self._buffer.clear()
        writer = self._writer
        if how.ended_by == "agent" and how is not TRANSFERRED and not self.peer_gone:
            await self._play_out(writer)
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        for task in list(self._tasks):
            if task is not asyncio.current_task() and task is not self._transfer:
                task.cancel()
        if not self.close_reason:
            self.close_reason = how.reason
        await self.close()

    async def _play_out(self, writer: asyncio.Task[None] | None) -> None:
        """Write what is queued and wait (bounded) until Twilio has played it."""
        self._wakeup.set()
        deadline = time.monotonic() + MAX_PLAYOUT_WAIT_SECONDS
        if writer is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(writer), MAX_PLAYOUT_WAIT_SECONDS)
        pending = self.tracker.pending_ms / 1000
        if pending <= 0 or self.peer_gone:
            return
        wait = min(pending + PLAYOUT_MARGIN_SECONDS, deadline - time.monotonic())
        self._played_out.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._played_out.wait(), max(0.0, wait))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self._close(self.close_code, self.close_reason)

    # --- writing -------------------------------------------------------------------------------
    async def _write(self) -> None:
        """The only writer to the socket while the call lives."""
        queue, tracker, protocol = self._queue, self.tracker, self._protocol
        while True:
            while not queue:
                if self._closing or self.peer_gone:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.peer_gone:
                return
            item = queue.popleft()
            try:
                if item is _CLEAR:
                    await self._send(protocol.clear())
                    # After the send: an echo that arrived before it was a real playback.
                    tracker.cleared()
                    continue
                assert isinstance(item, tuple)
                frame, nbytes, received_at = item
                self._queued_audio -= 1
                await self._send(frame)
                tracker.sent(nbytes)
                metrics.ADDED_LATENCY_SECONDS.observe(time.monotonic() - received_at)
                name = tracker.mark()
                if name is not None:
                    await self._send(protocol.mark(name))
            except Exception:
                # The socket is gone; the reader sees the close and ends the call.
                self.peer_gone = True
                return

    # --- tools ---------------------------------------------------------------------------------
    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _answer(self, event: ClientToolCall, result: str, is_error: bool) -> None:
        if self.bridge is None or self.bridge.ended:
            return
        answer = wire.ClientToolResult(event.tool_call_id, result, is_error)
        await self.bridge.caller_command(answer)

    async def _transfer_call(self, event: ClientToolCall) -> None:
        bridge = self.bridge
        assert bridge is not None
        to = event.parameters.get("phone_number")
        if not isinstance(to, str) or not to.strip():
            await self._answer(event, "A phone_number parameter is required.", True)
            self._transfer = None
            return
        result = await self._control.transfer(self._token, to.strip(), call_id=self.call_id)
        if result.ok:
            log.info("phone call transferred", extra={"call_id": self.call_id})
            await self._answer(event, result.message, False)
            bridge.end(TRANSFERRED)
            return
        self._transfer = None
        await self._answer(event, result.message, True)
        if self.peer_gone:
            bridge.end(CALLER_HANGUP)

    async def hang_up_if_needed(self) -> None:
        """After the call ended here: ask the control API to hang the phone call up, unless the
        caller hung up or the call was transferred (it goes on elsewhere)."""
        bridge = self.bridge
        how = bridge.how_ended if bridge is not None else None
        if how is None or how.ended_by == "caller" or how is TRANSFERRED:
            return
        await self._control.hangup(self._token, call_id=self.call_id)


def _canonical_base64(encoded: str, nbytes: int) -> bool:
    """Whether the agent's base64 (already decoded, leniently, to ``nbytes``) can be sent on as
    is: it must hold nothing but base64, or it could break the JSON frame around it. Lenient
    decoding skips foreign characters but needs every data and padding character of the
    canonical form, so a string of exactly the canonical length has no room for any other.
    O(1), where scanning the string would cost as much as encoding the audio again."""
    return len(encoded) == 4 * ((nbytes + 2) // 3)
