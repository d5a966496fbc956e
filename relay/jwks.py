"""Call-token verification with the control API's published keys (``/.well-known/jwks.json``).

The relay holds only public keys, so it can check a token but never mint one. Keys are cached
for ``cache_seconds``. A token signed by a key the cache does not know (the control API just
rotated) triggers a refresh, but at most one per ``refresh_min_interval`` seconds: a flood of
tokens with made-up key ids must not turn into a flood of requests to the control API. All
verifications waiting for keys share one fetch.

When the control API is briefly down the cached keys keep being used, however old: refusing
every caller because the API is restarting would be worse than trusting a key a few minutes
longer (removing a key is not an emergency revocation mechanism; ending calls is).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from relay.metrics import JWKS_FETCHES
from voicerelay.call_token import (
    MAX_TOKEN_LENGTH,
    CallTokenClaims,
    CallTokenError,
    parse_jwks,
    verify_call_token,
)
from voicerelay.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_REFRESH_MIN_INTERVAL_SECONDS = 5.0
JWKS_PATH = "/.well-known/jwks.json"


class KeysUnavailable(CallTokenError):
    """No verification key was ever loaded: the control API has not been reachable.

    A ``CallTokenError`` so callers that only know that type still refuse the token, but the
    relay should report it as ``upstream_unavailable`` rather than ``unauthorized``.
    """


class CallTokenVerifier:
    def __init__(
        self,
        http: httpx.AsyncClient,
        jwks_url: str,
        *,
        issuer: str,
        audience: str,
        cache_seconds: float,
        refresh_min_interval: float = DEFAULT_REFRESH_MIN_INTERVAL_SECONDS,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._url = jwks_url
        self._issuer = issuer
        self._audience = audience
        self._cache_seconds = cache_seconds
        self._refresh_min_interval = refresh_min_interval
        self._timeout = timeout
        self._clock = clock
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._fetched_at: float | None = None
        self._attempted_at = -float("inf")
        self._refresh: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, http: httpx.AsyncClient, settings: Settings) -> CallTokenVerifier:
        return cls(
            http,
            settings.control_api_internal_url + JWKS_PATH,
            issuer=settings.jwt_issuer,
            audience=settings.relay_token_audience,
            cache_seconds=settings.jwks_cache_seconds,
            timeout=settings.control_api_timeout_seconds,
        )

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    async def verify(self, token: str) -> CallTokenClaims:
        """The token's claims, or ``CallTokenError`` (``KeysUnavailable`` if no key is known)."""
        keys = await self._keys_for(_unverified_kid(token))
        return verify_call_token(token, keys, issuer=self._issuer, audience=self._audience)

    async def aclose(self) -> None:
        task, self._refresh = self._refresh, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _keys_for(self, kid: str | None) -> Mapping[str, Ed25519PublicKey]:
        now = self._clock()
        known = kid is not None and kid in self._keys
        fresh = self._fetched_at is not None and now - self._fetched_at < self._cache_seconds
        if known and fresh:
            return self._keys
        may_fetch = now - self._attempted_at >= self._refresh_min_interval
        if known:
            # Only old: answer now with what we have and refresh in the background.
            if may_fetch or self._refreshing():
                self._start_refresh()
            return self._keys
        if kid is None and self._keys:
            # No usable key id: verification fails anyway, so never fetch for it.
            return self._keys
        if may_fetch or self._refreshing():
            await asyncio.shield(self._start_refresh())
        if not self._keys:
            raise KeysUnavailable("verification keys unavailable")
        return self._keys

    def _refreshing(self) -> bool:
        return self._refresh is not None and not self._refresh.done()

    def _start_refresh(self) -> asyncio.Task[None]:
        if self._refresh is None or self._refresh.done():
            self._attempted_at = self._clock()
            self._refresh = asyncio.create_task(self._fetch(), name="jwks-refresh")
        return self._refresh

    async def _fetch(self) -> None:
        try:
            response = await self._http.get(self._url, timeout=self._timeout)
            response.raise_for_status()
            keys = parse_jwks(_json_object(response))
        except Exception as exc:
            # Whatever went wrong (network, status, body), the cached keys stay in service; a
            # failure here must never reach the verifications waiting on this fetch.
            JWKS_FETCHES.labels("error").inc()
            # The exception type only: messages may quote bodies or addresses.
            log.warning(
                "could not refresh the call-token keys; keeping %d cached",
                len(self._keys),
                extra={"error": type(exc).__name__},
            )
            return
        if not keys:
            JWKS_FETCHES.labels("error").inc()
            log.warning("the control API published no usable call-token keys; keeping the cache")
            return
        JWKS_FETCHES.labels("ok").inc()
        self._keys = keys
        self._fetched_at = self._clock()


def _json_object(response: httpx.Response) -> Mapping[str, Any]:
    document = response.json()
    if not isinstance(document, Mapping):
        raise ValueError("a JWKS document must be a JSON object")
    return document


def _unverified_kid(token: str) -> str | None:
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        return None
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except (jwt.InvalidTokenError, TypeError):
        return None
    return kid if isinstance(kid, str) and kid else None
