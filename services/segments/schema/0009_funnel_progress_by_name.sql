-- Funnel progress in the profile view reads only the funnels' step events, each step's already
-- in time order, instead of every event of the profile sorted twice.
--
-- 0005's profile_funnel_progress() joined the profile's events (events_by_profile_time, every
-- kind and name) to the steps, then sorted the matches into two arrays by (step, time) and
-- walked them once more in PL/pgSQL to find where each step starts. On a profile of 200,000
-- events with two funnels that took about 390 ms, nearly all of it sorting and per-row work,
-- not reading.
--
-- events_custom_by_name holds each custom event's name and time: a step without a condition
-- reads its occurrences as an index-only scan, already ascending; a step with a condition
-- reads the same range and fetches only those rows' payloads. The same profile now takes about
-- 30 ms. The cost still grows with the occurrences of the step names (a funnel over the most
-- frequent event of a heavy profile reads all of them), but no longer with the rest.
--
-- Creating the index holds a write lock on events for the time it takes (this migration runs
-- in a transaction, so not CONCURRENTLY); on a large existing table, create it CONCURRENTLY by
-- hand first under this name and the IF NOT EXISTS below skips it.
CREATE INDEX IF NOT EXISTS events_custom_by_name
    ON events (project_id, profile_id, name, event_time) WHERE kind = 1;

-- READ CONTRACT (query's profile view): unchanged from 0005, see there for the rule (the same
-- as model.best_attempt; a test compares them on random histories). Only the cost differs: one
-- ordered read per step (events_custom_by_name), stopping at the first step the profile never
-- did (no later step can be reached), then the same single forward walk over the starts, each
-- later step's next candidate only moving forward.
CREATE OR REPLACE FUNCTION profile_funnel_progress(
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
            -- touch the payload, so its read stays index-only.
            IF jsonb_typeof(step -> 'condition') IS DISTINCT FROM 'object' THEN
                step_times := ARRAY(
                    SELECT e.event_time FROM events e
                    WHERE e.project_id = p_project_id AND e.profile_id = p_profile_id
                      AND e.kind = 1 AND e.name = step ->> 'event_name'
                      AND e.event_time <= p_as_of
                    ORDER BY e.event_time);
            ELSE
                step_times := ARRAY(
                    SELECT e.event_time FROM events e
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
