"""Bad input never crashes the relay or leaks anything: bad tokens, bad events, garbage frames."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import jwt
import pytest
import socketio
import websockets

from control_api.call_tokens import issue_call_token
from control_api.security.signing import SigningKeyring
from tests.support.relay_stack import (
    ConnectRefused,
    RelayStack,
    call_client,
    pcm_silence,
    pcm_tone,
)
from voicerelay.call_token import CALL_TOKEN_TYP
from voicerelay.emulators.elevenlabs import EmulatedAgent
from voicerelay.settings import Settings


@pytest.fixture
async def live_call(stack: RelayStack, api: httpx.AsyncClient, tenant: Any) -> dict[str, Any]:
    agent = await stack.agent(api, tenant, EmulatedAgent(realtime=False))
    return await stack.call(api, tenant, agent)


async def refused(stack: RelayStack, auth: Any) -> dict[str, Any]:
    """The connect_error payload for a connection with this ``auth``."""
    async with call_client(stack.relay_url) as client:
        with pytest.raises(socketio.exceptions.ConnectionError):
            await client.sio.connect(
                stack.relay_url, transports=["websocket"], auth=auth, wait_timeout=10
            )
        data: dict[str, Any] = client.connect_error
    assert set(data["data"]) == {"code", "message"}
    assert "Traceback" not in str(data)
    return data


def signing(settings: Settings) -> SigningKeyring:
    return SigningKeyring(settings.signing_keyring())


def claims(settings: Settings, call: dict[str, Any], tenant: Any, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": settings.jwt_issuer,
        "aud": settings.relay_token_audience,
        "sub": call["call_id"],
        "tid": str(tenant.tenant_id),
        "role": "caller",
        "jti": uuid.uuid4().hex,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "cnb": now + 60,
    }
    base.update(changes)
    return base


async def test_no_token_is_unauthorized(stack: RelayStack) -> None:
    for auth in (None, {}, {"token": ""}, {"token": 42}, {"token": None}, {"tok": "x"}, ["x"]):
        data = await refused(stack, auth)
        assert data["data"]["code"] == "unauthorized", auth
        assert data["message"] == data["data"]["message"]


async def test_garbage_token_is_unauthorized(stack: RelayStack) -> None:
    for token in ("garbage", "a.b.c", "x" * 5000, "eyJhbGciOiJub25lIn0.e30."):
        async with call_client(stack.relay_url) as client:
            with pytest.raises(ConnectRefused) as refused:
                await client.connect(token)
        assert refused.value.code == "unauthorized", token[:20]


async def test_expired_token_is_unauthorized(
    stack: RelayStack, live_call: dict[str, Any], tenant: Any
) -> None:
    settings = stack.settings
    token = signing(settings).sign(
        claims(
            settings,
            live_call,
            tenant,
            iat=int(time.time()) - 4000,
            nbf=int(time.time()) - 4000,
            cnb=int(time.time()) - 3900,
            exp=int(time.time()) - 60,
        ),
        typ=CALL_TOKEN_TYP,
    )
    async with call_client(stack.relay_url) as client:
        with pytest.raises(ConnectRefused) as refused:
            await client.connect(token)
    assert refused.value.code == "unauthorized"
    assert "expired" in refused.value.data["data"]["message"]


async def test_wrong_audience_is_unauthorized(
    stack: RelayStack, live_call: dict[str, Any], tenant: Any
) -> None:
    settings = stack.settings
    token = signing(settings).sign(
        claims(settings, live_call, tenant, aud=settings.access_token_audience), typ=CALL_TOKEN_TYP
    )
    async with call_client(stack.relay_url) as client:
        with pytest.raises(ConnectRefused) as refused:
            await client.connect(token)
    assert refused.value.code == "unauthorized"
    assert "audience" in refused.value.data["data"]["message"]


async def test_wrong_algorithm_is_unauthorized(
    stack: RelayStack, live_call: dict[str, Any], tenant: Any
) -> None:
    settings = stack.settings
    kid = settings.signing_keyring()[0][0]
    # HS256 keyed with something an attacker might know (the public key's bytes, say).
    token = jwt.encode(
        claims(settings, live_call, tenant),
        "not-a-secret-anyone-should-trust-0123456789",
        algorithm="HS256",
        headers={"kid": kid, "typ": CALL_TOKEN_TYP},
    )
    async with call_client(stack.relay_url) as client:
        with pytest.raises(ConnectRefused) as refused:
            await client.connect(token)
    assert refused.value.code == "unauthorized"
    assert "algorithm" in refused.value.data["data"]["message"]


async def test_first_connection_after_connect_by_is_unauthorized(
    stack: RelayStack, live_call: dict[str, Any], tenant: Any
) -> None:
    settings = stack.settings
    late = issue_call_token(
        signing(settings),
        settings,
        call_id=uuid.UUID(live_call["call_id"]),
        tenant_id=tenant.tenant_id,
        role="caller",
        now=time.time() - settings.call_token_connect_window_seconds - 30,
    )
    async with call_client(stack.relay_url) as client:
        with pytest.raises(ConnectRefused) as refused:
            await client.connect(late.token)
    assert refused.value.code == "unauthorized"


async def test_origin_not_allowed_is_forbidden(
    stack: RelayStack, api: httpx.AsyncClient, tenant: Any
) -> None:
    agent = await stack.agent(
        api, tenant, EmulatedAgent(realtime=False), allowed_origins=["https://app.example.com"]
    )
    call = await stack.call(api, tenant, agent)
    async with call_client(stack.relay_url) as client:
        with pytest.raises(ConnectRefused) as refused:
            await client.connect(call["token"], headers={"Origin": "https://evil.example.com"})
    assert refused.value.code == "forbidden"
    async with call_client(stack.relay_url) as client:
        await client.connect(call["token"], headers={"Origin": "https://app.example.com"})
        await client.wait_for("call.ready")
        await client.emit("call.end")
        await client.wait_for("call.ended")


async def test_bad_client_events_get_errors_and_the_call_goes_on(
    stack: RelayStack, live_call: dict[str, Any]
) -> None:
    max_bytes = stack.settings.relay_max_audio_chunk_bytes
    async with call_client(stack.relay_url, live_call["token"]) as client:
        ready = await client.wait_for("call.ready")
        conversation = stack.conversation(ready["conversation_id"])
        cases: list[tuple[str, Any, str]] = [
            ("audio", bytes(max_bytes + 2), "audio_too_large"),
            ("audio", "not bytes", "audio_not_binary"),
            ("audio", [1, 2, 3], "audio_not_binary"),
            ("audio", {"data": "AAAA"}, "audio_not_binary"),
            ("audio", b"\x00\x01\x02", "invalid_message"),  # half a PCM16 sample
            ("no_such_event", {"x": 1}, "unknown_event"),
            ("user_message", {"text": 12}, "invalid_message"),
            ("user_message", "just a string", "invalid_message"),
            ("user_message", {"text": "x" * 5000}, "invalid_message"),
            ("client_tool_result", {"tool_call_id": 5}, "invalid_message"),
        ]
        for event, data, expected in cases:
            mark = len(client.events)
            await client.emit(event, data)
            error = await client.wait_for("error", after=mark)
            assert error["code"] == expected, (event, data if not isinstance(data, bytes) else "")
            assert set(error) == {"code", "message"}
        assert conversation.audio_bytes_in == 0
        assert conversation.user_messages == []
        # Still a working call.
        voiced = pcm_tone(0.3)
        mark = len(client.events)
        for start in range(0, len(voiced + pcm_silence(0.8)), 640):
            await client.emit("audio", (voiced + pcm_silence(0.8))[start : start + 640])
        await client.wait_for("agent_response", after=mark)
        await client.emit("call.end")
        assert (await client.wait_for("call.ended"))["reason"] == "caller_hangup"


async def test_polling_is_refused_with_websocket_required(stack: RelayStack) -> None:
    async with httpx.AsyncClient(base_url=stack.relay_url) as http:
        for query in ("EIO=4&transport=polling", "EIO=4&transport=websocket", ""):
            r = await http.get(f"/socket.io/?{query}")
            assert r.status_code == 400
            assert r.json()["code"] == "websocket_required"
        r = await http.post("/socket.io/?EIO=4&transport=polling&sid=abc", content=b"40")
        assert r.status_code == 400
        assert r.json()["code"] == "websocket_required"


async def test_garbage_socketio_frames_do_not_hurt_the_relay(
    stack: RelayStack, live_call: dict[str, Any]
) -> None:
    url = stack.relay_url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
    junk: list[str | bytes] = [
        "garbage",
        "",
        "4",
        "42",
        "42[",
        '42["audio"',
        "4{}",
        "9",
        "40{not json",
        '451-["audio",{"_placeholder":true,"num":0}]',
        b"\x00\xff\x10binary before connect",
        "40/nope,",
        '42["call.end"]',
        "1",
    ]
    for frame in junk:
        async with websockets.connect(url, compression=None) as ws:
            opening = await asyncio.wait_for(ws.recv(), 5)
            assert isinstance(opening, str)
            assert opening.startswith("0{")
            await ws.send(frame)
            # The relay answers with a protocol-level refusal or nothing; never a traceback.
            with_answers: list[str | bytes] = []
            try:
                while True:
                    with_answers.append(await asyncio.wait_for(ws.recv(), 0.3))
            except (TimeoutError, websockets.ConnectionClosed):
                pass
            for answer in with_answers:
                text = answer if isinstance(answer, str) else answer.decode("latin-1")
                assert "Traceback" not in text
                assert 'File "' not in text
    # Authenticated junk: after a good connect, malformed event packets.
    async with websockets.connect(url, compression=None) as ws:
        await asyncio.wait_for(ws.recv(), 5)
        await ws.send('40{"token":"' + live_call["token"] + '"}')
        ack = await asyncio.wait_for(ws.recv(), 10)
        assert ack.startswith("40{")
        for frame in ("42[]", "42[1,2]", "42[null]", '42[{"a":1}]', "42{}", b"\x01\x02"):
            await ws.send(frame)
        await asyncio.sleep(0.3)
        await ws.send('42["call.end"]')
        got_end = False
        async with asyncio.timeout(10):
            while not got_end:
                message = await ws.recv()
                if isinstance(message, str) and message == "2":
                    await ws.send("3")  # Engine.IO pong
                got_end = isinstance(message, str) and message.startswith('42["call.ended"')
    async with httpx.AsyncClient(base_url=stack.relay_url) as http:
        assert (await http.get("/health")).status_code == 200
