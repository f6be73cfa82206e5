-- The 50 custom attributes limit judged by event time. Ingest applied an arriving event's
-- operations on top of the names a profile held, whatever the event's time: a late event's
-- unset freed a name that the replay then gave back (a set after it), so a profile reached 51
-- without any merge, and a late set of a name unset after it took a place the replay left free,
-- so an event was refused that would have left 50 (found by a hunt against a model of the rule).
-- Ingest now also reads each custom attribute's latest change (unset ones included: their row
-- stays as a tombstone) and lets an arriving operation decide a name only when it is at least
-- as late (services/ingest/model.py, custom_attributes_after).
DROP FUNCTION profiles_ingest_lock_batch_profiles(uuid, uuid[], uuid[], smallint[], timestamptz[],
    uuid[], uuid[], bigint[], text[], text[], timestamptz[], jsonb[]);

-- 0038's function; the custom attributes of the asked profiles now with whether each is held
-- and the event time of its latest change, in one order.
CREATE FUNCTION profiles_ingest_lock_batch_profiles(
    p_project uuid, p_profiles uuid[],
    p_event_profiles uuid[], p_event_kinds smallint[], p_event_times timestamptz[],
    p_held_of uuid[],
    c_profiles uuid[], c_event_seqs bigint[], c_event_ids text[], c_installations text[],
    c_times timestamptz[], c_payloads jsonb[]
) RETURNS TABLE (profile_id uuid, version bigint, attribute_names text[],
                 attributes_held boolean[], attribute_times timestamptz[])
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
    SELECT b.profile_id, b.version, NULL::text[], NULL::boolean[], NULL::timestamptz[]
    FROM unnest(bumped_profiles, bumped_versions) AS b(profile_id, version);
    -- One index probe per asked profile (LATERAL), whatever the plan cache assumes of sizes.
    RETURN QUERY
    SELECT k.id, NULL::bigint, h.names, h.held, h.times
    FROM (SELECT DISTINCT u.id FROM unnest(p_held_of) AS u(id)) k
    CROSS JOIN LATERAL (
        SELECT array_agg(a.name ORDER BY a.name) AS names,
               array_agg(a.value IS NOT NULL ORDER BY a.name) AS held,
               array_agg(a.update_time ORDER BY a.name) AS times
        FROM profile_attributes a
        WHERE a.project_id = p_project AND a.profile_id = k.id AND NOT a.native
    ) h;
END $$;
