"""What the relay needs for one call, built when the caller connects.

Why an internal endpoint rather than a Redis record written at token issue: the relay must never
hold a tenant's provider key or the vault keys. A private agent's upstream URL is an ElevenLabs
signed URL, which needs the tenant's API key, and a signed URL is only valid for 15 minutes while a
call token may be used for much longer (reconnects). So the control API decrypts the key on use,
fetches a fresh signed URL at connect time, and hands the relay only that URL and the call's
settings. Postgres stays the one source of truth (an ended call is refused at once), and nothing
secret sits in Redis waiting to be read.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from control_api.agent_credentials import elevenlabs_key
from control_api.db import tenant_tx
from control_api.elevenlabs import (
    ConversationUrl,
    ElevenLabsAgentNotFound,
    ElevenLabsAuthError,
    ElevenLabsError,
    ElevenLabsUnavailable,
    fetch_signed_url,
    public_conversation_url,
)
from control_api.problems import Problem
from control_api.telephony.prefetch import take_prefetched_url
from voicerelay.call_token import CallTokenClaims

if TYPE_CHECKING:
    from control_api.state import AppState

log = logging.getLogger(__name__)

ENDED_STATUSES = frozenset({"ended", "failed"})


class SessionAgent(BaseModel):
    id: uuid.UUID
    elevenlabs_agent_id: str
    input_audio_format: str
    output_audio_format: str
    allowed_origins: list[str]


class ConversationInitiation(BaseModel):
    conversation_config_override: dict[str, Any]
    dynamic_variables: dict[str, Any]


class Telephony(BaseModel):
    provider: Literal["twilio"] = "twilio"
    call_sid: str
    account_sid: str


Direction = Literal["browser", "phone_inbound", "phone_outbound"]


class CallSession(BaseModel):
    call_id: uuid.UUID
    tenant_id: uuid.UUID
    role: Literal["caller", "monitor"]
    status: str
    agent: SessionAgent
    client_audio_format: str
    conversation_initiation: ConversationInitiation
    upstream_url: str
    upstream_url_expires_at: datetime | None
    max_duration_seconds: int
    tenant_max_concurrent_calls: int
    conversation_ids: list[str]
    direction: Direction = "browser"
    # The phone leg's provider ids, which the relay checks against the stream's ``start``.
    telephony: Telephony | None = None


class UnknownCall(Exception):
    """The token is validly signed but names no call of its tenant."""


_CALL_QUERY = """
    SELECT c.id, c.status, c.client_audio_format, c.dynamic_variables AS call_variables,
           c.conversation_ids, c.direction, c.metadata, a.id AS agent_id, a.elevenlabs_agent_id, a.credential_id,
           a.input_audio_format, a.output_audio_format, a.conversation_overrides,
           a.dynamic_variables AS agent_variables, a.allowed_origins,
           t.max_concurrent_calls
    FROM calls c
    JOIN tenants t ON t.id = c.tenant_id
    LEFT JOIN agents a ON a.tenant_id = c.tenant_id AND a.id = c.agent_id
    WHERE c.id = $1
"""


async def build_call_session(state: AppState, claims: CallTokenClaims) -> CallSession:
    api_key: str | None = None
    upstream: ConversationUrl | None = None
    async with tenant_tx(state.pool, claims.tenant_id) as conn:
        row = await conn.fetchrow(_CALL_QUERY, claims.call_id)
        if row is None:
            raise UnknownCall
        if row["status"] in ENDED_STATUSES:
            raise Problem(409, "call_ended", "This call has ended.")
        if row["agent_id"] is None:
            raise Problem(409, "agent_unavailable", "The call's agent no longer exists.")
        if row["credential_id"] is not None:
            if claims.role == "caller" and row["direction"] != "browser":
                upstream = await take_prefetched_url(
                    conn, state.require_vault(), claims.tenant_id, claims.call_id
                )
            if upstream is None:
                api_key = await elevenlabs_key(state, conn, claims.tenant_id, row["credential_id"])
    # The network call happens after the transaction so no database connection waits on it.
    if upstream is None:
        upstream = await _upstream_url(state, row["elevenlabs_agent_id"], api_key, claims)
    return CallSession(
        call_id=row["id"],
        tenant_id=claims.tenant_id,
        role=claims.role,
        status=row["status"],
        agent=SessionAgent(
            id=row["agent_id"],
            elevenlabs_agent_id=row["elevenlabs_agent_id"],
            input_audio_format=row["input_audio_format"],
            output_audio_format=row["output_audio_format"],
            allowed_origins=list(row["allowed_origins"]),
        ),
        client_audio_format=row["client_audio_format"],
        conversation_initiation=ConversationInitiation(
            conversation_config_override=dict(row["conversation_overrides"] or {}),
            # The call's own values win over the agent's defaults.
            dynamic_variables={
                **(row["agent_variables"] or {}),
                **(row["call_variables"] or {}),
            },
        ),
        upstream_url=upstream.url,
        upstream_url_expires_at=upstream.expires_at,
        max_duration_seconds=state.settings.max_call_duration_seconds,
        tenant_max_concurrent_calls=row["max_concurrent_calls"],
        conversation_ids=list(row["conversation_ids"]),
        direction=row["direction"],
        telephony=_telephony(row["direction"], row["metadata"]),
    )


def _telephony(direction: str, metadata: dict[str, Any] | None) -> Telephony | None:
    twilio = (metadata or {}).get("twilio") if direction != "browser" else None
    if not isinstance(twilio, dict):
        return None
    call_sid, account_sid = twilio.get("call_sid"), twilio.get("account_sid")
    if not isinstance(call_sid, str) or not isinstance(account_sid, str):
        return None
    return Telephony(call_sid=call_sid, account_sid=account_sid)


async def _upstream_url(
    state: AppState, agent_id: str, api_key: str | None, claims: CallTokenClaims
) -> ConversationUrl:
    settings = state.settings
    if api_key is None:
        return ConversationUrl(public_conversation_url(settings.elevenlabs_api_url, agent_id), None)
    context = {"call_id": str(claims.call_id)}
    try:
        return await fetch_signed_url(
            state.http,
            settings.elevenlabs_api_url,
            api_key=api_key,
            agent_id=agent_id,
            timeout_seconds=settings.elevenlabs_timeout_seconds,
        )
    except ElevenLabsAuthError:
        log.warning("ElevenLabs rejected the tenant's API key", extra=context)
        raise Problem(
            502, "upstream_auth_failed", "ElevenLabs rejected the agent's API key."
        ) from None
    except ElevenLabsAgentNotFound:
        log.warning("ElevenLabs does not know the agent", extra=context)
        raise Problem(
            502, "upstream_agent_not_found", "ElevenLabs does not know the agent id."
        ) from None
    except ElevenLabsUnavailable as exc:
        log.warning("ElevenLabs unavailable: %s", exc, extra=context)
        raise Problem(
            504 if exc.timed_out else 502,
            "upstream_unavailable",
            "ElevenLabs could not be reached; try again shortly.",
        ) from None
    except ElevenLabsError as exc:
        log.warning("ElevenLabs gave no signed URL: %s", exc, extra=context)
        raise Problem(502, "upstream_error", "ElevenLabs did not provide a signed URL.") from None
