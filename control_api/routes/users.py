"""Endpoints: the people of a tenant, their roles, and changing one's own password.

Owners are special: only an owner may make, change or remove an owner, and a tenant always keeps
at least one active owner (changes that would leave none answer 409 ``last_owner``).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

import asyncpg
from pydantic import BaseModel, Field
from starlette.responses import Response

from control_api.bootstrap import new_id
from control_api.db import Conn, tenant_tx
from control_api.emails import EmailAddress
from control_api.endpoints import ROLE_RANK, ApiCall, ApiModel, EndpointGroup
from control_api.principal import Principal
from control_api.problems import Problem
from control_api.routes.auth import TokenResponse, session_response
from control_api.security.access_tokens import revoke_issued_access_tokens
from control_api.security.password_change import CHANGE_PASSWORD_PATH
from control_api.security.passwords import (
    generate_password,
    hash_password_async,
    verify_password_async,
)
from control_api.security.refresh_tokens import revoke_user_families, start_family

group = EndpointGroup("users")

RoleName = Literal["viewer", "admin", "owner"]
MIN_PASSWORD_LENGTH = 12

_USER_COLUMNS = "id, email, role, must_change_password, disabled_at, created_at, updated_at"


class User(BaseModel):
    id: uuid.UUID
    email: str
    role: RoleName
    disabled: bool
    disabled_at: datetime | None
    must_change_password: bool
    created_at: datetime
    updated_at: datetime


class UserList(BaseModel):
    items: list[User]


class CreatedUser(User):
    password: str = Field(description="One-time password; shown only in this response.")


class CreateUserBody(ApiModel):
    email: EmailAddress
    role: RoleName = "viewer"


class UpdateUserBody(ApiModel):
    role: RoleName | None = None
    disabled: bool | None = None


class ChangePasswordBody(ApiModel):
    current_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(min_length=MIN_PASSWORD_LENGTH, max_length=1024)


def _user(row: Any) -> User:
    return User(disabled=row["disabled_at"] is not None, **dict(row))


@group("GET", "/v1/users", summary="List the tenant's users", response=UserList)
async def list_users(call: ApiCall[Any, Any]) -> UserList:
    async with tenant_tx(call.state.pool, call.tenant_id, readonly=True) as conn:
        rows = await conn.fetch(f"SELECT {_USER_COLUMNS} FROM users ORDER BY created_at, id")
    return UserList(items=[_user(r) for r in rows])


@group(
    "POST",
    "/v1/users",
    summary="Add a user; the response carries their one-time password",
    body=CreateUserBody,
    response=CreatedUser,
    status=201,
    role="admin",
    errors=[409],
)
async def create_user(call: ApiCall[CreateUserBody, Any]) -> CreatedUser:
    principal = call.require_principal()
    _require_rank_for(principal, call.body.role)
    password = generate_password()
    password_hash = await hash_password_async(password)
    try:
        async with tenant_tx(call.state.pool, principal.tenant_id) as conn:
            row = await conn.fetchrow(
                f"""
                INSERT INTO users (id, tenant_id, email, password_hash, role, must_change_password)
                VALUES ($1, $2, $3, $4, $5, true)
                RETURNING {_USER_COLUMNS}
                """,
                new_id(),
                principal.tenant_id,
                call.body.email,
                password_hash,
                call.body.role,
            )
    except asyncpg.UniqueViolationError:
        raise Problem(409, "email_taken", "A user with this email already exists.") from None
    return CreatedUser(password=password, **_user(row).model_dump())


@group("GET", "/v1/users/{id}", summary="One user", response=User, errors=[404])
async def get_user(call: ApiCall[Any, Any]) -> User:
    async with tenant_tx(call.state.pool, call.tenant_id, readonly=True) as conn:
        row = await conn.fetchrow(
            f"SELECT {_USER_COLUMNS} FROM users WHERE id = $1", call.path["id"]
        )
    if row is None:
        raise Problem(404, "not_found", "No such user.")
    return _user(row)


@group(
    "PATCH",
    "/v1/users/{id}",
    summary="Change a user's role or disable/enable them",
    body=UpdateUserBody,
    response=User,
    role="admin",
    errors=[404, 409],
)
async def update_user(call: ApiCall[UpdateUserBody, Any]) -> User:
    principal = call.require_principal()
    body = call.body
    if body.role is not None:
        _require_rank_for(principal, body.role)
    async with tenant_tx(call.state.pool, principal.tenant_id) as conn:
        target = await _lock_target(conn, principal, call.path["id"])
        stays_owner = (body.role or target["role"]) == "owner" and not (
            body.disabled if body.disabled is not None else target["disabled_at"] is not None
        )
        if target["role"] == "owner" and not stays_owner:
            await _keep_an_owner(conn, target["id"])
        if body.disabled is True and target["disabled_at"] is None:
            await revoke_user_families(conn, target["id"], "user_disabled")
            await revoke_issued_access_tokens(conn, target["id"])
        row = await conn.fetchrow(
            f"""
            UPDATE users SET
                role = coalesce($2, role),
                disabled_at = CASE WHEN $3::boolean IS NULL THEN disabled_at
                                   WHEN $3 THEN coalesce(disabled_at, now())
                                   ELSE NULL END,
                updated_at = now()
            WHERE id = $1
            RETURNING {_USER_COLUMNS}
            """,
            target["id"],
            body.role,
            body.disabled,
        )
    return _user(row)


@group(
    "DELETE",
    "/v1/users/{id}",
    summary="Remove a user",
    status=204,
    role="admin",
    errors=[404, 409],
)
async def delete_user(call: ApiCall[Any, Any]) -> Response:
    principal = call.require_principal()
    async with tenant_tx(call.state.pool, principal.tenant_id) as conn:
        target = await _lock_target(conn, principal, call.path["id"])
        if target["role"] == "owner":
            await _keep_an_owner(conn, target["id"])
        await conn.execute("DELETE FROM users WHERE id = $1", target["id"])
    return Response(status_code=204)


@group(
    "POST",
    CHANGE_PASSWORD_PATH,
    summary="Change your own password; ends your other sessions and returns fresh tokens",
    body=ChangePasswordBody,
    response=TokenResponse,
    errors=[403],
    before_password_change=True,
)
async def change_password(call: ApiCall[ChangePasswordBody, Any]) -> TokenResponse:
    principal = call.require_principal()
    if principal.kind != "user":
        raise Problem(403, "not_a_user", "Only a signed-in user has a password to change.")
    state, body = call.state, call.body
    if body.new_password == body.current_password:
        raise Problem(
            422, "password_unchanged", "Choose a password different from the current one."
        )
    async with tenant_tx(state.pool, principal.tenant_id, readonly=True) as conn:
        current_hash = await conn.fetchval(
            "SELECT password_hash FROM users WHERE id = $1", principal.subject_id
        )
    if not await verify_password_async(current_hash, body.current_password):
        raise Problem(403, "wrong_password", "The current password is incorrect.")
    new_hash = await hash_password_async(body.new_password)
    async with tenant_tx(state.pool, principal.tenant_id) as conn:
        await conn.execute(
            "UPDATE users SET password_hash = $2, must_change_password = false, updated_at = now()"
            " WHERE id = $1",
            principal.subject_id,
            new_hash,
        )
        await revoke_user_families(conn, principal.subject_id, "password_changed")
        await revoke_issued_access_tokens(conn, principal.subject_id)
        refresh = await start_family(
            conn, state.settings, tenant_id=principal.tenant_id, user_id=principal.subject_id
        )
        return await session_response(state, conn, principal.subject_id, refresh)


def _require_rank_for(principal: Principal, role: str) -> None:
    if ROLE_RANK[role] > ROLE_RANK[principal.role]:
        raise Problem(403, "forbidden", f"Only an {role} can grant the {role} role.")


async def _lock_target(conn: Conn, principal: Principal, user_id: uuid.UUID) -> Any:
    # Owner changes serialise on the tenant row, so two owners demoting each other at the same
    # time cannot both succeed and leave the tenant without one.
    await conn.execute("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE", principal.tenant_id)
    target = await conn.fetchrow(
        "SELECT id, role, disabled_at FROM users WHERE id = $1 FOR UPDATE", user_id
    )
    if target is None:
        raise Problem(404, "not_found", "No such user.")
    if target["role"] == "owner" and principal.role != "owner":
        raise Problem(403, "forbidden", "Only an owner can change or remove an owner.")
    return target


async def _keep_an_owner(conn: Conn, leaving_owner_id: uuid.UUID) -> None:
    others = await conn.fetchval(
        "SELECT count(*) FROM users WHERE role = 'owner' AND disabled_at IS NULL AND id <> $1",
        leaving_owner_id,
    )
    if not others:
        raise Problem(409, "last_owner", "A tenant must keep at least one active owner.")
