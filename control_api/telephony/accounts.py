"""The tenant's Twilio account: the stored ``twilio`` credential whose account SID matches.

A tenant may store several Twilio credentials (several accounts, or the same account twice
while rotating its auth token). A webhook or a call names its account by ``AccountSid``; the
credentials of that account are decrypted on use, newest first, and never leave this process.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass, field

from control_api.credential_store import (
    CredentialNotFound,
    CredentialUnreadable,
    load_credential_secret,
)
from control_api.db import Conn
from control_api.vault import Vault

log = logging.getLogger(__name__)

ACCOUNT_SID = re.compile(r"AC[0-9a-f]{32}")
CALL_SID = re.compile(r"CA[0-9a-f]{32}")
# More than this many credentials for one account is a mistake, not a rotation.
MAX_CREDENTIALS_PER_ACCOUNT = 5


@dataclass(frozen=True)
class TwilioAccount:
    credential_id: uuid.UUID
    account_sid: str
    auth_token: str = field(repr=False)


def normalize_account_sid(value: str | None) -> str | None:
    """``AC`` + 32 lower-case hex digits (how credentials store it), or None if malformed."""
    if value is None or len(value) != 34 or not value.startswith("AC"):
        return None
    normalized = "AC" + value[2:].lower()
    return normalized if ACCOUNT_SID.fullmatch(normalized) else None


def is_call_sid(value: str | None) -> bool:
    return value is not None and CALL_SID.fullmatch(value) is not None


async def twilio_accounts(
    conn: Conn, vault: Vault, tenant_id: uuid.UUID, account_sid: str
) -> list[TwilioAccount]:
    """The tenant's readable credentials for ``account_sid``, newest first (inside tenant_tx)."""
    rows = await conn.fetch(
        """
        SELECT id FROM credentials
        WHERE provider = 'twilio' AND public_info->>'account_sid' = $1
        ORDER BY updated_at DESC, id DESC
        LIMIT $2
        """,
        account_sid,
        MAX_CREDENTIALS_PER_ACCOUNT,
    )
    accounts: list[TwilioAccount] = []
    for row in rows:
        try:
            provider, secret = await load_credential_secret(conn, tenant_id, row["id"], vault=vault)
        except (CredentialNotFound, CredentialUnreadable):
            continue  # already logged by the store; another credential may still work
        token = secret.get("auth_token")
        if provider == "twilio" and secret.get("account_sid") == account_sid and token:
            accounts.append(TwilioAccount(row["id"], account_sid, token))
    return accounts
