"""Phone calls in the relay benchmark: the time from Twilio's ``start`` to the first agent audio
the relay sends back, under the step's load.

Each probe is a call as Twilio makes it: the signed voice webhook (the control API creates the
call, prefetches the agent's signed URL and answers ``<Connect><Stream>``), then the Media
Stream (``voicerelay.emulators.twilio_media.MediaStreamsCaller``) to one of the step's relay
replicas. The benchmark's phone agent greets the caller (a first message), so its first audio
does not wait for the caller to speak. The probe hangs up (``stop``) once that audio arrived.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import httpx

from loadtests.twilio_webhook import CallRefused, parse_connect_stream, signed_inbound_call
from voicerelay.emulators.twilio_media import MediaStreamsCaller

VOICE_WEBHOOK = "/v1/twilio/voice"


@dataclass(frozen=True)
class PhoneLine:
    """What the benchmark's tenant has for phone calls."""

    api_url: str
    number: str
    account_sid: str
    auth_token: str


@dataclass
class PhoneResults:
    first_audio_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def stream_url_on(relay_url: str, twiml_url: str) -> str:
    """The TwiML's stream path on the given replica (the benchmark starts its own relays; the
    control API's RELAY_PUBLIC_URL does not name them)."""
    relay = urlsplit(relay_url)
    scheme = {"http": "ws", "https": "wss"}.get(relay.scheme, relay.scheme)
    return urlunsplit((scheme, relay.netloc, urlsplit(twiml_url).path, "", ""))


async def first_agent_audio(
    http: httpx.AsyncClient, line: PhoneLine, relay_url: str, within: float
) -> float:
    """One phone call: seconds from ``start`` to the agent's first audio."""
    voice_url = line.api_url + VOICE_WEBHOOK
    call = signed_inbound_call(
        account_sid=line.account_sid,
        auth_token=line.auth_token,
        voice_url=voice_url,
        to_number=line.number,
    )
    answer = await http.post(voice_url, data=call.form, headers=call.headers)
    if answer.status_code != 200:
        raise CallRefused(f"voice webhook answered {answer.status_code}: {answer.text[:200]}")
    stream = parse_connect_stream(answer.text)
    async with MediaStreamsCaller.connect(
        stream_url_on(relay_url, stream.url),
        custom_parameters=stream.parameters,
        call_sid=call.call_sid,
        account_sid=line.account_sid,
        open_timeout=within,
    ) as caller:
        await caller.wait_for(lambda: caller.first_audio_at is not None or caller.closed, within)
        seconds = caller.first_audio_seconds
        if seconds is None:
            raise CallRefused(f"stream closed before any audio: {caller.close_code}")
        await caller.stop()
    return seconds


async def phone_probes(
    line: PhoneLine, relay_urls: list[str], count: int, *, spread: float, within: float
) -> PhoneResults:
    """``count`` calls started evenly over ``spread`` seconds, dealt round-robin to replicas."""
    results = PhoneResults()
    began = time.monotonic()
    async with httpx.AsyncClient(timeout=within) as http:

        async def one(index: int) -> None:
            await asyncio.sleep(max(0.0, began + spread * index / count - time.monotonic()))
            relay_url = relay_urls[index % len(relay_urls)]
            try:
                seconds = await first_agent_audio(http, line, relay_url, within)
            except Exception as exc:
                results.errors.append(f"phone: {type(exc).__name__}: {exc}")
            else:
                results.first_audio_ms.append(seconds * 1000)

        await asyncio.gather(*(one(i) for i in range(count)))
    return results
