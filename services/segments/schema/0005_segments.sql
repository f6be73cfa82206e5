-- Segments' tables: its own per-profile session history, fed by the events and identity streams
-- (never by ingest's or identity's tables), and each profile's stored classification with its
-- future time-only transitions.

-- The profiles segments has heard of, with what it keeps about them apart from sessions.
-- A merged-away profile keeps a row pointing at its survivor (merged_into), so late events and
-- reads of its ID resolve in one hop; an erased profile keeps only its ID and erase_time, so
-- events still queued for it are skipped (everything else about it is deleted).
CREATE TABLE segment_profiles (
    project_id uuid NOT NULL,
    profile_id uuid NOT NULL,
    time_zone text,
    time_zone_time timestamptz,
    merged_into uuid,
    erase_time timestamptz,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, profile_id),
    CHECK (merged_into IS NULL OR merged_into <> profile_id)
);

-- One row per session (session_key = its source and client session ID), so a replayed stream
-- entry updates the same row instead of counting the session twice. start_known is false while
-- only a heartbeat or end was seen (start_time is then event time minus duration).
CREATE TABLE segment_sessions (
    project_id uuid NOT NULL,
    profile_id uuid NOT NULL,
    session_key text NOT NULL,
    platform smallint NOT NULL,
    start_time timestamptz NOT NULL,
    start_known boolean NOT NULL,
    duration_ms bigint NOT NULL DEFAULT 0 CHECK (duration_ms >= 0),
    PRIMARY KEY (project_id, profile_id, session_key)
);
CREATE INDEX segment_sessions_by_start ON segment_sessions (project_id, profile_id, start_time);

-- Each profile's smart segment and flag, over all platforms (platform 0) and per platform it
-- has sessions on, with the transitions time alone will cause if no session arrives
-- (upcoming_*: same length, earliest first; next_transition_time is the first of them, or
-- 'infinity'). Values are the proto numbers of profiles.common.v1.SmartSegment/SmartSegmentFlag.
CREATE TABLE segment_states (
    project_id uuid NOT NULL,
    profile_id uuid NOT NULL,
    platform smallint NOT NULL,
    segment smallint NOT NULL,
    flag smallint NOT NULL,
    next_transition_time timestamptz NOT NULL DEFAULT 'infinity',
    upcoming_times timestamptz[] NOT NULL DEFAULT '{}',
    upcoming_segments smallint[] NOT NULL DEFAULT '{}',
    upcoming_flags smallint[] NOT NULL DEFAULT '{}',
    update_time timestamptz NOT NULL,
    PRIMARY KEY (project_id, profile_id, platform)
);
-- The distribution's due rows: those of one project and platform whose next transition has
-- passed (a range scan up to "now"; the sweep keeps them few).
CREATE INDEX segment_states_distribution
    ON segment_states (project_id, platform, next_transition_time) INCLUDE (segment, flag);
-- The sweep, over every project: only rows with a transition ahead.
CREATE INDEX segment_states_due ON segment_states (next_transition_time)
    WHERE next_transition_time < 'infinity';

-- How many segment_states rows hold each stored (segment, flag), per project and platform, so
-- the distribution reads a few dozen rows instead of every profile. Kept by the triggers below,
-- in the transaction of every statement that writes segment_states (events, the sweep, merges,
-- erasures, RecomputeAll, bulk loads alike): no writer can forget it, and a reader's snapshot
-- sees the states and their counts together. The profile_count of one (segment, flag) is the
-- sum over its shards: a transaction adds its deltas to a shard no concurrent writer uses (see
-- segment_state_counts_shard), so writers never queue, nor deadlock, on these rows.
CREATE TABLE segment_state_counts (
    project_id uuid NOT NULL,
    platform smallint NOT NULL,
    segment smallint NOT NULL,
    flag smallint NOT NULL,
    shard smallint NOT NULL,
    profile_count bigint NOT NULL,
    PRIMARY KEY (project_id, platform, segment, flag, shard)
);

-- The counter shard (0..15) of the calling transaction: the first, from one that depends on the
-- backend, whose transaction-scoped advisory lock (two-key form, namespace 0x5C, apart from
-- identity's custom ID locks 0x1D and the migration lock) it gets or already holds, so that
-- two open transactions never add to the same shard. With more than 16 concurrent writers the
-- backend's own shard is shared: row locks then queue them, still exactly.
CREATE FUNCTION segment_state_counts_shard() RETURNS smallint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    first integer := pg_backend_pid() % 16;
BEGIN
    FOR i IN 0..15 LOOP
        IF pg_try_advisory_xact_lock(x'5C'::integer, (first + i) % 16) THEN
            RETURN (first + i) % 16;
        END IF;
    END LOOP;
    RETURN first;
END $$;

-- Statement-level, over the transition tables: one upsert per statement and changed bucket
-- (a bulk load of a million rows is one aggregate, not a million upserts), and none at all for
-- an update that keeps every row's (segment, flag), the common case of a reclassification.
-- Rows are upserted in key order, so writers sharing a shard lock them in one order. The shard
-- is an InitPlan, so it is taken only when there is something to add.
CREATE FUNCTION segment_states_count() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO segment_state_counts AS c
            (project_id, platform, segment, flag, shard, profile_count)
        SELECT d.project_id, d.platform, d.segment, d.flag,
               (SELECT segment_state_counts_shard()), d.n
        FROM (SELECT project_id, platform, segment, flag, count(*) AS n
              FROM new_rows GROUP BY project_id, platform, segment, flag) d
        ORDER BY d.project_id, d.platform, d.segment, d.flag
        ON CONFLICT (project_id, platform, segment, flag, shard)
        DO UPDATE SET profile_count = c.profile_count + EXCLUDED.profile_count;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO segment_state_counts AS c
            (project_id, platform, segment, flag, shard, profile_count)
        SELECT d.project_id, d.platform, d.segment, d.flag,
               (SELECT segment_state_counts_shard()), d.n
        FROM (SELECT project_id, platform, segment, flag, sum(n) AS n
              FROM (SELECT project_id, platform, segment, flag, 1 AS n FROM new_rows
                    UNION ALL
                    SELECT project_id, platform, segment, flag, -1 FROM old_rows) x
              GROUP BY project_id, platform, segment, flag
              HAVING sum(n) <> 0) d
        ORDER BY d.project_id, d.platform, d.segment, d.flag
        ON CONFLICT (project_id, platform, segment, flag, shard)
        DO UPDATE SET profile_count = c.profile_count + EXCLUDED.profile_count;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO segment_state_counts AS c
            (project_id, platform, segment, flag, shard, profile_count)
        SELECT d.project_id, d.platform, d.segment, d.flag,
               (SELECT segment_state_counts_shard()), -d.n
        FROM (SELECT project_id, platform, segment, flag, count(*) AS n
              FROM old_rows GROUP BY project_id, platform, segment, flag) d
        ORDER BY d.project_id, d.platform, d.segment, d.flag
        ON CONFLICT (project_id, platform, segment, flag, shard)
        DO UPDATE SET profile_count = c.profile_count + EXCLUDED.profile_count;
    ELSE  -- TRUNCATE
        DELETE FROM segment_state_counts;
    END IF;
    RETURN NULL;
END $$;
-- (A trigger with transition tables may fire on one event only, hence three.)
CREATE TRIGGER segment_states_count_insert AFTER INSERT ON segment_states
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION segment_states_count();
CREATE TRIGGER segment_states_count_update AFTER UPDATE ON segment_states
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION segment_states_count();
CREATE TRIGGER segment_states_count_delete AFTER DELETE ON segment_states
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION segment_states_count();
CREATE TRIGGER segment_states_count_truncate AFTER TRUNCATE ON segment_states
    FOR EACH STATEMENT EXECUTE FUNCTION segment_states_count();

-- READ CONTRACT (query's overview, bench): the smart segment distribution of a project, on one
-- platform (0 for all), exact as of `as_of` including transitions caused only by time passing.
-- Rows whose next transition is still ahead are counted as stored; the few whose transition
-- has passed (the sweep runs every 30 s) are classified from their stored schedule: the last
-- step at or before `as_of`. Returns one row per (segment, flag) with at least one profile;
-- profiles with no session (on that platform) are not counted.
-- Cost: the project's counter rows (segment_state_counts: at most 16 shards per bucket) plus
-- its due rows (segment_states_distribution, next_transition_time <= as_of), whatever the
-- number of profiles: the stored counts, minus each due row's stored (segment, flag), plus
-- the (segment, flag) its schedule gives as of `as_of`. One statement, so one snapshot: counts
-- and rows agree.
CREATE FUNCTION segment_distribution(p_project_id uuid, p_platform smallint, p_as_of timestamptz)
RETURNS TABLE (segment smallint, flag smallint, profile_count bigint)
LANGUAGE sql STABLE AS $$
    SELECT c.segment, c.flag, sum(c.n)::bigint
    FROM (
        SELECT k.segment, k.flag, k.profile_count AS n
        FROM segment_state_counts k
        WHERE k.project_id = p_project_id AND k.platform = p_platform
        UNION ALL
        SELECT v.segment, v.flag, v.n
        FROM segment_states s
        LEFT JOIN LATERAL (
            SELECT x.segment, x.flag
            FROM unnest(s.upcoming_times, s.upcoming_segments, s.upcoming_flags)
                AS x(step_time, segment, flag)
            WHERE x.step_time <= p_as_of
            ORDER BY x.step_time DESC
            LIMIT 1
        ) u ON true
        CROSS JOIN LATERAL (VALUES (s.segment, s.flag, -1), (u.segment, u.flag, 1))
            AS v(segment, flag, n)
        WHERE s.project_id = p_project_id AND s.platform = p_platform
          AND s.next_transition_time <= p_as_of
          AND v.segment IS NOT NULL  -- (no step at or before as_of: the row is not counted)
    ) c
    GROUP BY c.segment, c.flag
    HAVING sum(c.n) <> 0
$$;

-- Identity's merge moves the rows of every table with project_id and profile_id in its own
-- transaction, unless the table's owner defines profiles_merge_<table>. Segments merges its own
-- rows when it handles the ProfileMerged message instead (so that it can announce who left and
-- entered which segment, in the same transaction), so for identity these are no-ops.
CREATE FUNCTION profiles_merge_segment_profiles(uuid, uuid, uuid) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN RETURN; END $$;
CREATE FUNCTION profiles_merge_segment_sessions(uuid, uuid, uuid) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN RETURN; END $$;
CREATE FUNCTION profiles_merge_segment_states(uuid, uuid, uuid) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN RETURN; END $$;

-- Identity's erasure deletes the rows of such tables in its own transaction unless the owner
-- defines profiles_erase_<table>. Session history goes at once with identity's plain DELETE;
-- the stored states and the profile row stay until segments handles ProfileDeleted, which
-- announces the LEFT changes and keeps the erased ID so that queued events are skipped.
CREATE FUNCTION profiles_erase_segment_profiles(uuid, uuid[]) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN RETURN; END $$;
CREATE FUNCTION profiles_erase_segment_states(uuid, uuid[]) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN RETURN; END $$;

-- Custom segments: a stored filter tree (model.Filter as JSON, see services/segments/model.py),
-- evaluated live by SQL compiled from it (services/segments/filter_sql.py). request_id makes a
-- retried CreateSegment a no-op while the segment exists; definition_hash tells a retry of the
-- same definition from a reuse of the key for another one.
CREATE TABLE custom_segments (
    project_id uuid NOT NULL,
    segment_id uuid NOT NULL,
    display_name text NOT NULL,
    description text NOT NULL DEFAULT '',
    filter jsonb NOT NULL,
    request_id uuid,
    definition_hash text NOT NULL,
    create_time timestamptz NOT NULL,
    create_seq bigint GENERATED ALWAYS AS IDENTITY,
    evaluate_time timestamptz,
    PRIMARY KEY (project_id, segment_id)
);
-- Names are unique per project, case-insensitively: the database settles two racing creates.
CREATE UNIQUE INDEX custom_segments_by_name ON custom_segments (project_id, lower(display_name));
CREATE UNIQUE INDEX custom_segments_by_request_id ON custom_segments (project_id, request_id)
    WHERE request_id IS NOT NULL;
-- Oldest first for ListSegments (keyset on create_seq).
CREATE INDEX custom_segments_by_seq ON custom_segments (project_id, create_seq);

-- READ CONTRACT (query's profile view): the members of each custom segment as of its last
-- evaluation, with when each entered (most recently). Kept current by segments itself:
--  * in the transaction that handles a profile's events (every kind: sessions, custom events,
--    attribute, subscription and installation changes) and identity's merges, splits, imports
--    and deletions, segments evaluates every custom segment of the project for that profile
--    and writes the difference here, with its ENTERED/LEFT changes (outbox, SEGMENT_CHANGES);
--  * a periodic sweep (every 5 s by default) evaluates each whole segment and writes what time
--    alone changed ("within the last N days" windows, smart segment transitions), and anything
--    written to the source tables without an event (e.g. a segment created while the event
--    was handled).
-- So a profile's rows are current as of the last event segments handled for it, and at most
-- one sweep interval behind for changes caused by time alone. Filled silently at creation
-- (creating a segment announces nothing; enter_time is then the creation time); deleted with the
-- segment. A row can name a merged-away or erased profile until the next evaluation of it:
-- readers join live profiles. GetSegment's size is computed live, not from these rows.
CREATE TABLE custom_segment_members (
    project_id uuid NOT NULL,
    segment_id uuid NOT NULL,
    profile_id uuid NOT NULL,
    enter_time timestamptz NOT NULL,
    PRIMARY KEY (project_id, segment_id, profile_id)
);
-- A profile's memberships (the per-profile evaluation and query's profile view).
CREATE INDEX custom_segment_members_by_profile
    ON custom_segment_members (project_id, profile_id);

-- Funnels: ordered steps (model.FunnelStep list as JSON) and a conversion window. Progress and
-- per-step counts are computed from events at read time, so nothing per profile is stored.
CREATE TABLE funnels (
    project_id uuid NOT NULL,
    funnel_id uuid NOT NULL,
    display_name text NOT NULL,
    description text NOT NULL DEFAULT '',
    steps jsonb NOT NULL,
    conversion_window_ms bigint NOT NULL CHECK (conversion_window_ms > 0),
    request_id uuid,
    definition_hash text NOT NULL,
    create_time timestamptz NOT NULL,
    create_seq bigint GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (project_id, funnel_id)
);
CREATE UNIQUE INDEX funnels_by_name ON funnels (project_id, lower(display_name));
CREATE UNIQUE INDEX funnels_by_request_id ON funnels (project_id, request_id)
    WHERE request_id IS NOT NULL;
CREATE INDEX funnels_by_seq ON funnels (project_id, create_seq);

-- A profile's smart segment and flag as of `p_as_of` from one stored segment_states row: the
-- stored values while the next transition is ahead, else the last scheduled step at or before
-- it (the same rule as segment_distribution). Used by custom segment filters.
CREATE FUNCTION segment_state_at(
    p_segment smallint, p_flag smallint, p_next timestamptz, p_times timestamptz[],
    p_segments smallint[], p_flags smallint[], p_as_of timestamptz
) RETURNS smallint[] LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_next > p_as_of THEN ARRAY[p_segment, p_flag]
    ELSE (SELECT ARRAY[x.segment, x.flag]
          FROM unnest(p_times, p_segments, p_flags) AS x(step_time, segment, flag)
          WHERE x.step_time <= p_as_of ORDER BY x.step_time DESC LIMIT 1) END
$$;

-- Membership rows follow segments' own evaluation, not identity's merge or erasure: the worker
-- announces the merged-away or erased profile leaving (cause MERGE or DELETION), then drops it.
CREATE FUNCTION profiles_merge_custom_segment_members(uuid, uuid, uuid) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN RETURN; END $$;
CREATE FUNCTION profiles_erase_custom_segment_members(uuid, uuid[]) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN RETURN; END $$;

-- Whether one event attribute value (the proto JSON of AttributeValue, as stored in
-- events.payload: {"number_value": 1.5}, {"string_list_value": {"values": [...]}}) passes one
-- funnel step condition (model.AttributeTest as stored in funnels.steps: {"operator": 1,
-- "value": {"type": "number", "value": 1.5}, "values": [...], "ignore_case": false, ...}).
-- The same rule as services/segments/filter_sql.py event_condition_sql (a test compares both
-- on every operator and type): a value of another type than the operand's never matches
-- (NOT_EQUALS included); ignore_case folds text; a string CONTAINS also looks into string lists.
CREATE FUNCTION funnel_step_value_matches(p_test jsonb, p_value jsonb)
RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    op integer := (p_test->>'operator')::integer;
    fold boolean := coalesce((p_test->>'ignore_case')::boolean, false);
    operand jsonb := CASE WHEN jsonb_typeof(p_test->'value') = 'object' THEN p_test->'value'
                          ELSE p_test->'values'->0 END;
    value_type text;
    operand_type text;
    stored text;
    items jsonb;
BEGIN
    IF p_value IS NULL OR jsonb_typeof(p_value) <> 'object' THEN
        RETURN false;
    END IF;
    value_type := CASE WHEN p_value ? 'string_value' THEN 'string'
                       WHEN p_value ? 'url_value' THEN 'url'
                       WHEN p_value ? 'number_value' THEN 'number'
                       WHEN p_value ? 'bool_value' THEN 'bool'
                       WHEN p_value ? 'timestamp_value' THEN 'timestamp'
                       WHEN p_value ? 'string_list_value' THEN 'string_list' END;
    IF op = 10 THEN  -- EXISTS
        RETURN value_type IS NOT NULL;
    END IF;
    operand_type := operand->>'type';
    IF value_type IS NULL OR NOT (value_type = operand_type
            OR (op = 8 AND operand_type = 'string' AND value_type = 'string_list')) THEN
        RETURN false;
    END IF;
    IF value_type = 'string_list' THEN
        items := coalesce(p_value->'string_list_value'->'values', '[]');
        IF op = 8 THEN  -- CONTAINS: one item equals the operand
            RETURN EXISTS (
                SELECT 1 FROM jsonb_array_elements_text(items) AS i(item)
                WHERE CASE WHEN fold THEN lower(i.item) = lower(operand->>'value')
                           ELSE i.item = operand->>'value' END);
        END IF;
        IF fold THEN
            RETURN funnel_compare(lower(items::text), lower((operand->'value')::text), op);
        END IF;
        RETURN funnel_compare(items, operand->'value', op);
    END IF;
    stored := coalesce(p_value->>'string_value', p_value->>'url_value',
                       p_value->>'number_value', p_value->>'bool_value',
                       p_value->>'timestamp_value');
    IF value_type = 'number' THEN
        IF op = 7 THEN
            RETURN stored::float8 IN (
                SELECT (x->>'value')::float8 FROM jsonb_array_elements(p_test->'values') x);
        END IF;
        RETURN funnel_compare(stored::float8, (operand->>'value')::float8, op);
    ELSIF value_type = 'bool' THEN
        RETURN funnel_compare(stored::boolean, (operand->>'value')::boolean, op);
    ELSIF value_type = 'timestamp' THEN
        RETURN funnel_compare(stored::timestamptz, (operand->>'value')::timestamptz, op);
    END IF;
    -- string, url
    IF fold THEN
        stored := lower(stored);
    END IF;
    IF op = 7 THEN  -- IN
        RETURN stored IN (
            SELECT CASE WHEN fold THEN lower(x->>'value') ELSE x->>'value' END
            FROM jsonb_array_elements(p_test->'values') x);
    ELSIF op = 8 THEN
        RETURN strpos(stored, CASE WHEN fold THEN lower(operand->>'value')
                                   ELSE operand->>'value' END) > 0;
    ELSIF op = 9 THEN
        RETURN starts_with(stored, CASE WHEN fold THEN lower(operand->>'value')
                                        ELSE operand->>'value' END);
    END IF;
    RETURN funnel_compare(stored, CASE WHEN fold THEN lower(operand->>'value')
                                       ELSE operand->>'value' END, op);
END $$;

-- model.Operator's comparisons (1 =, 2 <>, 3 <, 4 <=, 5 >, 6 >=) on two values of one type.
CREATE FUNCTION funnel_compare(a anyelement, b anyelement, op integer)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE op WHEN 1 THEN a = b WHEN 2 THEN a <> b WHEN 3 THEN a < b WHEN 4 THEN a <= b
                   WHEN 5 THEN a > b WHEN 6 THEN a >= b END
$$;

-- READ CONTRACT (query's profile view): one profile's progress in every funnel of its project
-- as of `p_as_of`, from its events (a merged profile's events are the survivor's: identity
-- moves them). One row per funnel and step, funnels oldest first (create_seq), steps in order:
-- the step's number (from 1) and event name, and when the profile's best attempt completed it
-- (NULL: not completed). The same rule as model.best_attempt (a test compares them): an
-- attempt starts at an occurrence of step 1; each later step is the first matching event
-- strictly after the previous step and strictly before start + conversion window; the best
-- attempt completes the most steps, the earliest start winning a tie. A step's events are the
-- custom events (kind 1) with its lower-case name whose attribute passes its condition, if any
-- (funnel_step_value_matches). Pass the live profile ID (a merged-away one has no events).
-- Cost: one read of the profile's events with the funnels' names per funnel
-- (events_by_profile_time), then a single pass over them (the next candidate of each step only
-- moves forward, as attempts start later).
CREATE FUNCTION profile_funnel_progress(p_project_id uuid, p_profile_id uuid, p_as_of timestamptz)
RETURNS TABLE (funnel_id uuid, display_name text, step_number integer, event_name text,
               complete_time timestamptz)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    f record;
    n integer;
    occurrence_steps integer[];
    occurrence_times timestamptz[];
    first_of integer[];
    last_of integer[];
    next_of integer[];
    best timestamptz[];
    attempt timestamptz[];
    deadline timestamptz;
    i integer;
    k integer;
BEGIN
    FOR f IN
        SELECT u.funnel_id, u.display_name, u.steps, u.conversion_window_ms
        FROM funnels u WHERE u.project_id = p_project_id ORDER BY u.create_seq
    LOOP
        n := jsonb_array_length(f.steps);
        SELECT coalesce(array_agg(o.step ORDER BY o.step, o.event_time), '{}'),
               coalesce(array_agg(o.event_time ORDER BY o.step, o.event_time), '{}')
        INTO occurrence_steps, occurrence_times
        FROM (
            SELECT s.step::integer AS step, e.event_time
            FROM jsonb_array_elements(f.steps) WITH ORDINALITY AS s(def, step)
            JOIN events e
                ON e.project_id = p_project_id AND e.profile_id = p_profile_id
               AND e.kind = 1 AND e.name = s.def->>'event_name' AND e.event_time <= p_as_of
            WHERE jsonb_typeof(s.def->'condition') IS DISTINCT FROM 'object'
               OR funnel_step_value_matches(
                      s.def->'condition'->'attribute',
                      e.payload->'attributes'->(s.def->'condition'->'attribute'->>'name'))
        ) o;
        first_of := array_fill(0, ARRAY[n]);
        last_of := array_fill(-1, ARRAY[n]);
        FOR i IN 1..cardinality(occurrence_times) LOOP
            k := occurrence_steps[i];
            IF first_of[k] = 0 THEN
                first_of[k] := i;
            END IF;
            last_of[k] := i;
        END LOOP;
        best := '{}';
        next_of := first_of;
        IF first_of[1] > 0 THEN
            FOR i IN first_of[1]..last_of[1] LOOP
                attempt := ARRAY[occurrence_times[i]];
                deadline := occurrence_times[i] + f.conversion_window_ms * interval '1 millisecond';
                FOR k IN 2..n LOOP
                    EXIT WHEN first_of[k] = 0;
                    WHILE next_of[k] <= last_of[k]
                          AND occurrence_times[next_of[k]] <= attempt[k - 1] LOOP
                        next_of[k] := next_of[k] + 1;
                    END LOOP;
                    EXIT WHEN next_of[k] > last_of[k] OR occurrence_times[next_of[k]] >= deadline;
                    attempt := attempt || occurrence_times[next_of[k]];
                END LOOP;
                IF cardinality(attempt) > cardinality(best) THEN
                    best := attempt;
                    EXIT WHEN cardinality(best) = n;  -- starts ascend: nothing beats a full one
                END IF;
            END LOOP;
        END IF;
        RETURN QUERY
            SELECT f.funnel_id, f.display_name, s.step::integer, s.def->>'event_name',
                   best[s.step]
            FROM jsonb_array_elements(f.steps) WITH ORDINALITY AS s(def, step)
            ORDER BY s.step;
    END LOOP;
END $$;
