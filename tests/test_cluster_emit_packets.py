"""EmitPackets makes exactly the Engine.IO packets python-socketio's manager would send."""

from __future__ import annotations

from typing import Any

import pytest
from engineio import packet as eio_packet
from socketio import packet as sio_packet

from relay.cluster.emit_packets import MAX_CACHED_HEADS, EmitPackets


def reference(event: str, data: Any, namespace: str) -> list[str | bytes]:
    # What socketio.AsyncManager.emit builds (no callback).
    args = list(data) if isinstance(data, tuple) else [] if data is None else [data]
    encoded = sio_packet.Packet(sio_packet.EVENT, namespace=namespace, data=[event, *args]).encode()
    parts = encoded if isinstance(encoded, list) else [encoded]
    return [eio_packet.Packet(eio_packet.MESSAGE, p).encode() for p in parts]


@pytest.mark.parametrize(
    ("event", "data", "namespace"),
    [
        ("audio", b"\x00\x01" * 320, "/"),
        ("audio", b"", "/"),
        ("audio", b"\xff", "/other"),
        ("call.ready", {"call_id": "c", "resumed": True}, "/"),
        ("interruption", {}, "/"),
        ("many", ("a", 1, None), "/"),
        ("none", None, "/"),
        ("mixed", {"chunk": b"\x01\x02", "n": 1}, "/"),
        ("two-binaries", (b"\x01", b"\x02"), "/"),
        ("bytearray", bytearray(b"\x05"), "/"),
        ('quoted "name"', b"\x00", "/"),
    ],
)
def test_packets_match_python_socketio(event: str, data: Any, namespace: str) -> None:
    packets = EmitPackets()
    for _ in range(2):  # the second time from the cache
        got = [p.encode() for p in packets.encode(event, data, namespace)]
        assert got == reference(event, data, namespace)


def test_audio_is_not_copied_and_its_text_packet_is_reused() -> None:
    packets = EmitPackets()
    chunk = b"\x00" * 640
    first = packets.encode("audio", chunk, "/")
    second = packets.encode("audio", b"\x01" * 640, "/")
    assert first[0] is second[0]
    assert first[1].data is chunk
    assert first[1].binary


def test_the_cache_is_bounded() -> None:
    packets = EmitPackets()
    for i in range(MAX_CACHED_HEADS * 3):
        assert [p.encode() for p in packets.encode(f"e{i}", b"x", "/")] == reference(
            f"e{i}", b"x", "/"
        )
    assert len(packets._heads) <= MAX_CACHED_HEADS
