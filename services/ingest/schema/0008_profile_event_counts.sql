-- Per-profile event totals, so the profile view's counters cost the same at 20 events as at
-- 200,000 (counting them live over events_by_profile_time took 29 ms at 200,000).
--
-- READ CONTRACT (query's profile view): one row per profile with at least one event; no row
-- means no event. event_count counts the profile's events of every kind (bare dedupe markers
-- left by an erasure have no profile and are not counted); crash_count those of kind 8 (CRASH).
-- Kept by the triggers below in the transaction of every statement that writes events
-- (ingest's inserts and its deletes of refused events, identity's merges and erasures, bulk
-- loads), so a reader's snapshot sees the events and their totals together, and no writer can
-- forget them.
--
-- Not sharded (unlike segment_state_counts, 0005): every writer of a profile's events holds
-- that profile's row lock in `profiles` first (ingest's insert locks them FOR NO KEY UPDATE in
-- profile_id order, identity locks both sides of a merge and the erased profiles), so two
-- transactions never wait for each other on these rows in opposite orders, and concurrent
-- writers of one profile are already serialized upstream of them.
CREATE TABLE profile_event_counts (
    project_id uuid NOT NULL,
    profile_id uuid NOT NULL,
    event_count bigint NOT NULL,
    crash_count bigint NOT NULL,
    PRIMARY KEY (project_id, profile_id)
);

-- Statement-level over the transition tables: one aggregate and one upsert per statement (a
-- batch of 500 events is one row per profile it touched), in key order. Inserts only add, the
-- hot path; updates (a merge moving events, an erasure stripping them) and deletes move counts
-- by their difference and drop the rows that fall to zero, so a merged-away or erased profile
-- keeps no row.
CREATE FUNCTION profile_event_counts_apply() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO profile_event_counts AS c (project_id, profile_id, event_count, crash_count)
        SELECT project_id, profile_id, count(*), count(*) FILTER (WHERE kind = 8)
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
        FROM (SELECT project_id, profile_id, 1 AS n, (kind = 8)::int AS crashes
              FROM new_rows WHERE profile_id IS NOT NULL
              UNION ALL
              SELECT project_id, profile_id, -1, -(kind = 8)::int
              FROM old_rows WHERE profile_id IS NOT NULL) x
        GROUP BY project_id, profile_id
        HAVING sum(n) <> 0 OR sum(crashes) <> 0
        ORDER BY project_id, profile_id
        ON CONFLICT (project_id, profile_id) DO UPDATE SET
            event_count = c.event_count + EXCLUDED.event_count,
            crash_count = c.crash_count + EXCLUDED.crash_count;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO profile_event_counts AS c (project_id, profile_id, event_count, crash_count)
        SELECT project_id, profile_id, -count(*), -count(*) FILTER (WHERE kind = 8)
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
-- (A trigger with transition tables may fire on one event only, hence three.)
CREATE TRIGGER profile_event_counts_insert AFTER INSERT ON events
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION profile_event_counts_apply();
CREATE TRIGGER profile_event_counts_update AFTER UPDATE ON events
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION profile_event_counts_apply();
CREATE TRIGGER profile_event_counts_delete AFTER DELETE ON events
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION profile_event_counts_apply();
CREATE TRIGGER profile_event_counts_truncate AFTER TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION profile_event_counts_apply();

-- Identity's merge moves the source's events with an UPDATE, which the trigger above already
-- counts on the survivor: moving these rows as well (identity's generic merge) would count them
-- twice. Its erasure strips the events (the trigger drops the rows) and then deletes whatever
-- is left by profile_id, as for any table.
CREATE FUNCTION profiles_merge_profile_event_counts(uuid, uuid, uuid) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN RETURN; END $$;

-- A profile's last crash without walking its other events: crashes are rare, so this index
-- costs ingest next to nothing.
CREATE INDEX events_crashes_by_profile ON events (project_id, profile_id, event_time DESC, event_seq DESC)
    WHERE kind = 8;

-- The events stored before this migration (it runs in one transaction, and the triggers above
-- lock the table against writers until it commits, so none is counted twice or missed).
INSERT INTO profile_event_counts (project_id, profile_id, event_count, crash_count)
SELECT project_id, profile_id, count(*), count(*) FILTER (WHERE kind = 8)
FROM events
WHERE profile_id IS NOT NULL
GROUP BY project_id, profile_id;
