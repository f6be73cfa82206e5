-- An increment whose result would not be a finite double (two increments of 1.5e308, say) made
-- PostgreSQL raise "value out of range" in the replay, which failed the whole batch, and every
-- later batch touching that attribute: one client's numbers blocked everyone's events. Such an
-- increment now applies nothing, like a set-once that finds a value: the value and its time
-- stay. The bound is checked in numeric, a little inside the double's range (1.79e308 against
-- 1.7976931348623157e308), so that the float8 sum profiles_ingest_apply makes below it never
-- overflows, and is the same float8 sum as before (numeric would round differently).

-- Whether `op` applies to the value it finds (NULL when absent): a set-once that finds a value,
-- and an increment that would leave the double's range, apply nothing.
CREATE FUNCTION profiles_ingest_applies(state_value jsonb, op attribute_operations)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE op.kind
        WHEN 'set_once' THEN state_value IS NULL
        WHEN 'increment' THEN abs(
            CASE WHEN state_value->>'type' = 'number'
                 THEN (state_value->>'value')::float8::numeric ELSE 0 END
            + (op.value->>'value')::numeric) < 1.79e308
        ELSE true
    END
$$;

-- One step of the replay: the state after `op`, from `state` (NULL before the first step,
-- which starts from start_value and start_time).
CREATE OR REPLACE FUNCTION profiles_ingest_replay_step(
    state profiles_ingest_replay_state, start_value jsonb, start_time timestamptz,
    op attribute_operations
) RETURNS profiles_ingest_replay_state LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    value jsonb := CASE WHEN state.started THEN state.value ELSE start_value END;
    changed timestamptz := CASE WHEN state.started THEN state.changed ELSE start_time END;
BEGIN
    -- An operation that applies nothing leaves the value with its time.
    IF NOT profiles_ingest_applies(value, op) THEN
        RETURN ROW(true, value, changed)::profiles_ingest_replay_state;
    END IF;
    RETURN ROW(true, profiles_ingest_apply(value, op), op.event_time)::profiles_ingest_replay_state;
END $$;
