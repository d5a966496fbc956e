"""Endpoints: the public signing keys (JWKS) the relay verifies call tokens with."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse, Response

from control_api.endpoints import ApiCall, EndpointGroup

group = EndpointGroup("keys")


@group(
    "GET",
    "/.well-known/jwks.json",
    summary="Public keys for verifying voicerelay tokens",
    auth=False,
)
async def jwks(call: ApiCall[Any, Any]) -> Response:
    return JSONResponse(call.state.signing.jwks(), headers={"cache-control": "public, max-age=300"})
