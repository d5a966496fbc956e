"""Being Twilio toward the control API's voice webhook (pure): the form Twilio posts for an
inbound call, its ``X-Twilio-Signature``, and the ``<Connect><Stream>`` TwiML it gets back."""

from __future__ import annotations

import secrets
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]

from voicerelay.emulators.twilio_media import twilio_sid

SIGNATURE_HEADER = "X-Twilio-Signature"


class CallRefused(Exception):
    """The webhook answered something other than a media stream (e.g. ``<Say>`` + ``<Hangup/>``)."""


@dataclass(frozen=True)
class StreamInstruction:
    url: str
    parameters: dict[str, str]


def inbound_call_form(
    *, account_sid: str, call_sid: str, from_number: str, to_number: str
) -> dict[str, str]:
    """The fields Twilio posts to a voice webhook when a call comes in (the ones that matter)."""
    return {
        "AccountSid": account_sid,
        "ApiVersion": "2010-04-01",
        "CallSid": call_sid,
        "CallStatus": "ringing",
        "Called": to_number,
        "Caller": from_number,
        "Direction": "inbound",
        "From": from_number,
        "To": to_number,
    }


def signature(auth_token: str, url: str, form: dict[str, str]) -> str:
    """Twilio's signature of a POST: the full URL it called and the form, with the auth token."""
    signed: str = RequestValidator(auth_token).compute_signature(url, form)
    return signed


@dataclass(frozen=True)
class SignedCall:
    """One inbound call's webhook request, signed as Twilio signs it."""

    call_sid: str
    form: dict[str, str]
    headers: dict[str, str]


def signed_inbound_call(
    *, account_sid: str, auth_token: str, voice_url: str, to_number: str
) -> SignedCall:
    """A new call (fresh CallSid, a random caller) to ``to_number``, for ``voice_url``."""
    call_sid = twilio_sid("CA")
    form = inbound_call_form(
        account_sid=account_sid,
        call_sid=call_sid,
        from_number=f"+1202555{secrets.randbelow(10_000):04d}",
        to_number=to_number,
    )
    headers = {SIGNATURE_HEADER: signature(auth_token, voice_url, form)}
    return SignedCall(call_sid, form, headers)


def parse_connect_stream(twiml: str) -> StreamInstruction:
    """The ``<Connect><Stream url>`` and its ``<Parameter>``s; CallRefused for anything else."""
    try:
        root = ET.fromstring(twiml)
    except ET.ParseError as exc:
        raise CallRefused(f"the webhook's answer is not TwiML: {exc}") from None
    stream = root.find("./Connect/Stream")
    if root.tag != "Response" or stream is None or not stream.get("url"):
        said = " ".join(t.strip() for t in root.itertext() if t.strip())
        raise CallRefused(f"no <Connect><Stream> in the TwiML ({said[:200] or root.tag})")
    parameters = {
        p.get("name", ""): p.get("value", "")
        for p in stream.findall("./Parameter")
        if p.get("name")
    }
    return StreamInstruction(stream.get("url", ""), parameters)
