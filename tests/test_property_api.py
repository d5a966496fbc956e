"""No input makes the API answer 5xx: schemathesis against the served /openapi.json, and the
classic malformed requests by hand (each a 4xx problem document with a stable ``code``).

Schemathesis drives a blocking HTTP client, so it runs in a worker thread while the test's event
loop keeps serving the API.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error

from control_api.bootstrap import NewTenant
from tests.support.attack import unique_phone_number
from tests.support.tenants import auth

# Small on purpose: the whole file must stay well under two minutes on two cores. derandomize
# makes every run send the same requests, so a failure always reproduces.
EXAMPLES = 12
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    report_multiple_bugs=False,
)


def _client_ip() -> str:
    # A fresh benchmarking-range address per request, so per-IP login limits do not turn the
    # run into a stream of 429s that never reach the code under test.
    return f"198.18.{random.randint(0, 255)}.{random.randint(1, 254)}"


@dataclass
class Fuzzer:
    """Runs schemathesis over every operation and collects what went wrong."""

    base_url: str
    schema: Any
    credentials: Iterator[dict[str, str]] | None
    known_ids: dict[str, str] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    by_operation: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def headers(self) -> dict[str, str]:
        headers = {"x-forwarded-for": _client_ip()}
        if self.credentials is not None:
            with self.lock:
                headers.update(next(self.credentials))
        return headers

    def use_known_ids(self, case: Case[Any], use: bool) -> Case[Any]:
        """Half the cases name rows that exist, so handlers get past their 404s."""
        if not use:
            return case
        if case.path_parameters and "id" in case.path_parameters:
            known = self.known_ids.get(case.operation.path)
            if known is not None:
                case.path_parameters["id"] = known
        if isinstance(case.body, dict):
            for name in ("agent_id", "credential_id"):
                if name in case.body and name in self.known_ids:
                    case.body[name] = self.known_ids[name]
        return case

    def run(self, mode: GenerationMode) -> None:
        session = requests.Session()
        operations = [result.ok() for result in self.schema.get_all_operations()]
        # Deletions last, so the known rows are still there for every other operation.
        operations.sort(key=lambda operation: operation.method.upper() == "DELETE")
        for operation in operations:
            # Mostly True (hypothesis starts from the simplest value, 0).
            use_known = st.integers(0, 3).map(lambda n: n != 3)
            strategy = st.tuples(operation.as_strategy(generation_mode=mode), use_known).map(
                lambda pair: (
                    self.use_known_ids(*pair) if mode == GenerationMode.POSITIVE else pair[0]
                )
            )
            self._run_operation(operation.label, strategy, session)

    def _run_operation(self, label: str, strategy: Any, session: requests.Session) -> None:
        @FUZZ_SETTINGS
        @given(case=strategy)
        def check(case: Case[Any]) -> None:
            response = case.call(base_url=self.base_url, session=session, headers=self.headers())
            self.statuses[response.status_code] += 1
            self.by_operation[(label, response.status_code)] += 1
            case.validate_response(response, checks=[not_a_server_error])

        try:
            check()
        except Unsatisfiable:
            # Negative mode for an operation without inputs: there is nothing to make invalid.
            return
        except Exception as exc:  # noqa: BLE001 - every failure is reported, not just the first
            self.failures.append(f"{label}: {exc}")


async def _fuzz(
    api_url: str,
    http: httpx.AsyncClient,
    credentials: list[dict[str, str]] | None,
    modes: list[GenerationMode],
    known_ids: dict[str, str] | None = None,
) -> Fuzzer:
    document = (await http.get("/openapi.json")).json()
    fuzzer = Fuzzer(
        base_url=api_url,
        schema=schemathesis.openapi.from_dict(document),
        credentials=itertools.cycle(credentials) if credentials else None,
        known_ids=known_ids or {},
    )
    for mode in modes:
        await asyncio.to_thread(fuzzer.run, mode)
    return fuzzer


async def _fuzz_tenant(
    http: httpx.AsyncClient, tenant: NewTenant
) -> tuple[list[dict[str, str]], dict[str, str]]:
    """Admin keys to spread the run over (each key has its own rate limit) and real rows."""
    headers = auth(tenant)
    keys = [headers]
    for n in range(7):
        r = await http.post(
            "/v1/api-keys", json={"name": f"fuzz-{n}", "role": "admin"}, headers=headers
        )
        assert r.status_code == 201, r.text
        keys.append({"authorization": f"Bearer {r.json()['key']}"})
    spare_key = await http.post(
        "/v1/api-keys", json={"name": "revoked by the fuzzer", "role": "viewer"}, headers=headers
    )
    user = await http.post(
        "/v1/users", json={"email": f"fuzz-{uuid.uuid4().hex[:8]}@example.com"}, headers=headers
    )
    credential = await http.post(
        "/v1/credentials",
        json={"provider": "elevenlabs", "name": "fuzz", "api_key": "sk_" + "f" * 32},
        headers=headers,
    )
    agent = await http.post(
        "/v1/agents",
        json={
            "name": "fuzz",
            "elevenlabs_agent_id": "agent_fuzz",
            "credential_id": credential.json()["id"],
            "phone_numbers": [unique_phone_number()],
        },
        headers=headers,
    )
    call = await http.post("/v1/calls", json={"agent_id": agent.json()["id"]}, headers=headers)
    for r in (spare_key, user, credential, agent, call):
        assert r.status_code == 201, r.text
    ids = {
        "/v1/api-keys/{id}": spare_key.json()["id"],
        "/v1/users/{id}": user.json()["id"],
        "/v1/credentials/{id}": credential.json()["id"],
        "/v1/credentials/{id}/secret": credential.json()["id"],
        "/v1/agents/{id}": agent.json()["id"],
        "/v1/calls/{id}": call.json()["call_id"],
        "/v1/calls/{id}/monitor-token": call.json()["call_id"],
        "agent_id": agent.json()["id"],
        "credential_id": credential.json()["id"],
    }
    return keys, ids


def _report(fuzzer: Fuzzer) -> str:
    lines = [
        f"{label}: {status} x{n}" for (label, status), n in sorted(fuzzer.by_operation.items())
    ]
    return "\n".join([*lines, "", *fuzzer.failures])


async def test_schemathesis_finds_no_server_error_when_authenticated(
    api_url: str, http: httpx.AsyncClient, tenant: NewTenant
) -> None:
    keys, ids = await _fuzz_tenant(http, tenant)
    fuzzer = await _fuzz(
        api_url, http, keys, [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids
    )
    assert not fuzzer.failures, _report(fuzzer)
    assert not any(status >= 500 for status in fuzzer.statuses), _report(fuzzer)
    # The run reached the handlers: successes, and not mostly rate-limited.
    assert sum(n for s, n in fuzzer.statuses.items() if 200 <= s < 300) > 20, _report(fuzzer)
    assert fuzzer.statuses[429] < sum(fuzzer.statuses.values()) // 10, _report(fuzzer)


async def test_schemathesis_finds_no_server_error_unauthenticated(
    api_url: str, http: httpx.AsyncClient
) -> None:
    fuzzer = await _fuzz(api_url, http, None, [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    assert not fuzzer.failures, _report(fuzzer)
    assert fuzzer.statuses[401] > 0


# --- hand-written malformed requests -----------------------------------------------------------


def _problem(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert isinstance(body.get("code"), str), body
    assert body["code"], body
    if code is not None:
        assert body["code"] == code, body
    return body


# (method, path, a valid body) for endpoints that take JSON, with {agent}/{credential} filled in.
JSON_ENDPOINTS: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/v1/agents", {"name": "n", "elevenlabs_agent_id": "agent_1"}),
    ("PATCH", "/v1/agents/{agent}", {"name": "n"}),
    ("POST", "/v1/credentials", {"provider": "elevenlabs", "name": "n", "api_key": "k" * 20}),
    ("PUT", "/v1/credentials/{credential}/secret", {"provider": "elevenlabs", "api_key": "k" * 20}),
    ("POST", "/v1/calls", {"agent_id": "{agent}"}),
    ("POST", "/v1/users", {"email": "someone@example.com"}),
    ("POST", "/v1/api-keys", {"name": "n", "role": "viewer"}),
    ("PATCH", "/v1/tenant", {"name": "n"}),
    ("POST", "/v1/auth/login", {"email": "a@example.com", "password": "p"}),
    ("POST", "/v1/auth/refresh", {"refresh_token": "r"}),
]
_IDS = [f"{m} {p}" for m, p, _ in JSON_ENDPOINTS]
_JSON = {"content-type": "application/json"}


@dataclass
class Rows:
    headers: dict[str, str]
    agent: str
    credential: str

    def path(self, template: str) -> str:
        return template.format(agent=self.agent, credential=self.credential)

    def body(self, body: dict[str, Any]) -> dict[str, Any]:
        return {k: self.path(v) if isinstance(v, str) else v for k, v in body.items()}


@pytest.fixture
async def rows(http: httpx.AsyncClient, tenant: NewTenant) -> Rows:
    headers = {**auth(tenant), "x-forwarded-for": _client_ip()}
    credential = await http.post(
        "/v1/credentials",
        json={"provider": "elevenlabs", "name": "c", "api_key": "sk_" + "c" * 32},
        headers=headers,
    )
    agent = await http.post(
        "/v1/agents", json={"name": "a", "elevenlabs_agent_id": "agent_a"}, headers=headers
    )
    return Rows(headers=headers, agent=agent.json()["id"], credential=credential.json()["id"])


def _send(http: httpx.AsyncClient, rows: Rows, method: str, path: str, **kwargs: Any) -> Any:
    headers = {**rows.headers, "x-forwarded-for": _client_ip(), **kwargs.pop("headers", {})}
    return http.request(method, rows.path(path), headers=headers, **kwargs)


@pytest.mark.parametrize(("method", "path", "body"), JSON_ENDPOINTS, ids=_IDS)
async def test_malformed_json_is_400(
    http: httpx.AsyncClient, rows: Rows, method: str, path: str, body: dict[str, Any]
) -> None:
    for raw in (b"{", b"{'a': 1}", b"\xff\xfe", b"[1, 2", b"nul", b""):
        r = await _send(
            http, rows, method, path, content=raw, headers={"content-type": "application/json"}
        )
        _problem(r, 400, "malformed_json")


@pytest.mark.parametrize(("method", "path", "body"), JSON_ENDPOINTS, ids=_IDS)
async def test_wrong_content_type_is_415(
    http: httpx.AsyncClient, rows: Rows, method: str, path: str, body: dict[str, Any]
) -> None:
    for media in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        r = await _send(
            http,
            rows,
            method,
            path,
            content=httpx.Request("POST", "/", json=rows.body(body)).content,
            headers={"content-type": media},
        )
        _problem(r, 415, "unsupported_media_type")


@pytest.mark.parametrize(("method", "path", "body"), JSON_ENDPOINTS, ids=_IDS)
async def test_unknown_fields_and_wrong_types_are_422(
    http: httpx.AsyncClient, rows: Rows, method: str, path: str, body: dict[str, Any]
) -> None:
    valid = rows.body(body)
    first = next(iter(valid))
    for bad in (
        {**valid, "is_admin": True},
        {**valid, first: 12345},
        {**valid, first: None} if method != "PATCH" else {**valid, first: [1]},
        {**valid, first: {"nested": "object"}},
        {**valid, first: 10**100},
        {**valid, first: -(10**40)},
        {**valid, first: 1e308},
        [valid],
        "just a string",
        12,
        None,
    ):
        # httpx sends no body at all for json=None; the JSON document null is meant here.
        r = await _send(http, rows, method, path, content=json.dumps(bad), headers=_JSON)
        _problem(r, 422)


@pytest.mark.parametrize(("method", "path", "body"), JSON_ENDPOINTS, ids=_IDS)
async def test_nul_characters_are_refused(
    http: httpx.AsyncClient, rows: Rows, method: str, path: str, body: dict[str, Any]
) -> None:
    """Postgres text cannot hold NUL; anywhere in a body, it is a 422, never a 500."""
    valid = rows.body(body)
    for bad in (
        {k: f"{v}\x00" if isinstance(v, str) else v for k, v in valid.items()},
        {**valid, "ke\x00y": "v"},
        {**valid, "metadata": {"a\x00": "b"}} if path == "/v1/calls" else {**valid, "x\x00": 1},
        {**valid, "metadata": {"a": ["\x00"]}} if path == "/v1/calls" else valid | {"\x00": 0},
    ):
        r = await _send(http, rows, method, path, json=bad)
        # Fields that refuse NUL themselves say so (validation_failed); anywhere else the
        # generic check does (invalid_character).
        assert _problem(r, 422)["code"] in ("validation_failed", "invalid_character")
    # NUL in a query string is refused the same way.
    for params in ({"cursor": "a\x00b"}, {"status\x00": "ended"}):
        r = await _send(http, rows, "GET", "/v1/calls", params=params)
        _problem(r, 422, "invalid_character")


async def test_nul_check_has_no_false_positives(http: httpx.AsyncClient, rows: Rows) -> None:
    """The text backslash-u-0-0-0-0 (an escaped backslash in JSON) is ordinary text."""
    name = "literally \\u0000, not a NUL"
    r = await _send(http, rows, "PATCH", "/v1/tenant", json={"name": name})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == name
    r = await _send(http, rows, "GET", "/v1/calls", params={"status": "ended"})
    assert r.status_code == 200, r.text


async def test_lone_surrogates_are_malformed_json(http: httpx.AsyncClient, rows: Rows) -> None:
    """Postgres stores UTF-8: a string that cannot be encoded must never reach it."""
    for raw in (b'{"name": "\\ud800"}', b'{"name": "\\udc00x"}', b'{"name": "\xed\xa0\x80"}'):
        r = await _send(http, rows, "PATCH", "/v1/tenant", content=raw, headers=_JSON)
        _problem(r, 400, "malformed_json")


async def test_nul_inside_free_form_json_is_refused(http: httpx.AsyncClient, rows: Rows) -> None:
    """Call metadata is any JSON: the generic check is all that stands between it and jsonb."""
    for metadata, loc in (
        ({"k": "a\x00b"}, ["metadata", "k"]),
        ({"k\x00": "v"}, ["metadata", "<key>"]),
        ({"k": {"deep": [1, "\u0000"]}}, ["metadata", "k", "deep", "1"]),
    ):
        r = await _send(
            http,
            rows,
            "POST",
            "/v1/calls",
            content=json.dumps({"agent_id": rows.agent, "metadata": metadata}),
            headers=_JSON,
        )
        body = _problem(r, 422, "invalid_character")
        assert body["errors"][0]["loc"] == loc, body
        assert "\x00" not in r.text


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/calls", {"agent_id": "{agent}", "metadata": {"n": 10**30}}, 422),
        ("POST", "/v1/calls", {"agent_id": "{agent}", "metadata": {"n": [-(10**300)]}}, 422),
        ("PATCH", "/v1/tenant", {"call_log_retention_days": 10**30}, 422),
        ("POST", "/v1/api-keys", {"name": "n", "role": "viewer", "expires_at": 10**30}, 422),
        # Dynamic variables read a number too large for an integer as a float, by design.
        ("POST", "/v1/calls", {"agent_id": "{agent}", "dynamic_variables": {"n": 10**30}}, 201),
        ("PATCH", "/v1/agents/{agent}", {"dynamic_variables": {"n": 10**400}}, 422),
    ],
)
async def test_huge_integers(
    http: httpx.AsyncClient,
    rows: Rows,
    method: str,
    path: str,
    body: dict[str, Any],
    status: int,
) -> None:
    r = await _send(http, rows, method, path, content=json.dumps(rows.body(body)), headers=_JSON)
    if status >= 400:
        _problem(r, status, "validation_failed")
    else:
        assert r.status_code == status, r.text


async def test_oversize_body_is_413(http: httpx.AsyncClient, rows: Rows, settings: Any) -> None:
    big = {"name": "n", "elevenlabs_agent_id": "a", "pad": "x" * settings.max_request_body_bytes}
    for method, path in (
        ("POST", "/v1/agents"),
        ("POST", "/v1/auth/login"),
        ("PATCH", "/v1/tenant"),
    ):
        r = await _send(http, rows, method, path, json=big)
        _problem(r, 413, "body_too_large")

    # Without a Content-Length (chunked), the limit still holds.
    async def chunks() -> Any:
        for _ in range(settings.max_request_body_bytes // 1024 + 2):
            yield b"x" * 1024

    r = await _send(
        http,
        rows,
        "POST",
        "/v1/agents",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    _problem(r, 413, "body_too_large")


@pytest.mark.parametrize(
    "template",
    [
        "/v1/agents/{x}",
        "/v1/credentials/{x}",
        "/v1/users/{x}",
        "/v1/calls/{x}",
        "/v1/api-keys/{x}",
        "/v1/credentials/{x}/secret",
        "/v1/calls/{x}/monitor-token",
    ],
)
async def test_bad_uuid_in_path_is_404(http: httpx.AsyncClient, rows: Rows, template: str) -> None:
    methods = {"/v1/api-keys/{x}": "DELETE", "/v1/credentials/{x}/secret": "PUT"}
    method = methods.get(template, "POST" if template.endswith("monitor-token") else "GET")
    for bad in (
        "not-a-uuid",
        "1",
        "%00",
        "00000000-0000-0000-0000-00000000000g",
        "x" * 300,
        "%F0%9F%98%80",
    ):
        r = await _send(http, rows, method, template.replace("{x}", bad))
        _problem(r, 404, "not_found")


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/agents", {"limit": "99999999999999999999999999"}),
        ("/v1/agents", {"limit": "-1"}),
        ("/v1/agents", {"limit": "abc"}),
        ("/v1/agents", {"cursor": "!!!not-a-cursor"}),
        ("/v1/credentials", {"limit": "1e400"}),
        ("/v1/calls", {"status": "exploded"}),
        ("/v1/calls", {"agent_id": "nope"}),
        ("/v1/calls", {"from": "9999-12-31T23:59:59+00:00"}),
        ("/v1/calls", {"from": "0001-01-01T00:00:00-23:59"}),
        ("/v1/calls", {"to": "yesterday"}),
        ("/v1/calls", {"cursor": "A" * 200}),
        ("/v1/calls/active", {"limit": "0"}),
        ("/v1/usage", {"from": "2020-01-01", "to": "2030-01-01"}),
        ("/v1/usage", {"group_by": "tenant"}),
        ("/v1/usage", {"from": "99999999999"}),
    ],
)
async def test_bad_query_values_are_4xx(
    http: httpx.AsyncClient, rows: Rows, path: str, params: dict[str, str]
) -> None:
    r = await _send(http, rows, "GET", path, params=params)
    assert 400 <= r.status_code < 500, r.text
    _problem(r, r.status_code)


@pytest.mark.parametrize("path", ["/v1/agents", "/v1/credentials", "/v1/calls", "/v1/usage"])
async def test_repeated_and_unknown_query_parameters(
    http: httpx.AsyncClient, rows: Rows, path: str
) -> None:
    first = {"/v1/usage": "group_by=day", "/v1/calls": "limit=5"}.get(path, "limit=5")
    r = await _send(http, rows, "GET", f"{path}?{first}&{first}")
    _problem(r, 400, "repeated_query_parameter")
    r = await _send(http, rows, "GET", path, params={"sort": "name; DROP TABLE agents"})
    _problem(r, 422, "validation_failed")


@pytest.mark.parametrize("path", ["/v1/tenant", "/v1/me", "/v1/users", "/v1/api-keys"])
async def test_query_parameters_where_none_are_taken(
    http: httpx.AsyncClient, rows: Rows, path: str
) -> None:
    r = await _send(http, rows, "GET", path, params={"limit": "1"})
    _problem(r, 400, "unknown_query_parameter")


async def test_odd_methods_and_headers(http: httpx.AsyncClient, rows: Rows) -> None:
    _problem(await _send(http, rows, "PUT", "/v1/agents"), 405)
    _problem(await _send(http, rows, "GET", "/v1/nothing-here"), 404)
    for header in (
        "Bearer",
        "Bearer  x y",
        "Basic dXNlcjpwYXNz",
        "Bearer " + "x" * 5000,
        "Bearer a.b.c",
    ):
        r = await http.get("/v1/agents", headers={"authorization": header})
        _problem(r, 401)
    r = await _send(
        http,
        rows,
        "POST",
        "/v1/agents",
        content=b'{"name": "n"}',
        headers={"content-type": "application/json; charset=latin-1"},
    )
    assert 400 <= r.status_code < 500
