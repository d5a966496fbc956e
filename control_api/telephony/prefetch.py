"""The ElevenLabs signed URL of a phone call, fetched while Twilio is still connecting the stream.

For a private agent the relay's session request would otherwise fetch the signed URL only after
the stream's ``start`` arrived, adding a round trip to ElevenLabs before the caller hears the
first word. The voice webhook starts the fetch in the background right after answering, and stores
the URL sealed with the credential vault on the call row: bound by associated data to the tenant
and the call (a ciphertext moved to another row does not open), used at most once (taking it
clears it in the same statement) and only before it expires. Any failure just leaves the row
empty, and the session endpoint fetches a URL as it does for browser calls.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from control_api.agent_credentials import elevenlabs_key
from control_api.db import Conn, tenant_tx
from control_api.elevenlabs import ConversationUrl, fetch_signed_url
from control_api.vault import Sealed, Vault, VaultError

if TYPE_CHECKING:
    from control_api.state import AppState

log = logging.getLogger(__name__)

_AAD_PREFIX = b"voicerelay/prefetched-upstream-url/v1|"


def associated_data(tenant_id: uuid.UUID, call_id: uuid.UUID) -> bytes:
    return _AAD_PREFIX + tenant_id.bytes + call_id.bytes


async def prefetch_upstream_url(
    state: AppState,
    *,
    tenant_id: uuid.UUID,
    call_id: uuid.UUID,
    elevenlabs_agent_id: str,
    credential_id: uuid.UUID,
) -> None:
    """Fetch and store the call's signed URL; never raises (the session endpoint falls back)."""
    context = {"call_id": str(call_id)}
    try:
        vault = state.require_vault()
        async with tenant_tx(state.pool, tenant_id, readonly=True) as conn:
            api_key = await elevenlabs_key(state, conn, tenant_id, credential_id)
        settings = state.settings
        url = await fetch_signed_url(
            state.http,
            settings.elevenlabs_api_url,
            api_key=api_key,
            agent_id=elevenlabs_agent_id,
            timeout_seconds=settings.elevenlabs_timeout_seconds,
        )
        assert url.expires_at is not None
        sealed = vault.seal(url.url.encode(), associated_data(tenant_id, call_id))
        async with tenant_tx(state.pool, tenant_id) as conn:
            await conn.execute(
                """
                UPDATE calls SET upstream_url_key_id = $2, upstream_url_nonce = $3,
                    upstream_url_ciphertext = $4, upstream_url_expires_at = $5
                WHERE id = $1
                """,
                call_id,
                sealed.key_id,
                sealed.nonce,
                sealed.ciphertext,
                url.expires_at,
            )
    except Exception as exc:
        log.warning(
            "signed URL prefetch failed; the session will fetch one",
            extra={**context, "error": type(exc).__name__},
        )


async def take_prefetched_url(
    conn: Conn, vault: Vault, tenant_id: uuid.UUID, call_id: uuid.UUID
) -> ConversationUrl | None:
    """The call's prefetched URL if one is stored and unexpired; clears it either way."""
    row = await conn.fetchrow(
        """
        WITH taken AS (
            SELECT id, created_at, upstream_url_key_id, upstream_url_nonce,
                   upstream_url_ciphertext, upstream_url_expires_at
            FROM calls WHERE id = $1 AND upstream_url_ciphertext IS NOT NULL
            FOR UPDATE
        )
        UPDATE calls c SET upstream_url_key_id = NULL, upstream_url_nonce = NULL,
            upstream_url_ciphertext = NULL, upstream_url_expires_at = NULL
        FROM taken WHERE c.id = taken.id AND c.created_at = taken.created_at
        RETURNING taken.upstream_url_key_id AS key_id, taken.upstream_url_nonce AS nonce,
                  taken.upstream_url_ciphertext AS ciphertext,
                  taken.upstream_url_expires_at AS expires_at
        """,
        call_id,
    )
    if row is None or row["expires_at"] <= datetime.now(UTC):
        return None
    sealed = Sealed(key_id=row["key_id"], nonce=row["nonce"], ciphertext=row["ciphertext"])
    try:
        url = vault.open(
            sealed,
            associated_data(tenant_id, call_id),
            what=f"prefetched URL of call {call_id}",
            bound_to="tenant and call",
        )
    except VaultError as exc:
        log.warning(
            "prefetched signed URL could not be opened; fetching a new one",
            extra={"call_id": str(call_id), "reason": type(exc).__name__},
        )
        return None
    return ConversationUrl(url.decode(), row["expires_at"])
