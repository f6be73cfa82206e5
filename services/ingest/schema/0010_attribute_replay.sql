-- Attribute state as the exact replay of every operation in event-time order (issue 22).
--
-- The rule: per profile and attribute, the state is the replay of every attribute operation
-- that ever reached the profile, in replay order, whatever the arrival order and the merges.
-- Replay order is (event_time, event_id, origin, position): event time first; between events
-- of the same time, the event ID, then the origin ('c:' || custom ID or 'i:' || installation
-- ID: an event is unique per origin and event ID); within one event, the order in which it
-- lists its operations (position). Text compares byte-wise (COLLATE "C"), whatever the
-- database's collation, so the order is the same everywhere.
-- At its point of the replay: a set gives the value; an unset removes it; a set-once gives the
-- value only when the attribute is absent (so again after an unset), else it is skipped;
-- increment adds to the number (0 when absent or not a number); append and remove act on the
-- list as it stands (a string counts as a one-item list, absent or another type as empty; a
-- list keeps its latest 25 items). update_time is the event time of the last operation applied
-- (a skipped set-once applies nothing). Consent follows the same order: the latest change by
-- (event_time, event_id, origin) wins.
--
-- Operations are kept, not folded away: the state is exact for histories of any length, and
-- a merge moves one profile's operations to the other and replays the attributes they touch.

-- Every accepted attribute operation, one row each (the event's own row in `events` holds the
-- same operations in its payload; this is their replay order and typed value). value is
-- {"type", "value"} as in profile_attributes; NULL for unset. The primary key is the replay
-- order per attribute. state/state_time is the attribute's value (NULL when absent) and
-- update_time just after this operation in the replay, so a late operation is replayed from
-- the state of the one before it: the cost is the operations after it (a few, as clients
-- reorder within minutes), not the history's length. NULL on a row not replayed yet.
CREATE TABLE attribute_operations (
    project_id uuid NOT NULL,
    profile_id uuid NOT NULL,
    native boolean NOT NULL,
    name text NOT NULL,
    event_time timestamptz NOT NULL,
    event_id text COLLATE "C" NOT NULL,
    origin text COLLATE "C" NOT NULL,
    position smallint NOT NULL,
    kind text NOT NULL
        CHECK (kind IN ('set', 'set_once', 'unset', 'increment', 'append', 'remove')),
    value jsonb,
    state jsonb,
    state_time timestamptz,
    PRIMARY KEY (project_id, profile_id, native, name, event_time, event_id, origin, position)
);

-- profile_attributes stays the folded current state that query, segments and identity's export
-- read (value, value_type, update_time; value NULL when absent): the state after the last
-- operation of the replay.

-- The one place the fold rule is written (profiles_ingest_apply is its step). Brings one
-- attribute up to date after operations were added to its log, the earliest of them at
-- (s_time, s_event_id, s_origin, s_position): from the state just before that point, replays
-- every operation from it on, recording each one's state, and stores the last as the
-- attribute's. Callers hold the profile's lock (ingest's version bump, identity's merge).
CREATE FUNCTION profiles_ingest_fold_attribute(
    p_project uuid, p_profile uuid, p_native boolean, p_name text,
    s_time timestamptz, s_event_id text, s_origin text, s_position smallint
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    since_event text COLLATE "C" := s_event_id;
    since_origin text COLLATE "C" := s_origin;
    op attribute_operations%ROWTYPE;
    state_value jsonb;  -- NULL while the attribute is absent
    changed timestamptz;
    applied jsonb;
BEGIN
    SELECT a.state, a.state_time INTO state_value, changed FROM attribute_operations a
    WHERE a.project_id = p_project AND a.profile_id = p_profile AND a.native = p_native
        AND a.name = p_name
        AND (a.event_time, a.event_id, a.origin, a.position)
            < (s_time, since_event, since_origin, s_position)
    ORDER BY a.event_time DESC, a.event_id DESC, a.origin DESC, a.position DESC
    LIMIT 1;
    FOR op IN
        SELECT * FROM attribute_operations a
        WHERE a.project_id = p_project AND a.profile_id = p_profile AND a.native = p_native
            AND a.name = p_name
            AND (a.event_time, a.event_id, a.origin, a.position)
                >= (s_time, since_event, since_origin, s_position)
        ORDER BY a.event_time, a.event_id, a.origin, a.position
    LOOP
        applied := profiles_ingest_apply(state_value, op);
        -- A set-once that finds a value applies nothing: the value keeps its time.
        IF NOT (op.kind = 'set_once' AND state_value IS NOT NULL) THEN
            changed := op.event_time;
        END IF;
        state_value := applied;
        IF op.state IS DISTINCT FROM state_value OR op.state_time IS DISTINCT FROM changed THEN
            UPDATE attribute_operations a SET state = state_value, state_time = changed
            WHERE a.project_id = p_project AND a.profile_id = p_profile
                AND a.native = p_native AND a.name = p_name AND a.event_time = op.event_time
                AND a.event_id = op.event_id AND a.origin = op.origin
                AND a.position = op.position;
        END IF;
    END LOOP;
    IF changed IS NULL THEN
        RETURN;  -- no operation at all: nothing to store
    END IF;
    INSERT INTO profile_attributes (project_id, profile_id, native, name, value, value_type,
                                    update_time)
    VALUES (p_project, p_profile, p_native, p_name, state_value, state_value->>'type', changed)
    ON CONFLICT (project_id, profile_id, native, name) DO UPDATE SET
        value = EXCLUDED.value, value_type = EXCLUDED.value_type,
        update_time = EXCLUDED.update_time;
END $$;

-- One step of the replay: the value (NULL when absent) after `op` applies to `state_value`.
CREATE FUNCTION profiles_ingest_apply(state_value jsonb, op attribute_operations)
RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    items jsonb;
    operand jsonb;
    total integer;
BEGIN
    IF op.kind = 'set' THEN
        RETURN op.value;
    ELSIF op.kind = 'unset' THEN
        RETURN NULL;
    ELSIF op.kind = 'set_once' THEN
        RETURN coalesce(state_value, op.value);
    ELSIF op.kind = 'increment' THEN
        RETURN jsonb_build_object('type', 'number', 'value',
            CASE WHEN state_value->>'type' = 'number'
                 THEN (state_value->>'value')::float8 ELSE 0 END
            + (op.value->>'value')::float8);
    END IF;
    items := CASE state_value->>'type'
        WHEN 'string_list' THEN state_value->'value'
        WHEN 'string' THEN jsonb_build_array(state_value->'value')
        ELSE '[]'::jsonb END;
    operand := CASE op.value->>'type'
        WHEN 'string_list' THEN op.value->'value'
        ELSE jsonb_build_array(op.value->'value') END;
    IF op.kind = 'append' THEN
        -- A list keeps its latest 25 items: the oldest make room for the new.
        items := items || operand;
        total := jsonb_array_length(items);
        IF total > 25 THEN
            SELECT jsonb_agg(x ORDER BY n) INTO items
            FROM jsonb_array_elements(items) WITH ORDINALITY AS t(x, n) WHERE n > total - 25;
        END IF;
    ELSE
        SELECT coalesce(jsonb_agg(x ORDER BY n), '[]'::jsonb) INTO items
        FROM jsonb_array_elements(items) WITH ORDINALITY AS t(x, n)
        WHERE NOT operand @> jsonb_build_array(x);
    END IF;
    RETURN jsonb_build_object('type', 'string_list', 'value', items);
END $$;

-- Backfill: each stored attribute becomes the operations its state was made of (its base as a
-- set, set-once or unset at base_time, then its pending operations in order), so the replay
-- gives the stored value back. Their origin names the profile they were stored on, unique
-- should a merge bring two backfilled histories together; event ID '' sorts before any real
-- event at the same time.
INSERT INTO attribute_operations (project_id, profile_id, native, name, event_time, event_id,
                                  origin, position, kind, value)
SELECT a.project_id, a.profile_id, a.native, a.name, a.base_time, '',
       'backfill:' || a.profile_id::text, 0,
       CASE WHEN a.base IS NULL THEN 'unset' WHEN a.set_once THEN 'set_once' ELSE 'set' END,
       a.base
FROM profile_attributes a
WHERE a.base_time > '1800-01-01 00:00:00+00'
UNION ALL
SELECT a.project_id, a.profile_id, a.native, a.name, (p->>'time')::timestamptz, '',
       'backfill:' || a.profile_id::text, n::smallint, p->>'kind',
       CASE WHEN p->>'kind' = 'increment'
            THEN jsonb_build_object('type', 'number', 'value', p->'operand')
            ELSE jsonb_build_object('type', 'string_list', 'value', p->'operand') END
FROM profile_attributes a
CROSS JOIN LATERAL jsonb_array_elements(a.pending) WITH ORDINALITY AS q(p, n);

ALTER TABLE profile_attributes
    DROP COLUMN base,
    DROP COLUMN base_time,
    DROP COLUMN set_once,
    DROP COLUMN pending;

-- Then every backfilled attribute is replayed from its first operation.
SELECT profiles_ingest_fold_attribute(f.project_id, f.profile_id, f.native, f.name,
                                      f.event_time, f.event_id, f.origin, f.position)
FROM (
    SELECT DISTINCT ON (project_id, profile_id, native, name) *
    FROM attribute_operations
    ORDER BY project_id, profile_id, native, name, event_time, event_id, origin, position
) f;

DROP FUNCTION profiles_ingest_replay(jsonb, jsonb);
DROP FUNCTION profiles_ingest_source_base_wins(jsonb, timestamptz, boolean, jsonb, timestamptz,
                                               boolean);

-- Merge: the source's operations move to the target, and every attribute they touch is
-- replayed from the earliest of them, so the merged state is the replay of both histories.
-- Identity calls this and profiles_merge_profile_attributes (below) in one transaction, in
-- either order; each does its part whatever the other has done.
CREATE FUNCTION profiles_merge_attribute_operations(p_project uuid, p_source uuid,
                                                    p_target uuid)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    starts attribute_operations[];
    s attribute_operations;
BEGIN
    SELECT coalesce(array_agg(f ORDER BY f.native, f.name), '{}') INTO starts
    FROM (
        SELECT DISTINCT ON (native, name) *
        FROM attribute_operations
        WHERE project_id = p_project AND profile_id = p_source
        ORDER BY native, name, event_time, event_id, origin, position
    ) f;
    UPDATE attribute_operations SET profile_id = p_target
    WHERE project_id = p_project AND profile_id = p_source;
    FOREACH s IN ARRAY starts LOOP
        PERFORM profiles_ingest_fold_attribute(p_project, p_target, s.native, s.name,
                                               s.event_time, s.event_id, s.origin, s.position);
    END LOOP;
END $$;

-- The target's attribute state is replayed from the operations (above); the source's folded
-- rows are dropped. No attribute is dropped from the target: the merged profile may hold over
-- 50 custom attributes, and ingest then refuses only operations that would add new ones.
CREATE OR REPLACE FUNCTION profiles_merge_profile_attributes(p_project uuid, p_source uuid,
                                                             p_target uuid)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM profile_attributes WHERE project_id = p_project AND profile_id = p_source;
END $$;

-- Consent follows the same replay order: the change that set the current state is kept with
-- its event ID and origin, and a change replaces it only when later by (change_time,
-- change_event_id, change_origin). Changes stored before this migration have '' for both, so
-- a new change at the same time wins over them.
ALTER TABLE profile_subscriptions
    ADD COLUMN change_event_id text COLLATE "C" NOT NULL DEFAULT '',
    ADD COLUMN change_origin text COLLATE "C" NOT NULL DEFAULT '';

CREATE OR REPLACE FUNCTION profiles_merge_profile_subscriptions(p_project uuid, p_source uuid,
                                                                p_target uuid)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO profile_subscriptions AS t (project_id, profile_id, channel, kind, subscribed,
                                            change_time, change_event_id, change_origin)
    SELECT project_id, p_target, channel, kind, subscribed, change_time, change_event_id,
           change_origin
    FROM profile_subscriptions
    WHERE project_id = p_project AND profile_id = p_source
    ORDER BY channel, kind
    ON CONFLICT (project_id, profile_id, channel, kind) DO UPDATE SET
        subscribed = EXCLUDED.subscribed, change_time = EXCLUDED.change_time,
        change_event_id = EXCLUDED.change_event_id, change_origin = EXCLUDED.change_origin
    WHERE (t.change_time, t.change_event_id, t.change_origin)
        < (EXCLUDED.change_time, EXCLUDED.change_event_id, EXCLUDED.change_origin);
    DELETE FROM profile_subscriptions WHERE project_id = p_project AND profile_id = p_source;
END $$;
