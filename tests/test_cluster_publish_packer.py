"""PublishPacker writes what redis-py would for the same PUBLISH commands (sans-I/O)."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection

from relay.cluster.pubsub import PublishPacker


@pytest.mark.parametrize("command", ["PUBLISH", "SPUBLISH"])
def test_batch_matches_redis_py(command: str) -> None:
    batch = [
        (b"vr:room:call:1", b"VR\x01\x01" + bytes(range(256)) * 3),
        (b"vr:owner:1", b""),
        (b"vr:room:call:1", b"\r\n$3\r\n"),  # payload bytes are never interpreted
        (b"\xff-binary-channel", b"x"),
    ]
    packer = PublishPacker(command)
    expected = b"".join(
        b"".join(Connection().pack_command(command, channel, message)) for channel, message in batch
    )
    assert packer.pack(batch) == expected
    assert packer.pack(batch) == expected  # channel prefixes from the cache


def test_channel_cache_is_bounded() -> None:
    packer = PublishPacker("PUBLISH")
    for i in range(PublishPacker.MAX_CHANNELS + 10):
        packer.pack([(b"c%d" % i, b"m")])
    assert len(packer._channels) <= PublishPacker.MAX_CHANNELS
