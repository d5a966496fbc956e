"""A whole voicerelay on loopback for relay tests: ElevenLabs emulator, control API and relay.

Each is a real uvicorn server inside the test event loop, configured to reach the others the way
production is (base URLs in settings). Tests add emulated agents to ``stack.emulator.agents`` by
id, create control-API agents pointing at them, and talk to the relay with real python-socketio
clients (``CallClient``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from array import array
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import socketio

from control_api.bootstrap import NewTenant
from relay.app import create_app as create_relay_app
from relay.bridge import BridgeOptions
from relay.runtime import RelayOptions
from tests.support.servers import serve
from tests.support.services import free_port
from tests.support.tenants import auth
from voicerelay.emulators.elevenlabs import (
    DEFAULT_API_KEY,
    EmulatedAgent,
    EmulatorConfig,
    create_emulator_app,
)
from voicerelay.emulators.twilio_rest import TwilioRestConfig
from voicerelay.settings import Settings

# Short enough that the vanished-caller test is quick, long enough for a reconnect in tests.
TEST_CALLER_GRACE_SECONDS = 1.5
# How long a call waits for the agent's socket to close after its end_call tool.
TEST_AGENT_END_CALL_CLOSE_SECONDS = 1.0


@dataclass
class RelayStack:
    settings: Settings  # the relay's
    api_url: str
    relay_url: str
    emulator_url: str
    emulator: EmulatorConfig
    emulator_app: Any
    relay_app: Any
    _credentials: dict[uuid.UUID, str] = field(default_factory=dict)

    @property
    def twilio_rest(self) -> TwilioRestConfig:
        """What the emulated Twilio REST API knows and every request it received."""
        config: TwilioRestConfig = self.emulator_app.state.twilio_rest
        return config

    def conversation(self, conversation_id: str) -> Any:
        return self.emulator_app.state.conversations.get(conversation_id)

    async def credential(self, http: httpx.AsyncClient, tenant: NewTenant) -> str:
        if tenant.tenant_id not in self._credentials:
            r = await http.post(
                "/v1/credentials",
                headers=auth(tenant),
                json={"provider": "elevenlabs", "name": "main", "api_key": DEFAULT_API_KEY},
            )
            assert r.status_code == 201, r.text
            self._credentials[tenant.tenant_id] = r.json()["id"]
        return self._credentials[tenant.tenant_id]

    async def agent(
        self,
        http: httpx.AsyncClient,
        tenant: NewTenant,
        emulated: EmulatedAgent | None = None,
        **body: Any,
    ) -> str:
        """An emulated agent and the tenant's control-API agent for it; returns the API id."""
        emulated = emulated or EmulatedAgent()
        el_id = "agent_" + uuid.uuid4().hex[:12]
        self.emulator.agents[el_id] = emulated
        payload: dict[str, Any] = {
            "name": el_id,
            "elevenlabs_agent_id": el_id,
            "input_audio_format": emulated.input_format,
            "output_audio_format": emulated.output_format,
            **body,
        }
        if emulated.requires_auth:
            payload["credential_id"] = await self.credential(http, tenant)
        r = await http.post("/v1/agents", headers=auth(tenant), json=payload)
        assert r.status_code == 201, r.text
        agent_id: str = r.json()["id"]
        return agent_id

    async def call(
        self, http: httpx.AsyncClient, tenant: NewTenant, agent_id: str, **body: Any
    ) -> dict[str, Any]:
        r = await http.post("/v1/calls", headers=auth(tenant), json={"agent_id": agent_id, **body})
        assert r.status_code == 201, r.text
        call: dict[str, Any] = r.json()
        return call

    async def monitor_token(
        self, http: httpx.AsyncClient, tenant: NewTenant, call_id: str
    ) -> dict[str, Any]:
        r = await http.post(f"/v1/calls/{call_id}/monitor-token", headers=auth(tenant))
        assert r.status_code == 200, r.text
        token: dict[str, Any] = r.json()
        return token


def stack_settings(base: Settings, **changes: Any) -> Settings:
    return base.model_copy(update=changes)


@contextlib.asynccontextmanager
async def serve_relay(
    settings: Settings, *, options: RelayOptions | None = None, port: int | None = None
) -> AsyncIterator[tuple[str, Any]]:
    options = options or RelayOptions(
        BridgeOptions(
            caller_grace_seconds=TEST_CALLER_GRACE_SECONDS,
            usage_interval_seconds=1.0,
            agent_end_call_close_seconds=TEST_AGENT_END_CALL_CLOSE_SECONDS,
        )
    )
    app = create_relay_app(settings, options)
    async with serve(app, port=port) as url:
        yield url, app


@contextlib.asynccontextmanager
async def relay_stack(
    base: Settings, *, advertise_relay: bool = False
) -> AsyncIterator[RelayStack]:
    """``advertise_relay``: the control API hands out the relay's real address (call tokens'
    ``relay_url``, the voice webhook's ``<Stream url>``), picked before the relay starts.

    The emulator also serves Twilio's REST Calls resource (``RelayStack.twilio_rest``), and the
    control API's TWILIO_API_URL points at it."""
    emulator = EmulatorConfig(accept_unknown_agents=False)
    emulator_app = create_emulator_app(emulator)
    relay_port = free_port() if advertise_relay else None
    async with serve(emulator_app) as emulator_url:
        api_settings = stack_settings(
            base, elevenlabs_api_url=emulator_url, twilio_api_url=emulator_url
        )
        if relay_port is not None:
            api_settings = stack_settings(
                api_settings, relay_public_url=f"ws://127.0.0.1:{relay_port}"
            )
        from control_api.app import create_app as create_api_app

        async with serve(create_api_app(api_settings)) as api_url:
            relay_settings = stack_settings(
                api_settings,
                control_api_internal_url=api_url,
                # Every test client comes from 127.0.0.1: per-IP limits would trip across tests.
                relay_connect_rate_per_minute_per_ip=100_000,
                upstream_connect_timeout_seconds=3.0,
            )
            async with serve_relay(relay_settings, port=relay_port) as (relay_url, relay_app):
                yield RelayStack(
                    settings=relay_settings,
                    api_url=api_url,
                    relay_url=relay_url,
                    emulator_url=emulator_url,
                    emulator=emulator,
                    emulator_app=emulator_app,
                    relay_app=relay_app,
                )


# --- clients ----------------------------------------------------------------------------------


class ConnectRefused(Exception):
    def __init__(self, data: Any) -> None:
        super().__init__(repr(data))
        self.data = data

    @property
    def code(self) -> str | None:
        inner = self.data.get("data") if isinstance(self.data, dict) else None
        return inner.get("code") if isinstance(inner, dict) else None


class CallClient:
    """A python-socketio client that records everything the relay sends it, in order."""

    def __init__(self, relay_url: str, *, reconnection: bool = False) -> None:
        self.url = relay_url
        # reconnection=True: python-socketio's own automatic reconnection (as socket.io-client).
        self.sio = socketio.AsyncClient(reconnection=reconnection, reconnection_delay=0.2)
        self.events: list[tuple[str, Any]] = []
        self._changed = asyncio.Condition()
        self.connect_error: Any = None
        self.disconnected = asyncio.Event()
        self.sio.on("*", self._record)
        self.sio.on("connect_error", self._on_connect_error)
        self.sio.on("disconnect", self._on_disconnect)

    async def _record(self, event: str, *args: Any) -> None:
        async with self._changed:
            self.events.append((event, args[0] if len(args) == 1 else args))
            self._changed.notify_all()

    async def _on_connect_error(self, data: Any) -> None:
        self.connect_error = data

    async def _on_disconnect(self, *args: Any) -> None:
        self.disconnected.set()
        async with self._changed:
            self._changed.notify_all()

    async def connect(self, token: str | None, **kwargs: Any) -> None:
        auth_data = {"token": token} if token is not None else None
        try:
            await self.sio.connect(
                self.url,
                transports=["websocket"],
                auth=auth_data,
                wait_timeout=10,
                **kwargs,
            )
        except socketio.exceptions.ConnectionError:
            raise ConnectRefused(self.connect_error) from None

    async def emit(self, event: str, data: Any = None) -> None:
        if data is None:
            await self.sio.emit(event)
        else:
            await self.sio.emit(event, data)

    async def wait_for(self, name: str, *, timeout: float = 10.0, after: int = 0) -> Any:
        """The first ``name`` event at or after index ``after`` (waiting for it)."""
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for event, data in self.events[after:]:
                    if event == name:
                        return data
                await self._changed.wait()

    def index_of(self, name: str, after: int = 0) -> int:
        for index in range(after, len(self.events)):
            if self.events[index][0] == name:
                return index
        return -1

    def audio(self, after: int = 0, until: int | None = None, name: str = "audio") -> bytes:
        return b"".join(data for event, data in self.events[after:until] if event == name)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.sio.disconnect()


@contextlib.asynccontextmanager
async def call_client(relay_url: str, token: str | None = None) -> AsyncIterator[CallClient]:
    client = CallClient(relay_url)
    try:
        if token is not None:
            await client.connect(token)
        yield client
    finally:
        await client.close()


# --- audio ------------------------------------------------------------------------------------


def pcm_tone(
    seconds: float, *, rate: int = 16000, hz: float = 440.0, amplitude: int = 8000
) -> bytes:
    samples = array(
        "h",
        (
            int(amplitude * math.sin(2 * math.pi * hz * n / rate))
            for n in range(round(seconds * rate))
        ),
    )
    return samples.tobytes()


def pcm_silence(seconds: float, *, rate: int = 16000) -> bytes:
    return bytes(2 * round(seconds * rate))


def pcm_rms(data: bytes) -> float:
    samples = array("h")
    samples.frombytes(data[: len(data) - len(data) % 2])
    if not samples:
        return 0.0
    return math.sqrt(sum(s * s for s in samples) / len(samples))


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def stream(client: CallClient, audio: bytes, *, chunk_bytes: int, pace: float = 0.0) -> None:
    for chunk in chunks(audio, chunk_bytes):
        await client.emit("audio", chunk)
        if pace:
            await asyncio.sleep(pace)
