"""OpenAPI 3.1 document built from the registered endpoints and their pydantic models."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from control_api.endpoints import Endpoint

_PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "code"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "code": {"type": "string", "description": "Stable machine-readable error code."},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
    },
    "additionalProperties": True,
}
_PATH_PARAM = re.compile(r"{([a-zA-Z_][a-zA-Z0-9_]*)(?::[a-z]+)?}")


def build_openapi(
    endpoints: list[Endpoint], *, title: str, version: str, server_url: str | None = None
) -> dict[str, Any]:
    models: list[tuple[type[BaseModel], Any]] = []
    for e in endpoints:
        if e.body is not None:
            models.append((e.body, "validation"))
        if e.response is not None:
            models.append((e.response, "serialization"))
    keyed, schema = models_json_schema(models, ref_template="#/components/schemas/{model}")
    components: dict[str, Any] = dict(schema.get("$defs", {}))
    components["Problem"] = _PROBLEM_SCHEMA

    paths: dict[str, Any] = {}
    for e in endpoints:
        if not e.include_in_schema:
            continue
        path = _PATH_PARAM.sub(r"{\1}", e.path)
        op: dict[str, Any] = {
            "operationId": e.handler.__name__,
            "summary": e.summary,
            "tags": e.tags,
            "responses": {},
        }
        params: list[dict[str, Any]] = []
        for name in _PATH_PARAM.findall(e.path):
            is_id = name == "id" or name.endswith("_id")
            params.append(
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "format": "uuid"} if is_id else {"type": "string"},
                }
            )
        if e.query is not None:
            qschema = e.query.model_json_schema(ref_template="#/components/schemas/{model}")
            required = set(qschema.get("required", []))
            for name, prop in qschema.get("properties", {}).items():
                params.append(
                    {"name": name, "in": "query", "required": name in required, "schema": prop}
                )
        if params:
            op["parameters"] = params
        if e.body is not None:
            ref = keyed[(e.body, "validation")]
            op["requestBody"] = {"required": True, "content": {e.body_media_type: {"schema": ref}}}
        ok: dict[str, Any] = {"description": "OK"}
        if e.response is not None:
            ok["content"] = {
                e.response_media_type: {"schema": keyed[(e.response, "serialization")]}
            }
        elif e.response_media_type != "application/json":
            ok["content"] = {e.response_media_type: {"schema": {"type": "string"}}}
        op["responses"][str(e.status)] = ok
        problem = {
            "description": "Problem",
            "content": {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            },
        }
        codes = set(e.errors) | {400, 422} if (e.body or e.query) else set(e.errors)
        if e.auth:
            codes |= {401, 403, 429}
            op["security"] = [{"bearer": []}]
        for code in sorted(codes):
            media = e.error_media_types.get(code)
            op["responses"][str(code)] = (
                {"description": "Refused", "content": {media: {"schema": {"type": "string"}}}}
                if media
                else problem
            )
        paths.setdefault(path, {})[e.method.lower()] = op

    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Access token (JWT) or API key (vr_live_…)",
                }
            },
        },
    }
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc
