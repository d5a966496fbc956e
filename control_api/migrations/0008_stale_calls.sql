-- Stale calls: a call whose relay replica died with nobody to take it over (a browser caller who
-- never came back, any phone call) never gets an `ended` event and would stay open forever. A
-- live call writes a usage event every 15 s, so one silent for minutes is dead: the control API's
-- maintenance ends it here.

-- When the reaper ended the call. A real `ended` event that arrives later replaces the reaper's
-- guess (the call was alive after all, or its relay had just been slow to report) and clears it.
ALTER TABLE calls ADD COLUMN reaped_at timestamptz;

-- The reaper's scan: open calls are few, so it stays small whatever the size of the call log.
CREATE INDEX calls_open_created ON calls (created_at) WHERE status IN ('connecting', 'active');

-- Ends up to p_limit connecting/active calls (of every tenant: this is platform maintenance) whose
-- last activity is older than p_idle_seconds, as relay_lost/stale, failed, ended by the relay at
-- that last activity, with an `ended` event in each call's timeline. That is all it can do: the
-- caller picks neither calls nor outcome, and the idle floor (far above the 15 s usage interval
-- and every lease) keeps it from ending a live call. Returns the calls it ended.
CREATE FUNCTION reap_stale_calls(p_idle_seconds integer, p_limit integer)
    RETURNS TABLE (tenant_id uuid, call_id uuid)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
#variable_conflict use_column
BEGIN
    IF p_idle_seconds IS NULL OR p_idle_seconds < 300 OR p_idle_seconds > 604800 THEN
        RAISE EXCEPTION 'p_idle_seconds out of range';
    END IF;
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 10000 THEN
        RAISE EXCEPTION 'p_limit out of range';
    END IF;
    RETURN QUERY
    WITH stale AS (
        SELECT c.id, c.created_at, GREATEST(c.created_at, c.last_event_at) AS last_activity
        FROM public.calls c
        WHERE c.status IN ('connecting', 'active') AND c.ended_at IS NULL
          AND GREATEST(c.created_at, c.last_event_at)
              < now() - make_interval(secs => p_idle_seconds)
        ORDER BY c.created_at
        LIMIT p_limit
        -- A call the consumer is updating right now is not stale: skip it, never wait for it.
        FOR UPDATE OF c SKIP LOCKED
    ), reaped AS (
        UPDATE public.calls c SET
            status = 'failed',
            ended_at = s.last_activity,
            end_reason = 'relay_lost',
            end_code = 'stale',
            ended_by = 'relay',
            duration_ms = CASE WHEN c.started_at IS NOT NULL THEN
                GREATEST(0, EXTRACT(EPOCH FROM (s.last_activity - c.started_at)) * 1000)::bigint
            END,
            reaped_at = now()
        FROM stale s
        WHERE c.id = s.id AND c.created_at = s.created_at
        RETURNING c.tenant_id, c.id, s.last_activity, c.duration_ms
    ), recorded AS (
        INSERT INTO public.call_events (event_id, tenant_id, call_id, occurred_at, type, data, seq)
        SELECT gen_random_uuid(), r.tenant_id, r.id, r.last_activity, 'ended',
               jsonb_strip_nulls(jsonb_build_object(
                   'reason', 'relay_lost', 'code', 'stale', 'ended_by', 'relay',
                   'duration_ms', r.duration_ms, 'failed', true)),
               -- After every event of the call, even one sharing the last timestamp.
               1 + coalesce((SELECT max(e.seq) FROM public.call_events e
                             WHERE e.tenant_id = r.tenant_id AND e.call_id = r.id), 0)
        FROM reaped r
    )
    SELECT r.tenant_id, r.id FROM reaped r;
END
$$;
REVOKE ALL ON FUNCTION reap_stale_calls(integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION reap_stale_calls(integer, integer) TO voicerelay_app;
