"""The benchmark's floor: the least a relay can do between a caller and an ElevenLabs agent.

A plain ``websockets`` server. For each caller connection it fetches a signed URL (as voicerelay's
control API does), opens the conversation socket (compression off), sends the initiation
message, waits for the metadata, says ``ready`` to the caller, then only pumps: caller binary
audio -> ``{"user_audio_chunk": base64}``; agent ``audio`` events -> binary to the caller;
``ping`` -> ``pong``. No authentication, limits, transcoding, call logs or metrics: whatever
voicerelay costs beyond this is the price of those.

    python -m loadtests.floor_relay --port 8095 --elevenlabs-url http://127.0.0.1:8070 \\
        --api-key sk_emulator_local_development_key --agent-id agent_bench
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import signal

import httpx
import orjson
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

INITIATION = orjson.dumps(
    {
        "type": "conversation_initiation_client_data",
        "conversation_config_override": {},
        "dynamic_variables": {},
    }
).decode()


class FloorRelay:
    def __init__(self, http: httpx.AsyncClient, elevenlabs_url: str, agent_id: str) -> None:
        self._http = http
        self._signed_url_endpoint = f"{elevenlabs_url}/v1/convai/conversation/get-signed-url"
        self._agent_id = agent_id

    async def _upstream(self) -> ClientConnection:
        answer = await self._http.get(
            self._signed_url_endpoint, params={"agent_id": self._agent_id}
        )
        answer.raise_for_status()
        upstream = await connect(
            answer.json()["signed_url"], compression=None, open_timeout=10, max_size=2**24
        )
        await upstream.send(INITIATION)
        first = orjson.loads(await asyncio.wait_for(upstream.recv(), 10))
        if first.get("type") != "conversation_initiation_metadata":
            await upstream.close()
            raise ConnectionError("the agent did not start the conversation")
        return upstream

    async def handle(self, caller: ServerConnection) -> None:
        try:
            upstream = await self._upstream()
        except Exception:
            await caller.close(1011, "upstream unavailable")
            return
        await caller.send("ready")
        pumps = [
            asyncio.create_task(_caller_to_agent(caller, upstream)),
            asyncio.create_task(_agent_to_caller(upstream, caller)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            await upstream.close()
            await caller.close()


async def _caller_to_agent(caller: ServerConnection, upstream: ClientConnection) -> None:
    with contextlib.suppress(websockets.ConnectionClosed):
        async for message in caller:
            if isinstance(message, bytes):
                await upstream.send(
                    b'{"user_audio_chunk":"' + base64.b64encode(message) + b'"}', text=True
                )


async def _agent_to_caller(upstream: ClientConnection, caller: ServerConnection) -> None:
    with contextlib.suppress(websockets.ConnectionClosed):
        async for message in upstream:
            event = orjson.loads(message)
            kind = event.get("type")
            if kind == "audio":
                await caller.send(base64.b64decode(event["audio_event"]["audio_base_64"]))
            elif kind == "ping":
                pong = {"type": "pong", "event_id": event["ping_event"]["event_id"]}
                await upstream.send(orjson.dumps(pong).decode())


async def serve_floor(
    host: str, port: int, elevenlabs_url: str, api_key: str, agent_id: str
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with httpx.AsyncClient(headers={"xi-api-key": api_key}, timeout=10) as http:
        relay = FloorRelay(http, elevenlabs_url.rstrip("/"), agent_id)
        async with serve(relay.handle, host, port, compression=None, max_size=2**20):
            await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--elevenlabs-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--agent-id", required=True)
    args = parser.parse_args()

    from voicerelay.serving import run

    run(serve_floor(args.host, args.port, args.elevenlabs_url, args.api_key, args.agent_id))


if __name__ == "__main__":
    main()
