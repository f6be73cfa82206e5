-- READ CONTRACTS (identity's ExportProfile, read in its one REPEATABLE READ snapshot): what
-- segments keeps or computes about one profile, as the export shows it to the person. The
-- export lacked all of it: the custom segments the person is in, their smart segment, their
-- engagement score and their funnel progress. Identity names these functions, never segments'
-- tables (the pattern of ingest's ingest_read_export_*, 0016).
--
-- What the export leaves out, and why: segment_sessions (segments' copy of the person's
-- sessions, from the same events as ingest's sessions, which the export holds; the engagement
-- below is what segments derives from them), segment_profiles' bookkeeping (when segments first
-- heard of the profile, merge and erasure marks; its time zone is the engagement's
-- `time_zone`), segment_states' schedule beyond the next transition and its update_time (when
-- segments last recomputed, not when the person entered the segment: segments stores no entry
-- time for smart segments), and the definitions themselves (filters, descriptions, funnel
-- steps' conditions: the project's, not the person's). The other tables hold no profile.
--
-- Each reads the profile's own rows only: a merge shows here once segments has handled it
-- (until then the merged-away profile's rows are its pre-merge state), as everywhere else
-- segments' data is read.

-- The custom segments the profile is in, as of segments' last evaluation of it (its last
-- event, or the periodic sweep for what time alone changes), with when it entered each (most
-- recently), oldest entry first.
CREATE FUNCTION segments_read_export_custom_segments(p_project uuid, p_profile uuid)
RETURNS TABLE (segment_id uuid, display_name text, enter_time timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT m.segment_id, g.display_name, m.enter_time
    FROM custom_segment_members m
    JOIN custom_segments g ON g.project_id = m.project_id AND g.segment_id = m.segment_id
    WHERE m.project_id = p_project AND m.profile_id = p_profile
    ORDER BY m.enter_time, m.segment_id
$$;

-- The profile's smart segment and flag as of `p_as_of`, over all platforms (platform 0) and on
-- each platform it has sessions on, platform 0 first, with when time alone next changes them
-- (NULL: only a new session can). The classification is segment_state_at's (0005, the
-- schedule rule custom segment filters use); the next transition is segments_read_smart_segment's
-- (0023), on every stored platform. Values are the proto numbers of profiles.common.v1.Platform,
-- SmartSegment and SmartSegmentFlag. No row: the profile has no session.
CREATE FUNCTION segments_read_export_smart_segments(
    p_project uuid, p_profile uuid, p_as_of timestamptz
)
RETURNS TABLE (platform smallint, segment smallint, flag smallint,
               next_transition_time timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT s.platform, c.state[1], c.state[2],
           coalesce((SELECT min(x.step_time) FROM unnest(s.upcoming_times) AS x(step_time)
                     WHERE x.step_time > p_as_of),
                    CASE WHEN s.next_transition_time > p_as_of
                              AND s.next_transition_time < 'infinity'
                         THEN s.next_transition_time END)
    FROM segment_states s
    CROSS JOIN LATERAL (
        SELECT segment_state_at(s.segment, s.flag, s.next_transition_time, s.upcoming_times,
                                s.upcoming_segments, s.upcoming_flags, p_as_of) AS state
    ) c
    WHERE s.project_id = p_project AND s.profile_id = p_profile
    ORDER BY s.platform
$$;

-- The profile's engagement score as of `p_as_of` (segments_read_engagement, 0023: always one
-- row, zeros without a session) with the window it covers and the time zone its calendar days
-- are counted in (the profile's, else UTC), so the export restates none of the rule.
CREATE FUNCTION segments_read_export_engagement(
    p_project uuid, p_profile uuid, p_as_of timestamptz
)
RETURNS TABLE (score float8, score1 float8, score2 integer, score3 integer,
               session_count bigint, average_session_us bigint, active_days bigint,
               time_zone text, window_start_time timestamptz, window_end_time timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT e.score, e.score1, e.score2, e.score3, e.session_count, e.average_session_us,
           e.active_days,
           coalesce((SELECT z.time_zone FROM segment_profiles z
                     WHERE z.project_id = p_project AND z.profile_id = p_profile), 'UTC'),
           p_as_of - interval '168 hours', p_as_of
    FROM segments_read_engagement(p_project, p_profile, p_as_of) e
$$;

-- The profile's progress as of `p_as_of` in the funnels it started (step 1 completed), oldest
-- funnel first, one row per step in order (complete_time NULL: not completed in the best
-- attempt): segments_read_funnel_progress's rule (0023). Funnels the person never started say
-- nothing about them and are left out.
CREATE FUNCTION segments_read_export_funnel_progress(
    p_project uuid, p_profile uuid, p_as_of timestamptz
)
RETURNS TABLE (funnel_id uuid, display_name text, step_number integer, event_name text,
               complete_time timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT f.funnel_id, f.display_name, f.step_number, f.event_name, f.complete_time
    FROM (
        SELECT p.*, bool_or(p.step_number = 1 AND p.complete_time IS NOT NULL)
                        OVER (PARTITION BY p.funnel_id) AS started
        FROM segments_read_funnel_progress(p_project, p_profile, p_as_of) WITH ORDINALITY AS p
    ) f
    WHERE f.started
    ORDER BY f.ordinality
$$;
