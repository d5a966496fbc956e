-- Phone calls through Twilio: agent phone settings, the call's Twilio CallSid lookup and the
-- signed conversation URL prefetched while Twilio connects the stream.

-- Numbers an agent may transfer a call to (E.164, checked by the API). An LLM decides when to
-- transfer, so only numbers the tenant listed can ever be dialled: anything else is toll fraud.
ALTER TABLE agents
    ADD COLUMN transfer_numbers text[] NOT NULL DEFAULT '{}'
        CHECK (cardinality(transfer_numbers) <= 20),
    -- Dynamic-variable name -> Twilio voice-webhook field (From, To, CallerName, FromCity...).
    ADD COLUMN phone_dynamic_variables jsonb NOT NULL DEFAULT '{}'::jsonb
        CHECK (jsonb_typeof(phone_dynamic_variables) = 'object');

-- A phone call's Twilio CallSid is stored in calls.provider_call_id. Uniqueness cannot be an
-- index on a table partitioned by created_at; the voice webhook serialises on the CallSid with an
-- advisory lock instead, so a retried webhook finds the call it already created.
CREATE INDEX calls_provider_call_id ON calls (provider_call_id) WHERE provider_call_id IS NOT NULL;

-- The ElevenLabs signed URL fetched during the voice webhook: AES-256-GCM under the credential
-- vault's keyring, bound by associated data to the tenant and the call, used at most once (the
-- session endpoint clears it when it takes it) and only before it expires.
ALTER TABLE calls
    ADD COLUMN upstream_url_key_id text,
    ADD COLUMN upstream_url_nonce bytea,
    ADD COLUMN upstream_url_ciphertext bytea,
    ADD COLUMN upstream_url_expires_at timestamptz,
    ADD CONSTRAINT calls_upstream_url_sealed CHECK (
        (upstream_url_ciphertext IS NULL) = (upstream_url_key_id IS NULL)
        AND (upstream_url_ciphertext IS NULL) = (upstream_url_nonce IS NULL)
        AND (upstream_url_ciphertext IS NULL) = (upstream_url_expires_at IS NULL)
    );

-- Twilio's status callback names a call only by its CallSid, before any tenant is known: this
-- returns the one tenant and call it belongs to (phone calls only, exact match), nothing else.
CREATE FUNCTION twilio_call_route(p_call_sid text)
    RETURNS TABLE (tenant_id uuid, call_id uuid)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
        SELECT c.tenant_id, c.id FROM calls c
        WHERE c.provider_call_id = p_call_sid AND c.direction <> 'browser'
        ORDER BY c.created_at DESC
        LIMIT 1
    $$;
REVOKE ALL ON FUNCTION twilio_call_route(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION twilio_call_route(text) TO voicerelay_app;
