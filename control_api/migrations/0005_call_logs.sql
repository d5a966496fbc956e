-- Call-log consumer and retention.

-- The producer's per-call sequence number: orders a call's events that share a timestamp.
ALTER TABLE call_events ADD COLUMN seq bigint NOT NULL DEFAULT 0;

-- Per-tenant retention deletes a tenant's events older than its cutoff, in batches, under RLS.
GRANT DELETE ON call_events TO voicerelay_app;
CREATE INDEX call_events_tenant_occurred ON call_events (tenant_id, occurred_at);
