"""Twilio as tests see it: signed webhook requests (signed the way Twilio signs them, with
twilio's own RequestValidator.compute_signature), a tenant set up for phone calls, TwiML parsing."""

from __future__ import annotations

import secrets
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
from twilio.request_validator import RequestValidator

from control_api.bootstrap import NewTenant
from tests.support.attack import unique_phone_number
from tests.support.sessions import from_ip
from tests.support.tenants import auth

# What Twilio is configured with, i.e. PUBLIC_API_URL of the API under test: deliberately not
# the loopback address the test server is bound to (the API sits behind a proxy).
PUBLIC_API_URL = "https://voice.example.com"
VOICE_PATH = "/v1/twilio/voice"
STATUS_PATH = "/v1/twilio/status"


def new_account_sid() -> str:
    return "AC" + secrets.token_hex(16)


def new_call_sid() -> str:
    return "CA" + secrets.token_hex(16)


def sign(auth_token: str, url: str, params: dict[str, str]) -> str:
    signature: str = RequestValidator(auth_token).compute_signature(url, params)
    return signature


@dataclass
class PhoneTenant:
    tenant: NewTenant
    account_sid: str
    auth_token: str
    number: str
    agent_id: str
    credential_id: str
    caller: str = "+14155552671"

    def voice_params(self, call_sid: str | None = None, **extra: str) -> dict[str, str]:
        """The parameters of an inbound call's voice webhook, as Twilio sends them."""
        return {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "CallSid": call_sid or new_call_sid(),
            "CallStatus": "ringing",
            "Called": self.number,
            "Caller": self.caller,
            "Direction": "inbound",
            "From": self.caller,
            "FromCity": "SAN FRANCISCO",
            "FromCountry": "US",
            "FromState": "CA",
            "FromZip": "94107",
            "To": self.number,
            "ToCountry": "US",
            **extra,
        }


async def phone_tenant(
    http: httpx.AsyncClient,
    tenant: NewTenant,
    *,
    elevenlabs_agent_id: str = "agent_phone_public",
    elevenlabs_credential_id: str | None = None,
    **agent: Any,
) -> PhoneTenant:
    """A Twilio credential and an agent answering a fresh number, through the real API."""
    account_sid, auth_token = new_account_sid(), "twilio_auth_" + secrets.token_hex(16)
    r = await http.post(
        "/v1/credentials",
        headers=auth(tenant),
        json={
            "provider": "twilio",
            "name": "Twilio",
            "account_sid": account_sid,
            "auth_token": auth_token,
        },
    )
    assert r.status_code == 201, r.text
    credential_id = r.json()["id"]
    number = unique_phone_number()
    r = await http.post(
        "/v1/agents",
        headers=auth(tenant),
        json={
            "name": "Phone agent",
            "elevenlabs_agent_id": elevenlabs_agent_id,
            "credential_id": elevenlabs_credential_id,
            "phone_numbers": [number],
            "input_audio_format": "ulaw_8000",
            "output_audio_format": "ulaw_8000",
            **agent,
        },
    )
    assert r.status_code == 201, r.text
    return PhoneTenant(tenant, account_sid, auth_token, number, r.json()["id"], credential_id)


async def twilio_post(
    http: httpx.AsyncClient,
    path: str,
    params: dict[str, str],
    *,
    auth_token: str | None,
    signed_url: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST ``params`` form-encoded to ``path``, signed (unless ``auth_token`` is None) over
    ``signed_url`` (default: the public URL Twilio was given for ``path``)."""
    sent = {**from_ip(), **(headers or {})}
    if auth_token is not None:
        sent["x-twilio-signature"] = sign(auth_token, signed_url or PUBLIC_API_URL + path, params)
    return await http.post(path, data=params, headers=sent)


@dataclass
class TwiML:
    root: ET.Element
    text: str
    parameters: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, response: httpx.Response) -> TwiML:
        assert response.headers["content-type"].startswith("text/xml"), response.headers
        root = ET.fromstring(response.text)
        assert root.tag == "Response"
        parameters = {p.attrib["name"]: p.attrib["value"] for p in root.iter("Parameter")}
        return cls(root, response.text, parameters)

    @property
    def verbs(self) -> list[str]:
        return [child.tag for child in self.root]

    @property
    def stream_url(self) -> str | None:
        stream = self.root.find("Connect/Stream")
        return stream.attrib["url"] if stream is not None else None

    @property
    def said(self) -> str:
        return " ".join(say.text or "" for say in self.root.iter("Say"))


def is_apology(twiml: TwiML) -> bool:
    """A polite <Say> then <Hangup/>, and no stream."""
    return twiml.verbs == ["Say", "Hangup"] and bool(twiml.said) and twiml.stream_url is None


def call_id_of(twiml: TwiML) -> uuid.UUID:
    """The call the stream's token names (read without verification: tests verify elsewhere)."""
    claims = jwt.decode(twiml.parameters["token"], options={"verify_signature": False})
    return uuid.UUID(claims["sub"])
