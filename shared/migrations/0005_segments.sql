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
