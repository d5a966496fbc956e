"""Endpoints: agents (an ElevenLabs agent as a tenant uses it) and their phone numbers."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from pydantic import BaseModel, Field, model_validator

from control_api import agent_store as store
from control_api.agent_settings import (
    AllowedOrigins,
    ConversationOverrides,
    DynamicVariables,
    PhoneDynamicVariables,
    PhoneNumbers,
    TransferNumbers,
)
from control_api.audio_formats import DEFAULT_AUDIO_FORMAT, AudioFormat
from control_api.db import tenant_tx
from control_api.endpoints import ApiCall, ApiModel, EndpointGroup
from control_api.keyset_cursor import PageQuery, decode_cursor, encode_cursor
from control_api.pg_text import PgText
from control_api.problems import Problem

group = EndpointGroup("agents")

Name = Annotated[PgText, Field(min_length=1, max_length=200)]
# It ends up in ElevenLabs URLs, so only the characters their agent ids use.
ElevenLabsAgentId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,200}$")]

_CREDENTIAL_DOC = (
    "An `elevenlabs` credential of this tenant, for private agents; null for public agents."
)
_TRANSFER_DOC = (
    "E.164 numbers a phone call may be transferred to when the agent asks for a transfer; "
    "any other number is refused (an LLM must never dial numbers of a caller's choosing)."
)
_PHONE_VARIABLES_DOC = (
    "For phone calls: dynamic-variable name -> the Twilio webhook parameter whose value it "
    'takes (e.g. {"caller_number": "From", "caller_city": "FromCity"}). A parameter '
    "Twilio did not send leaves its variable to the agent's default."
)
_ORIGINS_DOC = (
    "Browser origins (scheme://host[:port]) whose pages may connect with this agent's call "
    "tokens; an empty list places no origin restriction."
)


class AgentCreate(ApiModel):
    name: Name
    elevenlabs_agent_id: ElevenLabsAgentId
    credential_id: UUID | None = Field(default=None, description=_CREDENTIAL_DOC)
    phone_numbers: PhoneNumbers = Field(
        default_factory=list, description="E.164 numbers routed to this agent (platform-unique)."
    )
    input_audio_format: AudioFormat = DEFAULT_AUDIO_FORMAT
    output_audio_format: AudioFormat = DEFAULT_AUDIO_FORMAT
    conversation_overrides: ConversationOverrides = Field(default_factory=ConversationOverrides)
    dynamic_variables: DynamicVariables = Field(default_factory=dict)
    allowed_origins: AllowedOrigins = Field(default_factory=list, description=_ORIGINS_DOC)
    transfer_numbers: TransferNumbers = Field(default_factory=list, description=_TRANSFER_DOC)
    phone_dynamic_variables: PhoneDynamicVariables = Field(
        default_factory=dict, description=_PHONE_VARIABLES_DOC
    )


class AgentPatch(ApiModel):
    """Only the fields present change; ``phone_numbers`` replaces the whole set."""

    name: Name | None = None
    elevenlabs_agent_id: ElevenLabsAgentId | None = None
    credential_id: UUID | None = Field(default=None, description=_CREDENTIAL_DOC)
    phone_numbers: PhoneNumbers | None = None
    input_audio_format: AudioFormat | None = None
    output_audio_format: AudioFormat | None = None
    conversation_overrides: ConversationOverrides | None = None
    dynamic_variables: DynamicVariables | None = None
    allowed_origins: AllowedOrigins | None = Field(default=None, description=_ORIGINS_DOC)
    transfer_numbers: TransferNumbers | None = Field(default=None, description=_TRANSFER_DOC)
    phone_dynamic_variables: PhoneDynamicVariables | None = Field(
        default=None, description=_PHONE_VARIABLES_DOC
    )

    @model_validator(mode="after")
    def _null_only_where_meaningful(self) -> AgentPatch:
        for name in self.model_fields_set:
            if name != "credential_id" and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null (only credential_id can be cleared)")
        return self


class Agent(BaseModel):
    id: UUID
    name: str
    elevenlabs_agent_id: str
    credential_id: UUID | None
    phone_numbers: list[str]
    input_audio_format: AudioFormat
    output_audio_format: AudioFormat
    conversation_overrides: dict[str, Any]
    dynamic_variables: dict[str, Any]
    allowed_origins: list[str]
    transfer_numbers: list[str]
    phone_dynamic_variables: dict[str, str]
    created_at: datetime
    updated_at: datetime


class AgentPage(BaseModel):
    items: list[Agent]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at end.")


def _out(record: store.AgentRecord) -> Agent:
    return Agent(
        id=record.id,
        name=record.name,
        elevenlabs_agent_id=record.elevenlabs_agent_id,
        credential_id=record.credential_id,
        phone_numbers=record.phone_numbers,
        input_audio_format=record.input_audio_format,
        output_audio_format=record.output_audio_format,
        conversation_overrides=record.conversation_overrides,
        dynamic_variables=record.dynamic_variables,
        allowed_origins=record.allowed_origins,
        transfer_numbers=record.transfer_numbers,
        phone_dynamic_variables=record.phone_dynamic_variables,
        created_at=record.created_at,
        updated_at=record.updated_at,
    )


def _column_values(body: AgentCreate | AgentPatch, fields: set[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in sorted(fields - {"phone_numbers"}):
        value = getattr(body, name)
        if isinstance(value, ConversationOverrides):
            value = value.to_wire()
        elif isinstance(value, AudioFormat):
            value = value.value
        values[name] = value
    return values


def _not_found() -> Problem:
    return Problem(404, "not_found", "No such agent.")


def _store_problem(exc: Exception) -> Problem:
    if isinstance(exc, store.PhoneNumberTaken):
        detail = (
            f"The phone number {exc.number} is already in use."
            if exc.number
            else "One of the phone numbers is already in use."
        )
        if exc.number:
            return Problem(409, "phone_number_taken", detail, phone_number=exc.number)
        return Problem(409, "phone_number_taken", detail)
    return Problem(
        422,
        "invalid_credential",
        "credential_id must name an elevenlabs credential of this tenant.",
    )


@group(
    "POST",
    "/v1/agents",
    summary="Create an agent",
    body=AgentCreate,
    response=Agent,
    status=201,
    role="admin",
    errors=[409],
)
async def create_agent(call: ApiCall[AgentCreate, Any]) -> Agent:
    body = call.body
    values = _column_values(body, set(AgentCreate.model_fields))
    try:
        async with tenant_tx(call.state.pool, call.tenant_id) as conn:
            record = await store.create_agent(conn, call.tenant_id, values, body.phone_numbers)
    except (store.PhoneNumberTaken, store.InvalidCredential) as exc:
        raise _store_problem(exc) from None
    return _out(record)


@group(
    "GET",
    "/v1/agents",
    summary="List agents, newest first",
    query=PageQuery,
    response=AgentPage,
)
async def list_agents(call: ApiCall[Any, PageQuery]) -> AgentPage:
    after = decode_cursor(call.query.cursor) if call.query.cursor else None
    async with tenant_tx(call.state.pool, call.tenant_id, readonly=True) as conn:
        records = await store.list_agents(conn, limit=call.query.limit + 1, after=after)
    page = records[: call.query.limit]
    more = len(records) > call.query.limit
    return AgentPage(
        items=[_out(r) for r in page],
        next_cursor=encode_cursor(page[-1].created_at, page[-1].id) if more else None,
    )


@group("GET", "/v1/agents/{id}", summary="One agent", response=Agent, errors=[404])
async def get_agent(call: ApiCall[Any, Any]) -> Agent:
    async with tenant_tx(call.state.pool, call.tenant_id, readonly=True) as conn:
        record = await store.get_agent(conn, call.path["id"])
    if record is None:
        raise _not_found()
    return _out(record)


@group(
    "PATCH",
    "/v1/agents/{id}",
    summary="Change some of an agent's fields",
    body=AgentPatch,
    response=Agent,
    role="admin",
    errors=[404, 409],
)
async def update_agent(call: ApiCall[AgentPatch, Any]) -> Agent:
    body = call.body
    values = _column_values(body, body.model_fields_set)
    numbers = body.phone_numbers if "phone_numbers" in body.model_fields_set else None
    try:
        async with tenant_tx(call.state.pool, call.tenant_id) as conn:
            record = await store.update_agent(
                conn, call.tenant_id, call.path["id"], values, numbers
            )
    except (store.PhoneNumberTaken, store.InvalidCredential) as exc:
        raise _store_problem(exc) from None
    if record is None:
        raise _not_found()
    return _out(record)


@group(
    "DELETE",
    "/v1/agents/{id}",
    summary="Delete an agent and release its phone numbers",
    status=204,
    role="admin",
    errors=[404],
)
async def delete_agent(call: ApiCall[Any, Any]) -> None:
    async with tenant_tx(call.state.pool, call.tenant_id) as conn:
        deleted = await store.delete_agent(conn, call.path["id"])
    if not deleted:
        raise _not_found()
