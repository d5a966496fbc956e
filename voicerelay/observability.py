"""Optional error reporting to Sentry, with every secret scrubbed before an event leaves.

``init_sentry`` does nothing at all when ``SENTRY_DSN`` is unset: sentry_sdk is not even
imported. When set, events are sent without default PII, without local variables (a frame's
locals may hold a decrypted credential or a token) and without request bodies, and
``scrub_event`` runs on every event and transaction as the last step: values under secret-named
keys (Authorization, cookies, X-Twilio-Signature, tokens, passwords, API keys...) are replaced,
and strings are cleaned of bearer tokens, signed-URL query parameters, URL passwords, JWTs and
API keys wherever they appear (messages, exception values, breadcrumbs, URLs).
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from voicerelay.settings import Settings

FILTERED = "[Filtered]"

# Keys whose values are secret, matched on the normalised key (lower case, '-' as '_').
_SECRET_KEY_PARTS = (
    "authorization",
    "cookie",
    "token",
    "secret",
    "password",
    "passwd",
    "signature",
    "api_key",
    "apikey",
    "credential",
    "private_key",
    "encryption_key",
    "signing_key",
    "dsn",
    "database_url",
)
_VALUE_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), rf"\1 {FILTERED}"),
    # Query parameters of signed URLs, and tokens in query strings (which may be bare).
    (
        re.compile(
            r"(?i)((?:^|[?&;])[\w.-]*(?:token|signature|sig|key|secret|password|auth|credential)"
            r"[\w.-]*=)[^&#\s\"']*"
        ),
        rf"\1{FILTERED}",
    ),
    # scheme://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@/\s]+@"), rf"\1{FILTERED}@"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), FILTERED),
    # voicerelay API keys and ElevenLabs-style keys.
    (re.compile(r"\b(?:vr_live_|sk_)[A-Za-z0-9_-]{8,}"), FILTERED),
)


def _secret_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    normalised = key.lower().replace("-", "_")
    return any(part in normalised for part in _SECRET_KEY_PARTS)


def scrub_text(text: str) -> str:
    for pattern, replacement in _VALUE_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {
            key: FILTERED if _secret_key(key) and item else _scrub(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        # Header lists come as [name, value] pairs.
        if len(value) == 2 and _secret_key(value[0]) and isinstance(value[1], str):
            return [value[0], FILTERED]
        return [_scrub(item) for item in value]
    return value


def scrub_event(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sentry ``before_send``/``before_send_transaction``: the event with secrets removed."""
    scrubbed: dict[str, Any] = _scrub(event)
    return scrubbed


def _release() -> str | None:
    try:
        return f"voicerelay@{version('voicerelay')}"
    except PackageNotFoundError:
        return None


def init_sentry(settings: Settings, *, service: str) -> bool:
    """Start Sentry for ``service`` ("api" or "relay") if SENTRY_DSN is set; True if started."""
    if settings.sentry_dsn is None:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.starlette import StarletteIntegration

    sentry_sdk.init(
        dsn=settings.sentry_dsn.get_secret_value(),
        environment=settings.sentry_environment or settings.environment.value,
        release=_release(),
        traces_sample_rate=settings.sentry_traces_sample_rate,
        send_default_pii=False,
        include_local_variables=False,
        max_request_body_size="never",
        before_send=scrub_event,  # type: ignore[arg-type]
        before_send_transaction=scrub_event,  # type: ignore[arg-type]
        # Errors are what is reported. Auto-enabled integrations would also instrument every
        # Redis, asyncpg and httpx call, some of them on the audio path; Starlette's adds the
        # request (scrubbed) to errors raised while serving one.
        auto_enabling_integrations=False,
        integrations=[StarletteIntegration()],
    )
    sentry_sdk.set_tag("service", service)
    return True
