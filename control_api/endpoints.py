"""Declarative endpoints: one decorator gives a route its parsing, auth, role check and OpenAPI entry.

A handler receives an ``ApiCall`` whose ``body`` and ``query`` are already-validated pydantic
models and whose ``principal`` is authenticated, and returns a model (serialised as JSON), or a
Starlette ``Response`` for anything else. Bad input never reaches handler code.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from control_api.problems import Problem, validation_errors
from control_api.security.password_change import require_chosen_password

if TYPE_CHECKING:
    from control_api.principal import Principal
    from control_api.state import AppState

Role = Literal["viewer", "admin", "owner"]
ROLE_RANK: dict[str, int] = {"viewer": 1, "admin": 2, "owner": 3}


class ApiModel(BaseModel):
    """Base for request bodies: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class QueryModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


B = TypeVar("B", bound=BaseModel)
Q = TypeVar("Q", bound=BaseModel)


@dataclass
class ApiCall(Generic[B, Q]):
    request: Request
    state: AppState
    principal: Principal | None
    body: B
    query: Q
    path: dict[str, Any]

    @property
    def tenant_id(self) -> uuid.UUID:
        if self.principal is None:
            raise Problem(401, "unauthorized", "Authentication required.")
        return self.principal.tenant_id

    def require_principal(self) -> Principal:
        if self.principal is None:
            raise Problem(401, "unauthorized", "Authentication required.")
        return self.principal


Handler = Callable[[ApiCall[Any, Any]], Awaitable[Any]]


@dataclass
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    tags: list[str]
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    auth: bool = True
    role: Role = "viewer"
    errors: list[int] = field(default_factory=list)
    include_in_schema: bool = True
    body_media_type: str = "application/json"
    # The handler reads the request itself (webhooks whose signature covers every parameter);
    # ``body`` and ``query`` then only document it.
    raw_request: bool = False
    response_media_type: str = "application/json"
    # Error statuses answered with something other than a problem document (e.g. TwiML).
    error_media_types: dict[int, str] = field(default_factory=dict)
    # Also open to a user who must still replace a one-time password (changing it, only).
    before_password_change: bool = False

    def route(self) -> Route:
        return Route(self.path, self._asgi, methods=[self.method], name=self.handler.__name__)

    async def _asgi(self, request: Request) -> Response:
        state: AppState = request.app.state.api
        principal = None
        if self.auth:
            principal = await state.authenticate(request)
            if not self.before_password_change:
                require_chosen_password(principal)
            if ROLE_RANK[principal.role] < ROLE_RANK[self.role]:
                raise Problem(403, "forbidden", f"This action needs the {self.role} role.")
            await state.limit_principal(principal)
        path = _parse_path_params(request.path_params)
        body = query = None
        if not self.raw_request:
            body = await self._parse_body(request)
            query = self._parse_query(request)
        result = await self.handler(ApiCall(request, state, principal, body, query, path))
        if isinstance(result, Response):
            return result
        if result is None:
            return Response(status_code=204 if self.status == 200 else self.status)
        payload = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
        return Response(
            orjson.dumps(payload), status_code=self.status, media_type="application/json"
        )

    async def _parse_body(self, request: Request) -> Any:
        if self.body is None:
            return None
        raw = await request.body()
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if self.body_media_type == "application/json":
            if media and media != "application/json" and not media.endswith("+json"):
                raise Problem(415, "unsupported_media_type", "Send the body as application/json.")
            if not raw.strip():
                raise Problem(400, "malformed_json", "The request body is empty.")
            try:
                parsed = self.body.model_validate_json(raw)
            except ValidationError as exc:
                if any(e.get("type") == "json_invalid" for e in exc.errors()):
                    raise Problem(
                        400, "malformed_json", "The request body is not valid JSON."
                    ) from None
                raise Problem(
                    422,
                    "validation_failed",
                    "The request body did not match the schema.",
                    errors=validation_errors(exc),
                ) from None
            # After validation, so fields that refuse NUL themselves keep their precise errors.
            if _JSON_NUL in raw:
                _refuse_nul(raw)
            return parsed
        form = await request.form()
        if any(_has_nul(k) or (isinstance(v, str) and _has_nul(v)) for k, v in form.multi_items()):
            raise _invalid_character("form")
        try:
            return self.body.model_validate(
                {k: v for k, v in form.multi_items() if isinstance(v, str)}
            )
        except ValidationError as exc:
            raise Problem(
                422,
                "validation_failed",
                "The form did not match the schema.",
                errors=validation_errors(exc),
            ) from None

    def _parse_query(self, request: Request) -> Any:
        if any(_has_nul(k) or _has_nul(v) for k, v in request.query_params.multi_items()):
            raise _invalid_character("query string")
        if self.query is None:
            if request.query_params:
                raise Problem(
                    400, "unknown_query_parameter", "This endpoint takes no query parameters."
                )
            return None
        data: dict[str, Any] = {}
        for key, value in request.query_params.multi_items():
            if key in data:
                raise Problem(
                    400, "repeated_query_parameter", f"Query parameter {key!r} is repeated."
                )
            data[key] = value
        try:
            return self.query.model_validate(data)
        except ValidationError as exc:
            raise Problem(
                422,
                "validation_failed",
                "The query parameters did not match the schema.",
                errors=validation_errors(exc),
            ) from None


# Postgres text and jsonb cannot hold U+0000, so a NUL anywhere in the input would reach the
# database as a 500. JSON can only carry it escaped; the full check runs when the escape appears.
_JSON_NUL = b"\\u0000"


def _has_nul(text: str) -> bool:
    return "\x00" in text


def _nul_locations(document: Any) -> list[list[str]]:
    found: list[list[str]] = []
    pending: list[tuple[list[str], Any]] = [([], document)]
    while pending:
        loc, item = pending.pop()
        if isinstance(item, str):
            if _has_nul(item):
                found.append(loc)
        elif isinstance(item, dict):
            for key, value in item.items():
                # A key with a NUL is reported by position only: its text cannot be shown.
                if _has_nul(key):
                    found.append([*loc, "<key>"])
                else:
                    pending.append(([*loc, key], value))
        elif isinstance(item, list):
            pending.extend(([*loc, str(i)], v) for i, v in enumerate(item))
    return found


def _refuse_nul(raw: bytes) -> None:
    try:
        # The standard parser takes whatever the model's parser took (huge integers included).
        document = json.loads(raw)
    except (ValueError, RecursionError):
        raise _invalid_character("request body") from None
    locations = _nul_locations(document)
    if locations:
        raise _invalid_character(
            "request body",
            errors=[
                {
                    "loc": loc,
                    "msg": "must not contain the NUL character",
                    "type": "invalid_character",
                }
                for loc in sorted(locations)[:20]
            ],
        )


def _invalid_character(where: str, **extra: Any) -> Problem:
    return Problem(
        422,
        "invalid_character",
        f"The {where} contains a NUL character (U+0000), which is not allowed.",
        **extra,
    )


def _parse_path_params(params: dict[str, Any]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for name, value in params.items():
        if name == "id" or name.endswith("_id"):
            try:
                parsed[name] = uuid.UUID(str(value))
            except ValueError:
                raise Problem(404, "not_found", "No such resource.") from None
        else:
            parsed[name] = value
    return parsed


class EndpointGroup:
    """The endpoints of one route module; ``app.py`` collects every group."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.endpoints: list[Endpoint] = []

    def __call__(
        self,
        method: str,
        path: str,
        *,
        summary: str,
        body: type[BaseModel] | None = None,
        query: type[BaseModel] | None = None,
        response: type[BaseModel] | None = None,
        status: int = 200,
        auth: bool = True,
        role: Role = "viewer",
        errors: list[int] | None = None,
        include_in_schema: bool = True,
        body_media_type: str = "application/json",
        raw_request: bool = False,
        response_media_type: str = "application/json",
        error_media_types: dict[int, str] | None = None,
        before_password_change: bool = False,
    ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.endpoints.append(
                Endpoint(
                    method=method.upper(),
                    path=path,
                    handler=handler,
                    summary=summary,
                    tags=[self.tag],
                    body=body,
                    query=query,
                    response=response,
                    status=status,
                    auth=auth,
                    role=role,
                    errors=errors or [],
                    include_in_schema=include_in_schema,
                    body_media_type=body_media_type,
                    raw_request=raw_request,
                    response_media_type=response_media_type,
                    error_media_types=error_media_types or {},
                    before_password_change=before_password_change,
                )
            )
            return handler

        return register

    def routes(self) -> list[Route]:
        return [e.route() for e in self.endpoints]
