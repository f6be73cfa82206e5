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

-- The members of each custom segment as of its last evaluation: the evaluation worker diffs the
-- filter's live result against these rows and announces the difference (ENTERED/LEFT). Filled
-- silently at creation (creating a segment announces nothing); deleted with the segment.
CREATE TABLE custom_segment_members (
    project_id uuid NOT NULL,
    segment_id uuid NOT NULL,
    profile_id uuid NOT NULL,
    PRIMARY KEY (project_id, segment_id, profile_id)
);

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
