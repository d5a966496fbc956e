"""A small async client for Twilio's REST API: updating a live call (hang up, redirect).

``POST {TWILIO_API_URL}/2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json`` with a form body
and HTTP basic auth ``AccountSid:AuthToken``. The auth token goes only into the Authorization
header: it is never logged, put into an exception or returned. Exceptions carry Twilio's numeric
error code and HTTP status, which are safe to log.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from control_api.telephony.accounts import TwilioAccount

log = logging.getLogger(__name__)

API_VERSION = "2010-04-01"
# Twilio's error codes: the resource does not exist; the call is not in a state that allows it.
NOT_FOUND_CODE = 20404
CALL_NOT_IN_PROGRESS_CODE = 21220


class TwilioError(Exception):
    """Twilio refused the request, or answered something unexpected."""

    def __init__(self, message: str, *, status: int | None = None, code: int | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class TwilioUnavailable(TwilioError):
    """Twilio could not be reached in time, or answered with a server error or 429."""

    def __init__(self, message: str, *, timed_out: bool = False, status: int | None = None):
        super().__init__(message, status=status)
        self.timed_out = timed_out


class TwilioAuthError(TwilioError):
    """Twilio rejected the account SID and auth token."""


class CallNotLive(TwilioError):
    """The call does not exist (any more) or has already ended."""


def call_url(api_url: str, account_sid: str, call_sid: str) -> str:
    return f"{api_url.rstrip('/')}/{API_VERSION}/Accounts/{account_sid}/Calls/{call_sid}.json"


async def update_call(
    http: httpx.AsyncClient,
    api_url: str,
    account: TwilioAccount,
    call_sid: str,
    form: dict[str, str],
    *,
    timeout_seconds: float,
) -> dict[str, Any]:
    """Update a live call (``Status=completed``, ``Twiml=...``); returns Twilio's call resource."""
    try:
        response = await http.post(
            call_url(api_url, account.account_sid, call_sid),
            data=form,
            auth=httpx.BasicAuth(account.account_sid, account.auth_token),
            headers={"accept": "application/json"},
            timeout=timeout_seconds,
            follow_redirects=False,
        )
    except httpx.TimeoutException:
        raise TwilioUnavailable("Twilio did not answer in time", timed_out=True) from None
    except httpx.HTTPError as exc:
        # The exception text may describe the request; only its class is logged.
        log.warning("Twilio unreachable", extra={"error": type(exc).__name__})
        raise TwilioUnavailable("Twilio could not be reached") from None
    status = response.status_code
    body = _json_object(response)
    code = body.get("code") if isinstance(body.get("code"), int) else None
    if status == 200:
        return body
    if status == 404 or code in (NOT_FOUND_CODE, CALL_NOT_IN_PROGRESS_CODE):
        raise CallNotLive("the call is not live", status=status, code=code)
    if status in (401, 403):
        raise TwilioAuthError("Twilio rejected the credentials", status=status, code=code)
    if status == 429 or status >= 500:
        raise TwilioUnavailable(f"Twilio answered HTTP {status}", status=status)
    raise TwilioError(f"Twilio answered HTTP {status}", status=status, code=code)


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
