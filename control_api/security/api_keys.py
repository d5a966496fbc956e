"""Tenant API keys: ``vr_live_<prefix>_<secret>``, shown once, stored as a SHA-256 hash.

The keys carry 256 bits of randomness, so a fast hash is enough (no password stretching); the
prefix is stored in clear so that keys can be listed and recognised without revealing them.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

KEY_MARKER = "vr_live_"


@dataclass(frozen=True)
class NewApiKey:
    plaintext: str
    prefix: str
    key_hash: bytes


def generate_api_key() -> NewApiKey:
    prefix = secrets.token_hex(4)
    plaintext = f"{KEY_MARKER}{prefix}_{secrets.token_urlsafe(32)}"
    return NewApiKey(
        plaintext=plaintext, prefix=f"{KEY_MARKER}{prefix}", key_hash=hash_api_key(plaintext)
    )


def hash_api_key(plaintext: str) -> bytes:
    return hashlib.sha256(plaintext.encode()).digest()


def looks_like_api_key(token: str) -> bool:
    return token.startswith(KEY_MARKER) and 20 < len(token) < 200
