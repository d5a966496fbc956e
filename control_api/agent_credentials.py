"""An agent's ElevenLabs API key, decrypted on use (signed URLs for private agents).

The key stays in the caller's local variables: never logged, stored or put into a response.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from control_api.credential_store import (
    CredentialNotFound,
    CredentialUnreadable,
    load_credential_secret,
)
from control_api.db import Conn
from control_api.problems import Problem

if TYPE_CHECKING:
    from control_api.state import AppState


async def elevenlabs_key(
    state: AppState, conn: Conn, tenant_id: uuid.UUID, credential_id: uuid.UUID
) -> str:
    vault = state.require_vault()
    try:
        provider, secret = await load_credential_secret(conn, tenant_id, credential_id, vault=vault)
    except CredentialNotFound:
        raise Problem(409, "credential_unusable", "The agent's credential is missing.") from None
    except CredentialUnreadable:
        raise Problem(
            500, "credential_unreadable", "The agent's credential could not be decrypted."
        ) from None
    key = secret.get("api_key") if provider == "elevenlabs" else None
    if not isinstance(key, str) or not key:
        raise Problem(
            409, "credential_unusable", "The agent's credential is not an ElevenLabs API key."
        )
    return key
