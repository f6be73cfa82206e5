-- What stays exact after retention (issue 20), read from what ingest stores instead of from the
-- events left: the export's first and last seen, and the profile view's last crash. (Segments'
-- first/last seen conditions read ingest_read_profile_event_counts, 0025, from its own SQL.)

-- READ CONTRACT (identity's ExportProfile), replacing 0016's body: the span of the profile's
-- event times is the first and last event times ingest keeps beside its totals (0025), which
-- retention never narrows; no longer min/max over the events still stored. Always one row (an
-- aggregate over at most one), NULLs when the profile never had an event, as before.
CREATE OR REPLACE FUNCTION ingest_read_export_event_span(p_project uuid, p_profile uuid)
RETURNS TABLE (first_time timestamptz, last_time timestamptz) LANGUAGE sql STABLE AS $$
    SELECT min(c.first_event_time), max(c.last_event_time) FROM profile_event_counts c
    WHERE c.project_id = p_project AND c.profile_id = p_profile
$$;

-- The profile's last crash, kept by ingest so that the profile view still shows it once
-- retention removed the crash event (a crash count above zero with no last crash would be a
-- contradiction on one screen). One row per profile that ever had a crash: the latest by event
-- time (then arrival order), with what the view shows of it. Its own table, not columns of
-- profile_event_counts: that row is rewritten by every event, this one only by crashes, which
-- are rare; and name and reason (300 characters each at most) stay out of the hot row.
CREATE TABLE profile_last_crashes (
    project_id uuid NOT NULL,
    profile_id uuid NOT NULL,
    event_seq bigint NOT NULL,
    event_id text NOT NULL,
    installation_id text,
    event_time timestamptz NOT NULL,
    name text NOT NULL,
    reason text NOT NULL,
    fatal boolean NOT NULL,
    PRIMARY KEY (project_id, profile_id)
);

INSERT INTO profile_last_crashes (project_id, profile_id, event_seq, event_id, installation_id,
                                  event_time, name, reason, fatal)
SELECT DISTINCT ON (project_id, profile_id)
       project_id, profile_id, event_seq, event_id, installation_id, event_time,
       coalesce(payload ->> 'name', ''), coalesce(payload ->> 'reason', ''),
       coalesce((payload ->> 'fatal')::boolean, false)
FROM events
WHERE kind = ingest_read_event_kind('crash') AND profile_id IS NOT NULL
ORDER BY project_id, profile_id, event_time DESC, event_seq DESC;

-- Follows the events' statements, as profile_event_counts' trigger does:
-- - inserted crashes, and crashes an UPDATE gave a profile (a merge moving them to its
--   survivor), replace the stored one when later (event time, then event_seq);
-- - a delete outside retention (erasure's shadowed events; ingest refuses only attribute
--   changes after insertion) that removed the stored crash puts back the latest crash left,
--   or none; retention's deletes (profiles.retention) change nothing: that is the point;
-- - what an UPDATE took away from a profile (the merge's source, the erasure's stripping) is
--   left to the profile hooks below, which move or delete the whole row.
-- Statements without a crash return after one look at the transition table.
CREATE FUNCTION profiles_ingest_last_crash_follow() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM profile_last_crashes;
    ELSIF TG_OP = 'INSERT' OR TG_OP = 'UPDATE' THEN
        IF NOT EXISTS (SELECT 1 FROM new_rows
                       WHERE kind = ingest_read_event_kind('crash') AND profile_id IS NOT NULL) THEN
            RETURN NULL;
        END IF;
        INSERT INTO profile_last_crashes AS c (project_id, profile_id, event_seq, event_id,
                                               installation_id, event_time, name, reason, fatal)
        SELECT DISTINCT ON (project_id, profile_id)
               project_id, profile_id, event_seq, event_id, installation_id, event_time,
               coalesce(payload ->> 'name', ''), coalesce(payload ->> 'reason', ''),
               coalesce((payload ->> 'fatal')::boolean, false)
        FROM new_rows
        WHERE kind = ingest_read_event_kind('crash') AND profile_id IS NOT NULL
        ORDER BY project_id, profile_id, event_time DESC, event_seq DESC
        ON CONFLICT (project_id, profile_id) DO UPDATE SET
            event_seq = EXCLUDED.event_seq, event_id = EXCLUDED.event_id,
            installation_id = EXCLUDED.installation_id, event_time = EXCLUDED.event_time,
            name = EXCLUDED.name, reason = EXCLUDED.reason, fatal = EXCLUDED.fatal
        WHERE (EXCLUDED.event_time, EXCLUDED.event_seq) > (c.event_time, c.event_seq);
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
               e.event_time, coalesce(e.payload ->> 'name', ''),
               coalesce(e.payload ->> 'reason', ''),
               coalesce((e.payload ->> 'fatal')::boolean, false)
        FROM gone g
        CROSS JOIN LATERAL (
            SELECT * FROM events x
            WHERE x.project_id = g.project_id AND x.profile_id = g.profile_id
                AND x.kind = ingest_read_event_kind('crash')
            ORDER BY x.event_time DESC, x.event_seq DESC
            LIMIT 1
        ) e;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER profile_last_crashes_insert AFTER INSERT ON events
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION profiles_ingest_last_crash_follow();
CREATE TRIGGER profile_last_crashes_update AFTER UPDATE ON events
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION profiles_ingest_last_crash_follow();
CREATE TRIGGER profile_last_crashes_delete AFTER DELETE ON events
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION profiles_ingest_last_crash_follow();
CREATE TRIGGER profile_last_crashes_truncate AFTER TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION profiles_ingest_last_crash_follow();

-- Merge (after ingest_merge_events, 30, whose UPDATE already gave the survivor the moved
-- crashes): the source's row may name a crash retention removed since; the later of the two
-- stays on the survivor, and the source's row goes.
CREATE FUNCTION ingest_merge_profile_last_crash(
    p_project uuid, p_source uuid, p_target uuid
) RETURNS void LANGUAGE sql AS $$
    INSERT INTO profile_last_crashes AS c (project_id, profile_id, event_seq, event_id,
                                           installation_id, event_time, name, reason, fatal)
    SELECT p_project, p_target, s.event_seq, s.event_id, s.installation_id, s.event_time,
           s.name, s.reason, s.fatal
    FROM profile_last_crashes s
    WHERE s.project_id = p_project AND s.profile_id = p_source
    ON CONFLICT (project_id, profile_id) DO UPDATE SET
        event_seq = EXCLUDED.event_seq, event_id = EXCLUDED.event_id,
        installation_id = EXCLUDED.installation_id, event_time = EXCLUDED.event_time,
        name = EXCLUDED.name, reason = EXCLUDED.reason, fatal = EXCLUDED.fatal
    WHERE (EXCLUDED.event_time, EXCLUDED.event_seq) > (c.event_time, c.event_seq);
    DELETE FROM profile_last_crashes WHERE project_id = p_project AND profile_id = p_source;
$$;

-- Erasure: the crash's name and reason are the profile's data like its events.
CREATE FUNCTION ingest_erase_profile_last_crashes(
    p_project uuid, p_profile_ids uuid[], p_installation_ids text[], p_custom_ids text[]
) RETURNS void LANGUAGE sql AS $$
    DELETE FROM profile_last_crashes
    WHERE project_id = p_project AND profile_id = ANY(p_profile_ids)
$$;

INSERT INTO profile_hooks (kind, owner, function_name, run_order) VALUES
    ('merge', 'ingest', 'ingest_merge_profile_last_crash', 36),
    ('erase', 'ingest', 'ingest_erase_profile_last_crashes', 20);

-- READ CONTRACT (query's profile view): each profile's last crash, by event time then arrival,
-- of every crash it ever held (its merged-away profiles' included), whatever retention removed
-- since. crash_time is the event time; name, reason and fatal as the crash detail had them
-- ('' and false when absent); installation_id NULL for a server-side crash.
CREATE FUNCTION ingest_read_profile_last_crashes()
RETURNS TABLE (project_id uuid, profile_id uuid, event_id text, installation_id text,
               crash_time timestamptz, name text, reason text, fatal boolean)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT project_id, profile_id, event_id, installation_id, event_time, name, reason, fatal
    FROM profile_last_crashes
$$;
