"""A Twilio REST API emulator: the Calls resource the control API uses to hang up and transfer.

``routes()`` serves, the way ``https://api.twilio.com`` does:

- ``POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json`` with a form body (``Status``
  ``completed``/``canceled``, ``Twiml``, ``Url``): updates the call and answers the JSON call
  resource. Redirecting (``Twiml``/``Url``) a call that is no longer in progress is HTTP 400 with
  code 21220, as Twilio does; ending an ended call again changes nothing.
- ``GET`` on the same path: the call resource.

HTTP basic auth ``AccountSid:AuthToken`` is checked against ``TwilioRestConfig.accounts`` and must
name the account in the path; anything else is 401 with Twilio's error document (code 20003). An
unknown call is 404 with code 20404 unless ``accept_unknown_calls`` (local runs) makes every
well-formed CallSid an in-progress call. Every request, refused or not, is appended to
``TwilioRestConfig.requests`` (with whether its credentials were right, never the token itself),
so tests can assert on exactly what reached "Twilio".
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

__all__ = [
    "DEFAULT_ACCOUNT_SID",
    "DEFAULT_AUTH_TOKEN",
    "EmulatedCall",
    "RecordedRequest",
    "TwilioRestConfig",
    "routes",
]

API_VERSION = "2010-04-01"
CALL_PATH = f"/{API_VERSION}/Accounts/{{account_sid}}/Calls/{{call_sid}}.json"
# The account `voicerelay emulator` accepts when started without --twilio-account (local runs).
DEFAULT_ACCOUNT_SID = "AC" + "0" * 31 + "1"
DEFAULT_AUTH_TOKEN = "emulator_local_twilio_auth_token"

_CALL_SID = re.compile(r"CA[0-9a-f]{32}")
_ENDED = frozenset({"completed", "canceled", "busy", "failed", "no-answer"})


@dataclass
class EmulatedCall:
    sid: str
    account_sid: str
    from_number: str = "+15005550006"
    to_number: str = "+15005550001"
    status: str = "in-progress"
    # The TwiML or URL the call was last redirected to (a transfer), if any.
    twiml: str | None = None
    url: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    ended_at: datetime | None = None

    def resource(self) -> dict[str, Any]:
        """The call as Twilio's JSON call resource (the fields clients read)."""
        uri = CALL_PATH.format(account_sid=self.account_sid, call_sid=self.sid)
        duration = (
            str(int((self.ended_at - self.created_at).total_seconds()))
            if self.ended_at is not None
            else None
        )
        return {
            "sid": self.sid,
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "direction": "inbound",
            "from": self.from_number,
            "from_formatted": self.from_number,
            "to": self.to_number,
            "to_formatted": self.to_number,
            "status": self.status,
            "date_created": format_datetime(self.created_at, usegmt=True),
            "date_updated": format_datetime(self.updated_at, usegmt=True),
            "start_time": format_datetime(self.created_at, usegmt=True),
            "end_time": format_datetime(self.ended_at, usegmt=True) if self.ended_at else None,
            "duration": duration,
            "parent_call_sid": None,
            "price": None,
            "price_unit": "USD",
            "answered_by": None,
            "caller_name": None,
            "forwarded_from": None,
            "uri": uri,
            "subresource_uris": {},
        }


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    account_sid: str
    call_sid: str
    # The basic-auth user name presented, and whether user and token were both right.
    auth_user: str | None
    authenticated: bool
    form: dict[str, str]
    status: int


@dataclass
class TwilioRestConfig:
    accounts: dict[str, str] = field(
        default_factory=lambda: {DEFAULT_ACCOUNT_SID: DEFAULT_AUTH_TOKEN}
    )
    calls: dict[str, EmulatedCall] = field(default_factory=dict)
    # Local runs have no real calls to look up: every well-formed CallSid is then in progress.
    accept_unknown_calls: bool = False
    requests: list[RecordedRequest] = field(default_factory=list)

    def add_call(
        self, account_sid: str, call_sid: str | None = None, **details: Any
    ) -> EmulatedCall:
        """Register an in-progress call (a test's stand-in for one Twilio is connecting)."""
        sid = call_sid or "CA" + secrets.token_hex(16)
        call = EmulatedCall(sid=sid, account_sid=account_sid, **details)
        self.calls[sid] = call
        return call

    def authenticates(self, account_sid: str, user: str | None, token: str | None) -> bool:
        expected = self.accounts.get(account_sid)
        if expected is None or user is None or token is None:
            return False
        # Both compared in constant time, so timing does not say which part was wrong.
        same_user = hmac.compare_digest(user.encode(), account_sid.encode())
        same_token = hmac.compare_digest(token.encode(), expected.encode())
        return same_user and same_token


def _error(status: int, code: int, message: str, **extra: Any) -> JSONResponse:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
        **extra,
    }
    return JSONResponse(body, status_code=status)


def _basic_auth(request: Request) -> tuple[str | None, str | None]:
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    user, sep, token = decoded.partition(":")
    return (user, token) if sep else (None, None)


def _update(call: EmulatedCall, form: dict[str, str]) -> JSONResponse | None:
    """Apply an update; a refusal as Twilio would answer it, or None when applied."""
    status, twiml, url = form.get("Status"), form.get("Twiml"), form.get("Url")
    if status is None and twiml is None and url is None:
        return _error(400, 21218, "Invalid parameter: Status, Twiml or Url is required")
    if status is not None and status not in ("completed", "canceled"):
        return _error(400, 21218, "Invalid Status: must be completed or canceled")
    now = datetime.now(UTC)
    if status is not None:
        if call.status not in _ENDED:
            call.status = status
            call.ended_at = now
        call.updated_at = now
        return None
    if call.status in _ENDED:
        return _error(400, 21220, "Call is not in-progress. Cannot redirect.")
    call.twiml, call.url, call.updated_at = twiml, url, now
    return None


async def call_resource(request: Request) -> JSONResponse:
    config: TwilioRestConfig = request.app.state.twilio_rest
    account_sid = request.path_params["account_sid"]
    call_sid = request.path_params["call_sid"]
    form: dict[str, str] = {}
    if request.method == "POST":
        parsed = await request.form()
        form = {k: v for k, v in parsed.items() if isinstance(v, str)}
    user, token = _basic_auth(request)
    authenticated = config.authenticates(account_sid, user, token)
    response = _handle(config, request.method, account_sid, call_sid, form, authenticated)
    config.requests.append(
        RecordedRequest(
            method=request.method,
            path=request.url.path,
            account_sid=account_sid,
            call_sid=call_sid,
            auth_user=user,
            authenticated=authenticated,
            form=form,
            status=response.status_code,
        )
    )
    return response


def _handle(
    config: TwilioRestConfig,
    method: str,
    account_sid: str,
    call_sid: str,
    form: dict[str, str],
    authenticated: bool,
) -> JSONResponse:
    if not authenticated:
        response = _error(
            401, 20003, "Authenticate", detail="Your AccountSid or AuthToken was incorrect."
        )
        response.headers["www-authenticate"] = 'Basic realm="Twilio API"'
        return response
    call = config.calls.get(call_sid)
    if call is None and config.accept_unknown_calls and _CALL_SID.fullmatch(call_sid):
        call = config.add_call(account_sid, call_sid)
    if call is None or call.account_sid != account_sid:
        path = CALL_PATH.format(account_sid=account_sid, call_sid=call_sid)
        return _error(404, 20404, f"The requested resource {path} was not found")
    if method == "POST":
        refusal = _update(call, form)
        if refusal is not None:
            return refusal
    return JSONResponse(call.resource())


def routes() -> list[BaseRoute]:
    return [Route(CALL_PATH, call_resource, methods=["GET", "POST"])]
