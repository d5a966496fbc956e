"""AES-256-GCM credential vault with a versioned keyring.

The first key of the keyring encrypts; every key decrypts, chosen by the key id stored with the
row (no trial decryption). Each ciphertext is bound by associated data to the tenant, the
credential id and the provider, so a ciphertext copied into another row does not decrypt.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
KEY_BYTES = 32
_AAD_PREFIX = b"voicerelay/credential/v1|"


class VaultError(Exception):
    """A ciphertext could not be opened. Messages never contain key material or plaintext."""


class UnknownKeyId(VaultError):
    pass


class DecryptionFailed(VaultError):
    pass


@dataclass(frozen=True)
class Sealed:
    """What is stored in a credentials row."""

    key_id: str
    nonce: bytes
    ciphertext: bytes

    def __repr__(self) -> str:
        return f"Sealed(key_id={self.key_id!r}, ciphertext=<{len(self.ciphertext)} bytes>)"


def associated_data(tenant_id: uuid.UUID, credential_id: uuid.UUID, provider: str) -> bytes:
    # Both UUIDs are fixed-width and the provider comes last, so the encoding is unambiguous.
    return _AAD_PREFIX + tenant_id.bytes + credential_id.bytes + provider.encode()


class Vault:
    def __init__(self, keyring: list[tuple[str, bytes]]) -> None:
        if not keyring:
            raise ValueError("the vault needs at least one key")
        self._ciphers: dict[str, AESGCM] = {}
        for kid, key in keyring:
            if len(key) != KEY_BYTES:
                raise ValueError(f"vault key {kid!r} must be {KEY_BYTES} bytes")
            if kid in self._ciphers:
                raise ValueError(f"vault key id {kid!r} is repeated")
            self._ciphers[kid] = AESGCM(key)
        self._active = keyring[0][0]

    @property
    def active_key_id(self) -> str:
        return self._active

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._ciphers)

    def __repr__(self) -> str:
        return f"Vault(active_key_id={self._active!r}, key_ids={list(self._ciphers)!r})"

    __str__ = __repr__

    def encrypt(
        self, plaintext: bytes, *, tenant_id: uuid.UUID, credential_id: uuid.UUID, provider: str
    ) -> Sealed:
        return self.seal(plaintext, associated_data(tenant_id, credential_id, provider))

    def decrypt(
        self, sealed: Sealed, *, tenant_id: uuid.UUID, credential_id: uuid.UUID, provider: str
    ) -> bytes:
        return self.open(
            sealed,
            associated_data(tenant_id, credential_id, provider),
            what=f"credential {credential_id}",
            bound_to="tenant, credential and provider",
        )

    def seal(self, plaintext: bytes, aad: bytes) -> Sealed:
        """Encrypt under the active key, bound to ``aad`` (which must identify the row)."""
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = self._ciphers[self._active].encrypt(nonce, plaintext, aad)
        return Sealed(key_id=self._active, nonce=nonce, ciphertext=ciphertext)

    def open(self, sealed: Sealed, aad: bytes, *, what: str, bound_to: str) -> bytes:
        """Decrypt what ``seal`` sealed with the same ``aad``; ``what`` names it in errors."""
        cipher = self._ciphers.get(sealed.key_id)
        if cipher is None:
            raise UnknownKeyId(
                f"{what} is encrypted under key id {sealed.key_id!r}, "
                "which is not in ENCRYPTION_KEYS"
            )
        if len(sealed.nonce) != NONCE_BYTES:
            raise DecryptionFailed(f"{what} has a malformed nonce")
        try:
            return cipher.decrypt(sealed.nonce, sealed.ciphertext, aad)
        except InvalidTag:
            raise DecryptionFailed(
                f"{what} failed authentication: the ciphertext was altered "
                f"or does not belong to this {bound_to}"
            ) from None

    def needs_rewrap(self, sealed: Sealed) -> bool:
        return sealed.key_id != self._active

    def rewrap(
        self, sealed: Sealed, *, tenant_id: uuid.UUID, credential_id: uuid.UUID, provider: str
    ) -> Sealed:
        """Re-encrypt under the active key (with a fresh nonce); the plaintext stays local."""
        plaintext = self.decrypt(
            sealed, tenant_id=tenant_id, credential_id=credential_id, provider=provider
        )
        return self.encrypt(
            plaintext, tenant_id=tenant_id, credential_id=credential_id, provider=provider
        )
