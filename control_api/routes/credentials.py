"""Endpoints: provider credentials (ElevenLabs API keys, Twilio account SID + auth token).

Secrets are write-only. Responses carry a mask (the last four characters) and non-secret public
information: a Twilio account SID is an account identifier, not an authenticator, so it is shown
in full (``public_info.account_sid``) to let people tell their accounts apart.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, Field, RootModel, SecretStr, field_validator

from control_api import credential_store as store
from control_api.db import tenant_tx
from control_api.endpoints import ApiCall, ApiModel, EndpointGroup
from control_api.keyset_cursor import PageQuery, decode_cursor, encode_cursor
from control_api.pg_text import PgText
from control_api.problems import Problem

group = EndpointGroup("credentials")

Name = Annotated[PgText, Field(min_length=1, max_length=200)]
AccountSid = Annotated[str, Field(pattern=r"^AC[0-9a-fA-F]{32}$")]


def _secret_text(value: SecretStr) -> SecretStr:
    # Messages name the rule, never the value: it is a secret the caller just sent.
    text = value.get_secret_value()
    if any(ch.isspace() for ch in text) or not text.isprintable():
        raise ValueError("must not contain whitespace or control characters")
    return value


class ElevenLabsSecret(ApiModel):
    provider: Literal["elevenlabs"]
    api_key: SecretStr = Field(min_length=16, max_length=512, description="Write-only.")

    _check_api_key = field_validator("api_key")(_secret_text)

    def secret(self) -> tuple[dict[str, str], str, dict[str, Any]]:
        key = self.api_key.get_secret_value()
        return {"api_key": key}, store.mask_secret(key), {}


class TwilioSecret(ApiModel):
    provider: Literal["twilio"]
    account_sid: AccountSid = Field(description="AC followed by 32 hex digits; shown in full.")
    auth_token: SecretStr = Field(min_length=16, max_length=256, description="Write-only.")

    _check_auth_token = field_validator("auth_token")(_secret_text)

    def secret(self) -> tuple[dict[str, str], str, dict[str, Any]]:
        sid = "AC" + self.account_sid[2:].lower()
        token = self.auth_token.get_secret_value()
        return (
            {"account_sid": sid, "auth_token": token},
            store.mask_secret(token),
            {"account_sid": sid},
        )


class ElevenLabsCredentialCreate(ElevenLabsSecret):
    name: Name


class TwilioCredentialCreate(TwilioSecret):
    name: Name


class CredentialCreate(
    RootModel[
        Annotated[
            ElevenLabsCredentialCreate | TwilioCredentialCreate, Field(discriminator="provider")
        ]
    ]
):
    pass


class CredentialSecretReplace(
    RootModel[Annotated[ElevenLabsSecret | TwilioSecret, Field(discriminator="provider")]]
):
    pass


class Credential(BaseModel):
    id: UUID
    provider: Literal["elevenlabs", "twilio"]
    name: str
    mask: str = Field(description="The last four characters of the secret, e.g. '…f3a9'.")
    public_info: dict[str, Any] = Field(
        description="Non-secret details: `account_sid` for Twilio; empty for ElevenLabs."
    )
    created_at: datetime
    updated_at: datetime


class CredentialPage(BaseModel):
    items: list[Credential]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at end.")


def _out(row: store.CredentialRow) -> Credential:
    return Credential(
        id=row.id,
        provider=row.provider,
        name=row.name,
        mask=row.mask,
        public_info=row.public_info,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _not_found() -> Problem:
    return Problem(404, "not_found", "No such credential.")


@group(
    "POST",
    "/v1/credentials",
    summary="Store a provider credential (encrypted; the secret is never shown again)",
    body=CredentialCreate,
    response=Credential,
    status=201,
    role="admin",
    errors=[503],
)
async def create_credential(call: ApiCall[CredentialCreate, Any]) -> Credential:
    vault = call.state.require_vault()
    body = call.body.root
    secret, mask, public_info = body.secret()
    async with tenant_tx(call.state.pool, call.tenant_id) as conn:
        row = await store.create_credential(
            conn,
            vault,
            tenant_id=call.tenant_id,
            provider=body.provider,
            name=body.name,
            secret=secret,
            mask=mask,
            public_info=public_info,
        )
    return _out(row)


@group(
    "GET",
    "/v1/credentials",
    summary="List credentials, newest first",
    query=PageQuery,
    response=CredentialPage,
)
async def list_credentials(call: ApiCall[Any, PageQuery]) -> CredentialPage:
    after = decode_cursor(call.query.cursor) if call.query.cursor else None
    async with tenant_tx(call.state.pool, call.tenant_id, readonly=True) as conn:
        rows = await store.list_credentials(conn, limit=call.query.limit + 1, after=after)
    page = rows[: call.query.limit]
    more = len(rows) > call.query.limit
    return CredentialPage(
        items=[_out(r) for r in page],
        next_cursor=encode_cursor(page[-1].created_at, page[-1].id) if more else None,
    )


@group(
    "GET",
    "/v1/credentials/{id}",
    summary="One credential (mask and public details only)",
    response=Credential,
    errors=[404],
)
async def get_credential(call: ApiCall[Any, Any]) -> Credential:
    async with tenant_tx(call.state.pool, call.tenant_id, readonly=True) as conn:
        row = await store.get_credential(conn, call.path["id"])
    if row is None:
        raise _not_found()
    return _out(row)


@group(
    "PUT",
    "/v1/credentials/{id}/secret",
    summary="Replace a credential's secret (rotation); the provider cannot change",
    body=CredentialSecretReplace,
    response=Credential,
    role="admin",
    errors=[404, 409, 503],
)
async def replace_credential_secret(call: ApiCall[CredentialSecretReplace, Any]) -> Credential:
    vault = call.state.require_vault()
    body = call.body.root
    secret, mask, public_info = body.secret()
    async with tenant_tx(call.state.pool, call.tenant_id) as conn:
        provider = await store.credential_provider(conn, call.path["id"])
        if provider is None:
            raise _not_found()
        if provider != body.provider:
            raise Problem(
                409,
                "provider_mismatch",
                f"This is a {provider} credential; create a new one for another provider.",
            )
        row = await store.replace_secret(
            conn,
            vault,
            tenant_id=call.tenant_id,
            credential_id=call.path["id"],
            provider=body.provider,
            secret=secret,
            mask=mask,
            public_info=public_info,
        )
    if row is None:
        raise _not_found()
    return _out(row)


@group(
    "DELETE",
    "/v1/credentials/{id}",
    summary="Delete a credential that no agent uses",
    status=204,
    role="admin",
    errors=[404, 409],
)
async def delete_credential(call: ApiCall[Any, Any]) -> None:
    try:
        async with tenant_tx(call.state.pool, call.tenant_id) as conn:
            deleted = await store.delete_credential(conn, call.path["id"])
    except store.CredentialInUse:
        raise Problem(
            409,
            "credential_in_use",
            "An agent uses this credential; change or delete the agent first.",
        ) from None
    if not deleted:
        raise _not_found()
