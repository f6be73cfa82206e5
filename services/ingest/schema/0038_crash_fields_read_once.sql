-- How a stored crash's last-crash fields read its payload is one rule, written once here:
-- profiles_ingest_crash_fields. Before, the insert and delete branches of the last-crash
-- trigger (0029) and ingest's batches (which passed name, reason and fatal to the locked part)
-- each restated it. Ingest now passes its crashes' payloads as stored and the locked part reads
-- them through the rule, as the trigger does.

-- Validation stores a crash's name always, its reason and fatal only when set.
CREATE FUNCTION profiles_ingest_crash_fields(
    payload jsonb, OUT name text, OUT reason text, OUT fatal boolean
) LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(payload ->> 'name', ''), coalesce(payload ->> 'reason', ''),
           coalesce((payload ->> 'fatal')::boolean, false)
$$;

-- New arguments (payloads instead of the fields): dropped and created again.
DROP FUNCTION profiles_ingest_lock_batch_profiles(uuid, uuid[], uuid[], smallint[], timestamptz[],
                                                  uuid[], uuid[], bigint[], text[], text[],
                                                  timestamptz[], text[], text[], boolean[]);
DROP FUNCTION profiles_ingest_keep_last_crashes(uuid[], uuid[], bigint[], text[], text[],
                                                timestamptz[], text[], text[], boolean[]);

CREATE FUNCTION profiles_ingest_keep_last_crashes(
    p_projects uuid[], p_profiles uuid[], p_event_seqs bigint[], p_event_ids text[],
    p_installations text[], p_times timestamptz[], p_payloads jsonb[]
) RETURNS void LANGUAGE sql AS $$
    INSERT INTO profile_last_crashes AS c (project_id, profile_id, event_seq, event_id,
                                           installation_id, event_time, name, reason, fatal)
    SELECT DISTINCT ON (k.project_id, k.profile_id)
           k.project_id, k.profile_id, k.event_seq, k.event_id, k.installation_id, k.event_time,
           f.name, f.reason, f.fatal
    FROM unnest(p_projects, p_profiles, p_event_seqs, p_event_ids, p_installations, p_times,
                p_payloads)
         AS k(project_id, profile_id, event_seq, event_id, installation_id, event_time, payload)
    CROSS JOIN LATERAL profiles_ingest_crash_fields(k.payload) f
    WHERE k.profile_id IS NOT NULL
    ORDER BY k.project_id, k.profile_id, k.event_time DESC, k.event_seq DESC
    ON CONFLICT (project_id, profile_id) DO UPDATE SET
        event_seq = EXCLUDED.event_seq, event_id = EXCLUDED.event_id,
        installation_id = EXCLUDED.installation_id, event_time = EXCLUDED.event_time,
        name = EXCLUDED.name, reason = EXCLUDED.reason, fatal = EXCLUDED.fatal
    WHERE (EXCLUDED.event_time, EXCLUDED.event_seq) > (c.event_time, c.event_seq)
$$;

-- 0029's trigger function, both branches reading crashes through the rule.
CREATE OR REPLACE FUNCTION profiles_ingest_last_crash_follow() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM profile_last_crashes;
    ELSIF TG_OP = 'INSERT' OR TG_OP = 'UPDATE' THEN
        IF TG_OP = 'INSERT' AND current_setting('profiles.event_counts', true) = 'deferred' THEN
            RETURN NULL;
        END IF;
        PERFORM profiles_ingest_keep_last_crashes(
            array_agg(n.project_id), array_agg(n.profile_id), array_agg(n.event_seq),
            array_agg(n.event_id), array_agg(n.installation_id), array_agg(n.event_time),
            array_agg(n.payload))
        FROM new_rows n
        WHERE n.kind = ingest_read_event_kind('crash') AND n.profile_id IS NOT NULL;
    ELSIF current_setting('profiles.retention', true) IS DISTINCT FROM 'on' THEN
        IF NOT EXISTS (SELECT 1 FROM old_rows WHERE kind = ingest_read_event_kind('crash')) THEN
            RETURN NULL;
        END IF;
        -- The stored crashes this statement deleted: the latest crash left replaces each.
        WITH gone AS (
            DELETE FROM profile_last_crashes c USING old_rows o
            WHERE c.project_id = o.project_id AND c.profile_id = o.profile_id
                AND c.event_seq = o.event_seq
            RETURNING c.project_id, c.profile_id
        )
        INSERT INTO profile_last_crashes (project_id, profile_id, event_seq, event_id,
                                          installation_id, event_time, name, reason, fatal)
        SELECT g.project_id, g.profile_id, e.event_seq, e.event_id, e.installation_id,
               e.event_time, f.name, f.reason, f.fatal
        FROM gone g
        CROSS JOIN LATERAL (
            SELECT * FROM events x
            WHERE x.project_id = g.project_id AND x.profile_id = g.profile_id
                AND x.kind = ingest_read_event_kind('crash')
            ORDER BY x.event_time DESC, x.event_seq DESC
            LIMIT 1
        ) e
        CROSS JOIN LATERAL profiles_ingest_crash_fields(e.payload) f;
    END IF;
    RETURN NULL;
END $$;

-- 0029's call 1 (c_*: each inserted crash's profile, event_seq, event ID, installation, event
-- time and payload, as ingest stored them).
CREATE FUNCTION profiles_ingest_lock_batch_profiles(
    p_project uuid, p_profiles uuid[],
    p_event_profiles uuid[], p_event_kinds smallint[], p_event_times timestamptz[],
    p_held_of uuid[],
    c_profiles uuid[], c_event_seqs bigint[], c_event_ids text[], c_installations text[],
    c_times timestamptz[], c_payloads jsonb[]
) RETURNS TABLE (profile_id uuid, version bigint, held_names text[])
LANGUAGE plpgsql AS $$
DECLARE
    bumped_profiles uuid[];
    bumped_versions bigint[];
BEGIN
    SELECT array_agg(v.profile_id), array_agg(v.version)
    INTO bumped_profiles, bumped_versions
    FROM identity_apply_profile_versions(p_project, p_profiles) v;
    PERFORM profiles_ingest_add_event_counts(
        array_fill(p_project, ARRAY[cardinality(p_event_profiles)]), p_event_profiles,
        p_event_kinds, p_event_times);
    IF cardinality(c_profiles) > 0 THEN
        PERFORM profiles_ingest_keep_last_crashes(
            array_fill(p_project, ARRAY[cardinality(c_profiles)]), c_profiles, c_event_seqs,
            c_event_ids, c_installations, c_times, c_payloads);
    END IF;
    RETURN QUERY
    SELECT b.profile_id, b.version, NULL::text[]
    FROM unnest(bumped_profiles, bumped_versions) AS b(profile_id, version);
    -- One index probe per asked profile (LATERAL), whatever the plan cache assumes of sizes.
    RETURN QUERY
    SELECT k.id, NULL::bigint, h.names
    FROM (SELECT DISTINCT u.id FROM unnest(p_held_of) AS u(id)) k
    CROSS JOIN LATERAL (
        SELECT array_agg(a.name) AS names FROM profile_attributes a
        WHERE a.project_id = p_project AND a.profile_id = k.id AND NOT a.native
            AND a.value IS NOT NULL
    ) h;
END $$;
