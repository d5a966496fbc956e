"""The agents API: CRUD, validation of every setting, phone-number uniqueness, isolation."""

from __future__ import annotations

import secrets
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
from phonenumbers import is_valid_number, parse

from control_api.agent_settings import normalize_e164, normalize_origin
from control_api.bootstrap import NewTenant
from tests.conftest import TestDatabase
from tests.support.tenants import auth, make_tenant
from tests.test_credentials_api import TWILIO_SID, create_el, el_key, viewer_headers

_issued: set[str] = set()


def number() -> str:
    """A valid US number not used before in this test run (the numbers table is shared)."""
    while True:
        candidate = f"+1415{2_000_000 + secrets.randbelow(8_000_000)}"
        if candidate not in _issued and is_valid_number(parse(candidate)):
            _issued.add(candidate)
            return candidate


FULL_OVERRIDES = {
    "agent": {
        "prompt": {"prompt": "You are a helpful receptionist.", "llm": "gpt-4o-mini"},
        "first_message": "Hello {{user_name}}!",
        "language": "en",
    },
    "tts": {
        "voice_id": "21m00Tcm4TlvDq8ikWAM",
        "stability": 0.5,
        "speed": 1.1,
        "similarity_boost": 0.8,
    },
    "asr": {"keywords": ["voicerelay", "Acme"]},
    "conversation": {"text_only": False},
}


@pytest.fixture(scope="module")
async def shared_tenant(database: TestDatabase) -> NewTenant:
    """One tenant for the many requests that must change nothing."""
    return await make_tenant(database.owner_dsn)


async def create_agent(http: httpx.AsyncClient, tenant: NewTenant, **fields: Any) -> dict:
    body = {"name": "Receptionist", "elevenlabs_agent_id": "agent_01abc", **fields}
    r = await http.post("/v1/agents", json=body, headers=auth(tenant))
    assert r.status_code == 201, r.text
    return r.json()


async def test_crud(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    cred = await create_el(http, tenant, el_key())
    first, second = number(), number()
    formatted = f"+1 (415) {first[5:8]}-{first[8:]}"
    agent = await create_agent(
        http,
        tenant,
        credential_id=cred["id"],
        phone_numbers=[formatted, second, first],
        input_audio_format="ulaw_8000",
        output_audio_format="pcm_24000",
        conversation_overrides=FULL_OVERRIDES,
        dynamic_variables={"user_name": "Ada", "vip": True, "tier": 3, "score": 0.5},
        allowed_origins=["https://App.Example.com:443", "http://localhost:5173"],
    )
    assert agent["credential_id"] == cred["id"]
    assert agent["phone_numbers"] == sorted([first, second])
    assert agent["input_audio_format"] == "ulaw_8000"
    assert agent["output_audio_format"] == "pcm_24000"
    assert agent["conversation_overrides"] == FULL_OVERRIDES
    assert agent["dynamic_variables"] == {"user_name": "Ada", "vip": True, "tier": 3, "score": 0.5}
    assert agent["allowed_origins"] == ["https://app.example.com", "http://localhost:5173"]

    path = f"/v1/agents/{agent['id']}"
    assert (await http.get(path, headers=auth(tenant))).json() == agent

    public = await create_agent(http, tenant, name="Public")
    assert public["credential_id"] is None
    assert public["phone_numbers"] == []
    assert public["input_audio_format"] == "pcm_16000"
    assert public["output_audio_format"] == "pcm_16000"
    assert public["conversation_overrides"] == {}
    listed = (await http.get("/v1/agents", headers=auth(tenant))).json()
    assert [a["id"] for a in listed["items"]] == [public["id"], agent["id"]]
    assert listed["items"][1]["phone_numbers"] == agent["phone_numbers"]
    page = (await http.get("/v1/agents", params={"limit": 1}, headers=auth(tenant))).json()
    assert [a["id"] for a in page["items"]] == [public["id"]]
    page = (
        await http.get(
            "/v1/agents", params={"limit": 1, "cursor": page["next_cursor"]}, headers=auth(tenant)
        )
    ).json()
    assert [a["id"] for a in page["items"]] == [agent["id"]]
    assert page["next_cursor"] is None

    # PATCH changes only what is given; phone_numbers replaces the set.
    third = number()
    r = await http.patch(
        path, json={"name": "Front desk", "phone_numbers": [second, third]}, headers=auth(tenant)
    )
    assert r.status_code == 200, r.text
    patched = r.json()
    assert patched["name"] == "Front desk"
    assert patched["phone_numbers"] == sorted([second, third])
    for unchanged in (
        "credential_id",
        "conversation_overrides",
        "dynamic_variables",
        "allowed_origins",
    ):
        assert patched[unchanged] == agent[unchanged]
    assert patched["updated_at"] > agent["updated_at"]

    # The released number is free again: another agent can take it.
    other = await create_agent(http, tenant, name="Other", phone_numbers=[first])
    assert other["phone_numbers"] == [first]

    r = await http.patch(
        path,
        json={
            "credential_id": None,
            "dynamic_variables": {},
            "conversation_overrides": {"tts": {"speed": 0.9}},
        },
        headers=auth(tenant),
    )
    assert r.status_code == 200
    assert r.json()["credential_id"] is None
    assert r.json()["dynamic_variables"] == {}
    assert r.json()["conversation_overrides"] == {"tts": {"speed": 0.9}}
    assert r.json()["phone_numbers"] == patched["phone_numbers"]

    assert (await http.delete(path, headers=auth(tenant))).status_code == 204
    assert (await http.get(path, headers=auth(tenant))).status_code == 404
    assert (await http.patch(path, json={"name": "x"}, headers=auth(tenant))).status_code == 404
    assert (await http.delete(path, headers=auth(tenant))).status_code == 404
    # Its numbers went with it.
    reuse = await create_agent(http, tenant, name="Reuse", phone_numbers=[second, third])
    assert reuse["phone_numbers"] == sorted([second, third])


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"phone_numbers": ["4155552671"]}, "phone_numbers"),
        ({"phone_numbers": ["+1555123"]}, "phone_numbers"),
        ({"phone_numbers": ["+15551234567"]}, "phone_numbers"),
        ({"phone_numbers": ["not a number"]}, "phone_numbers"),
        ({"input_audio_format": "mp3_44100"}, "input_audio_format"),
        ({"output_audio_format": "PCM_16000"}, "output_audio_format"),
        ({"conversation_overrides": {"agent": {"voice": "x"}}}, "conversation_overrides"),
        ({"conversation_overrides": {"unknown": {}}}, "conversation_overrides"),
        ({"conversation_overrides": {"tts": {"stability": 1.5}}}, "conversation_overrides"),
        (
            {"conversation_overrides": {"agent": {"prompt": {"tool_ids": []}}}},
            "conversation_overrides",
        ),
        ({"conversation_overrides": {"asr": {"keywords": "one"}}}, "conversation_overrides"),
        (
            {"conversation_overrides": {"conversation": {"text_only": "yes"}}},
            "conversation_overrides",
        ),
        ({"dynamic_variables": {"system__caller_id": "x"}}, "dynamic_variables"),
        ({"dynamic_variables": {"System__time": "x"}}, "dynamic_variables"),
        ({"dynamic_variables": {"1st": "x"}}, "dynamic_variables"),
        ({"dynamic_variables": {"bad-name": "x"}}, "dynamic_variables"),
        ({"dynamic_variables": {"nested": {"a": 1}}}, "dynamic_variables"),
        ({"dynamic_variables": {"list": [1]}}, "dynamic_variables"),
        ({"dynamic_variables": {"nothing": None}}, "dynamic_variables"),
        ({"dynamic_variables": {f"v{i}": i for i in range(51)}}, "dynamic_variables"),
        ({"dynamic_variables": {f"v{i}": "x" * 4000 for i in range(5)}}, "dynamic_variables"),
        ({"allowed_origins": ["https://app.example.com/path"]}, "allowed_origins"),
        ({"allowed_origins": ["ftp://app.example.com"]}, "allowed_origins"),
        ({"allowed_origins": ["app.example.com"]}, "allowed_origins"),
        ({"allowed_origins": ["https://user@app.example.com"]}, "allowed_origins"),
        ({"allowed_origins": ["https://app.example.com:99999"]}, "allowed_origins"),
        ({"allowed_origins": ["*"]}, "allowed_origins"),
        ({"elevenlabs_agent_id": "agent/../x"}, "elevenlabs_agent_id"),
        ({"name": ""}, "name"),
        ({"name": "nul\u0000"}, "name"),
        (
            {"conversation_overrides": {"agent": {"first_message": "\u0000"}}},
            "conversation_overrides",
        ),
        ({"conversation_overrides": {"asr": {"keywords": ["a\u0000"]}}}, "conversation_overrides"),
        ({"dynamic_variables": {"v": "nul\u0000"}}, "dynamic_variables"),
        ({"credential_id": "nope"}, "credential_id"),
        ({"surprise": 1}, "surprise"),
    ],
)
async def test_validation_errors_are_problem_documents(
    http: httpx.AsyncClient, shared_tenant: NewTenant, fields: dict[str, Any], loc: str
) -> None:
    tenant = shared_tenant
    body = {"name": "A", "elevenlabs_agent_id": "agent_1", **fields}
    r = await http.post("/v1/agents", json=body, headers=auth(tenant))
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["code"] == "validation_failed"
    assert any(e["loc"][0] == loc for e in problem["errors"]), problem


async def test_patch_validation(http: httpx.AsyncClient, tenant: NewTenant) -> None:
    agent = await create_agent(http, tenant)
    path = f"/v1/agents/{agent['id']}"
    for body in (
        {"name": None},
        {"phone_numbers": None},
        {"phone_numbers": ["+1"]},
        {"conversation_overrides": {"tts": {"pitch": 1}}},
        {"dynamic_variables": {"system__x": 1}},
        {"allowed_origins": ["https://x.example/"]},
        {"input_audio_format": "opus_48000"},
    ):
        r = await http.patch(path, json=body, headers=auth(tenant))
        assert r.status_code == 422, body
        assert r.json()["code"] == "validation_failed"
    assert (await http.get(path, headers=auth(tenant))).json() == agent
    r = await http.patch(path, json={}, headers=auth(tenant))
    assert r.status_code == 200
    assert r.json() == agent


async def test_phone_numbers_are_unique_across_tenants(
    http: httpx.AsyncClient,
    tenant: NewTenant,
    other_tenant: NewTenant,
    owner_conn: asyncpg.Connection,
) -> None:
    shared = number()
    mine = await create_agent(http, tenant, phone_numbers=[shared])

    fresh = number()
    r = await http.post(
        "/v1/agents",
        json={"name": "Thief", "elevenlabs_agent_id": "agent_2", "phone_numbers": [fresh, shared]},
        headers=auth(other_tenant),
    )
    assert r.status_code == 409
    problem = r.json()
    assert problem["code"] == "phone_number_taken"
    # It names the number the caller sent, nothing about who holds it.
    assert str(tenant.tenant_id) not in r.text
    assert mine["id"] not in r.text
    assert tenant.slug not in r.text
    # Nothing was created: the other number is still free.
    assert (await http.get("/v1/agents", headers=auth(other_tenant))).json()["items"] == []
    theirs = await create_agent(http, other_tenant, phone_numbers=[fresh])

    r = await http.patch(
        f"/v1/agents/{theirs['id']}", json={"phone_numbers": [shared]}, headers=auth(other_tenant)
    )
    assert r.status_code == 409
    assert r.json()["code"] == "phone_number_taken"
    theirs_now = (await http.get(f"/v1/agents/{theirs['id']}", headers=auth(other_tenant))).json()
    assert theirs_now["phone_numbers"] == [fresh]

    # Within one tenant too: another agent's number is taken.
    r = await http.post(
        "/v1/agents",
        json={"name": "Dup", "elevenlabs_agent_id": "agent_3", "phone_numbers": [shared]},
        headers=auth(tenant),
    )
    assert r.status_code == 409
    # Re-sending an agent's own numbers is not a conflict.
    r = await http.patch(
        f"/v1/agents/{mine['id']}", json={"phone_numbers": [shared]}, headers=auth(tenant)
    )
    assert r.status_code == 200
    assert r.json()["phone_numbers"] == [shared]
    owners = await owner_conn.fetch("SELECT tenant_id FROM phone_numbers WHERE e164 = $1", shared)
    assert [o["tenant_id"] for o in owners] == [tenant.tenant_id]


async def test_other_tenant_cannot_read_change_delete_or_reference(
    http: httpx.AsyncClient, tenant: NewTenant, other_tenant: NewTenant
) -> None:
    cred = await create_el(http, tenant, el_key())
    agent = await create_agent(http, tenant, credential_id=cred["id"], phone_numbers=[number()])
    path = f"/v1/agents/{agent['id']}"
    assert (await http.get(path, headers=auth(other_tenant))).status_code == 404
    assert (
        await http.patch(path, json={"name": "pwned"}, headers=auth(other_tenant))
    ).status_code == 404
    assert (await http.delete(path, headers=auth(other_tenant))).status_code == 404
    assert (await http.get("/v1/agents", headers=auth(other_tenant))).json()["items"] == []
    assert (await http.get(path, headers=auth(tenant))).json() == agent

    r = await http.post(
        "/v1/agents",
        json={"name": "X", "elevenlabs_agent_id": "agent_x", "credential_id": cred["id"]},
        headers=auth(other_tenant),
    )
    assert r.status_code == 422
    assert r.json()["code"] == "invalid_credential"
    theirs = await create_agent(http, other_tenant)
    r = await http.patch(
        f"/v1/agents/{theirs['id']}", json={"credential_id": cred["id"]}, headers=auth(other_tenant)
    )
    assert r.status_code == 422
    assert r.json()["code"] == "invalid_credential"


async def test_credential_must_be_an_elevenlabs_credential(
    http: httpx.AsyncClient, tenant: NewTenant
) -> None:
    r = await http.post(
        "/v1/credentials",
        json={"provider": "twilio", "name": "T", "account_sid": TWILIO_SID, "auth_token": el_key()},
        headers=auth(tenant),
    )
    twilio = r.json()
    for credential_id in (twilio["id"], str(uuid.uuid4())):
        r = await http.post(
            "/v1/agents",
            json={"name": "X", "elevenlabs_agent_id": "agent_x", "credential_id": credential_id},
            headers=auth(tenant),
        )
        assert r.status_code == 422
        assert r.json()["code"] == "invalid_credential"


async def test_viewer_reads_but_cannot_write(
    http: httpx.AsyncClient, tenant: NewTenant, owner_conn: asyncpg.Connection
) -> None:
    agent = await create_agent(http, tenant)
    viewer = await viewer_headers(owner_conn, tenant)
    path = f"/v1/agents/{agent['id']}"
    assert (await http.get(path, headers=viewer)).status_code == 200
    assert (await http.get("/v1/agents", headers=viewer)).status_code == 200
    r = await http.post(
        "/v1/agents", json={"name": "A", "elevenlabs_agent_id": "a"}, headers=viewer
    )
    assert r.status_code == 403
    assert (await http.patch(path, json={"name": "B"}, headers=viewer)).status_code == 403
    assert (await http.delete(path, headers=viewer)).status_code == 403
    assert (await http.get(path, headers=auth(tenant))).json() == agent


def test_normalisers() -> None:
    assert normalize_e164("+1 (415) 555-2671") == "+14155552671"
    assert normalize_e164("+44 20 7946 0958") == "+442079460958"
    for bad in ("415-555-2671", "+1", "+999123456789", "+1415555267a1" * 3):
        with pytest.raises(ValueError):
            normalize_e164(bad)
    assert normalize_origin("HTTPS://Example.COM") == "https://example.com"
    assert normalize_origin("http://example.com:80") == "http://example.com"
    assert normalize_origin("https://example.com:8443") == "https://example.com:8443"
    assert normalize_origin("http://[::1]:3000") == "http://[::1]:3000"
    assert normalize_origin("http://127.0.0.1:3000") == "http://127.0.0.1:3000"
    for bad in (
        "https://example.com/",
        "https://example.com?x=1",
        "https://example.com#x",
        "https://-bad-.com",
        "http://[zz::1]",
        "https://exa mple.com",
        "null",
    ):
        with pytest.raises(ValueError):
            normalize_origin(bad)


async def test_forged_cursor_at_datetime_edge_is_400(http, tenant) -> None:  # type: ignore[no-untyped-def]
    import base64

    import orjson

    from tests.support.tenants import auth

    raw = orjson.dumps(["0001-01-01T00:00:00+14:00", "00000000-0000-0000-0000-000000000000"])
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    r = await http.get("/v1/agents", params={"cursor": cursor}, headers=auth(tenant))
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_cursor"
