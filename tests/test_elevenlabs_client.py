"""The ElevenLabs signed-URL client against the emulator, and the emulator's signatures."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from click.testing import CliRunner

from control_api.elevenlabs import (
    SIGNED_URL_VALIDITY,
    ElevenLabsAgentNotFound,
    ElevenLabsAuthError,
    ElevenLabsError,
    ElevenLabsUnavailable,
    fetch_signed_url,
    public_conversation_url,
)
from tests.support.servers import serve
from tests.support.services import free_port
from voicerelay.cli import main
from voicerelay.emulators.elevenlabs import (
    EmulatedAgent,
    EmulatorConfig,
    create_emulator_app,
    sign_conversation,
    verify_conversation_signature,
)

KEY = "sk_test_emulator_key_0123456789"


@pytest.fixture(scope="module")
def emulator_config() -> EmulatorConfig:
    return EmulatorConfig(
        api_keys=frozenset({KEY, "sk_second_key"}),
        agents={
            "agent_private": EmulatedAgent(requires_auth=True),
            "agent_ulaw": EmulatedAgent("ulaw_8000", "ulaw_8000", requires_auth=True),
        },
        accept_unknown_agents=False,
    )


@pytest.fixture(scope="module")
async def emulator_url(emulator_config: EmulatorConfig) -> AsyncIterator[str]:
    async with serve(create_emulator_app(emulator_config)) as url:
        yield url


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as http:
        yield http


# --- pure ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        (
            "https://api.elevenlabs.io",
            "wss://api.elevenlabs.io/v1/convai/conversation?agent_id=agent_1",
        ),
        (
            "https://api.eu.residency.elevenlabs.io/",
            "wss://api.eu.residency.elevenlabs.io/v1/convai/conversation?agent_id=agent_1",
        ),
        ("http://127.0.0.1:8070", "ws://127.0.0.1:8070/v1/convai/conversation?agent_id=agent_1"),
        ("http://proxy/el", "ws://proxy/el/v1/convai/conversation?agent_id=agent_1"),
    ],
)
def test_public_conversation_url(base: str, expected: str) -> None:
    assert public_conversation_url(base, "agent_1") == expected


def test_public_conversation_url_encodes_the_agent_id() -> None:
    url = public_conversation_url("https://api.elevenlabs.io", "a&b=c d")
    assert parse_qs(urlsplit(url).query) == {"agent_id": ["a&b=c d"]}
    with pytest.raises(ValueError):
        public_conversation_url("ftp://example.com", "a")


def test_conversation_signatures() -> None:
    config = EmulatorConfig()
    signature = sign_conversation(config, "agent_a", now=1000)
    assert verify_conversation_signature(config, "agent_a", signature, now=1000)
    assert not verify_conversation_signature(config, "agent_b", signature, now=1000)
    assert not verify_conversation_signature(
        config, "agent_a", signature, now=1000 + config.signed_url_ttl_seconds + 1
    )
    expires, nonce, mac = signature.split(".")
    for forged in (
        f"{int(expires) + 999}.{nonce}.{mac}",
        f"{expires}.other.{mac}",
        f"{expires}.{nonce}.{mac[:-2]}xx",
        "",
        "garbage",
    ):
        assert not verify_conversation_signature(config, "agent_a", forged, now=1000)
    # Another emulator process (another secret) does not accept it.
    assert not verify_conversation_signature(EmulatorConfig(), "agent_a", signature, now=1000)


def test_emulated_agent_rejects_unknown_formats() -> None:
    with pytest.raises(ValueError):
        EmulatedAgent(input_format="mp3_44100")


# --- the client against the emulator on a loopback port ------------------------------------------


async def test_signed_url_from_emulator(
    client: httpx.AsyncClient, emulator_url: str, emulator_config: EmulatorConfig
) -> None:
    now = datetime.now(UTC)
    result = await fetch_signed_url(
        client, emulator_url, api_key=KEY, agent_id="agent_private", timeout_seconds=5, now=now
    )
    parts = urlsplit(result.url)
    assert parts.scheme == "ws"
    assert parts.netloc == urlsplit(emulator_url).netloc
    assert parts.path == "/v1/convai/conversation"
    query = parse_qs(parts.query)
    assert query["agent_id"] == ["agent_private"]
    assert verify_conversation_signature(
        emulator_config, "agent_private", query["conversation_signature"][0]
    )
    assert result.expires_at == now + SIGNED_URL_VALIDITY


async def test_underscore_alias_and_second_key(
    client: httpx.AsyncClient, emulator_url: str
) -> None:
    r = await client.get(
        f"{emulator_url}/v1/convai/conversation/get_signed_url",
        params={"agent_id": "agent_ulaw"},
        headers={"xi-api-key": "sk_second_key"},
    )
    assert r.status_code == 200
    assert r.json()["signed_url"].startswith("ws://")


async def test_emulator_errors_look_like_elevenlabs(
    client: httpx.AsyncClient, emulator_url: str
) -> None:
    url = f"{emulator_url}/v1/convai/conversation/get-signed-url"
    r = await client.get(url, params={"agent_id": "agent_private"})
    assert r.status_code == 401
    assert r.json() == {"detail": {"status": "invalid_api_key", "message": "Invalid API key"}}
    r = await client.get(url, params={"agent_id": "agent_private"}, headers={"xi-api-key": "no"})
    assert r.status_code == 401
    r = await client.get(url, headers={"xi-api-key": KEY})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["query", "agent_id"]
    r = await client.get(url, params={"agent_id": "nobody"}, headers={"xi-api-key": KEY})
    assert r.status_code == 404
    assert r.json()["detail"]["status"] == "agent_not_found"


async def test_wrong_key_is_an_auth_error_without_the_key(
    client: httpx.AsyncClient, emulator_url: str
) -> None:
    wrong = "sk_wrong_key_that_must_not_leak_9876"
    with pytest.raises(ElevenLabsAuthError) as caught:
        await fetch_signed_url(
            client, emulator_url, api_key=wrong, agent_id="agent_private", timeout_seconds=5
        )
    assert wrong not in str(caught.value)
    assert caught.value.__cause__ is None


async def test_unknown_agent(client: httpx.AsyncClient, emulator_url: str) -> None:
    with pytest.raises(ElevenLabsAgentNotFound):
        await fetch_signed_url(
            client, emulator_url, api_key=KEY, agent_id="nobody", timeout_seconds=5
        )


async def test_closed_port_is_unavailable(client: httpx.AsyncClient) -> None:
    with pytest.raises(ElevenLabsUnavailable) as caught:
        await fetch_signed_url(
            client,
            f"http://127.0.0.1:{free_port()}",
            api_key=KEY,
            agent_id="agent_private",
            timeout_seconds=5,
        )
    assert not caught.value.timed_out
    assert KEY not in str(caught.value)


@contextlib.asynccontextmanager
async def _silent_server() -> AsyncIterator[str]:
    """Accepts connections and never answers."""
    writers: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_silence_is_a_timeout(client: httpx.AsyncClient) -> None:
    async with _silent_server() as url:
        with pytest.raises(ElevenLabsUnavailable) as caught:
            await fetch_signed_url(
                client, url, api_key=KEY, agent_id="agent_private", timeout_seconds=0.2
            )
    assert caught.value.timed_out


@contextlib.asynccontextmanager
async def _fixed_answer(status: int, body: bytes) -> AsyncIterator[str]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (200, b'{"signed_url": "https://not-a-websocket"}', ElevenLabsError),
        (200, b'{"nothing": 1}', ElevenLabsError),
        (200, b"not json", ElevenLabsError),
        (403, b"{}", ElevenLabsAuthError),
        (429, b"{}", ElevenLabsUnavailable),
        (503, b"{}", ElevenLabsUnavailable),
        (400, b"{}", ElevenLabsError),
    ],
)
async def test_odd_answers(
    client: httpx.AsyncClient, status: int, body: bytes, error: type[Exception]
) -> None:
    async with _fixed_answer(status, body) as url:
        with pytest.raises(error):
            await fetch_signed_url(client, url, api_key=KEY, agent_id="a", timeout_seconds=5)


def test_emulator_command_help() -> None:
    result = CliRunner().invoke(main, ["emulator", "--help"])
    assert result.exit_code == 0
    assert "--api-key" in result.output
    assert "--port" in result.output
