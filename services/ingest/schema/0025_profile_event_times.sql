-- A profile's first and last event times kept beside its totals (issue 20), so that first and
-- last seen stay exact once retention has removed its oldest events (or all of them): they are
-- stored, never recounted from events.
--
-- READ CONTRACT (query's profile view), in addition to 0008's: first_event_time and
-- last_event_time are the earliest and latest event_time of every event the profile ever held
-- (its merged-away profiles' included), whatever retention removed since.
ALTER TABLE profile_event_counts
    ADD COLUMN first_event_time timestamptz,
    ADD COLUMN last_event_time timestamptz;

UPDATE profile_event_counts c SET first_event_time = t.first_time, last_event_time = t.last_time
FROM (
    SELECT project_id, profile_id, min(event_time) AS first_time, max(event_time) AS last_time
    FROM events WHERE profile_id IS NOT NULL
    GROUP BY project_id, profile_id
) t
WHERE c.project_id = t.project_id AND c.profile_id = t.profile_id;

-- 0024's trigger function, keeping the times too. Inserts and moved-in rows (a merge) widen
-- the range. A delete outside retention (ingest's refused events, in the transaction that
-- inserted them; erasure's shadowed markers) narrows it again from the events left, only when
-- a deleted event was at one of its ends: retention never removed an event from inside the
-- range it did not also remove, so what is left is exact. Retention's deletes change nothing.
CREATE OR REPLACE FUNCTION profile_event_counts_apply() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO profile_event_counts AS c (project_id, profile_id, event_count, crash_count,
                                               first_event_time, last_event_time)
        SELECT project_id, profile_id, count(*), count(*) FILTER (WHERE kind = ingest_read_event_kind('crash')),
               min(event_time), max(event_time)
        FROM new_rows
        WHERE profile_id IS NOT NULL
        GROUP BY project_id, profile_id
        ORDER BY project_id, profile_id
        ON CONFLICT (project_id, profile_id) DO UPDATE SET
            event_count = c.event_count + EXCLUDED.event_count,
            crash_count = c.crash_count + EXCLUDED.crash_count,
            first_event_time = least(c.first_event_time, EXCLUDED.first_event_time),
            last_event_time = greatest(c.last_event_time, EXCLUDED.last_event_time);
        RETURN NULL;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO profile_event_counts AS c (project_id, profile_id, event_count, crash_count,
                                               first_event_time, last_event_time)
        SELECT project_id, profile_id, sum(n), sum(crashes), min(t), max(t)
        FROM (SELECT project_id, profile_id, 1 AS n, (kind = ingest_read_event_kind('crash'))::int AS crashes,
                     event_time AS t
              FROM new_rows WHERE profile_id IS NOT NULL
              UNION ALL
              SELECT project_id, profile_id, -1, -(kind = ingest_read_event_kind('crash'))::int, NULL
              FROM old_rows WHERE profile_id IS NOT NULL) x
        GROUP BY project_id, profile_id
        HAVING sum(n) <> 0 OR sum(crashes) <> 0
        ORDER BY project_id, profile_id
        ON CONFLICT (project_id, profile_id) DO UPDATE SET
            event_count = c.event_count + EXCLUDED.event_count,
            crash_count = c.crash_count + EXCLUDED.crash_count,
            first_event_time = least(c.first_event_time, EXCLUDED.first_event_time),
            last_event_time = greatest(c.last_event_time, EXCLUDED.last_event_time);
    ELSIF TG_OP = 'DELETE' THEN
        IF current_setting('profiles.retention', true) = 'on' THEN
            RETURN NULL;
        END IF;
        INSERT INTO profile_event_counts AS c (project_id, profile_id, event_count, crash_count)
        SELECT project_id, profile_id, -count(*), -count(*) FILTER (WHERE kind = ingest_read_event_kind('crash'))
        FROM old_rows
        WHERE profile_id IS NOT NULL
        GROUP BY project_id, profile_id
        ORDER BY project_id, profile_id
        ON CONFLICT (project_id, profile_id) DO UPDATE SET
            event_count = c.event_count + EXCLUDED.event_count,
            crash_count = c.crash_count + EXCLUDED.crash_count;
        UPDATE profile_event_counts c SET
            first_event_time = CASE WHEN d.first_time <= c.first_event_time
                THEN (SELECT min(e.event_time) FROM events e
                      WHERE e.project_id = c.project_id AND e.profile_id = c.profile_id)
                ELSE c.first_event_time END,
            last_event_time = CASE WHEN d.last_time >= c.last_event_time
                THEN (SELECT max(e.event_time) FROM events e
                      WHERE e.project_id = c.project_id AND e.profile_id = c.profile_id)
                ELSE c.last_event_time END
        FROM (SELECT project_id, profile_id, min(event_time) AS first_time,
                     max(event_time) AS last_time
              FROM old_rows WHERE profile_id IS NOT NULL
              GROUP BY project_id, profile_id) d
        WHERE c.project_id = d.project_id AND c.profile_id = d.profile_id AND c.event_count > 0
            AND (d.first_time <= c.first_event_time OR d.last_time >= c.last_event_time);
    ELSE  -- TRUNCATE
        DELETE FROM profile_event_counts;
        RETURN NULL;
    END IF;
    DELETE FROM profile_event_counts c
    USING (SELECT DISTINCT project_id, profile_id FROM old_rows WHERE profile_id IS NOT NULL) o
    WHERE c.project_id = o.project_id AND c.profile_id = o.profile_id AND c.event_count = 0;
    RETURN NULL;
END $$;

-- Identity's merge runs ingest's declared merge hooks (0016) in run_order: ingest_merge_events
-- (30) moves the source's events with an UPDATE (the trigger above moves their totals and times
-- to the survivor); then this one (35): whatever the source's row still holds counts events
-- retention removed, and goes to the survivor too, so the merged totals and times stay exact.
CREATE FUNCTION ingest_merge_profile_event_counts(
    p_project uuid, p_source uuid, p_target uuid
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO profile_event_counts AS c (project_id, profile_id, event_count, crash_count,
                                           first_event_time, last_event_time)
    SELECT p_project, p_target, s.event_count, s.crash_count, s.first_event_time,
           s.last_event_time
    FROM profile_event_counts s
    WHERE s.project_id = p_project AND s.profile_id = p_source
    ON CONFLICT (project_id, profile_id) DO UPDATE SET
        event_count = c.event_count + EXCLUDED.event_count,
        crash_count = c.crash_count + EXCLUDED.crash_count,
        first_event_time = least(c.first_event_time, EXCLUDED.first_event_time),
        last_event_time = greatest(c.last_event_time, EXCLUDED.last_event_time);
    DELETE FROM profile_event_counts WHERE project_id = p_project AND profile_id = p_source;
END $$;

INSERT INTO profile_hooks (kind, owner, function_name, run_order) VALUES
    ('merge', 'ingest', 'ingest_merge_profile_event_counts', 35);

-- READ CONTRACT (query's profile view), replacing 0022's: per-profile event totals, with the
-- first and last event times above (a new result column: dropped and created again; readers
-- name it in their statements only, nothing in the catalog depends on it).
DROP FUNCTION ingest_read_profile_event_counts();
CREATE FUNCTION ingest_read_profile_event_counts()
RETURNS TABLE (project_id uuid, profile_id uuid, event_count bigint, crash_count bigint,
               first_event_time timestamptz, last_event_time timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT project_id, profile_id, event_count, crash_count, first_event_time, last_event_time
    FROM profile_event_counts
$$;
