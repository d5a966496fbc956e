"""One call's ordered queue of server-to-client emits, bounded in audio.

Everything the relay sends to a call's participants goes through one outbox drained by one task,
so emits never interleave (a binary emit is two Engine.IO packets) and events keep their order.
Audio is the only thing that can pile up: past ``max_audio`` queued chunks the oldest is dropped,
so a client that cannot keep up costs a bounded amount of memory and never slows other calls.
An interruption drops every queued audio chunk at once (``drop_audio``), including one the pump
is holding while it waits for a slow client (the generation check).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Outgoing:
    event: str
    data: Any
    room: str
    audio: bool = False
    # monotonic time the source frame reached the relay (audio only), for the latency metric
    received_at: float = 0.0
    generation: int = 0


class Outbox:
    def __init__(self, max_audio: int) -> None:
        if max_audio < 1:
            raise ValueError("max_audio must be at least 1")
        self._items: deque[Outgoing] = deque()
        self._max_audio = max_audio
        self._audio = 0
        self._wakeup = asyncio.Event()
        self._closed = False
        self.generation = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: Outgoing) -> int:
        """Queue ``item``; returns how many old audio chunks were dropped to make room."""
        if self._closed:
            return 0
        dropped = 0
        if item.audio:
            item.generation = self.generation
            if self._audio >= self._max_audio:
                dropped = self._drop_oldest_audio()
            self._audio += 1
        self._items.append(item)
        self._wakeup.set()
        return dropped

    def drop_audio(self) -> int:
        """Forget every queued audio chunk (after an interruption); returns how many."""
        self.generation += 1
        if not self._audio:
            return 0
        dropped = self._audio
        self._items = deque(item for item in self._items if not item.audio)
        self._audio = 0
        return dropped

    def is_current(self, item: Outgoing) -> bool:
        """False for audio queued before the latest ``drop_audio``."""
        return not item.audio or item.generation == self.generation

    def close(self) -> None:
        """No more items are accepted; ``get`` returns what is queued, then None."""
        self._closed = True
        self._wakeup.set()

    async def get(self) -> Outgoing | None:
        while not self._items:
            if self._closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        item = self._items.popleft()
        if item.audio:
            self._audio -= 1
        return item

    def _drop_oldest_audio(self) -> int:
        for index, queued in enumerate(self._items):
            if queued.audio:
                del self._items[index]
                self._audio -= 1
                return 1
        return 0  # pragma: no cover - _audio > 0 means an audio item exists
