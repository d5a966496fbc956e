"""Every Prometheus metric of the relay, in one place so names and labels stay consistent.

Labels are small closed sets (direction, result, error code, limiter). Never a call id, and a
tenant id only in the scrape-time ``TenantCalls`` gauge, which names at most a bounded number of
tenants that have a call right now: one series per call or per tenant ever seen would grow the
registry without bound.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Protocol

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# --- calls and audio --------------------------------------------------------------------------
ACTIVE_CALLS = Gauge("voicerelay_relay_active_calls", "Calls this relay is carrying right now.")
CALLS = Counter(
    "voicerelay_relay_calls_total",
    "Calls that ended on this relay, by result (the call.ended reason).",
    ["result"],
)
AUDIO_FRAMES = Counter(
    "voicerelay_relay_audio_frames_total",
    "Audio chunks relayed, by direction (in: caller to agent, out: agent to caller).",
    ["direction"],
)
AUDIO_BYTES = Counter(
    "voicerelay_relay_audio_bytes_total",
    "Audio bytes relayed, by direction, as sent on the wire after any transcoding.",
    ["direction"],
)
UPSTREAM_CONNECT_SECONDS = Histogram(
    "voicerelay_relay_upstream_connect_seconds",
    "Time from starting the upstream (ElevenLabs) connection to its conversation metadata.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
)
ADDED_LATENCY_SECONDS = Histogram(
    "voicerelay_relay_added_latency_seconds",
    "Time an audio chunk spends inside the relay (received to sent on), either direction.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
ERRORS = Counter(
    "voicerelay_relay_errors_total",
    "Errors reported to clients or ending calls, by stable error code.",
    ["code"],
)
CLIENT_QUEUE_DROPPED = Counter(
    "voicerelay_relay_client_queue_dropped_total",
    "Agent audio chunks dropped (oldest first) because a client could not keep up.",
)
STALE_AUDIO_DROPPED = Counter(
    "voicerelay_relay_stale_audio_dropped_total",
    "Agent audio chunks dropped because an interruption made them stale.",
)
DRAINING = Gauge(
    "voicerelay_relay_draining", "1 while this relay is draining (refusing new calls)."
)
CONNECT_REJECTED = Counter(
    "voicerelay_relay_connect_rejected_total",
    "Socket.IO connections refused, by the connect_error code.",
    ["code"],
)

# --- admission --------------------------------------------------------------------------------
CONNECT_RATE_DECISIONS = Counter(
    "voicerelay_relay_connect_rate_decisions_total",
    "Connection-rate checks by limiter (ip, tenant) and result (allowed, limited, error).",
    ["limiter", "result"],
)
TENANT_CAP_DECISIONS = Counter(
    "voicerelay_relay_tenant_cap_decisions_total",
    "Tenant concurrent-call slot requests by result (acquired, refused, error).",
    ["result"],
)
TENANT_CAP_RELEASE_ERRORS = Counter(
    "voicerelay_relay_tenant_cap_release_errors_total",
    "Slot releases Redis did not take; those slots free themselves when their lease expires.",
)

# --- control API ------------------------------------------------------------------------------
JWKS_FETCHES = Counter(
    "voicerelay_relay_jwks_fetches_total",
    "Fetches of the control API's JWKS by result (ok, error).",
    ["result"],
)
SESSION_FETCHES = Counter(
    "voicerelay_relay_session_fetches_total",
    "Call-session requests to the control API by result (ok or the SessionError code).",
    ["result"],
)

# --- call log ---------------------------------------------------------------------------------
CALL_LOG_APPENDED = Counter(
    "voicerelay_relay_call_log_appended_total",
    "Call-log events appended to the Redis stream.",
)
CALL_LOG_DROPPED = Counter(
    "voicerelay_relay_call_log_dropped_total",
    "Call-log events lost, by reason (buffer_full, rejected, invalid, closed).",
    ["reason"],
)
CALL_LOG_BUFFERED = Gauge(
    "voicerelay_relay_call_log_buffered",
    "Call-log events waiting in memory to be appended to Redis.",
)
CALL_LOG_APPEND_FAILURES = Counter(
    "voicerelay_relay_call_log_append_failures_total",
    "Attempts to append call-log events that failed because Redis was unreachable.",
)

# --- dashboards: time to first agent audio, calls per tenant, pub/sub health -----------------
FIRST_AGENT_AUDIO_SECONDS = Histogram(
    "voicerelay_relay_first_agent_audio_seconds",
    "Time from a call's start on this relay to the first agent audio chunk sent to the caller.",
    buckets=(0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0),
)

# Tenants listed by id in the calls-per-tenant gauge; the rest are summed under "other".
TENANT_LABEL_LIMIT = 50
OTHER_TENANTS = "other"


class TenantCalls(Collector):
    """``voicerelay_relay_tenant_active_calls{tenant}``: calls carried here, per tenant.

    A plain labelled Gauge would keep one series per tenant ever seen. This one is computed at
    scrape time from the tenants with a call right now, so a tenant's series disappears when its
    last call ends, and at most ``TENANT_LABEL_LIMIT`` busiest tenants are named.
    """

    NAME = "voicerelay_relay_tenant_active_calls"

    def __init__(self, limit: int = TENANT_LABEL_LIMIT) -> None:
        self._limit = limit
        self._calls: dict[str, int] = {}

    def started(self, tenant_id: object) -> None:
        key = str(tenant_id)
        self._calls[key] = self._calls.get(key, 0) + 1

    def ended(self, tenant_id: object) -> None:
        key = str(tenant_id)
        left = self._calls.get(key, 0) - 1
        if left > 0:
            self._calls[key] = left
        else:
            self._calls.pop(key, None)

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            self.NAME,
            f"Calls this relay is carrying right now, per tenant (the {self._limit} busiest "
            f"by id, the rest as {OTHER_TENANTS!r}).",
            labels=["tenant"],
        )
        busiest = sorted(self._calls.items(), key=lambda item: item[1], reverse=True)
        for tenant, calls in busiest[: self._limit]:
            family.add_metric([tenant], calls)
        rest = sum(calls for _, calls in busiest[self._limit :])
        if rest:
            family.add_metric([OTHER_TENANTS], rest)
        yield family


class Healthy(Protocol):
    @property
    def healthy(self) -> bool: ...


class PubSubListenerUp(Collector):
    """``voicerelay_relay_pubsub_listener_up``: 1 while every pub/sub listener of this process
    is connected and subscribed, else 0. Absent on a lone replica (no pub/sub to be deaf to)."""

    NAME = "voicerelay_relay_pubsub_listener_up"

    def __init__(self) -> None:
        self._listeners: weakref.WeakSet[Healthy] = weakref.WeakSet()

    def track(self, listener: Healthy) -> None:
        self._listeners.add(listener)

    def forget(self, listener: Healthy) -> None:
        self._listeners.discard(listener)

    def collect(self) -> Iterable[Metric]:
        listeners = list(self._listeners)
        if listeners:
            yield GaugeMetricFamily(
                self.NAME,
                "1 while this replica's Redis pub/sub listener is connected and subscribed.",
                value=float(all(listener.healthy for listener in listeners)),
            )


TENANT_ACTIVE_CALLS = TenantCalls()
PUBSUB_LISTENER_UP = PubSubListenerUp()
REGISTRY.register(TENANT_ACTIVE_CALLS)
REGISTRY.register(PUBSUB_LISTENER_UP)

# --- phone calls (Twilio Media Streams) ---------------------------------------------------------
PHONE_STREAMS = Counter(
    "voicerelay_relay_phone_streams_total",
    "Twilio Media Streams connections, by result: accepted, or the stable code they were closed "
    "with before the call started (unauthorized, missing_start, ...).",
    ["result"],
)
PHONE_STREAM_VIOLATIONS = Counter(
    "voicerelay_relay_phone_stream_violations_total",
    "Media Streams messages that broke the protocol (the stream is closed), by code.",
    ["code"],
)
PHONE_IGNORED_EVENTS = Counter(
    "voicerelay_relay_phone_ignored_events_total",
    "Media Streams messages of event types the relay does not know, ignored.",
)
PHONE_PREBUFFER_DROPPED = Counter(
    "voicerelay_relay_phone_prebuffer_dropped_total",
    "Caller audio chunks dropped (oldest first) while the agent was not ready yet, beyond "
    "RELAY_PHONE_PREBUFFER_MS.",
)
PHONE_CONTROL_REQUESTS = Counter(
    "voicerelay_relay_phone_control_requests_total",
    "Hang-up and transfer requests to the control API, by action and result.",
    ["action", "result"],
)
