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
-- The distribution: an index-only scan per project and platform, split at "now".
CREATE INDEX segment_states_distribution
    ON segment_states (project_id, platform, next_transition_time) INCLUDE (segment, flag);
-- The sweep, over every project: only rows with a transition ahead.
CREATE INDEX segment_states_due ON segment_states (next_transition_time)
    WHERE next_transition_time < 'infinity';

-- READ CONTRACT (query's overview, bench): the smart segment distribution of a project, on one
-- platform (0 for all), exact as of `as_of` including transitions caused only by time passing.
-- Rows whose next transition is still ahead are counted as stored; the few whose transition
-- has passed (the sweep runs every 30 s) are classified from their stored schedule: the last
-- step at or before `as_of`. Returns one row per (segment, flag) with at least one profile;
-- profiles with no session (on that platform) are not counted.
CREATE FUNCTION segment_distribution(p_project_id uuid, p_platform smallint, p_as_of timestamptz)
RETURNS TABLE (segment smallint, flag smallint, profile_count bigint)
LANGUAGE sql STABLE AS $$
    SELECT c.segment, c.flag, count(*)
    FROM (
        SELECT s.segment, s.flag
        FROM segment_states s
        WHERE s.project_id = p_project_id AND s.platform = p_platform
          AND s.next_transition_time > p_as_of
        UNION ALL
        SELECT u.segment, u.flag
        FROM segment_states s
        CROSS JOIN LATERAL (
            SELECT x.segment, x.flag
            FROM unnest(s.upcoming_times, s.upcoming_segments, s.upcoming_flags)
                AS x(step_time, segment, flag)
            WHERE x.step_time <= p_as_of
            ORDER BY x.step_time DESC
            LIMIT 1
        ) u
        WHERE s.project_id = p_project_id AND s.platform = p_platform
          AND s.next_transition_time <= p_as_of
    ) c
    GROUP BY c.segment, c.flag
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
