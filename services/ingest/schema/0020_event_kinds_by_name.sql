-- Event kinds by name in ingest's SQL, instead of their numbers.
--
-- READ CONTRACT (every owner's SQL): the number of an event kind (events.kind), by the name of
-- its profiles.common.v1.EventKind value without the prefix, lower-case ('custom' for
-- EVENT_KIND_CUSTOM, 'crash' for EVENT_KIND_CRASH); NULL for an unknown name. IMMUTABLE, so
-- `kind = ingest_read_event_kind('crash')` is folded to `kind = 8` when a statement is planned:
-- it costs nothing at run time. tests/integration/test_event_kinds.py compares it with the proto
-- enum. Index predicates keep their numbers (events_crashes_by_profile, events_custom_by_name):
-- changing one rebuilds the index.
CREATE FUNCTION ingest_read_event_kind(p_name text) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE p_name
        WHEN 'unspecified' THEN 0
        WHEN 'custom' THEN 1
        WHEN 'session_start' THEN 2
        WHEN 'session_heartbeat' THEN 3
        WHEN 'session_end' THEN 4
        WHEN 'attribute_change' THEN 5
        WHEN 'subscription_change' THEN 6
        WHEN 'installation_update' THEN 7
        WHEN 'crash' THEN 8
        WHEN 'merge' THEN 9
        WHEN 'split' THEN 10
    END::smallint
$$;

-- 0008's counts, with the crash kind named (the rule is unchanged):
-- Statement-level over the transition tables: one aggregate and one upsert per statement (a
-- batch of 500 events is one row per profile it touched), in key order. Inserts only add, the
-- hot path; updates (a merge moving events, an erasure stripping them) and deletes move counts
-- by their difference and drop the rows that fall to zero, so a merged-away or erased profile
-- keeps no row.
CREATE OR REPLACE FUNCTION profile_event_counts_apply() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO profile_event_counts AS c (project_id, profile_id, event_count, crash_count)
        SELECT project_id, profile_id, count(*), count(*) FILTER (WHERE kind = ingest_read_event_kind('crash'))
        FROM new_rows
        WHERE profile_id IS NOT NULL
        GROUP BY project_id, profile_id
        ORDER BY project_id, profile_id
        ON CONFLICT (project_id, profile_id) DO UPDATE SET
            event_count = c.event_count + EXCLUDED.event_count,
            crash_count = c.crash_count + EXCLUDED.crash_count;
        RETURN NULL;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO profile_event_counts AS c (project_id, profile_id, event_count, crash_count)
        SELECT project_id, profile_id, sum(n), sum(crashes)
        FROM (SELECT project_id, profile_id, 1 AS n, (kind = ingest_read_event_kind('crash'))::int AS crashes
              FROM new_rows WHERE profile_id IS NOT NULL
              UNION ALL
              SELECT project_id, profile_id, -1, -(kind = ingest_read_event_kind('crash'))::int
              FROM old_rows WHERE profile_id IS NOT NULL) x
        GROUP BY project_id, profile_id
        HAVING sum(n) <> 0 OR sum(crashes) <> 0
        ORDER BY project_id, profile_id
        ON CONFLICT (project_id, profile_id) DO UPDATE SET
            event_count = c.event_count + EXCLUDED.event_count,
            crash_count = c.crash_count + EXCLUDED.crash_count;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO profile_event_counts AS c (project_id, profile_id, event_count, crash_count)
        SELECT project_id, profile_id, -count(*), -count(*) FILTER (WHERE kind = ingest_read_event_kind('crash'))
        FROM old_rows
        WHERE profile_id IS NOT NULL
        GROUP BY project_id, profile_id
        ORDER BY project_id, profile_id
        ON CONFLICT (project_id, profile_id) DO UPDATE SET
            event_count = c.event_count + EXCLUDED.event_count,
            crash_count = c.crash_count + EXCLUDED.crash_count;
    ELSE  -- TRUNCATE
        DELETE FROM profile_event_counts;
        RETURN NULL;
    END IF;
    DELETE FROM profile_event_counts c
    USING (SELECT DISTINCT project_id, profile_id FROM old_rows WHERE profile_id IS NOT NULL) o
    WHERE c.project_id = o.project_id AND c.profile_id = o.profile_id AND c.event_count = 0;
    RETURN NULL;
END $$;

-- ingest_profile_hooks' erasure of events, with the neutral kind named (the rule is unchanged):
-- Identity's erasure of the profiles' events; returns how many events were erased. Erased
-- events become bare dedupe markers: the origin (installation ID, or for a server-side event
-- the marker given for its custom ID: p_markers[i] for p_custom_ids[i]) and the event ID stay,
-- so an SDK retrying an old batch is answered DUPLICATE and stores nothing; everything else
-- goes. NOT NULL columns get neutral values: kind and platform 0 (EVENT_KIND_UNSPECIFIED,
-- PLATFORM_UNSPECIFIED), event_time the receive time (kept so markers can be pruned by age one
-- day). A custom ID erased before (quarantine over, then used and erased again) already left
-- markers with the same key: those events are simply dropped, the older marker keeps
-- deduplicating.
CREATE OR REPLACE FUNCTION ingest_apply_event_erasure(
    p_project uuid, p_profile_ids uuid[], p_custom_ids text[], p_markers text[]
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    shadowed bigint;
    stripped bigint;
BEGIN
    DELETE FROM events e
    USING unnest(p_custom_ids, p_markers) AS m(custom_id, marker)
    WHERE e.project_id = p_project AND e.profile_id = ANY(p_profile_ids)
        AND e.custom_id = m.custom_id
        AND EXISTS (
            SELECT 1 FROM events o
            WHERE o.project_id = p_project AND o.custom_id = m.marker AND o.event_id = e.event_id
        );
    GET DIAGNOSTICS shadowed = ROW_COUNT;
    UPDATE events e SET
        custom_id = CASE WHEN e.custom_id IS NULL THEN NULL ELSE (
            SELECT m.marker FROM unnest(p_custom_ids, p_markers) AS m(custom_id, marker)
            WHERE m.custom_id = e.custom_id
        ) END,
        profile_id = NULL, kind = ingest_read_event_kind('unspecified'), name = NULL, event_time = e.receive_time,
        session_id = NULL, platform = 0, payload = NULL, imported = false
    WHERE e.project_id = p_project AND e.profile_id = ANY(p_profile_ids);
    GET DIAGNOSTICS stripped = ROW_COUNT;
    RETURN shadowed + stripped;
END $$;
