"""Endpoints: creating calls and issuing their call tokens (caller and monitor).

The call-log read endpoints (``GET /v1/calls...``) live in their own module.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from pydantic import AfterValidator, BaseModel, Field, JsonValue

from control_api.agent_settings import DynamicVariables
from control_api.audio_formats import AudioFormat
from control_api.bootstrap import new_id
from control_api.call_tokens import IssuedCallToken, issue_call_token
from control_api.db import tenant_tx
from control_api.endpoints import ApiCall, ApiModel, EndpointGroup
from control_api.problems import Problem
from voicerelay.call_token import CallRole

group = EndpointGroup("calls")

MAX_METADATA_BYTES = 4096


def _check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    try:
        encoded = orjson.dumps(value)
    except TypeError:  # an integer beyond 64 bits: neither orjson nor the jsonb codec takes it
        raise ValueError("metadata numbers must fit in 64 bits") from None
    if len(encoded) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata must serialise to at most {MAX_METADATA_BYTES} bytes")
    return value


# Caller-supplied values the relay passes through untouched; bounded so a call row stays small.
Metadata = Annotated[dict[str, JsonValue], AfterValidator(_check_metadata)]


class CreateCall(ApiModel):
    agent_id: uuid.UUID
    client_audio_format: AudioFormat | None = Field(
        default=None, description="The caller's audio format; default: the agent's input format."
    )
    dynamic_variables: DynamicVariables = Field(default_factory=dict)
    metadata: Metadata = Field(default_factory=dict)


class CallToken(BaseModel):
    call_id: uuid.UUID
    role: CallRole
    token: str
    relay_url: str
    expires_at: datetime
    connect_by: datetime = Field(
        description="The relay refuses a first connection after this instant; "
        "reconnects are accepted until expires_at."
    )


def _token_response(call: ApiCall[Any, Any], call_id: uuid.UUID, role: CallRole) -> CallToken:
    state = call.state
    issued: IssuedCallToken = issue_call_token(
        state.signing, state.settings, call_id=call_id, tenant_id=call.tenant_id, role=role
    )
    return CallToken(
        call_id=call_id,
        role=role,
        token=issued.token,
        relay_url=state.settings.relay_public_url,
        expires_at=issued.expires_at,
        connect_by=issued.connect_by,
    )


@group(
    "POST",
    "/v1/calls",
    summary="Create a browser call and its caller token",
    body=CreateCall,
    response=CallToken,
    status=201,
    role="admin",
    errors=[404],
)
async def create_call(call: ApiCall[CreateCall, Any]) -> CallToken:
    body = call.body
    call_id = new_id()
    async with tenant_tx(call.state.pool, call.tenant_id) as conn:
        agent = await conn.fetchrow(
            "SELECT id, input_audio_format FROM agents WHERE id = $1", body.agent_id
        )
        if agent is None:
            raise Problem(404, "not_found", "No such agent.")
        await conn.execute(
            "INSERT INTO calls (id, tenant_id, agent_id, created_at, direction, status,"
            " client_audio_format, dynamic_variables, metadata)"
            " VALUES ($1, $2, $3, $4, 'browser', 'created', $5, $6, $7)",
            call_id,
            call.tenant_id,
            agent["id"],
            datetime.now(UTC),
            body.client_audio_format.value
            if body.client_audio_format
            else agent["input_audio_format"],
            body.dynamic_variables,
            body.metadata,
        )
    return _token_response(call, call_id, "caller")


@group(
    "POST",
    "/v1/calls/{id}/monitor-token",
    summary="Issue a receive-only token to listen in on a call",
    response=CallToken,
    role="admin",
    errors=[404, 409],
)
async def monitor_token(call: ApiCall[Any, Any]) -> CallToken:
    call_id: uuid.UUID = call.path["id"]
    async with tenant_tx(call.state.pool, call.tenant_id, readonly=True) as conn:
        status = await conn.fetchval("SELECT status FROM calls WHERE id = $1", call_id)
    if status is None:
        raise Problem(404, "not_found", "No such call.")
    if status in ("ended", "failed"):
        raise Problem(409, "call_ended", "This call has ended.")
    return _token_response(call, call_id, "monitor")
