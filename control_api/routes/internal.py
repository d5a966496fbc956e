"""Endpoints for the relay only, authenticated with the shared internal service token.

These are not tenant endpoints: no API key or access token is accepted here, and they are left
out of the public OpenAPI document. See ``control_api.call_sessions`` for why the relay asks the
control API for a call's session instead of reading it from Redis.
"""

from __future__ import annotations

import hmac
from typing import Any, TypeVar

from pydantic import Field, ValidationError

from control_api.call_sessions import CallSession, UnknownCall, build_call_session
from control_api.call_tokens import verify_issued_call_token
from control_api.endpoints import ApiCall, ApiModel, EndpointGroup
from control_api.problems import Problem, validation_errors
from voicerelay.call_token import MAX_TOKEN_LENGTH, CallTokenClaims, CallTokenError
from voicerelay.logs import call_id_var, tenant_id_var

group = EndpointGroup("internal")

_CHALLENGE = {"www-authenticate": 'Bearer realm="voicerelay-internal"'}


class CallSessionRequest(ApiModel):
    token: str = Field(min_length=1, max_length=MAX_TOKEN_LENGTH)


M = TypeVar("M", bound=ApiModel)


def require_service(call: ApiCall[Any, Any]) -> None:
    expected = call.state.settings.internal_service_token
    header = call.request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    ok = (
        expected is not None
        and scheme.lower() == "bearer"
        and hmac.compare_digest(presented.strip().encode(), expected.get_secret_value().encode())
    )
    if not ok:
        raise Problem(
            401, "unauthorized", "A valid internal service token is required.", headers=_CHALLENGE
        )


async def parse_service_body(call: ApiCall[Any, Any], model: type[M]) -> M:
    """The body, parsed only after ``require_service``: an unauthenticated caller learns nothing
    about what an internal endpoint expects."""
    try:
        return model.model_validate_json(await call.request.body())
    except ValidationError as exc:
        raise Problem(
            422,
            "validation_failed",
            "The request body did not match the schema.",
            errors=validation_errors(exc),
        ) from None


@group(
    "POST",
    "/internal/v1/call-sessions",
    summary="Everything the relay needs for one call (service-authenticated)",
    response=CallSession,
    auth=False,
    include_in_schema=False,
    errors=[401, 409, 502, 504],
)
async def call_session(call: ApiCall[Any, Any]) -> CallSession:
    require_service(call)
    body = await parse_service_body(call, CallSessionRequest)
    state = call.state
    claims = verify_presented_token(call, body.token)
    try:
        return await build_call_session(state, claims)
    except UnknownCall:
        raise Problem(401, "invalid_call_token", "The call token names no known call.") from None


def verify_presented_token(call: ApiCall[Any, Any], token: str) -> CallTokenClaims:
    """The relay's caller's call token, verified as the relay did; sets the log context."""
    state = call.state
    try:
        claims = verify_issued_call_token(state.signing, state.settings, token)
    except CallTokenError as exc:
        raise Problem(401, "invalid_call_token", f"The call token is invalid: {exc}.") from None
    tenant_id_var.set(str(claims.tenant_id))
    call_id_var.set(str(claims.call_id))
    return claims
