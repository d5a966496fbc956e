"""Twilio webhooks: the voice webhook that answers a phone call, and the call status callback.

Twilio does not send our bearer tokens, so these endpoints authenticate each request by its
``X-Twilio-Signature`` under the auth token of the tenant's Twilio account (see
``control_api.telephony.signature``). Work before the signature is checked is bounded: the body
size limit, a missing signature refused before anything else, a rate limit per client address and
called number (or CallSid), then one indexed lookup to learn the tenant, a few credential
decryptions and HMACs.

Answers are TwiML (``text/xml``): 403 for a missing or invalid signature, 200 with a polite
``<Say>`` and ``<Hangup/>`` for any other refusal or failure (Twilio plays it to the caller). Only
what Twilio never causes is a problem document: 415 (not a form), 429 (the flood guard, with
Retry-After) and, for the status callback, 503 when the call log cannot be written. Each outcome
is one log line, never with the call token.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError
from starlette.responses import Response

from control_api.bootstrap import new_id
from control_api.call_tokens import issue_call_token
from control_api.client_ip import request_client_ip
from control_api.db import Conn, platform_tx, tenant_tx
from control_api.endpoints import ApiCall, EndpointGroup
from control_api.problems import Problem
from control_api.ratelimit import Rate, enforce
from control_api.state import AppState
from control_api.telephony import twiml
from control_api.telephony.accounts import is_call_sid, normalize_account_sid, twilio_accounts
from control_api.telephony.call_log import CallLogUnavailable, append_telephony_event
from control_api.telephony.prefetch import prefetch_upstream_url
from control_api.telephony.signature import (
    SHARED_KEY_SETTINGS_HEADER,
    SIGNATURE_HEADER,
    FormParams,
    public_request_url,
    signature_is_valid,
)
from voicerelay.call_events import InvalidCallEvent
from voicerelay.logs import call_id_var, tenant_id_var
from voicerelay.tenant_calls import count_active_calls

log = logging.getLogger(__name__)

group = EndpointGroup("twilio")

_FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"
# Caller details are copied into the call row and the agent's variables: bounded, never NUL.
_MAX_FIELD_CHARS = 256
_E164_CHARS = frozenset("+0123456789")
# Twilio gives up on a webhook after 15 s; a repeat within this window is Twilio retrying.
_RETRY_WINDOW_SECONDS = 60.0
# Twilio's status callbacks for one call share these; a retried callback gets the same event id.
_TELEPHONY_EVENT_NAMESPACE = uuid.UUID("6f0c3f5e-2a43-4c1b-9a55-8d2f1f7b9e21")


class _TwilioForm(BaseModel):
    # Documentation only: the handlers read every parameter, because the signature covers them.
    model_config = ConfigDict(extra="allow")

    CallSid: str = Field(description="CA followed by 32 hex digits.")
    AccountSid: str = Field(description="AC followed by 32 hex digits.")


class TwilioVoiceWebhook(_TwilioForm):
    """Twilio's voice webhook parameters (all of them are signed and all are accepted)."""

    From: str
    To: str = Field(description="The called number (E.164); it selects the tenant's agent.")
    CallStatus: str | None = None
    Direction: str | None = None
    CallerName: str | None = None


class TwilioStatusCallback(_TwilioForm):
    """Twilio's call status callback parameters."""

    CallStatus: str
    CallDuration: str | None = None
    SequenceNumber: str | None = None
    Timestamp: str | None = None


def _twiml(document: str, status: int = 200) -> Response:
    return Response(document, status_code=status, media_type=twiml.TWIML_MEDIA_TYPE)


def _outcome(event: str, outcome: str, level: int = logging.INFO, **extra: Any) -> None:
    log.log(level, "twilio %s: %s", event, outcome, extra={"outcome": outcome, **extra})


@dataclass(frozen=True)
class _SignedRequest:
    """A webhook whose signature matched the tenant's Twilio account."""

    tenant_id: uuid.UUID
    account_sid: str
    params: FormParams


async def _read_form(call: ApiCall[Any, Any], event: str, subject: str) -> tuple[str, FormParams]:
    """The signature and every parameter, after the checks that need no lookup."""
    request = call.request
    signature = request.headers.get(SIGNATURE_HEADER, "")
    if not signature:
        raise _forbidden(event, "no X-Twilio-Signature")
    if SHARED_KEY_SETTINGS_HEADER in request.headers:
        raise _forbidden(event, "signed with a SharedKey, not the auth token")
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != _FORM_MEDIA_TYPE:
        raise Problem(415, "unsupported_media_type", f"Twilio webhooks are {_FORM_MEDIA_TYPE}.")
    form = await request.form()
    params = FormParams.of((k, v) for k, v in form.multi_items() if isinstance(v, str))
    await _limit(call, event, params.first(subject) or "")
    return signature, params


async def _limit(call: ApiCall[Any, Any], event: str, subject: str) -> None:
    """A flood guard before any lookup, per client address *and* the number or call the request
    names. Not per address alone: Twilio's few webhook addresses carry every tenant's calls, so a
    limit on them (or on their failures, which anyone can provoke by pointing a Twilio number of
    their own here) would let one tenant's traffic refuse another's."""
    state = call.state
    settings = state.settings
    ip = request_client_ip(call.request, settings.trusted_proxies)
    named = hashlib.sha256(subject[:_MAX_FIELD_CHARS].encode()).hexdigest()[:24]
    rate = Rate(settings.rate_limit_api_per_second, settings.rate_limit_api_burst)
    await enforce(state, f"twilio-{event}", f"{ip}|{named}", rate)


async def _verify(
    call: ApiCall[Any, Any],
    event: str,
    signature: str,
    params: FormParams,
    tenant_id: uuid.UUID,
    **context: Any,
) -> _SignedRequest:
    """Check the signature under the tenant's account named by ``AccountSid``; 403 otherwise."""
    state = call.state
    account_sid = normalize_account_sid(params.first("AccountSid"))
    if account_sid is None:
        raise _forbidden(event, "no valid AccountSid", **context)
    async with tenant_tx(state.pool, tenant_id, readonly=True) as conn:
        accounts = await twilio_accounts(conn, state.require_vault(), tenant_id, account_sid)
    context["tenant_id"] = str(tenant_id)
    if not accounts:
        reason = "the tenant has no Twilio credential for this AccountSid"
        raise _forbidden(event, reason, account_sid=account_sid, **context)
    url = public_request_url(state.settings.public_api_url, call.request)
    if not signature_is_valid(url, params, signature, [a.auth_token for a in accounts]):
        # The path only: a query string may carry something its owner considers secret.
        path = url.split("?", 1)[0]
        raise _forbidden(event, "invalid X-Twilio-Signature", url=path, **context)
    tenant_id_var.set(str(tenant_id))
    return _SignedRequest(tenant_id, account_sid, params)


class _Refusal(Exception):
    def __init__(self, status: int, message: str = twiml.REFUSED) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _forbidden(event: str, reason: str, **context: Any) -> _Refusal:
    """A request that cannot be shown to come from the tenant's Twilio account: 403."""
    _outcome(event, f"refused: {reason}", logging.WARNING, **context)
    return _Refusal(403)


def _caller_detail(params: FormParams, name: str) -> str | None:
    value = params.first(name)
    if not value or "\x00" in value:
        return None
    return value[:_MAX_FIELD_CHARS]


# --- the voice webhook -------------------------------------------------------------------------


@group(
    "POST",
    "/v1/twilio/voice",
    summary="Twilio voice webhook: answer a phone call with a Media Stream to the relay",
    body=TwilioVoiceWebhook,
    body_media_type=_FORM_MEDIA_TYPE,
    auth=False,
    raw_request=True,
    response_media_type=twiml.TWIML_MEDIA_TYPE,
    errors=[403, 413, 415, 429],
    error_media_types={403: twiml.TWIML_MEDIA_TYPE},
)
async def twilio_voice(call: ApiCall[Any, Any]) -> Response:
    """Set this URL (``PUBLIC_API_URL`` + ``/v1/twilio/voice``, HTTP POST) as the phone number's
    "A call comes in" webhook in Twilio's console, and ``/v1/twilio/status`` as its call status
    callback."""
    try:
        signature, params = await _read_form(call, "voice", "To")
        return await _answer(call, signature, params)
    except _Refusal as refusal:
        return _twiml(twiml.say_and_hang_up(refusal.message), refusal.status)
    except Problem as problem:
        if problem.status < 500:  # not Twilio's form (415) or a flood (429): said as problems
            raise
        _outcome("voice", f"failed: {problem.code}", logging.ERROR)
        return _twiml(twiml.say_and_hang_up(twiml.TROUBLE))
    except Exception:
        log.exception("twilio voice: failed; the caller hears an apology")
        return _twiml(twiml.say_and_hang_up(twiml.TROUBLE))


async def _answer(call: ApiCall[Any, Any], signature: str, params: FormParams) -> Response:
    state = call.state
    call_sid = params.first("CallSid")
    if not is_call_sid(call_sid):
        raise _forbidden("voice", "no valid CallSid")
    assert call_sid is not None
    called = params.first("To") or ""
    route = None
    if 8 <= len(called) <= 16 and called.startswith("+") and set(called) <= _E164_CHARS:
        async with platform_tx(state.pool) as conn:
            route = await conn.fetchrow(
                "SELECT tenant_id, agent_id FROM phone_number_route($1)", called
            )
    if route is None:
        _outcome("voice", "refused: unknown number", logging.WARNING, call_sid=call_sid)
        raise _Refusal(200, twiml.UNKNOWN_NUMBER)
    signed = await _verify(call, "voice", signature, params, route["tenant_id"], call_sid=call_sid)
    async with tenant_tx(state.pool, signed.tenant_id, readonly=True) as conn:
        agent = await conn.fetchrow(
            """
            SELECT a.id, a.elevenlabs_agent_id, a.credential_id, a.phone_dynamic_variables,
                   t.max_concurrent_calls
            FROM agents a JOIN tenants t ON t.id = a.tenant_id WHERE a.id = $1
            """,
            route["agent_id"],
        )
    if agent is None:  # the agent was deleted since the lookup
        _outcome("voice", "refused: unknown number", logging.WARNING, call_sid=call_sid)
        raise _Refusal(200, twiml.UNKNOWN_NUMBER)
    await _check_cap(state, signed.tenant_id, agent["max_concurrent_calls"], call_sid)
    async with tenant_tx(state.pool, signed.tenant_id) as conn:
        call_id = await _create_call(conn, signed, agent, call_sid)
    call_id_var.set(str(call_id))
    issued = issue_call_token(
        state.signing,
        state.settings,
        call_id=call_id,
        tenant_id=signed.tenant_id,
        role="caller",
        compact=True,
    )
    parameters = {"token": issued.token}
    for name, field in (("from", "From"), ("to", "To")):
        value = _caller_detail(params, field)
        if value is not None:
            parameters[name] = value[: twiml.MAX_PARAMETER_LENGTH - len(name)]
    try:
        document = twiml.connect_stream(state.settings.twilio_media_stream_url(), parameters)
    except twiml.ParameterTooLong as exc:
        _outcome(
            "voice",
            f"failed: {exc}; shorten JWT_ISSUER, RELAY_TOKEN_AUDIENCE or the SIGNING_KEYS ids",
            logging.ERROR,
            call_sid=call_sid,
        )
        return _twiml(twiml.say_and_hang_up(twiml.TROUBLE))
    if agent["credential_id"] is not None:
        state.spawn(
            prefetch_upstream_url(
                state,
                tenant_id=signed.tenant_id,
                call_id=call_id,
                elevenlabs_agent_id=agent["elevenlabs_agent_id"],
                credential_id=agent["credential_id"],
            ),
            name=f"prefetch-{call_id}",
        )
    _outcome("voice", "connecting the stream", call_sid=call_sid, call_id=str(call_id))
    return _twiml(document)


async def _check_cap(state: AppState, tenant_id: uuid.UUID, limit: int, call_sid: str) -> None:
    """Refuse politely now rather than let the relay refuse the stream after Twilio connected
    it. Read-only: the relay takes the slot when the stream starts. Fails closed like the relay,
    which could not take a slot either."""
    try:
        active = await count_active_calls(state.redis, state.settings, tenant_id)
    except (RedisError, OSError, TimeoutError):
        _outcome(
            "voice", "refused: the call cap cannot be checked", logging.ERROR, call_sid=call_sid
        )
        raise _Refusal(200, twiml.TROUBLE) from None
    if active >= limit:
        _outcome(
            "voice",
            "refused: the tenant is at its concurrent-call limit",
            logging.WARNING,
            call_sid=call_sid,
            active=active,
            limit=limit,
        )
        raise _Refusal(200, twiml.BUSY)


async def _create_call(conn: Conn, signed: _SignedRequest, agent: Any, call_sid: str) -> uuid.UUID:
    """The call row for this CallSid; a retried webhook finds the one it created before."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", "twilio:" + call_sid
    )
    existing = await conn.fetchrow(
        """
        SELECT id, status = 'created' AND created_at > now() - make_interval(secs => $2)
            AS retry
        FROM calls WHERE provider_call_id = $1 AND direction = 'phone_inbound'
        """,
        call_sid,
        _RETRY_WINDOW_SECONDS,
    )
    if existing is not None:
        if not existing["retry"]:
            # A signature carries no timestamp: a captured webhook replayed later must not hand
            # out a caller token for a call that is under way (or over).
            _outcome("voice", "refused: a late repeat of this CallSid's webhook", logging.WARNING)
            raise _Refusal(200, twiml.TROUBLE)
        found: uuid.UUID = existing["id"]
        return found
    params = signed.params
    caller, called = _caller_detail(params, "From"), _caller_detail(params, "To")
    variables: dict[str, str] = {}
    for name, field in (agent["phone_dynamic_variables"] or {}).items():
        value = _caller_detail(params, field)
        if value is not None:
            variables[name] = value
    call_id = new_id()
    await conn.execute(
        """
        INSERT INTO calls (id, tenant_id, agent_id, created_at, direction, status,
            client_audio_format, dynamic_variables, metadata, from_number, to_number,
            provider_call_id)
        VALUES ($1, $2, $3, $4, 'phone_inbound', 'created', 'ulaw_8000', $5, $6, $7, $8, $9)
        """,
        call_id,
        signed.tenant_id,
        agent["id"],
        datetime.now(UTC),
        variables,
        {
            "twilio": {
                "call_sid": call_sid,
                "account_sid": signed.account_sid,
                "from": caller,
                "to": called,
            }
        },
        caller,
        called,
        call_sid,
    )
    return call_id


# --- the status callback -----------------------------------------------------------------------


@group(
    "POST",
    "/v1/twilio/status",
    summary="Twilio call status callback: record the call's status in its call log",
    body=TwilioStatusCallback,
    body_media_type=_FORM_MEDIA_TYPE,
    auth=False,
    raw_request=True,
    response_media_type=twiml.TWIML_MEDIA_TYPE,
    errors=[403, 413, 415, 429, 503],
    error_media_types={403: twiml.TWIML_MEDIA_TYPE},
)
async def twilio_status(call: ApiCall[Any, Any]) -> Response:
    """Set this URL as the phone number's call status callback in Twilio's console."""
    try:
        signature, params = await _read_form(call, "status", "CallSid")
        return await _record_status(call, signature, params)
    except _Refusal as refusal:
        return _twiml(twiml.empty(), refusal.status)


async def _record_status(call: ApiCall[Any, Any], signature: str, params: FormParams) -> Response:
    state = call.state
    call_sid = params.first("CallSid")
    route = None
    if is_call_sid(call_sid):
        async with platform_tx(state.pool) as conn:
            route = await conn.fetchrow(
                "SELECT tenant_id, call_id FROM twilio_call_route($1)", call_sid
            )
    if route is None:
        _outcome("status", "ignored: unknown CallSid", logging.WARNING, call_sid=call_sid)
        return _twiml(twiml.empty())
    assert call_sid is not None
    signed = await _verify(call, "status", signature, params, route["tenant_id"], call_sid=call_sid)
    call_id: uuid.UUID = route["call_id"]
    call_id_var.set(str(call_id))
    status = params.first("CallStatus") or ""
    sequence = _non_negative_int(params.first("SequenceNumber"))
    occurred_at = _twilio_time(params.first("Timestamp"))
    try:
        await append_telephony_event(
            state,
            tenant_id=signed.tenant_id,
            call_id=call_id,
            seq=sequence or 0,
            occurred_at=occurred_at,
            event_id=uuid.uuid5(
                _TELEPHONY_EVENT_NAMESPACE,
                f"{call_sid}|{status}|{sequence}|{occurred_at.isoformat()}",
            ),
            data={
                "call_status": status,
                "call_sid": call_sid,
                "duration_seconds": _non_negative_int(params.first("CallDuration")),
                "sequence": sequence,
            },
        )
    except InvalidCallEvent as exc:
        _outcome("status", f"ignored: {exc.reason}", logging.WARNING, call_sid=call_sid)
        return _twiml(twiml.empty())
    except CallLogUnavailable:
        _outcome("status", "failed: the call log is unavailable", logging.ERROR, call_sid=call_sid)
        raise Problem(503, "unavailable", "The call log is unavailable; retry later.") from None
    _outcome("status", f"recorded {status}", call_sid=call_sid, call_id=str(call_id))
    return _twiml(twiml.empty())


def _non_negative_int(text: str | None) -> int | None:
    if text is None or not text.isdigit() or len(text) > 12:
        return None
    return int(text)


def _twilio_time(text: str | None) -> datetime:
    """Twilio's ``Timestamp`` (RFC 2822); now when it is absent or unreadable."""
    if text:
        try:
            parsed = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed
    return datetime.now(UTC)
