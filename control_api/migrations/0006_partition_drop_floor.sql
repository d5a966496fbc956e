-- The application role may call drop_call_log_partitions_before (the maintenance job runs as the
-- service), so the function itself must not let that role destroy call logs a tenant still keeps:
-- the cutoff is clamped to the longest retention any tenant has. A compromised or buggy service
-- can then drop nothing that retention would not drop anyway.
CREATE OR REPLACE FUNCTION drop_call_log_partitions_before(p_cutoff date)
    RETURNS SETOF text
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
DECLARE
    r record;
    floor_date date := current_date
        - (SELECT coalesce(max(t.call_log_retention_days), 0) FROM public.tenants t);
BEGIN
    IF p_cutoff IS NULL OR p_cutoff > floor_date THEN
        p_cutoff := floor_date;
    END IF;
    FOR r IN
        SELECT c.relname AS name,
               to_date(substring(c.relname from '_p([0-9]{6})$'), 'YYYYMM') AS month_start
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        JOIN pg_namespace n ON n.oid = p.relnamespace
        WHERE n.nspname = 'public' AND p.relname IN ('calls', 'call_events')
          AND c.relname ~ '_p[0-9]{6}$'
    LOOP
        IF (r.month_start + interval '1 month')::date <= p_cutoff THEN
            EXECUTE format('DROP TABLE public.%I', r.name);
            RETURN NEXT r.name;
        END IF;
    END LOOP;
END
$$;
