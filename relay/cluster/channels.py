"""Names of the Redis keys and pub/sub channels the replicas share (pure).

All names go through the deployment's key prefix (``Settings.redis_key``), so several
deployments (or test runs) can share one Redis. Keys that belong to one room or call carry a
``{...}`` hash tag so a Redis Cluster keeps each on one slot.

Sids made by ``RelayClientManager`` end in ``.<tag>``, where the tag is a short hash of the
replica id that holds the connection: an emit or disconnect addressed to a sid on another
replica goes straight to that replica's inbox channel, with no sid-to-replica lookup in Redis.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable
from typing import Final

DEFAULT_NAMESPACE: Final = "/"
SID_TAG_LENGTH: Final = 10
_SID_TAG = re.compile(rf"\.([0-9a-f]{{{SID_TAG_LENGTH}}})\Z")

KeyFunction = Callable[[str], str]


def replica_tag(replica_id: str) -> str:
    return hashlib.blake2b(replica_id.encode(), digest_size=SID_TAG_LENGTH // 2).hexdigest()


def tagged_sid(random_id: str, tag: str) -> str:
    return f"{random_id}.{tag}"


def sid_tag(sid: str) -> str | None:
    """The replica tag of a sid made by ``tagged_sid``; None for anything else (room names)."""
    match = _SID_TAG.search(sid)
    return match.group(1) if match else None


def room_name(namespace: str, room: str) -> str:
    """A room's cluster-wide name: the room itself in the default namespace."""
    return room if namespace == DEFAULT_NAMESPACE else f"{namespace}|{room}"


class Channels:
    def __init__(self, key: KeyFunction) -> None:
        self._key = key

    def room(self, namespace: str, room: str) -> str:
        """Emits to a room, and its membership notices."""
        return self._key(f"room:{room_name(namespace, room)}")

    def room_replicas(self, namespace: str, room: str) -> str:
        """SET of replica ids with local members of the room."""
        return self._key(f"room-replicas:{{{room_name(namespace, room)}}}")

    def owner(self, call_id: uuid.UUID | str) -> str:
        """Client -> owner traffic of one call; subscribed by its owner replica only."""
        return self._key(f"owner:{call_id}")

    def inbox(self, tag: str) -> str:
        """Traffic for sids held by one replica (emit to / disconnect / enter or leave a room)."""
        return self._key(f"replica-inbox:{tag}")

    def broadcast(self) -> str:
        """Emits to every client of a namespace (no room); every replica subscribes."""
        return self._key("broadcast")

    def heartbeat(self, replica_id: str) -> str:
        """A live replica's heartbeat key (written by the replica registry, read here)."""
        return self._key(f"replica:{replica_id}")
