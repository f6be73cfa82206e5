-- Segments' read contracts: what other services may read of segments' data (query's profile
-- view, users table and overview). A reader names the contract, never the table
-- (docs/read-contracts.md). All are SQL functions the planner inlines: those without arguments
-- return a plain projection of one table (so its indexes serve the reader as before, and, unlike
-- a simple view, nothing can be written through them); the others hold a rule of segments so
-- that no reader restates it. The projections, the engagement and the smart segment are
-- PARALLEL SAFE (they only read): the planner judges a query's parallel safety before it
-- inlines functions, and an undeclared function would keep every reader's query serial.
--
-- Segments itself reads identity's and ingest's data only through their contracts
-- (identity_read_*, 0013; ingest_read_*, 0014), so its funnel progress is redefined here over
-- ingest_read_events. The functions published before under other names (segment_distribution,
-- profile_funnel_progress) stay as aliases of the contracts, for segments' own tools.

-- A profile's smart segment and flag over all platforms as of `p_as_of`, and when time alone
-- next changes them (NULL: no transition ahead), from its stored state (segment_states,
-- platform 0) and that state's schedule, so a reader sees the state as of its read without
-- waiting for the sweep: the stored values while the next transition is ahead, else the last
-- scheduled step at or before `p_as_of` (the rule of segments_read_distribution and
-- segment_state_at; model.advance in Python). Values are the proto numbers of
-- profiles.common.v1.SmartSegment / SmartSegmentFlag. No row: the profile has no session.
-- Cost: one primary-key row; a plain SQL function, so the planner inlines it, also into a
-- LATERAL join per row of a page.
CREATE FUNCTION segments_read_smart_segment(
    p_project_id uuid, p_profile_id uuid, p_as_of timestamptz
)
RETURNS TABLE (segment smallint, flag smallint, next_transition_time timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN s.next_transition_time > p_as_of THEN s.segment ELSE u.segment END,
           CASE WHEN s.next_transition_time > p_as_of THEN s.flag ELSE u.flag END,
           coalesce((SELECT min(x.step_time) FROM unnest(s.upcoming_times) AS x(step_time)
                     WHERE x.step_time > p_as_of),
                    CASE WHEN s.next_transition_time > p_as_of
                              AND s.next_transition_time < 'infinity'
                         THEN s.next_transition_time END)
    FROM segment_states s
    LEFT JOIN LATERAL (
        SELECT x.segment, x.flag
        FROM unnest(s.upcoming_times, s.upcoming_segments, s.upcoming_flags)
            AS x(step_time, segment, flag)
        WHERE x.step_time <= p_as_of
        ORDER BY x.step_time DESC
        LIMIT 1
    ) u ON true
    WHERE s.project_id = p_project_id AND s.profile_id = p_profile_id AND s.platform = 0
$$;

-- Custom segments' names (for listing a profile's memberships).
CREATE FUNCTION segments_read_custom_segments()
RETURNS TABLE (project_id uuid, segment_id uuid, display_name text)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT project_id, segment_id, display_name
    FROM custom_segments
$$;

-- Custom segment members, current as of segments' last evaluation of the profile (its last
-- event, or the periodic sweep for changes time alone makes). A row can name a merged-away or
-- erased profile until the next evaluation of it: readers join live profiles.
CREATE FUNCTION segments_read_custom_segment_members()
RETURNS TABLE (project_id uuid, segment_id uuid, profile_id uuid, enter_time timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT project_id, segment_id, profile_id, enter_time
    FROM custom_segment_members
$$;

-- The engagement score (Countly's) of a profile as of `p_as_of`: over the sessions started in
-- [as_of - 168 h, as_of], score1 = the average duration in minutes of the ended ones (an open
-- session's length is not known yet), capped at 2; score2 = their count, capped at 20; score3 =
-- the calendar days with a session start in the profile's time zone (else UTC), capped at 7;
-- score = score1 x score2 x score3, out of 280. Always one row (0 without a session).
-- The same rule as services/segments/model.py engagement(), to the last bit: the average is
-- rounded to the microsecond half to even (Python's timedelta division) and the scores are
-- float8 products in the same order; tests/integration/test_segments_engagement.py compares
-- them on random histories. Cost: the profile's sessions of the window
-- (segment_sessions_by_start) and one segment_profiles row.
CREATE FUNCTION segments_read_engagement(
    p_project_id uuid, p_profile_id uuid, p_as_of timestamptz
)
RETURNS TABLE (session_count bigint, average_session_us bigint, active_days bigint,
               score1 float8, score2 integer, score3 integer, score float8)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT a.session_count, a.average_us, a.active_days, a.score1, a.score2, a.score3,
           a.score1 * a.score2 * a.score3
    FROM (
        SELECT w.session_count, v.average_us, w.active_days,
               least(v.average_us::float8 / 1000000 / 60, 2) AS score1,
               least(w.session_count, 20)::integer AS score2,
               least(w.active_days, 7)::integer AS score3
        FROM (
            SELECT count(*) AS session_count,
                   count(*) FILTER (WHERE x.ended) AS ended_count,
                   coalesce(sum(x.duration_ms) FILTER (WHERE x.ended), 0) * 1000 AS ended_us,
                   count(DISTINCT (x.start_time AT TIME ZONE coalesce(
                       (SELECT z.time_zone FROM segment_profiles z
                        WHERE z.project_id = p_project_id AND z.profile_id = p_profile_id),
                       'UTC'))::date) AS active_days
            FROM segment_sessions x
            WHERE x.project_id = p_project_id AND x.profile_id = p_profile_id
              AND x.start_time >= p_as_of - interval '168 hours' AND x.start_time <= p_as_of
        ) w
        CROSS JOIN LATERAL (
            SELECT CASE WHEN w.ended_count = 0 THEN 0
                        ELSE div(w.ended_us, w.ended_count)
                             + CASE WHEN 2 * mod(w.ended_us, w.ended_count) > w.ended_count
                                      OR (2 * mod(w.ended_us, w.ended_count) = w.ended_count
                                          AND mod(div(w.ended_us, w.ended_count), 2) = 1)
                                    THEN 1 ELSE 0 END
                   END::bigint AS average_us
        ) v
    ) a
$$;

-- The smart segment distribution of a project on one platform (0: all) exact as of
-- `p_as_of`: one row per (segment, flag) with at least one profile; profiles with no session
-- (on that platform) are not counted. The rule and its cost are 0005's segment_distribution,
-- moved here unchanged under its published name.
CREATE FUNCTION segments_read_distribution(p_project_id uuid, p_platform smallint, p_as_of timestamptz)
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

-- The old name, for segments' own tools and tests. Dropped and created anew rather than replaced,
-- so that it is created after the contract it calls (schema.sql lists objects in creation order).
DROP FUNCTION segment_distribution(uuid, smallint, timestamptz);
CREATE FUNCTION segment_distribution(
    p_project_id uuid, p_platform smallint, p_as_of timestamptz
)
RETURNS TABLE (segment smallint, flag smallint, profile_count bigint)
LANGUAGE sql STABLE AS $$
    SELECT * FROM segments_read_distribution(p_project_id, p_platform, p_as_of)
$$;

-- A profile's progress through each of the project's funnels as of `p_as_of` (funnels in
-- creation order, one row per step in order; complete_time NULL: not completed): the profile's
-- best attempt, the same rule as services/segments/funnels.py best_attempt (a test compares
-- them on random histories). 0009's profile_funnel_progress unchanged, except that it reads
-- ingest's events through ingest_read_events() (0022); the plans are the same (the contract is
-- inlined: events_custom_by_name still serves each step).
CREATE FUNCTION segments_read_funnel_progress(
    p_project_id uuid, p_profile_id uuid, p_as_of timestamptz
)
RETURNS TABLE (funnel_id uuid, display_name text, step_number integer, event_name text,
               complete_time timestamptz)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    f record;
    n integer;
    step jsonb;
    step_times timestamptz[];
    -- Every step's occurrences, ascending, one after the other: step k's are
    -- occurrence_times[offset_of[k] + 1 .. offset_of[k] + count_of[k]].
    occurrence_times timestamptz[];
    offset_of integer[];
    count_of integer[];
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
        occurrence_times := '{}';
        offset_of := '{}';
        count_of := '{}';
        FOR k IN 1..n LOOP
            step := f.steps -> (k - 1);
            -- Two statements rather than one with an OR: a step without a condition must not
            -- touch the payload, so its read stays index-only. kind 1 is EventKind CUSTOM, a
            -- literal so that the partial index events_custom_by_name (kind = 1) matches.
            IF jsonb_typeof(step -> 'condition') IS DISTINCT FROM 'object' THEN
                step_times := ARRAY(
                    SELECT e.event_time FROM ingest_read_events() e
                    WHERE e.project_id = p_project_id AND e.profile_id = p_profile_id
                      AND e.kind = 1 AND e.name = step ->> 'event_name'
                      AND e.event_time <= p_as_of
                    ORDER BY e.event_time);
            ELSE
                step_times := ARRAY(
                    SELECT e.event_time FROM ingest_read_events() e
                    WHERE e.project_id = p_project_id AND e.profile_id = p_profile_id
                      AND e.kind = 1 AND e.name = step ->> 'event_name'
                      AND e.event_time <= p_as_of
                      AND funnel_step_value_matches(
                          step -> 'condition' -> 'attribute',
                          e.payload -> 'attributes'
                              -> (step -> 'condition' -> 'attribute' ->> 'name'))
                    ORDER BY e.event_time);
            END IF;
            offset_of := offset_of || cardinality(occurrence_times);
            count_of := count_of || cardinality(step_times);
            occurrence_times := occurrence_times || step_times;
            EXIT WHEN cardinality(step_times) = 0;
        END LOOP;
        best := '{}';
        IF count_of[1] > 0 THEN
            next_of := array_fill(1, ARRAY[n]);
            FOR i IN 1..count_of[1] LOOP
                attempt := ARRAY[occurrence_times[i]];
                deadline := occurrence_times[i] + f.conversion_window_ms * interval '1 millisecond';
                FOR k IN 2..n LOOP
                    EXIT WHEN k > cardinality(count_of) OR count_of[k] = 0;
                    WHILE next_of[k] <= count_of[k]
                          AND occurrence_times[offset_of[k] + next_of[k]] <= attempt[k - 1] LOOP
                        next_of[k] := next_of[k] + 1;
                    END LOOP;
                    EXIT WHEN next_of[k] > count_of[k]
                           OR occurrence_times[offset_of[k] + next_of[k]] >= deadline;
                    attempt := attempt || occurrence_times[offset_of[k] + next_of[k]];
                END LOOP;
                IF cardinality(attempt) > cardinality(best) THEN
                    best := attempt;
                    EXIT WHEN cardinality(best) = n;  -- starts ascend: nothing beats a full one
                END IF;
            END LOOP;
        END IF;
        RETURN QUERY
            SELECT f.funnel_id, f.display_name, s.step::integer, s.def ->> 'event_name',
                   best[s.step]
            FROM jsonb_array_elements(f.steps) WITH ORDINALITY AS s(def, step)
            ORDER BY s.step;
    END LOOP;
END $$;

-- The old name, for segments' own tools and tests (dropped and created anew, as above).
DROP FUNCTION profile_funnel_progress(uuid, uuid, timestamptz);
CREATE FUNCTION profile_funnel_progress(
    p_project_id uuid, p_profile_id uuid, p_as_of timestamptz
)
RETURNS TABLE (funnel_id uuid, display_name text, step_number integer, event_name text,
               complete_time timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT * FROM segments_read_funnel_progress(p_project_id, p_profile_id, p_as_of)
$$;
