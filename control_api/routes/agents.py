"""Endpoints: agents."""

from __future__ import annotations

from control_api.endpoints import EndpointGroup

group = EndpointGroup("agents")
