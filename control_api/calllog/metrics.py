"""Prometheus metrics of the call-log consumer and its maintenance task."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_WRITTEN = Counter(
    "voicerelay_call_log_events_written_total", "Call events written to Postgres for the first time"
)
EVENTS_DUPLICATE = Counter(
    "voicerelay_call_log_events_duplicate_total",
    "Call events already in Postgres (replays, redeliveries, duplicates)",
)
EVENTS_DEAD_LETTERED = Counter(
    "voicerelay_call_log_events_dead_lettered_total",
    "Stream entries moved to the dead-letter stream",
    ["reason"],
)
EVENTS_UNKNOWN_CALL = Counter(
    "voicerelay_call_log_events_unknown_call_total",
    "Call events recorded for a call that has no row (never created or already deleted)",
)
ENTRIES_TRIMMED = Counter(
    "voicerelay_call_log_entries_trimmed_total",
    "Pending stream entries that had been trimmed from the stream before they were written",
)
CONSUMER_ERRORS = Counter(
    "voicerelay_call_log_consumer_errors_total",
    "Errors the consumer recovered from by backing off and retrying",
    ["stage"],
)
CONSUMER_LAG = Gauge(
    "voicerelay_call_log_consumer_lag",
    "Stream entries not yet delivered to the consumer group (XINFO GROUPS lag)",
)
CONSUMER_PENDING = Gauge(
    "voicerelay_call_log_consumer_pending",
    "Stream entries delivered but not yet acknowledged (XINFO GROUPS pending)",
)
BATCH_SECONDS = Histogram(
    "voicerelay_call_log_batch_seconds",
    "Time to write one batch of call events to Postgres",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PARTITIONS_CREATED = Counter(
    "voicerelay_call_log_partitions_created_total", "Monthly call-log partitions created"
)
PARTITIONS_DROPPED = Counter(
    "voicerelay_call_log_partitions_dropped_total",
    "Monthly call-log partitions dropped past retention",
)
ROWS_DELETED = Counter(
    "voicerelay_call_log_rows_deleted_total",
    "Call-log rows deleted by per-tenant retention",
    ["table"],
)
MAINTENANCE_ERRORS = Counter(
    "voicerelay_call_log_maintenance_errors_total", "Failed call-log maintenance rounds"
)
