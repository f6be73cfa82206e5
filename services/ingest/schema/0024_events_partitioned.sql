-- events and rejected_events partitioned by time (issue 20): a month of events is one table
-- with indexes the size of a month, and ageing it out is a DROP TABLE, not a DELETE.
--
-- Periods: one partition per calendar month (UTC), named events_YYYY_MM over
-- [first of the month, first of the next), by event_time; rejected_events_YYYY_MM by
-- receive_time (a rejected event may carry no usable event time). Monthly, not weekly: the
-- readers' plans visit one partition per period a profile's history spans, and the bench
-- (bench/partitions.py) showed no gain from smaller ones (docs/partitions.md).
-- A DEFAULT partition (events_default, rejected_events_default) takes every row no monthly
-- partition covers, so no event is ever refused for lack of one: imports reaching far back,
-- and anything before the oldest month created. Ingest creates the current month's and the
-- next two months' partitions on start and periodically (services/ingest/partitions.py), and
-- moves the DEFAULT partition's rows of a month into it when it creates one.
--
-- Idempotency: a partitioned table cannot hold a unique index that leaves out the partition key,
-- and a retry's event_time may differ from the first attempt's (clock-skew correction uses the
-- retry's sent time), so the dedupe key moved out of events into event_keys, one row per
-- accepted event: (project_id, event_key), event_key a digest of the origin (installation ID,
-- or custom ID for server-side events) and the client's event ID. Ingest claims a batch's keys
-- (ON CONFLICT DO NOTHING) and then stores, in the same transaction, only the events whose key
-- it claimed (services/ingest/repository.py). A key is kept for EVENT_KEY_DAYS (35) after it
-- was received, then pruned: TrackEvents refuses events over 30 days old, so any retry of an
-- event arrives while its key is there and is answered DUPLICATE. ImportEvents accepts any
-- age: a re-import of the same event ID within 35 days of the first import is a duplicate;
-- after that it is stored again.
--
-- Everything that reads events reads it under the same name, columns and index names as before
-- (events_pkey now carries event_time too: a primary key of a partitioned table must include
-- the partition key; event_seq stays unique, it comes from one sequence).

-- 0. Views other owners may have built on events or rejected_events (read contracts) bind to
-- the table, not its name: kept here, dropped with the old table, created again on the new one.
CREATE TEMPORARY TABLE events_dependent_views ON COMMIT DROP AS
WITH RECURSIVE deps(oid) AS (
    SELECT DISTINCT r.ev_class FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
    WHERE d.refobjid IN ('events'::regclass, 'rejected_events'::regclass)
    UNION
    SELECT r.ev_class FROM deps JOIN pg_depend d ON d.refobjid = deps.oid
    JOIN pg_rewrite r ON r.oid = d.objid
    WHERE r.ev_class <> deps.oid
)
SELECT c.oid::regclass::text AS name, c.oid AS view_oid,
       pg_get_viewdef(c.oid) AS definition, obj_description(c.oid, 'pg_class') AS remark
FROM deps JOIN pg_class c ON c.oid = deps.oid
WHERE c.relkind = 'v';

DO $$
DECLARE v record;
BEGIN
    FOR v IN SELECT name FROM events_dependent_views ORDER BY view_oid DESC LOOP
        EXECUTE 'DROP VIEW IF EXISTS ' || v.name || ' CASCADE';
    END LOOP;
END $$;

-- 1. The dedupe keys. A key is a digest of the origin and the event ID, not the IDs themselves:
-- 16 bytes instead of some 80 (a smaller index, cheaper per event), and the table keeps no
-- installation ID or custom ID in clear (an erasure's promise covers every table but the bare
-- markers in events). The length prefix keeps the encoding unambiguous; an MD5 collision
-- within one project's 35-day window is not a practical concern (2^64 keys for even odds).
CREATE FUNCTION profiles_ingest_event_key(installation_id text, custom_id text, event_id text)
RETURNS uuid LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT md5(CASE WHEN installation_id IS NOT NULL
                    THEN 'i' || length(installation_id) || ':' || installation_id
                    ELSE 'c' || length(custom_id) || ':' || custom_id END
               || event_id)::uuid
$$;

CREATE TABLE event_keys (
    project_id uuid NOT NULL,
    event_key uuid NOT NULL,
    receive_time timestamptz NOT NULL,
    PRIMARY KEY (project_id, event_key)
);
-- Pruning finds old keys through a BRIN index: keys arrive in receive-time order, so it costs
-- ingest next to nothing per row, where a B-tree would be a second index written per event.
CREATE INDEX event_keys_by_receive_time ON event_keys USING brin (receive_time);

-- From the stored events received within the key window (erasure markers included: they keep
-- deduplicating retries of erased events, as before).
INSERT INTO event_keys (project_id, event_key, receive_time)
SELECT project_id, profiles_ingest_event_key(installation_id, custom_id, event_id),
       max(receive_time)
FROM events
WHERE receive_time > now() - interval '35 days'
GROUP BY 1, 2;

-- 2. Creates the monthly partition of `p_parent` (events or rejected_events, partitioned by
-- `p_key`) for [p_from, p_to), unless it exists. It is built as a plain table and attached:
-- writers of the parent wait for the commit, readers do not (CREATE TABLE ... PARTITION OF
-- would take ACCESS EXCLUSIVE: every reader would queue behind it too).
-- Rows of that range the DEFAULT partition holds move into it first (a partition cannot be
-- attached over rows the DEFAULT holds); moving rows between partitions directly fires no
-- trigger of the parent (the rows stay in the table: profile_event_counts and event_keys are
-- right as they are). A CHECK constraint spares ATTACH its validation scan of the new table.
-- Returns the rows moved, or NULL when the partition already existed. Callers hold ingest's
-- partition advisory lock (services/ingest/partitions.py), so replicas do not race.
CREATE FUNCTION profiles_ingest_ensure_partition(
    p_parent text, p_key text, p_from timestamptz, p_to timestamptz
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    part text := p_parent || '_' || to_char(p_from AT TIME ZONE 'UTC', 'YYYY_MM');
    fallback text := p_parent || '_default';
    waiting boolean;
    moved bigint;
BEGIN
    IF to_regclass(part) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    -- Writers of the table wait from here to the commit (readers do not): a writer that
    -- routed its rows with the partitions as they were before the attach would put a row of
    -- this range into the DEFAULT partition, which then refuses it (a check violation, an
    -- error for the writer). Ingest's write transactions are short, and this is once a month
    -- per table; the caller's lock timeout bounds the wait.
    EXECUTE format('LOCK TABLE %I IN SHARE ROW EXCLUSIVE MODE', p_parent);
    -- Rows to move: readers wait too. A reader planned with the partitions as they were would
    -- look for them in the DEFAULT partition only, after they left it, and miss them. Rows wait
    -- in DEFAULT only when a month's partition was missing, so this is the rare case.
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I WHERE %I >= $1 AND %I < $2)',
                   fallback, p_key, p_key)
        INTO waiting USING p_from, p_to;
    IF waiting THEN
        EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE', p_parent);
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   part, p_parent);
    EXECUTE format('WITH m AS (DELETE FROM %I WHERE %I >= $1 AND %I < $2 RETURNING *) '
                   'INSERT INTO %I SELECT * FROM m', fallback, p_key, p_key, part)
        USING p_from, p_to;
    GET DIAGNOSTICS moved = ROW_COUNT;
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (%I >= %L AND %I < %L)',
                   part, part || '_range', p_key, p_from, p_key, p_to);
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   p_parent, part, p_from, p_to);
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', part, part || '_range');
    RETURN moved;
END $$;

-- 3. events, partitioned. Same columns in the same order; the old table is copied and dropped.
LOCK TABLE events IN ACCESS EXCLUSIVE MODE;
ALTER TABLE events RENAME TO events_0012;

CREATE TABLE events (
    project_id uuid NOT NULL,
    event_seq bigint GENERATED ALWAYS AS IDENTITY,
    installation_id text,
    custom_id text,
    event_id text NOT NULL
        CONSTRAINT events_event_id_check CHECK (char_length(event_id) BETWEEN 1 AND 64),
    profile_id uuid,
    kind smallint NOT NULL,
    name text,
    event_time timestamptz NOT NULL,
    receive_time timestamptz NOT NULL,
    session_id text,
    platform smallint NOT NULL,
    payload jsonb,
    imported boolean NOT NULL DEFAULT false,
    -- 0004's names (the old table, renamed, still holds them while this one is built).
    CONSTRAINT events_check CHECK ((installation_id IS NULL) <> (custom_id IS NULL))
) PARTITION BY RANGE (event_time);
CREATE TABLE events_default PARTITION OF events DEFAULT;

-- A month for every month of the last two years that holds events, and the current month with
-- the next two; older events stay in the DEFAULT partition (where retention finds them too).
DO $$
DECLARE m timestamptz;
BEGIN
    FOR m IN
        SELECT DISTINCT date_trunc('month', event_time AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
        FROM events_0012
        WHERE event_time >= date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                            - interval '24 months'
        UNION
        SELECT (date_trunc('month', now() AT TIME ZONE 'UTC') + n * interval '1 month')
               AT TIME ZONE 'UTC'
        FROM generate_series(0, 2) AS n
        ORDER BY 1
    LOOP
        PERFORM profiles_ingest_ensure_partition(
            'events', 'event_time', m,
            ((m AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC');
    END LOOP;
END $$;

-- Rows first, indexes after (one sorted build per partition instead of a row-by-row insert).
INSERT INTO events OVERRIDING SYSTEM VALUE SELECT * FROM events_0012;
DROP TABLE events_0012;

DO $$
BEGIN
    EXECUTE format('ALTER TABLE events ALTER COLUMN event_seq RESTART WITH %s',
                   (SELECT coalesce(max(event_seq), 0) + 1 FROM events));
END $$;

-- The index names every reader's comments and plans name, as 0004, 0008 and 0009 made them
-- (0014's comments kept). Index predicates keep the kinds' numbers (1 custom, 8 crash), as
-- 0020 decided: ingest_read_event_kind names them in statements.
ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (project_id, event_seq, event_time);
-- Dedupe lookups within one partition (erasure's shadowed markers, support queries); no longer
-- unique: event_keys is the rule.
CREATE INDEX events_by_installation_event_id ON events (project_id, installation_id, event_id)
    WHERE installation_id IS NOT NULL;
CREATE INDEX events_by_custom_id_event_id ON events (project_id, custom_id, event_id)
    WHERE custom_id IS NOT NULL;
CREATE INDEX events_by_profile_time ON events (project_id, profile_id, event_time DESC, event_seq DESC);
CREATE INDEX events_crashes_by_profile ON events (project_id, profile_id, event_time DESC, event_seq DESC)
    WHERE kind = 8;
CREATE INDEX events_custom_by_name
    ON events (project_id, profile_id, name, event_time) WHERE kind = 1;
COMMENT ON INDEX events_custom_by_name IS
    'Custom events (kind 1) by profile, name and time: a funnel step''s occurrences in time '
    'order (segments'' funnel progress), index-only when the step has no condition.';

-- 0008's counters: statement-level triggers with transition tables are allowed on a
-- partitioned table (not on its partitions) and see every row the statement wrote, whatever
-- partition it went to, rows an UPDATE moved between partitions included (an erasure's
-- stripping moves markers to their receive time's month). Dropping or detaching a partition
-- fires none of them: retention keeps the totals.
-- A DELETE from events removes the counted events and their dedupe keys (ingest's refused
-- events, erasure's shadowed ones: retried, they are new again), except under retention's
-- `profiles.retention` setting (SET LOCAL by the sweep), which ages events out without
-- touching what was derived from them: totals stay exact, keys expire on their own.
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
    ELSE  -- TRUNCATE
        DELETE FROM profile_event_counts;
        RETURN NULL;
    END IF;
    DELETE FROM profile_event_counts c
    USING (SELECT DISTINCT project_id, profile_id FROM old_rows WHERE profile_id IS NOT NULL) o
    WHERE c.project_id = o.project_id AND c.profile_id = o.profile_id AND c.event_count = 0;
    RETURN NULL;
END $$;
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

-- The keys follow the events' own changes: an erasure rewrites a server-side event's custom ID
-- into its keyed marker (identity's STRIP_EVENTS), so the key's clear custom ID is replaced by
-- the marker's and a retry still finds it; a deleted event (refused by ingest, or shadowed by
-- an older marker on erasure) loses its key. Nothing to do for a merge (no origin changes):
-- the first test below returns at once.
CREATE FUNCTION profiles_ingest_event_keys_follow() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NOT EXISTS (SELECT 1 FROM new_rows WHERE profile_id IS NULL AND custom_id IS NOT NULL)
        THEN
            RETURN NULL;
        END IF;
        DELETE FROM event_keys k
        USING old_rows o JOIN new_rows n ON n.event_seq = o.event_seq
        WHERE o.custom_id IS DISTINCT FROM n.custom_id AND o.custom_id IS NOT NULL
            AND k.project_id = o.project_id
            AND k.event_key = profiles_ingest_event_key(NULL, o.custom_id, o.event_id);
        INSERT INTO event_keys (project_id, event_key, receive_time)
        SELECT n.project_id, profiles_ingest_event_key(NULL, n.custom_id, n.event_id),
               n.receive_time
        FROM old_rows o JOIN new_rows n ON n.event_seq = o.event_seq
        WHERE o.custom_id IS DISTINCT FROM n.custom_id AND n.custom_id IS NOT NULL
        ORDER BY 1, 2
        ON CONFLICT DO NOTHING;
    ELSIF current_setting('profiles.retention', true) IS DISTINCT FROM 'on' THEN
        DELETE FROM event_keys k
        USING old_rows o
        WHERE k.project_id = o.project_id
            AND k.event_key = profiles_ingest_event_key(o.installation_id, o.custom_id,
                                                        o.event_id);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER event_keys_follow_update AFTER UPDATE ON events
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION profiles_ingest_event_keys_follow();
CREATE TRIGGER event_keys_follow_delete AFTER DELETE ON events
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION profiles_ingest_event_keys_follow();

-- 4. rejected_events, partitioned by receive time, the same way.
LOCK TABLE rejected_events IN ACCESS EXCLUSIVE MODE;
ALTER TABLE rejected_events RENAME TO rejected_events_0012;
CREATE TABLE rejected_events (
    project_id uuid NOT NULL,
    rejected_seq bigint GENERATED ALWAYS AS IDENTITY,
    receive_time timestamptz NOT NULL,
    reason text NOT NULL,
    field_path text NOT NULL,
    message text NOT NULL,
    event_id text NOT NULL,
    installation_id text,
    custom_id text,
    payload jsonb
) PARTITION BY RANGE (receive_time);
CREATE TABLE rejected_events_default PARTITION OF rejected_events DEFAULT;
DO $$
DECLARE m timestamptz;
BEGIN
    FOR m IN
        SELECT DISTINCT date_trunc('month', receive_time AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
        FROM rejected_events_0012
        WHERE receive_time >= date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                              - interval '24 months'
        UNION
        SELECT (date_trunc('month', now() AT TIME ZONE 'UTC') + n * interval '1 month')
               AT TIME ZONE 'UTC'
        FROM generate_series(0, 2) AS n
        ORDER BY 1
    LOOP
        PERFORM profiles_ingest_ensure_partition(
            'rejected_events', 'receive_time', m,
            ((m AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC');
    END LOOP;
END $$;
INSERT INTO rejected_events OVERRIDING SYSTEM VALUE SELECT * FROM rejected_events_0012;
DROP TABLE rejected_events_0012;
DO $$
BEGIN
    EXECUTE format('ALTER TABLE rejected_events ALTER COLUMN rejected_seq RESTART WITH %s',
                   (SELECT coalesce(max(rejected_seq), 0) + 1 FROM rejected_events));
END $$;
ALTER TABLE rejected_events ADD CONSTRAINT rejected_events_pkey
    PRIMARY KEY (project_id, rejected_seq, receive_time);
CREATE INDEX rejected_events_by_time ON rejected_events (project_id, receive_time DESC, rejected_seq DESC);
CREATE INDEX rejected_events_by_reason ON rejected_events (project_id, reason, receive_time DESC, rejected_seq DESC);
CREATE INDEX rejected_events_by_installation ON rejected_events (project_id, installation_id)
    WHERE installation_id IS NOT NULL;

-- 5. The views of step 0, on the new table.
DO $$
DECLARE v record;
BEGIN
    FOR v IN SELECT * FROM events_dependent_views ORDER BY view_oid LOOP
        EXECUTE 'CREATE VIEW ' || v.name || ' AS ' || v.definition;
        IF v.remark IS NOT NULL THEN
            EXECUTE format('COMMENT ON VIEW %s IS %L', v.name, v.remark);
        END IF;
    END LOOP;
END $$;
