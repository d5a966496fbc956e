"""Ed25519 signing keys for every JWT the control API issues, with kid-based rotation.

The first key of ``SIGNING_KEYS`` signs; every key verifies, so a new key can be added in front and
an old one removed once the longest-lived token it signed has expired. The public halves are served
as JWKS so the relay verifies call tokens without ever being able to mint one.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

# The only algorithm accepted anywhere: never derived from a token's own header.
ALGORITHMS = ["EdDSA"]


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: Ed25519PrivateKey
    public: Ed25519PublicKey

    def jwk(self) -> dict[str, str]:
        raw = self.public.public_bytes(Encoding.Raw, PublicFormat.Raw)
        x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": x,
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig",
        }


class SigningKeyring:
    def __init__(self, seeds: list[tuple[str, bytes]]) -> None:
        if not seeds:
            raise ValueError("the signing keyring is empty")
        self._keys: dict[str, SigningKey] = {}
        for kid, seed in seeds:
            private = Ed25519PrivateKey.from_private_bytes(seed)
            self._keys[kid] = SigningKey(kid, private, private.public_key())
        self.active = self._keys[seeds[0][0]]

    def sign(self, claims: dict[str, Any], *, typ: str) -> str:
        return jwt.encode(
            claims,
            self.active.private,
            algorithm="EdDSA",
            headers={"kid": self.active.kid, "typ": typ},
        )

    def verify(
        self,
        token: str,
        *,
        typ: str,
        audience: str,
        issuer: str,
        required: list[str],
        leeway: float = 5.0,
    ) -> dict[str, Any]:
        """Decode and verify; raises jwt.InvalidTokenError on any problem."""
        header = jwt.get_unverified_header(token)
        if header.get("typ") != typ:
            raise jwt.InvalidTokenError("unexpected token type")
        kid = header.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise jwt.InvalidTokenError("unknown key id")
        claims: dict[str, Any] = jwt.decode(
            token,
            key.public,
            algorithms=ALGORITHMS,
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            options={"require": required, "strict_aud": True},
        )
        return claims

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [k.jwk() for k in self._keys.values()]}
