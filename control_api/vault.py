"""AES-256-GCM credential vault with a versioned keyring."""

from __future__ import annotations


class Vault:
    def __init__(self, keyring: list[tuple[str, bytes]]) -> None:
        self.keyring = keyring
