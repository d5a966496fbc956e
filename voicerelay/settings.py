"""Every setting of voicerelay, read from the environment (12-factor names).

One typed place: both services and the command line read their configuration from
``Settings``. ``config/README.md`` and ``config/example.env`` document each variable.
"""

from __future__ import annotations

import base64
import binascii
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import AnyUrl, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Environment(StrEnum):
    development = "development"
    production = "production"


def parse_keyring(raw: str, *, key_bytes: int) -> list[tuple[str, bytes]]:
    """Parse ``kid:base64key,kid:base64key`` into ``[(kid, key)]``; the first entry is active.

    Raises ValueError with a message that never contains key material.
    """
    entries: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    for position, item in enumerate(part.strip() for part in raw.split(",")):
        if not item:
            continue
        kid, sep, encoded = item.partition(":")
        kid = kid.strip()
        if not sep or not kid or not kid.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"keyring entry {position} must look like 'kid:base64key'")
        if kid in seen:
            raise ValueError(f"keyring entry {position} repeats key id {kid!r}")
        try:
            key = base64.urlsafe_b64decode(encoded.strip() + "=" * (-len(encoded.strip()) % 4))
        except (binascii.Error, ValueError):
            raise ValueError(f"keyring entry {kid!r} is not valid base64") from None
        if len(key) != key_bytes:
            raise ValueError(f"keyring entry {kid!r} must decode to {key_bytes} bytes")
        seen.add(kid)
        entries.append((kid, key))
    return entries


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """All configuration. Field names map to upper-case environment variables."""

    # hide_input_in_errors: pydantic would otherwise quote the raw input (keys, passwords in
    # URLs) in every validation error, and the command line prints those errors.
    model_config = SettingsConfigDict(
        env_file=None,
        case_sensitive=False,
        extra="ignore",
        validate_default=True,
        hide_input_in_errors=True,
    )

    environment: Environment = Environment.production
    log_level: str = "INFO"
    log_format: str = Field(default="json", pattern="^(json|text)$")
    state_dir: Path = Path(".voicerelay")

    # --- Postgres -----------------------------------------------------------------------
    # The services connect as an application role that owns nothing and cannot bypass RLS.
    database_url: SecretStr | None = None
    # Migrations, partition maintenance and `tenant create` connect as the schema owner.
    migration_database_url: SecretStr | None = None
    database_pool_min_size: int = Field(default=1, ge=0, le=100)
    database_pool_max_size: int = Field(default=10, ge=1, le=500)
    # 0 disables asyncpg's prepared-statement cache: required behind PgBouncer in transaction mode.
    database_statement_cache_size: int = Field(default=100, ge=0)
    database_command_timeout_seconds: float = Field(default=10.0, gt=0)

    # --- Redis --------------------------------------------------------------------------
    redis_url: SecretStr | None = None
    redis_key_prefix: str = Field(default="vr:", min_length=1, max_length=64)

    # --- Listeners and public addresses -------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)
    relay_host: str = "127.0.0.1"
    relay_port: int = Field(default=8090, ge=0, le=65535)
    emulator_host: str = "127.0.0.1"
    emulator_port: int = Field(default=8070, ge=0, le=65535)
    public_api_url: str = "http://127.0.0.1:8080"
    relay_public_url: str = "ws://127.0.0.1:8090"
    # Control API base URL as the relay reaches it (service-to-service).
    control_api_internal_url: str = "http://127.0.0.1:8080"
    # Client addresses in X-Forwarded-For are trusted only from these proxies.
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["127.0.0.1"])
    cors_allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_request_body_bytes: int = Field(default=64 * 1024, ge=1024)

    # --- Tokens -------------------------------------------------------------------------
    jwt_issuer: str = "voicerelay-control-api"
    access_token_audience: str = "voicerelay-api"
    relay_token_audience: str = "voicerelay-relay"
    # Ed25519 keyring, ``kid:base64(32-byte seed)`` comma-separated, first entry signs.
    signing_keys: SecretStr | None = None
    access_token_ttl_seconds: int = Field(default=900, ge=60, le=900)
    refresh_token_ttl_seconds: int = Field(default=14 * 86400, ge=300)
    refresh_family_max_age_seconds: int = Field(default=30 * 86400, ge=300)
    refresh_reuse_grace_seconds: int = Field(default=10, ge=0, le=60)
    # A call token must be presented to the relay within this window after issue.
    call_token_connect_window_seconds: int = Field(default=300, ge=10, le=3600)
    # Upper bound on a call's length; call tokens expire this long after issue (plus grace).
    max_call_duration_seconds: int = Field(default=3600, ge=30, le=4 * 3600)
    # Shared secret the relay presents to the control API's internal endpoints.
    internal_service_token: SecretStr | None = None

    # --- Credential vault ---------------------------------------------------------------
    # AES-256-GCM keyring, ``kid:base64(32 bytes)`` comma-separated, first entry encrypts.
    encryption_keys: SecretStr | None = None

    # --- Providers ----------------------------------------------------------------------
    elevenlabs_api_url: str = "https://api.elevenlabs.io"
    elevenlabs_timeout_seconds: float = Field(default=10.0, gt=0)
    twilio_api_url: str = "https://api.twilio.com"
    twilio_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    # The <Stream url> the voice webhook hands Twilio; default: RELAY_PUBLIC_URL + /twilio/stream.
    twilio_stream_url: str | None = None
    # When the agent ends a phone call, also hang it up through Twilio's REST API.
    twilio_hangup_on_agent_end: bool = True
    # The agent's client tool that transfers a phone call to a number (<Dial>).
    twilio_transfer_tool_name: str = Field(
        default="transfer_to_number", min_length=1, max_length=100
    )

    # --- Rate limits (GCRA in Redis) ----------------------------------------------------
    rate_limit_login_per_minute_per_ip: int = Field(default=20, ge=1)
    rate_limit_login_burst: int = Field(default=5, ge=0)
    rate_limit_api_per_second: float = Field(default=20.0, gt=0)
    rate_limit_api_burst: int = Field(default=40, ge=0)

    # --- Call logs ----------------------------------------------------------------------
    call_events_stream: str = "call-events"
    call_events_group: str = "call-log-writer"
    call_log_max_retention_days: int = Field(default=400, ge=1)
    call_log_partitions_ahead_months: int = Field(default=3, ge=1, le=24)
    # Entries kept in the call-event stream (approximate trim); must exceed what the consumer can
    # fall behind by during a PostgreSQL outage.
    call_events_stream_maxlen: int = Field(default=1_000_000, ge=10_000)
    # A live call writes a usage event every 15 s and its owner renews leases of at most 120 s
    # (owner) and 600 s (tenant slot); a call silent for longer than this is dead and gets ended
    # as relay_lost. The floor keeps a slow consumer or a takeover from ending live calls.
    call_stale_after_seconds: int = Field(default=600, ge=300, le=7 * 86400)

    # --- Relay --------------------------------------------------------------------------
    # Identifies this replica in the call registry and logs; defaults to hostname-pid.
    relay_id: str | None = Field(default=None, max_length=100)
    # Largest single audio chunk accepted from a client (bytes).
    relay_max_audio_chunk_bytes: int = Field(default=64 * 1024, ge=320, le=1024 * 1024)
    # Agent audio chunks queued for one slow client before the oldest are dropped.
    relay_client_queue_chunks: int = Field(default=250, ge=10, le=10_000)
    upstream_connect_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    # A call with no audio in either direction for this long is ended (reason idle_timeout).
    call_idle_timeout_seconds: float = Field(default=120.0, gt=0)
    # On SIGTERM, active calls may continue this long before they are ended (reason shutdown).
    drain_deadline_seconds: float = Field(default=300.0, ge=0)
    # Lease on a tenant's concurrent-call slot; renewed every third of it while the call lives.
    tenant_call_lease_seconds: int = Field(default=30, ge=3, le=600)
    relay_connect_rate_per_minute_per_ip: int = Field(default=60, ge=1)
    relay_connect_rate_per_minute_per_tenant: int = Field(default=600, ge=1)
    # Call-log events buffered in memory while Redis is unreachable, before the oldest are dropped.
    relay_call_log_buffer_events: int = Field(default=10_000, ge=100)
    jwks_cache_seconds: float = Field(default=300.0, ge=1)
    control_api_timeout_seconds: float = Field(default=10.0, gt=0)
    # --- Relay: phone calls (Twilio Media Streams at /twilio/stream) ---------------------
    # Caller audio held while the agent is not ready yet, then delivered (oldest dropped beyond).
    relay_phone_prebuffer_ms: int = Field(default=5000, ge=0, le=60_000)
    # A Media Streams connection must send ``start`` within this long, or it is closed.
    relay_twilio_start_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # Largest Media Streams message accepted (a text frame, base64 audio inside).
    relay_twilio_max_message_bytes: int = Field(default=64 * 1024, ge=1024, le=1024 * 1024)
    # --- Relay scale-out ----------------------------------------------------------------
    # Lease on a call's upstream bridge (the owner replica renews it every third of it).
    call_owner_lease_seconds: float = Field(default=5.0, ge=1.0, le=120.0)
    # A replica whose heartbeat is older than this is dead; its calls may be claimed.
    replica_ttl_seconds: float = Field(default=3.0, ge=1.0, le=60.0)
    # "targeted" routes a frame only to the replicas that need it; "stock" is python-socketio's
    # AsyncRedisManager (every emit to every replica), kept for benchmarks and comparison only.
    relay_client_manager: str = Field(default="targeted", pattern="^(targeted|stock|local)$")

    # --- Error reporting (optional) -----------------------------------------------------
    # Sentry is off unless a DSN is set.
    sentry_dsn: SecretStr | None = None
    sentry_environment: str | None = Field(default=None, max_length=100)
    sentry_traces_sample_rate: float = Field(default=0.0, ge=0.0, le=1.0)

    @field_validator(
        "database_url",
        "migration_database_url",
        "redis_url",
        "signing_keys",
        "encryption_keys",
        "internal_service_token",
        "sentry_dsn",
        "twilio_stream_url",
        "sentry_environment",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `FOO=` in an env file or a compose file means "not set", not "the empty string".
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("trusted_proxies", "cors_allowed_origins", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator(
        "public_api_url",
        "relay_public_url",
        "control_api_internal_url",
        "elevenlabs_api_url",
        "twilio_api_url",
    )
    @classmethod
    def _url(cls, value: str) -> str:
        AnyUrl(value)
        return value.rstrip("/")

    @field_validator("twilio_stream_url")
    @classmethod
    def _optional_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        AnyUrl(value)
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_keyrings(self) -> Settings:
        if self.signing_keys is not None:
            parse_keyring(self.signing_keys.get_secret_value(), key_bytes=32)
        if self.encryption_keys is not None:
            parse_keyring(self.encryption_keys.get_secret_value(), key_bytes=32)
        if self.database_pool_min_size > self.database_pool_max_size:
            raise ValueError("DATABASE_POOL_MIN_SIZE must not exceed DATABASE_POOL_MAX_SIZE")
        return self

    # --- Derived helpers ----------------------------------------------------------------
    def twilio_media_stream_url(self) -> str:
        """Where Twilio opens the call's Media Streams WebSocket (no query string allowed)."""
        if self.twilio_stream_url is not None:
            return self.twilio_stream_url
        base = self.relay_public_url
        if base.startswith("https://"):
            base = "wss://" + base[len("https://") :]
        elif base.startswith("http://"):
            base = "ws://" + base[len("http://") :]
        return base + "/twilio/stream"

    def signing_keyring(self) -> list[tuple[str, bytes]]:
        if self.signing_keys is None:
            raise MissingSetting("SIGNING_KEYS")
        ring = parse_keyring(self.signing_keys.get_secret_value(), key_bytes=32)
        if not ring:
            raise MissingSetting("SIGNING_KEYS")
        return ring

    def encryption_keyring(self) -> list[tuple[str, bytes]]:
        if self.encryption_keys is None:
            raise MissingSetting("ENCRYPTION_KEYS")
        ring = parse_keyring(self.encryption_keys.get_secret_value(), key_bytes=32)
        if not ring:
            raise MissingSetting("ENCRYPTION_KEYS")
        return ring

    def require(self, name: str) -> str:
        """Return a secret or URL setting's value, or fail with the variable's name."""
        value = getattr(self, name)
        if value is None:
            raise MissingSetting(name.upper())
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        return str(value)

    def redis_key(self, *parts: str) -> str:
        return self.redis_key_prefix + ":".join(parts)


class MissingSetting(RuntimeError):
    def __init__(self, variable: str) -> None:
        super().__init__(f"{variable} is not set")
        self.variable = variable


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
