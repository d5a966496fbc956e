"""Endpoints: sign in with a password, refresh and sign out, and who am I."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field
from starlette.responses import Response

from control_api.client_ip import request_client_ip
from control_api.db import Conn, platform_tx, tenant_tx
from control_api.endpoints import ApiCall, ApiModel, EndpointGroup
from control_api.problems import Problem
from control_api.ratelimit import limit_login, limit_refresh
from control_api.security.access_tokens import issue_access_token
from control_api.security.passwords import verify_password_async
from control_api.security.refresh_tokens import (
    IssuedRefreshToken,
    end_session,
    rotate_refresh_token,
    start_family,
)
from control_api.state import AppState

group = EndpointGroup("auth")

RoleName = Literal["viewer", "admin", "owner"]


class LoginBody(ApiModel):
    # Not validated as an address: a malformed email must fail like a wrong password.
    email: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=1024)
    tenant: str | None = Field(
        default=None,
        max_length=63,
        description="Tenant slug; needed only when the same credentials match users in several tenants.",
    )


class RefreshBody(ApiModel):
    refresh_token: str = Field(min_length=1, max_length=200)


class LogoutBody(ApiModel):
    refresh_token: str = Field(min_length=1, max_length=200)
    everywhere: bool = Field(
        default=False,
        description="Also end every other session of the user and every access token issued so far.",
    )


class SessionUser(BaseModel):
    id: uuid.UUID
    email: str
    role: RoleName
    tenant_id: uuid.UUID
    must_change_password: bool


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["Bearer"] = "Bearer"
    expires_in: int
    refresh_token: str
    refresh_expires_in: int
    user: SessionUser


class MeResponse(BaseModel):
    kind: Literal["user", "api_key"]
    id: uuid.UUID
    tenant_id: uuid.UUID
    role: RoleName
    email: str | None = None
    must_change_password: bool | None = None
    name: str | None = Field(default=None, description="The API key's name.")


def _invalid_login() -> Problem:
    return Problem(401, "invalid_credentials", "The email or password is incorrect.")


@group(
    "POST",
    "/v1/auth/login",
    summary="Sign in with email and password",
    body=LoginBody,
    response=TokenResponse,
    auth=False,
    errors=[401, 403, 409, 429],
)
async def login(call: ApiCall[LoginBody, Any]) -> TokenResponse:
    state, body = call.state, call.body
    ip = request_client_ip(call.request, state.settings.trusted_proxies)
    await limit_login(state, client_ip=ip, email=body.email)
    async with platform_tx(state.pool) as conn:
        candidates = await conn.fetch("SELECT * FROM auth_users_by_email($1)", body.email.strip())
    if body.tenant is not None:
        candidates = [c for c in candidates if c["tenant_slug"] == body.tenant.strip().lower()]
    if not candidates:
        # Same cost as a wrong password, so response times do not reveal which emails exist.
        await verify_password_async(None, body.password)
        raise _invalid_login()
    checks = await asyncio.gather(
        *(verify_password_async(c["password_hash"], body.password) for c in candidates)
    )
    matches = [c for c, ok in zip(candidates, checks, strict=True) if ok]
    if not matches:
        raise _invalid_login()
    if len(matches) > 1:
        raise Problem(
            409,
            "tenant_required",
            "These credentials match accounts in several tenants; send the tenant's slug.",
            tenants=sorted(m["tenant_slug"] for m in matches),
        )
    match = matches[0]
    if match["disabled"]:
        raise Problem(403, "account_disabled", "This account has been disabled.")
    async with tenant_tx(state.pool, match["tenant_id"]) as tconn:
        refresh = await start_family(
            tconn, state.settings, tenant_id=match["tenant_id"], user_id=match["user_id"]
        )
        return await session_response(state, tconn, match["user_id"], refresh)


async def session_response(
    state: AppState, conn: Conn, user_id: uuid.UUID, refresh: IssuedRefreshToken
) -> TokenResponse:
    """Access token plus the given refresh token, for a user read inside the tenant's transaction."""
    row = await conn.fetchrow(
        "SELECT id, tenant_id, email, role, must_change_password, disabled_at IS NOT NULL AS disabled"
        " FROM users WHERE id = $1",
        user_id,
    )
    if row is None or row["disabled"]:
        raise Problem(401, "invalid_credentials", "The account is not available.")
    access = issue_access_token(
        state.signing,
        state.settings,
        user_id=row["id"],
        tenant_id=row["tenant_id"],
        role=row["role"],
        must_change_password=row["must_change_password"],
    )
    return TokenResponse(
        access_token=access.token,
        expires_in=access.expires_in,
        refresh_token=refresh.token,
        refresh_expires_in=refresh.expires_in,
        user=SessionUser(
            id=row["id"],
            email=row["email"],
            role=row["role"],
            tenant_id=row["tenant_id"],
            must_change_password=row["must_change_password"],
        ),
    )


@group(
    "POST",
    "/v1/auth/refresh",
    summary="Exchange a refresh token for new tokens (the presented one stops working)",
    body=RefreshBody,
    response=TokenResponse,
    auth=False,
    errors=[401, 429],
)
async def refresh(call: ApiCall[RefreshBody, Any]) -> TokenResponse:
    state = call.state
    await limit_refresh(
        state, client_ip=request_client_ip(call.request, state.settings.trusted_proxies)
    )
    rotated = await rotate_refresh_token(state.pool, state.settings, call.body.refresh_token)
    async with tenant_tx(state.pool, rotated.tenant_id, readonly=True) as conn:
        return await session_response(state, conn, rotated.user_id, rotated.refresh)


@group(
    "POST",
    "/v1/auth/logout",
    summary="End the refresh token's session (optionally every session of the user)",
    body=LogoutBody,
    status=204,
    auth=False,
)
async def logout(call: ApiCall[LogoutBody, Any]) -> Response:
    await end_session(call.state.pool, call.body.refresh_token, everywhere=call.body.everywhere)
    return Response(status_code=204)


@group("GET", "/v1/me", summary="The authenticated user or API key", response=MeResponse)
async def me(call: ApiCall[Any, Any]) -> MeResponse:
    principal = call.require_principal()
    async with tenant_tx(call.state.pool, principal.tenant_id, readonly=True) as conn:
        if principal.kind == "user":
            row = await conn.fetchrow(
                "SELECT email, must_change_password FROM users WHERE id = $1",
                principal.subject_id,
            )
            if row is None:
                raise Problem(401, "invalid_token", "The user no longer exists.")
            return MeResponse(
                kind="user",
                id=principal.subject_id,
                tenant_id=principal.tenant_id,
                role=principal.role,
                email=row["email"],
                must_change_password=row["must_change_password"],
            )
        name = await conn.fetchval("SELECT name FROM api_keys WHERE id = $1", principal.subject_id)
    return MeResponse(
        kind="api_key",
        id=principal.subject_id,
        tenant_id=principal.tenant_id,
        role=principal.role,
        name=name,
    )
