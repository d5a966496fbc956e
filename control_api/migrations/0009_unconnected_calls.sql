-- Unconnected calls: a call created by POST /v1/calls or by Twilio's voice webhook whose caller
-- never reached the relay gets no event at all and would stay `created` forever. Its caller token
-- only admits a first connection until the token's connect-by (CALL_TOKEN_CONNECT_WINDOW_SECONDS
-- after issue), so once that has passed nobody can connect any more: the control API's
-- maintenance ends it here.

-- The expiry's scan: calls waiting for their caller are few, whatever the size of the call log.
CREATE INDEX calls_unconnected_created ON calls (created_at) WHERE status = 'created';

-- Ends up to p_limit `created` calls (of every tenant: this is platform maintenance) whose caller
-- can no longer connect, as never_connected/expired, failed, ended by the control API at the
-- latest connect-by any of the call's caller tokens can carry, without a duration, with an `ended`
-- event in each call's timeline. The caller passes the platform's connect window and nothing else:
-- it picks neither calls nor outcome, and the margins below are not its to shrink. Returns the
-- calls it ended.
--
-- A caller token is issued right after its call's row (created_at, same clock), so its connect-by
-- is the window after created_at. A repeat of Twilio's voice webhook up to 60 s after the call
-- was created (_RETRY_WINDOW_SECONDS in control_api/routes/twilio.py) is a retry and gets a fresh
-- token for the same call: a phone call's last connect-by is up to 60 s later. The 60 s margin on top covers
-- the relay's clock against the database's and a call-log consumer that is a little behind.
--
-- Like the stale-call reaper's ending (migration 0008) this one sets reaped_at: a `connected` that
-- was only slow to arrive adds what it carries, and the relay's own `ended` replaces this ending.
CREATE FUNCTION expire_unconnected_calls(p_connect_window_seconds integer, p_limit integer)
    RETURNS TABLE (tenant_id uuid, call_id uuid)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
#variable_conflict use_column
DECLARE
    margin CONSTANT interval := interval '60 seconds';
    phone_retry CONSTANT interval := interval '60 seconds';
BEGIN
    -- The bounds of CALL_TOKEN_CONNECT_WINDOW_SECONDS.
    IF p_connect_window_seconds IS NULL OR p_connect_window_seconds < 10
            OR p_connect_window_seconds > 3600 THEN
        RAISE EXCEPTION 'p_connect_window_seconds out of range';
    END IF;
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 10000 THEN
        RAISE EXCEPTION 'p_limit out of range';
    END IF;
    RETURN QUERY
    WITH unconnected AS (
        SELECT c.id, c.created_at, d.connect_deadline
        FROM public.calls c,
             LATERAL (SELECT c.created_at + make_interval(secs => p_connect_window_seconds)
                 + CASE WHEN c.direction = 'browser' THEN interval '0' ELSE phone_retry END
                 AS connect_deadline) d
        WHERE c.status = 'created' AND c.ended_at IS NULL
          -- The earliest any call's deadline can have passed, so the index bounds the scan.
          AND c.created_at < now() - make_interval(secs => p_connect_window_seconds) - margin
          AND d.connect_deadline < now() - margin
        ORDER BY c.created_at
        LIMIT p_limit
        -- A call the consumer is updating right now (its first event) is not ours: skip it.
        FOR UPDATE OF c SKIP LOCKED
    ), expired AS (
        UPDATE public.calls c SET
            status = 'failed',
            ended_at = u.connect_deadline,
            end_reason = 'never_connected',
            end_code = 'expired',
            ended_by = 'control_api',
            duration_ms = NULL,
            reaped_at = now()
        FROM unconnected u
        WHERE c.id = u.id AND c.created_at = u.created_at
        RETURNING c.tenant_id, c.id, u.connect_deadline
    ), recorded AS (
        INSERT INTO public.call_events (event_id, tenant_id, call_id, occurred_at, type, data, seq)
        SELECT gen_random_uuid(), x.tenant_id, x.id, x.connect_deadline, 'ended',
               jsonb_build_object(
                   'reason', 'never_connected', 'code', 'expired', 'ended_by', 'control_api',
                   'failed', true),
               -- After every event of the call (Twilio's status callbacks, say).
               1 + coalesce((SELECT max(e.seq) FROM public.call_events e
                             WHERE e.tenant_id = x.tenant_id AND e.call_id = x.id), 0)
        FROM expired x
    )
    SELECT x.tenant_id, x.id FROM expired x;
END
$$;
REVOKE ALL ON FUNCTION expire_unconnected_calls(integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION expire_unconnected_calls(integer, integer) TO voicerelay_app;
