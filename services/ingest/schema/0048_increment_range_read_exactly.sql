-- 0041's range check of an increment, on the stored number as stored. It read the value through
-- float8 into numeric, and PostgreSQL's float8-to-numeric cast keeps 15 significant digits: a
-- stored 1.789999999999996e308 read as 1.79e308, so every increment of it was refused, and a
-- stored 1.7900000000000004e308 read as 1.79e308 too, so an increment leaving it past the bound
-- applied (found by a hunt against a model of the rule). The jsonb number holds the value's
-- shortest exact spelling; cast to numeric directly, it is checked as it is. The float8 sum
-- profiles_ingest_apply makes is unchanged.
CREATE OR REPLACE FUNCTION profiles_ingest_applies(state_value jsonb, op attribute_operations)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE op.kind
        WHEN 'set_once' THEN state_value IS NULL
        WHEN 'increment' THEN abs(
            CASE WHEN state_value->>'type' = 'number'
                 THEN (state_value->>'value')::numeric ELSE 0 END
            + (op.value->>'value')::numeric) < 1.79e308
        ELSE true
    END
$$;
