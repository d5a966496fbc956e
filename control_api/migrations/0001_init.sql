-- voicerelay control database, version 1.
--
-- Tenant isolation is enforced here, not in application code: every tenant table has row-level
-- security ENABLED and FORCED, and the services connect as a login role that is a member of
-- voicerelay_app, which owns nothing and cannot bypass RLS. The tenant of a transaction comes from
-- the transaction-local setting app.tenant_id (set_config(..., true)); when it is unset the policy
-- compares against NULL and no row is visible, so a forgotten tenant fails closed.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'voicerelay_app') THEN
        CREATE ROLE voicerelay_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    -- Another database on the same cluster created it concurrently.
    NULL;
END
$$;

CREATE FUNCTION current_tenant_id() RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT NULLIF(current_setting('app.tenant_id', true), '')::uuid $$;

-- ------------------------------------------------------------------------------------------
-- Tenants and people
-- ------------------------------------------------------------------------------------------
CREATE TABLE tenants (
    id                      uuid PRIMARY KEY,
    name                    text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    slug                    text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{1,62}$'),
    max_concurrent_calls    integer NOT NULL DEFAULT 10 CHECK (max_concurrent_calls BETWEEN 1 AND 100000),
    call_log_retention_days integer NOT NULL DEFAULT 90 CHECK (call_log_retention_days BETWEEN 1 AND 3650),
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id                   uuid PRIMARY KEY,
    tenant_id            uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    email                text NOT NULL CHECK (email = lower(email) AND length(email) BETWEEN 3 AND 320),
    password_hash        text NOT NULL,
    role                 text NOT NULL CHECK (role IN ('owner', 'admin', 'viewer')),
    must_change_password boolean NOT NULL DEFAULT false,
    disabled_at          timestamptz,
    -- Access tokens issued before this instant are rejected (logout everywhere, role change).
    tokens_valid_after   timestamptz NOT NULL DEFAULT '-infinity',
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, email),
    UNIQUE (tenant_id, id)
);

CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    prefix       text NOT NULL,
    key_hash     bytea NOT NULL UNIQUE,
    role         text NOT NULL CHECK (role IN ('admin', 'viewer')),
    created_by   uuid,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    last_used_at timestamptz,
    revoked_at   timestamptz,
    FOREIGN KEY (tenant_id, created_by) REFERENCES users (tenant_id, id) ON DELETE SET NULL (created_by)
);
CREATE INDEX api_keys_tenant_created ON api_keys (tenant_id, created_at DESC);

CREATE TABLE refresh_token_families (
    id                  uuid PRIMARY KEY,
    tenant_id           uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    user_id             uuid NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    absolute_expires_at timestamptz NOT NULL,
    revoked_at          timestamptz,
    revoke_reason       text,
    UNIQUE (tenant_id, id),
    FOREIGN KEY (tenant_id, user_id) REFERENCES users (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX refresh_token_families_tenant_user ON refresh_token_families (tenant_id, user_id);

CREATE TABLE refresh_tokens (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL,
    family_id   uuid NOT NULL,
    parent_id   uuid REFERENCES refresh_tokens (id) ON DELETE SET NULL,
    token_hash  bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    FOREIGN KEY (tenant_id, family_id) REFERENCES refresh_token_families (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX refresh_tokens_tenant_family ON refresh_tokens (tenant_id, family_id, created_at DESC);

-- ------------------------------------------------------------------------------------------
-- Credential vault: AES-256-GCM ciphertexts; plaintext never leaves the control API.
-- ------------------------------------------------------------------------------------------
CREATE TABLE credentials (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    provider    text NOT NULL CHECK (provider IN ('elevenlabs', 'twilio')),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    key_id      text NOT NULL,
    nonce       bytea NOT NULL CHECK (length(nonce) = 12),
    ciphertext  bytea NOT NULL,
    mask        text NOT NULL,
    public_info jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, id)
);
CREATE INDEX credentials_tenant_created ON credentials (tenant_id, created_at DESC);
CREATE INDEX credentials_key_id ON credentials (key_id);

-- ------------------------------------------------------------------------------------------
-- Agents and phone numbers
-- ------------------------------------------------------------------------------------------
CREATE TABLE agents (
    id                     uuid PRIMARY KEY,
    tenant_id              uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name                   text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    elevenlabs_agent_id    text NOT NULL CHECK (length(elevenlabs_agent_id) BETWEEN 1 AND 200),
    credential_id          uuid,
    input_audio_format     text NOT NULL DEFAULT 'pcm_16000',
    output_audio_format    text NOT NULL DEFAULT 'pcm_16000',
    conversation_overrides jsonb NOT NULL DEFAULT '{}'::jsonb,
    dynamic_variables      jsonb NOT NULL DEFAULT '{}'::jsonb,
    allowed_origins        text[] NOT NULL DEFAULT '{}',
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, id),
    -- Composite keys make a cross-tenant reference impossible even for a buggy caller.
    FOREIGN KEY (tenant_id, credential_id) REFERENCES credentials (tenant_id, id) ON DELETE RESTRICT
);
CREATE INDEX agents_tenant_created ON agents (tenant_id, created_at DESC);

-- E.164 numbers are unique across the platform because Twilio's webhook routes by number.
CREATE TABLE phone_numbers (
    e164       text PRIMARY KEY CHECK (e164 ~ '^\+[1-9][0-9]{6,14}$'),
    tenant_id  uuid NOT NULL,
    agent_id   uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant_id, agent_id) REFERENCES agents (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX phone_numbers_tenant_agent ON phone_numbers (tenant_id, agent_id);

-- ------------------------------------------------------------------------------------------
-- Calls and their event log, partitioned by month (see ensure_call_log_partitions below).
-- ------------------------------------------------------------------------------------------
CREATE TABLE calls (
    id                  uuid NOT NULL,
    tenant_id           uuid NOT NULL,
    agent_id            uuid,
    created_at          timestamptz NOT NULL,
    direction           text NOT NULL DEFAULT 'browser' CHECK (direction IN ('browser', 'phone_inbound', 'phone_outbound')),
    status              text NOT NULL DEFAULT 'created' CHECK (status IN ('created', 'connecting', 'active', 'ended', 'failed')),
    client_audio_format text NOT NULL DEFAULT 'pcm_16000',
    dynamic_variables   jsonb NOT NULL DEFAULT '{}'::jsonb,
    metadata            jsonb NOT NULL DEFAULT '{}'::jsonb,
    conversation_ids    text[] NOT NULL DEFAULT '{}',
    from_number         text,
    to_number           text,
    provider_call_id    text,
    started_at          timestamptz,
    ended_at            timestamptz,
    end_reason          text,
    end_code            text,
    ended_by            text,
    duration_ms         bigint,
    audio_in_seconds    double precision NOT NULL DEFAULT 0,
    audio_out_seconds   double precision NOT NULL DEFAULT 0,
    frames_in           bigint NOT NULL DEFAULT 0,
    frames_out          bigint NOT NULL DEFAULT 0,
    bytes_in            bigint NOT NULL DEFAULT 0,
    bytes_out           bigint NOT NULL DEFAULT 0,
    last_event_at       timestamptz,
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX calls_tenant_created ON calls (tenant_id, created_at DESC, id DESC);
CREATE INDEX calls_tenant_agent_created ON calls (tenant_id, agent_id, created_at DESC);
CREATE INDEX calls_tenant_open ON calls (tenant_id, status, created_at DESC)
    WHERE status IN ('created', 'connecting', 'active');

-- One row per lifecycle event from the relay. event_id is minted by the producer, so a replayed
-- or duplicated stream entry hits the primary key and changes nothing.
CREATE TABLE call_events (
    event_id    uuid NOT NULL,
    tenant_id   uuid NOT NULL,
    call_id     uuid NOT NULL,
    occurred_at timestamptz NOT NULL,
    type        text NOT NULL,
    data        jsonb NOT NULL DEFAULT '{}'::jsonb,
    inserted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, occurred_at)
) PARTITION BY RANGE (occurred_at);
CREATE INDEX call_events_tenant_call ON call_events (tenant_id, call_id, occurred_at);

-- ------------------------------------------------------------------------------------------
-- Row-level security on every tenant table
-- ------------------------------------------------------------------------------------------
ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenants FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenants
    USING (id = (SELECT current_tenant_id()))
    WITH CHECK (id = (SELECT current_tenant_id()));

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['users', 'api_keys', 'refresh_token_families', 'refresh_tokens',
                             'credentials', 'agents', 'phone_numbers', 'calls', 'call_events']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_isolation ON %I '
                       'USING (tenant_id = (SELECT current_tenant_id())) '
                       'WITH CHECK (tenant_id = (SELECT current_tenant_id()))', t);
    END LOOP;
END
$$;

-- The application role gets privileges on parents only, never on partitions.
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO voicerelay_app;
GRANT SELECT, UPDATE ON tenants TO voicerelay_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON users, api_keys, refresh_token_families, refresh_tokens,
    credentials, agents, phone_numbers, calls TO voicerelay_app;
GRANT SELECT, INSERT ON call_events TO voicerelay_app;
GRANT EXECUTE ON FUNCTION current_tenant_id() TO voicerelay_app;

-- ------------------------------------------------------------------------------------------
-- Narrow pre-tenant lookups. They run as the owner (SECURITY DEFINER) and return only what is
-- needed to learn which tenant a credential belongs to; everything after runs under RLS.
-- ------------------------------------------------------------------------------------------
CREATE FUNCTION auth_users_by_email(p_email text)
    RETURNS TABLE (user_id uuid, tenant_id uuid, tenant_slug text, password_hash text,
                   role text, disabled boolean)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
        SELECT u.id, u.tenant_id, t.slug, u.password_hash, u.role, u.disabled_at IS NOT NULL
        FROM users u JOIN tenants t ON t.id = u.tenant_id
        WHERE u.email = lower(p_email)
        ORDER BY u.created_at
        LIMIT 20
    $$;

CREATE FUNCTION auth_api_key(p_key_hash bytea)
    RETURNS TABLE (api_key_id uuid, tenant_id uuid, role text, active boolean)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
        SELECT k.id, k.tenant_id, k.role,
               k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())
        FROM api_keys k WHERE k.key_hash = p_key_hash
    $$;

CREATE FUNCTION auth_refresh_token_tenant(p_token_hash bytea)
    RETURNS uuid
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$ SELECT r.tenant_id FROM refresh_tokens r WHERE r.token_hash = p_token_hash $$;

CREATE FUNCTION phone_number_route(p_e164 text)
    RETURNS TABLE (tenant_id uuid, agent_id uuid)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$ SELECT p.tenant_id, p.agent_id FROM phone_numbers p WHERE p.e164 = p_e164 $$;

CREATE FUNCTION phone_number_taken(p_e164 text)
    RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$ SELECT EXISTS (SELECT 1 FROM phone_numbers p WHERE p.e164 = p_e164) $$;

-- Tenants' retention settings, for the call-log retention job (no other tenant data).
CREATE FUNCTION call_log_retention_policies()
    RETURNS TABLE (tenant_id uuid, retention_days integer)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$ SELECT t.id, t.call_log_retention_days FROM tenants t $$;

-- Monthly partitions for calls and call_events, created ahead of time by the services
-- (the application role cannot run DDL itself).
CREATE FUNCTION ensure_call_log_partitions(p_from date, p_months integer)
    RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
DECLARE
    created integer := 0;
    month_start date;
    month_end date;
    parent text;
    part text;
BEGIN
    IF p_months < 1 OR p_months > 120 THEN
        RAISE EXCEPTION 'p_months out of range';
    END IF;
    FOR i IN 0 .. p_months - 1 LOOP
        month_start := (date_trunc('month', p_from) + make_interval(months => i))::date;
        month_end := (month_start + interval '1 month')::date;
        FOREACH parent IN ARRAY ARRAY['calls', 'call_events'] LOOP
            part := format('%s_p%s', parent, to_char(month_start, 'YYYYMM'));
            IF to_regclass(format('public.%I', part)) IS NULL THEN
                -- Concurrent callers may race; the advisory lock serialises creation.
                PERFORM pg_advisory_xact_lock(hashtext('voicerelay:' || part));
                IF to_regclass(format('public.%I', part)) IS NULL THEN
                    EXECUTE format('CREATE TABLE public.%I PARTITION OF public.%I '
                                   'FOR VALUES FROM (%L) TO (%L)',
                                   part, parent, month_start, month_end);
                    EXECUTE format('REVOKE ALL ON public.%I FROM PUBLIC', part);
                    created := created + 1;
                END IF;
            END IF;
        END LOOP;
    END LOOP;
    RETURN created;
END
$$;

-- Drops whole monthly partitions that end before the cutoff. Returns the dropped names.
CREATE FUNCTION drop_call_log_partitions_before(p_cutoff date)
    RETURNS SETOF text
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
DECLARE
    r record;
BEGIN
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

REVOKE ALL ON FUNCTION auth_users_by_email(text), auth_api_key(bytea),
    auth_refresh_token_tenant(bytea), phone_number_route(text), phone_number_taken(text),
    call_log_retention_policies(), ensure_call_log_partitions(date, integer),
    drop_call_log_partitions_before(date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION auth_users_by_email(text), auth_api_key(bytea),
    auth_refresh_token_tenant(bytea), phone_number_route(text), phone_number_taken(text),
    call_log_retention_policies(), ensure_call_log_partitions(date, integer),
    drop_call_log_partitions_before(date) TO voicerelay_app;

SELECT ensure_call_log_partitions((now() - interval '1 month')::date, 5);
