"""Sentry: off without SENTRY_DSN; with it, errors arrive and carry no secrets.

Each case runs in a child process (sentry_sdk is process-global and must not leak into other
tests). With a DSN, the child sends to a recording HTTP server on 127.0.0.1: a request to a real
Starlette app fails while carrying an Authorization header, an X-Twilio-Signature, a cookie and
a token in its query string, and an exception's message holds a signed URL, a database URL
with its password, a JWT and API keys. Every event must arrive, and no secret may appear in any
byte the server received.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from voicerelay.observability import FILTERED, scrub_event, scrub_text

ROOT = Path(__file__).resolve().parent.parent

SECRETS = {
    "bearer": "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ1c2VyIn0.c2lnbmF0dXJlLXNlY3JldA",
    "twilio_signature": "Zm9yZ2VkLXR3aWxpby1zaWduYXR1cmU9",
    "cookie": "refresh-cookie-secret-4711",
    "query_token": "query-token-secret-0815",
    "signature": "conv-signature-secret-9d1c",
    "db_password": "db-password-secret-77",
    "api_key": "vr_live_" + "k" * 32,
    "elevenlabs_key": "sk_" + "e" * 32,
}

CHILD = r"""
import asyncio, json, logging, os, sys

from voicerelay.observability import init_sentry
from voicerelay.settings import Settings

secrets = json.loads(os.environ["TEST_SECRETS"])
settings = Settings(
    sentry_dsn=os.environ.get("SENTRY_DSN"),
    sentry_environment="test-env",
    sentry_traces_sample_rate=0.0,
)
started = init_sentry(settings, service="relay")
report = {"started": started, "imported": "sentry_sdk" in sys.modules}

import httpx
import sentry_sdk
from starlette.applications import Starlette
from starlette.routing import Route

report["active"] = sentry_sdk.get_client().is_active()
if started:
    async def boom(request):
        raise RuntimeError("handler failed")

    app = Starlette(routes=[Route("/boom", boom)])

    async def request():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://relay") as client:
            await client.get(
                "/boom",
                params={"token": secrets["query_token"], "agent": "a1"},
                headers={
                    "Authorization": "Bearer " + secrets["bearer"],
                    "X-Twilio-Signature": secrets["twilio_signature"],
                    "Cookie": "vr_refresh=" + secrets["cookie"],
                },
            )

    asyncio.run(request())
    try:
        raise ValueError(
            "upstream refused wss://api.elevenlabs.io/v1/convai/conversation?agent_id=a1"
            "&conversation_signature=" + secrets["signature"]
            + " via postgresql://owner:" + secrets["db_password"] + "@db:5432/voicerelay"
            + " with Bearer " + secrets["bearer"] + " key " + secrets["api_key"]
            + " el " + secrets["elevenlabs_key"]
        )
    except ValueError:
        sentry_sdk.set_context("call", {"xi-api-key": secrets["elevenlabs_key"], "ok": "yes"})
        sentry_sdk.capture_exception()
    logging.getLogger("relay.bridge").error(
        "call failed for %s", "Authorization: Bearer " + secrets["bearer"]
    )
    sentry_sdk.flush(timeout=15)
print(json.dumps(report))
"""


class _Recorder(BaseHTTPRequestHandler):
    bodies: list[bytes]

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        raw = self.rfile.read(int(self.headers.get("content-length", "0")))
        encoding = self.headers.get("content-encoding", "")
        if encoding == "gzip":
            raw = gzip.decompress(raw)
        elif encoding == "deflate":
            raw = zlib.decompress(raw)
        elif encoding == "br":
            import brotli  # type: ignore[import-not-found]

            raw = brotli.decompress(raw)
        self.bodies.append(raw)
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[bytes]]]:
    bodies: list[bytes] = []
    handler = type("Recorder", (_Recorder,), {"bodies": bodies})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://public-key@127.0.0.1:{server.server_port}/42", bodies
    finally:
        server.shutdown()
        server.server_close()


def _child(dsn: str | None) -> dict[str, bool]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENTRY_")}
    env["TEST_SECRETS"] = json.dumps(SECRETS)
    if dsn is not None:
        env["SENTRY_DSN"] = dsn
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, bool] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def _events(bodies: list[bytes]) -> list[dict[str, object]]:
    """The event items of every envelope (an envelope is JSON lines: header, item header, item)."""
    events = []
    for body in bodies:
        lines = body.split(b"\n")
        for header, payload in zip(lines[1::2], lines[2::2], strict=False):
            if json.loads(header).get("type") == "event":
                events.append(json.loads(payload))
    return events


def test_without_a_dsn_sentry_is_not_even_imported() -> None:
    assert _child(None) == {"started": False, "imported": False, "active": False}


def test_errors_reach_sentry_without_secrets(recorder: tuple[str, list[bytes]]) -> None:
    dsn, bodies = recorder
    assert _child(dsn) == {"started": True, "imported": True, "active": True}
    events = _events(bodies)
    kinds = {
        value["type"]
        for event in events
        for value in event.get("exception", {}).get("values", [])  # type: ignore[attr-defined]
    }
    assert {"RuntimeError", "ValueError"} <= kinds
    assert any("call failed for" in json.dumps(event) for event in events)  # the log error
    requests = [event["request"] for event in events if "request" in event]
    assert any(str(r["url"]).endswith("/boom") for r in requests)  # type: ignore[index]
    for event in events:
        assert event["environment"] == "test-env"
        assert event["tags"]["service"] == "relay"  # type: ignore[index]
    received = b"\n".join(bodies).decode()
    for name, secret in SECRETS.items():
        assert secret not in received, f"{name} leaked to Sentry"
    assert FILTERED in received


def test_scrubber_on_a_hand_made_event() -> None:
    event = {
        "request": {
            "url": "https://relay.example/twilio/stream?token=abc123&agent=a1",
            "query_string": "access_token=abc123&agent=a1",
            "headers": [["Authorization", "Bearer abc.def.ghi"], ["Accept", "*/*"]],
            "env": {"X-Twilio-Signature": "sig", "REMOTE_PORT": 443},
        },
        "extra": {"encryption_keys": "k1:abcd", "count": 3, "nested": [{"password": "pw"}]},
        "message": "basic dXNlcjpwYXNz and dsn postgres://u:pw@h/db",
    }
    scrubbed = scrub_event(event)
    assert scrubbed["request"]["url"] == (
        f"https://relay.example/twilio/stream?token={FILTERED}&agent=a1"
    )
    assert scrubbed["request"]["query_string"] == f"access_token={FILTERED}&agent=a1"
    assert scrubbed["request"]["headers"] == [["Authorization", FILTERED], ["Accept", "*/*"]]
    assert scrubbed["request"]["env"] == {"X-Twilio-Signature": FILTERED, "REMOTE_PORT": 443}
    assert scrubbed["extra"] == {
        "encryption_keys": FILTERED,
        "count": 3,
        "nested": [{"password": FILTERED}],
    }
    assert scrubbed["message"] == f"basic {FILTERED} and dsn postgres://u:{FILTERED}@h/db"
    assert scrub_text("nothing secret here") == "nothing secret here"
