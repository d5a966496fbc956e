"""Validating Twilio's ``X-Twilio-Signature`` on webhooks (voice and status callbacks).

Twilio signs the URL it requested, exactly as configured on the phone number (scheme, host, port,
path and query string), followed by every POST parameter sorted by name, with HMAC-SHA1 under the
account's auth token. ``twilio.request_validator.RequestValidator`` computes that and accepts the
URL with or without the default port, both of which Twilio has been seen to sign.

The URL is rebuilt from ``PUBLIC_API_URL`` plus the request's raw path and raw query string, never
from the Host or X-Forwarded-* headers: behind a load balancer or TLS-terminating proxy the request
reaches us as ``http://10.0.0.7:8080/...`` while Twilio signed ``https://api.example.com/...``, and
the forwarded headers are whatever the last hop (or an attacker talking to us directly) chose to
send. The configured public address is the one thing Twilio and we agree on. A proxy that strips a
path prefix must have that prefix in ``PUBLIC_API_URL``.

Webhooks signed with a Twilio *SharedKey* (``X-Twilio-Webhooks-Signature-Settings``) are refused:
only the account's auth token is stored, so such a signature cannot be checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import quote

from starlette.requests import Request
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]

SIGNATURE_HEADER = "x-twilio-signature"
SHARED_KEY_SETTINGS_HEADER = "x-twilio-webhooks-signature-settings"
# Twilio's signatures are base64 of a 20-byte HMAC-SHA1 (28 characters); anything far longer is
# not worth hashing against every stored token.
MAX_SIGNATURE_LENGTH = 128


class FormParams(dict[str, list[str]]):
    """Every value of every POST parameter, as the validator wants them (``getlist``)."""

    def getlist(self, name: str) -> list[str]:
        return self[name]

    def first(self, name: str) -> str | None:
        values = self.get(name)
        return values[0] if values else None

    @classmethod
    def of(cls, items: Iterable[tuple[str, str]]) -> FormParams:
        params = cls()
        for key, value in items:
            params.setdefault(key, []).append(value)
        return params


def public_request_url(public_api_url: str, request: Request) -> str:
    """The URL Twilio requested: ``PUBLIC_API_URL`` + raw path + raw query string."""
    raw_path = request.scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else quote(request.url.path)
    query = request.scope.get("query_string", b"").decode("latin-1")
    return public_api_url.rstrip("/") + path + (f"?{query}" if query else "")


def signature_is_valid(
    url: str, params: FormParams, signature: str, auth_tokens: Sequence[str]
) -> bool:
    """True when ``signature`` is Twilio's for ``url`` + ``params`` under one of the tokens.

    Several tokens only when the tenant stored the same account more than once (e.g. while
    rotating its auth token): each is tried.
    """
    if not signature or len(signature) > MAX_SIGNATURE_LENGTH:
        return False
    valid = False
    for token in auth_tokens:
        valid |= RequestValidator(token).validate(url, params, signature)
    return valid
