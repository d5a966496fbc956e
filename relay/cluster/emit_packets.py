"""The Engine.IO packets of a Socket.IO event emit, made once for all its recipients (sans-I/O).

What python-socketio's ``AsyncManager.emit`` sends for an emit without an acknowledgement, with
one shortcut for the per-frame case: an emit whose data is one ``bytes`` argument (an audio
chunk) is a text packet that depends only on the event and the namespace
(``51-["audio",{"_placeholder":true,"num":0}]``) followed by the bytes as a binary packet. That
text packet is encoded once per event and namespace and reused; the bytes are never copied.
"""

from __future__ import annotations

from typing import Any, Final

from engineio import packet as eio_packet
from socketio import packet as sio_packet

# Emitted event names are the server's own, a handful; the bound is only a safety net.
MAX_CACHED_HEADS: Final = 64


class EmitPackets:
    def __init__(self, packet_class: type[sio_packet.Packet] = sio_packet.Packet) -> None:
        self._packet_class = packet_class
        self._heads: dict[tuple[str, str], eio_packet.Packet] = {}

    def encode(self, event: str, data: Any, namespace: str) -> list[eio_packet.Packet]:
        """Packets for ``emit(event, data)``: ``data`` as python-socketio takes it (a tuple is
        several arguments, None none, anything else one)."""
        if type(data) is bytes:
            key = (event, namespace)
            head = self._heads.get(key)
            if head is None:
                if len(self._heads) >= MAX_CACHED_HEADS:
                    self._heads.clear()
                head = self._full(event, [b""], namespace)[0]
                self._heads[key] = head
            return [head, eio_packet.Packet(eio_packet.MESSAGE, data)]
        args = list(data) if isinstance(data, tuple) else [] if data is None else [data]
        return self._full(event, args, namespace)

    def _full(self, event: str, args: list[Any], namespace: str) -> list[eio_packet.Packet]:
        pkt = self._packet_class(sio_packet.EVENT, namespace=namespace, data=[event, *args])
        encoded = pkt.encode()
        parts = encoded if isinstance(encoded, list) else [encoded]
        return [eio_packet.Packet(eio_packet.MESSAGE, part) for part in parts]
