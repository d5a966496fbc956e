"""Endpoints for the relay: hang up or transfer a live phone call through Twilio's REST API.

Service-authenticated like ``/internal/v1/call-sessions``, and naming the call by the caller's
call token (which the relay holds). The tenant's Twilio auth token is decrypted here, on use, and
only ever sent to ``TWILIO_API_URL`` in the Authorization header; the relay never sees it.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from control_api.agent_settings import normalize_e164
from control_api.call_sessions import UnknownCall
from control_api.db import tenant_tx
from control_api.endpoints import ApiCall, ApiModel, EndpointGroup
from control_api.problems import Problem
from control_api.routes.internal import (
    parse_service_body,
    require_service,
    verify_presented_token,
)
from control_api.telephony import rest, twiml
from control_api.telephony.accounts import TwilioAccount, twilio_accounts
from control_api.telephony.call_log import CallLogUnavailable, append_telephony_event
from voicerelay.call_events import InvalidCallEvent
from voicerelay.call_token import MAX_TOKEN_LENGTH

log = logging.getLogger(__name__)

group = EndpointGroup("internal")


class HangupRequest(ApiModel):
    token: str = Field(min_length=1, max_length=MAX_TOKEN_LENGTH)


class TransferRequest(ApiModel):
    token: str = Field(min_length=1, max_length=MAX_TOKEN_LENGTH)
    to: str = Field(min_length=1, max_length=32, description="E.164 number to transfer to.")


class HangupResult(BaseModel):
    status: Literal["completed", "already_ended", "skipped"]


class TransferResult(BaseModel):
    status: Literal["transferred"]
    to: str


@dataclass(frozen=True)
class _PhoneCall:
    tenant_id: uuid.UUID
    call_id: uuid.UUID
    call_sid: str
    transfer_numbers: list[str]
    # Newest first; an older one is tried when Twilio rejects a newer (mid-rotation).
    accounts: list[TwilioAccount]


async def _phone_call(call: ApiCall[Any, Any], token: str) -> _PhoneCall:
    claims = verify_presented_token(call, token)
    if claims.role != "caller":
        raise Problem(403, "caller_token_required", "Only the caller's token controls the call.")
    state = call.state
    async with tenant_tx(state.pool, claims.tenant_id, readonly=True) as conn:
        row = await conn.fetchrow(
            """
            SELECT c.direction, c.metadata, a.transfer_numbers
            FROM calls c LEFT JOIN agents a ON a.tenant_id = c.tenant_id AND a.id = c.agent_id
            WHERE c.id = $1
            """,
            claims.call_id,
        )
        if row is None:
            raise UnknownCall
        twilio = (row["metadata"] or {}).get("twilio") if row["direction"] != "browser" else None
        if not isinstance(twilio, dict) or not isinstance(twilio.get("call_sid"), str):
            raise Problem(409, "not_a_phone_call", "This call has no phone leg to control.")
        account_sid = twilio.get("account_sid")
        accounts = (
            await twilio_accounts(conn, state.require_vault(), claims.tenant_id, account_sid)
            if isinstance(account_sid, str)
            else []
        )
    if not accounts:
        raise Problem(
            409, "credential_unusable", "The tenant has no Twilio credential for this call."
        )
    return _PhoneCall(
        tenant_id=claims.tenant_id,
        call_id=claims.call_id,
        call_sid=twilio["call_sid"],
        transfer_numbers=list(row["transfer_numbers"] or []),
        accounts=accounts,
    )


async def _update(
    call: ApiCall[Any, Any], phone: _PhoneCall, form: dict[str, str], **logged: str
) -> None:
    """Update the live call, then note it in the call log (best effort: the call log is the
    record, not a condition for hanging up or transferring)."""
    settings = call.state.settings
    assert phone.accounts, "_phone_call refuses calls without a Twilio credential"
    for attempt, account in enumerate(phone.accounts, start=1):
        try:
            resource = await rest.update_call(
                call.state.http,
                settings.twilio_api_url,
                account,
                phone.call_sid,
                form,
                timeout_seconds=settings.twilio_timeout_seconds,
            )
            break
        except rest.TwilioAuthError:
            if attempt == len(phone.accounts):
                raise
    status = resource.get("status")
    try:
        await append_telephony_event(
            call.state,
            tenant_id=phone.tenant_id,
            call_id=phone.call_id,
            data={
                "call_status": status if isinstance(status, str) else "unknown",
                "call_sid": phone.call_sid,
                **logged,
            },
        )
    except (InvalidCallEvent, CallLogUnavailable) as exc:
        log.warning(
            "the phone call's update is not in its call log",
            extra={"call_sid": phone.call_sid, "error": type(exc).__name__},
        )


def _twilio_problem(exc: rest.TwilioError, action: str, call_sid: str) -> Problem:
    log.warning(
        "Twilio %s failed: %s",
        action,
        exc,
        extra={"call_sid": call_sid, "twilio_status": exc.status, "twilio_code": exc.code},
    )
    if isinstance(exc, rest.TwilioUnavailable):
        return Problem(
            504 if exc.timed_out else 502,
            "twilio_unavailable",
            "Twilio could not be reached; try again shortly.",
        )
    if isinstance(exc, rest.TwilioAuthError):
        return Problem(502, "twilio_error", "Twilio rejected the tenant's Twilio credential.")
    return Problem(502, "twilio_error", f"Twilio refused the {action}.", twilio_code=exc.code)


@group(
    "POST",
    "/internal/v1/calls/hangup",
    summary="Hang up a phone call through Twilio (service-authenticated)",
    response=HangupResult,
    auth=False,
    include_in_schema=False,
    raw_request=True,
    errors=[401, 403, 409, 502, 504],
)
async def hangup(call: ApiCall[Any, Any]) -> HangupResult:
    require_service(call)
    body = await parse_service_body(call, HangupRequest)
    try:
        phone = await _phone_call(call, body.token)
    except UnknownCall:
        raise Problem(401, "invalid_call_token", "The call token names no known call.") from None
    if not call.state.settings.twilio_hangup_on_agent_end:
        log.info("Twilio hang-up skipped (TWILIO_HANGUP_ON_AGENT_END is off)")
        return HangupResult(status="skipped")
    try:
        await _update(call, phone, {"Status": "completed"}, action="hangup")
    except rest.CallNotLive:
        log.info("Twilio hang-up: the call had already ended", extra={"call_sid": phone.call_sid})
        return HangupResult(status="already_ended")
    except rest.TwilioError as exc:
        raise _twilio_problem(exc, "hang-up", phone.call_sid) from None
    log.info("Twilio hang-up done", extra={"call_sid": phone.call_sid})
    return HangupResult(status="completed")


@group(
    "POST",
    "/internal/v1/calls/transfer",
    summary="Transfer a phone call to an allowed number (service-authenticated)",
    response=TransferResult,
    auth=False,
    include_in_schema=False,
    raw_request=True,
    errors=[401, 403, 409, 422, 502, 504],
)
async def transfer(call: ApiCall[Any, Any]) -> TransferResult:
    require_service(call)
    body = await parse_service_body(call, TransferRequest)
    try:
        number = normalize_e164(body.to)
    except ValueError as exc:
        raise Problem(
            422,
            "invalid_phone_number",
            "to must be a valid phone number in E.164 form.",
            errors=[{"loc": ["to"], "msg": str(exc), "type": "value_error"}],
        ) from None
    try:
        phone = await _phone_call(call, body.token)
    except UnknownCall:
        raise Problem(401, "invalid_call_token", "The call token names no known call.") from None
    if number not in phone.transfer_numbers:
        # The number itself is the caller's business: not logged.
        log.warning("transfer refused: the number is not in the agent's transfer_numbers")
        raise Problem(
            403, "transfer_not_allowed", "The agent may not transfer calls to this number."
        )
    try:
        await _update(call, phone, {"Twiml": twiml.dial(number)}, action="transfer", to=number)
    except rest.CallNotLive:
        raise Problem(409, "call_ended", "The phone call has already ended.") from None
    except rest.TwilioError as exc:
        raise _twilio_problem(exc, "transfer", phone.call_sid) from None
    log.info("Twilio transfer done", extra={"call_sid": phone.call_sid})
    return TransferResult(status="transferred", to=number)
