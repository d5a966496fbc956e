"""Every endpoint group of the control API, in the order they appear in the OpenAPI document."""

from __future__ import annotations

from control_api.endpoints import Endpoint, EndpointGroup
from control_api.routes import (
    agents,
    api_keys,
    auth,
    call_logs,
    calls,
    credentials,
    internal,
    jwks,
    ops,
    phone_control,
    tenant,
    twilio,
    usage,
    users,
)

GROUPS: list[EndpointGroup] = [
    ops.group,
    jwks.group,
    auth.group,
    tenant.group,
    users.group,
    api_keys.group,
    credentials.group,
    agents.group,
    calls.group,
    call_logs.group,
    usage.group,
    twilio.group,
    internal.group,
    phone_control.group,
]


def all_endpoints() -> list[Endpoint]:
    return [e for g in GROUPS for e in g.endpoints]
