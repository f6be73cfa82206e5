-- The attribute replay of a batch in one statement (issue 19's breakdown: the attribute fold
-- line, 8.2 ms a batch of 500 with about 100 touched attributes). The replay was a loop of a
-- plpgsql function per touched attribute, each running a statement for the state before its
-- earliest new operation, one over its operations from there, one update per operation whose
-- state changed and one upsert of the attribute: some 400 statements a batch, mostly the cost
-- of starting each. The rule is unchanged (0010: operations in the order (event time, event
-- ID, origin, position), profiles_ingest_apply for each step, a set-once that finds a value
-- keeps the value's time) and is now written once, as the step of an aggregate that a window
-- runs over each attribute's operations; the single-attribute function that merges call is
-- that same statement for one attribute.

-- Where the replay of one attribute stands: `started` once it has its starting point (the
-- state before the first operation replayed, which may be absent: value NULL).
CREATE TYPE profiles_ingest_replay_state AS (started boolean, value jsonb, changed timestamptz);

-- One step of the replay: the state after `op`, from `state` (NULL before the first step,
-- which starts from start_value and start_time).
CREATE FUNCTION profiles_ingest_replay_step(
    state profiles_ingest_replay_state, start_value jsonb, start_time timestamptz,
    op attribute_operations
) RETURNS profiles_ingest_replay_state LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    value jsonb := CASE WHEN state.started THEN state.value ELSE start_value END;
    changed timestamptz := CASE WHEN state.started THEN state.changed ELSE start_time END;
BEGIN
    -- A set-once that finds a value applies nothing: the value keeps its time.
    IF NOT (op.kind = 'set_once' AND value IS NOT NULL) THEN
        changed := op.event_time;
    END IF;
    RETURN ROW(true, profiles_ingest_apply(value, op), changed)::profiles_ingest_replay_state;
END $$;

-- The replay of an attribute's operations in their order from a starting state:
-- profiles_ingest_replay(start_value, start_time, operation) OVER (... ORDER BY the
-- operations' order ROWS UNBOUNDED PRECEDING) is the state after each operation.
CREATE AGGREGATE profiles_ingest_replay(jsonb, timestamptz, attribute_operations) (
    SFUNC = profiles_ingest_replay_step,
    STYPE = profiles_ingest_replay_state
);

-- Replays each given attribute (profile, native, name) from the given operation (its earliest
-- new one) on: every operation from there gets the state after it, and the attribute its
-- final state. The attributes' profiles must be locked by the caller (a batch's or a merge's
-- profile locks), so no one else changes their operations meanwhile. Each attribute once.
CREATE FUNCTION profiles_ingest_fold_attributes(
    p_project uuid, f_profiles uuid[], f_natives boolean[], f_names text[],
    f_times timestamptz[], f_event_ids text[], f_origins text[], f_positions smallint[]
) RETURNS void LANGUAGE sql AS $$
    WITH since AS (
        SELECT * FROM unnest(f_profiles, f_natives, f_names, f_times, f_event_ids, f_origins,
                             f_positions)
             AS s(profile_id, native, name, event_time, event_id, origin, position)
    ),
    replayed AS (
        SELECT a.row_id, a.profile_id, a.native, a.name, a.event_time, a.event_id,
               a.origin, a.position, a.state, a.state_time,
               profiles_ingest_replay(before.state, before.state_time, a.operation) OVER (
                   PARTITION BY a.profile_id, a.native, a.name
                   ORDER BY a.event_time, a.event_id, a.origin, a.position
                   ROWS UNBOUNDED PRECEDING) AS after
        FROM since s
        -- The state before the replay's first operation: the one its predecessor holds.
        LEFT JOIN LATERAL (
            SELECT b.state, b.state_time FROM attribute_operations b
            WHERE b.project_id = p_project AND b.profile_id = s.profile_id
                AND b.native = s.native AND b.name = s.name
                AND (b.event_time, b.event_id, b.origin, b.position)
                    < (s.event_time, s.event_id COLLATE "C", s.origin COLLATE "C", s.position)
            ORDER BY b.event_time DESC, b.event_id DESC, b.origin DESC, b.position DESC
            LIMIT 1
        ) before ON true
        -- The operations replayed, by the primary key, attribute by attribute (OFFSET 0 keeps
        -- the planner from flattening this into a join, which with the statistics of a young
        -- table it planned as a hash of all the project's operations: the plan of a SQL
        -- function is kept, and that one grew with the table).
        CROSS JOIN LATERAL (
            SELECT o.ctid AS row_id, o AS operation, o.profile_id, o.native, o.name,
                   o.event_time, o.event_id, o.origin, o.position, o.state, o.state_time
            FROM attribute_operations o
            WHERE o.project_id = p_project AND o.profile_id = s.profile_id
                AND o.native = s.native AND o.name = s.name
                AND (o.event_time, o.event_id, o.origin, o.position)
                    >= (s.event_time, s.event_id COLLATE "C", s.origin COLLATE "C", s.position)
            OFFSET 0
        ) a
    ),
    restated AS (
        UPDATE attribute_operations a
        SET state = (r.after).value, state_time = (r.after).changed
        FROM replayed r
        -- The rows just read (the caller's profile locks keep them where they are): by their
        -- address, which no statistics can turn into a scan of the project's operations.
        WHERE a.ctid = r.row_id
            AND (r.state IS DISTINCT FROM (r.after).value
                 OR r.state_time IS DISTINCT FROM (r.after).changed)
    )
    INSERT INTO profile_attributes (project_id, profile_id, native, name, value, value_type,
                                    update_time)
    SELECT DISTINCT ON (r.profile_id, r.native, r.name)
           p_project, r.profile_id, r.native, r.name, (r.after).value,
           (r.after).value->>'type', (r.after).changed
    FROM replayed r
    ORDER BY r.profile_id, r.native, r.name, r.event_time DESC, r.event_id DESC,
             r.origin DESC, r.position DESC
    ON CONFLICT (project_id, profile_id, native, name) DO UPDATE SET
        value = EXCLUDED.value, value_type = EXCLUDED.value_type,
        update_time = EXCLUDED.update_time
$$;

-- One attribute (merges replay each attribute the source's operations touch): the same
-- statement. (plpgsql: its body may name a function created after it, as in a schema file.)
CREATE OR REPLACE FUNCTION profiles_ingest_fold_attribute(
    p_project uuid, p_profile uuid, p_native boolean, p_name text, s_time timestamptz,
    s_event_id text, s_origin text, s_position smallint
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM profiles_ingest_fold_attributes(p_project, ARRAY[p_profile], ARRAY[p_native],
                                            ARRAY[p_name], ARRAY[s_time], ARRAY[s_event_id],
                                            ARRAY[s_origin], ARRAY[s_position]);
END $$;

-- 0030's function, with the replay above for the batch's touched attributes.
CREATE OR REPLACE FUNCTION profiles_ingest_apply_batch_state(
    p_project uuid,
    -- attribute operations: profile, native, name, event time, event ID, origin, position,
    -- kind, value
    o_profiles uuid[], o_natives boolean[], o_names text[], o_times timestamptz[],
    o_event_ids text[], o_origins text[], o_positions smallint[], o_kinds text[],
    o_values jsonb[],
    p_refused_event_seqs bigint[],
    -- consent changes: profile, channel, kind, subscribed, time, event ID, origin
    s_profiles uuid[], s_channels text[], s_kinds text[], s_subscribed boolean[],
    s_times timestamptz[], s_event_ids text[], s_origins text[],
    -- installation events: installation, event time, platform, the fields it sets
    i_installations text[], i_times timestamptz[], i_platforms smallint[], i_changes jsonb[],
    p_session_starters text[],
    -- session events: installation, session, profile, platform, kind, time, duration, country
    e_installations text[], e_sessions text[], e_profiles uuid[], e_platforms smallint[],
    e_kinds smallint[], e_times timestamptz[], e_durations interval[], e_countries text[]
) RETURNS TABLE (what text, installation_id text, session_id text, country text,
                 imported_installation_id text)
LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(o_profiles) > 0 THEN
        INSERT INTO attribute_operations (project_id, profile_id, native, name, event_time,
                                          event_id, origin, position, kind, value)
        SELECT p_project, o.*
        FROM unnest(o_profiles, o_natives, o_names, o_times, o_event_ids, o_origins,
                    o_positions, o_kinds, o_values) AS o;
        -- Every touched attribute replayed from its earliest operation of the batch, in one
        -- statement for the batch.
        PERFORM profiles_ingest_fold_attributes(
            p_project, array_agg(f.profile_id), array_agg(f.native), array_agg(f.name),
            array_agg(f.event_time), array_agg(f.event_id), array_agg(f.origin),
            array_agg(f.position))
        FROM (
            SELECT DISTINCT ON (o.profile_id, o.native, o.name) o.*
            FROM unnest(o_profiles, o_natives, o_names, o_times, o_event_ids, o_origins,
                        o_positions)
                 AS o(profile_id, native, name, event_time, event_id, origin, position)
            ORDER BY o.profile_id, o.native, o.name, o.event_time, o.event_id COLLATE "C",
                     o.origin COLLATE "C", o.position
        ) f;
    END IF;

    IF cardinality(p_refused_event_seqs) > 0 THEN
        DELETE FROM events e
        WHERE e.project_id = p_project AND e.event_seq = ANY(p_refused_event_seqs);
    END IF;

    IF cardinality(s_profiles) > 0 THEN
        INSERT INTO profile_subscriptions AS t (project_id, profile_id, channel, kind,
                                                subscribed, change_time, change_event_id,
                                                change_origin)
        SELECT DISTINCT ON (s.profile_id, s.channel, s.kind) p_project, s.*
        FROM unnest(s_profiles, s_channels, s_kinds, s_subscribed, s_times, s_event_ids,
                    s_origins)
             AS s(profile_id, channel, kind, subscribed, change_time, change_event_id,
                  change_origin)
        ORDER BY s.profile_id, s.channel, s.kind, s.change_time DESC,
                 s.change_event_id COLLATE "C" DESC, s.change_origin COLLATE "C" DESC
        ON CONFLICT ON CONSTRAINT profile_subscriptions_pkey DO UPDATE SET
            subscribed = EXCLUDED.subscribed, change_time = EXCLUDED.change_time,
            change_event_id = EXCLUDED.change_event_id, change_origin = EXCLUDED.change_origin
        WHERE (t.change_time, t.change_event_id, t.change_origin)
            < (EXCLUDED.change_time, EXCLUDED.change_event_id, EXCLUDED.change_origin);
    END IF;

    IF cardinality(i_installations) > 0 THEN
        RETURN QUERY
        WITH batch AS (
            SELECT c.installation_id, c.event_time, c.ord,
                   coalesce((c.changes->>'platform')::smallint, c.platform) AS platform,
                   c.changes - 'platform' AS changes
            FROM unnest(i_installations, i_times, i_platforms, i_changes)
                 WITH ORDINALITY AS c(installation_id, event_time, platform, changes, ord)
        ),
        -- Every event carries its platform: the latest event's, with the installation's span,
        -- in one sort of the batch (no JSON for the 87% of events that change nothing else).
        seen AS (
            SELECT DISTINCT ON (b.installation_id) b.installation_id, b.platform,
                   b.event_time AS platform_time,
                   min(b.event_time) OVER w AS first_seen, max(b.event_time) OVER w AS last_seen
            FROM batch b
            WINDOW w AS (PARTITION BY b.installation_id ORDER BY b.event_time DESC, b.ord DESC
                         ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
            ORDER BY b.installation_id, b.event_time DESC, b.ord DESC
        ),
        -- The other fields, from the events that set them: the latest event's value per field.
        latest AS (
            SELECT DISTINCT ON (b.installation_id, f.key) b.installation_id, f.key, f.value,
                   b.event_time
            FROM batch b CROSS JOIN LATERAL jsonb_each(b.changes) AS f
            WHERE b.changes IS NOT NULL AND b.changes <> '{}'
            ORDER BY b.installation_id, f.key, b.event_time DESC, b.ord DESC
        ),
        changed AS (
            SELECT l.installation_id, jsonb_object_agg(l.key, l.value) AS v,
                   jsonb_object_agg(l.key, l.event_time) AS times
            FROM latest l
            GROUP BY l.installation_id
        ),
        merged AS (
            SELECT s.installation_id,
                   jsonb_build_object('platform', s.platform) || coalesce(c.v, '{}') AS v,
                   jsonb_build_object('platform', s.platform_time) || coalesce(c.times, '{}')
                       AS times,
                   s.first_seen, s.last_seen
            FROM seen s LEFT JOIN changed c USING (installation_id)
        ),
        upserted AS (
            INSERT INTO installation_details AS d (project_id, installation_id, platform,
                app_version, os_version, device_model, push_token, push_opt_in, language,
                timezone, uninstalled, field_times, first_seen, last_seen)
            SELECT p_project, m.installation_id, (m.v->>'platform')::smallint,
                   m.v->>'app_version', m.v->>'os_version', m.v->>'device_model',
                   m.v->>'push_token', (m.v->>'push_opt_in')::boolean, m.v->>'language',
                   m.v->>'timezone', coalesce((m.v->>'uninstalled')::boolean, false), m.times,
                   m.first_seen, m.last_seen
            FROM merged m
            ORDER BY m.installation_id
            ON CONFLICT ON CONSTRAINT installation_details_pkey DO UPDATE SET
                platform = CASE WHEN profiles_ingest_field_wins(EXCLUDED.field_times,
                    d.field_times, 'platform') THEN EXCLUDED.platform ELSE d.platform END,
                app_version = CASE WHEN profiles_ingest_field_wins(EXCLUDED.field_times,
                    d.field_times, 'app_version') THEN EXCLUDED.app_version
                    ELSE d.app_version END,
                os_version = CASE WHEN profiles_ingest_field_wins(EXCLUDED.field_times,
                    d.field_times, 'os_version') THEN EXCLUDED.os_version
                    ELSE d.os_version END,
                device_model = CASE WHEN profiles_ingest_field_wins(EXCLUDED.field_times,
                    d.field_times, 'device_model') THEN EXCLUDED.device_model
                    ELSE d.device_model END,
                push_token = CASE WHEN profiles_ingest_field_wins(EXCLUDED.field_times,
                    d.field_times, 'push_token') THEN EXCLUDED.push_token
                    ELSE d.push_token END,
                push_opt_in = CASE WHEN profiles_ingest_field_wins(EXCLUDED.field_times,
                    d.field_times, 'push_opt_in') THEN EXCLUDED.push_opt_in
                    ELSE d.push_opt_in END,
                language = CASE WHEN profiles_ingest_field_wins(EXCLUDED.field_times,
                    d.field_times, 'language') THEN EXCLUDED.language ELSE d.language END,
                timezone = CASE WHEN profiles_ingest_field_wins(EXCLUDED.field_times,
                    d.field_times, 'timezone') THEN EXCLUDED.timezone ELSE d.timezone END,
                uninstalled = CASE WHEN profiles_ingest_field_wins(EXCLUDED.field_times,
                    d.field_times, 'uninstalled') THEN EXCLUDED.uninstalled
                    ELSE d.uninstalled END,
                field_times = CASE
                    WHEN EXCLUDED.field_times - 'platform' <> '{}'
                        THEN profiles_ingest_field_times(EXCLUDED.field_times, d.field_times)
                    WHEN profiles_ingest_field_wins(EXCLUDED.field_times, d.field_times,
                                                    'platform')
                        THEN d.field_times || EXCLUDED.field_times
                    ELSE d.field_times END,
                first_seen = least(d.first_seen, EXCLUDED.first_seen),
                last_seen = greatest(d.last_seen, EXCLUDED.last_seen)
            -- A row the batch does not change is not written (a late event inside the span
            -- seen, carrying only an older platform): only what follows would change it. The
            -- batch's session starters always are (their events set `uninstalled`), so the
            -- reintegration check below sees each of them.
            WHERE EXCLUDED.first_seen < d.first_seen OR EXCLUDED.last_seen > d.last_seen
                OR EXCLUDED.field_times - 'platform' <> '{}'
                OR profiles_ingest_field_wins(EXCLUDED.field_times, d.field_times, 'platform')
            RETURNING d.installation_id, d.platform, d.push_token
        )
        SELECT 'reintegration', u.installation_id, NULL::text, NULL::text, t.installation_id
        FROM upserted u
        JOIN installation_details t
            ON t.project_id = p_project AND t.platform = u.platform
               AND t.push_token = u.push_token AND t.imported
               AND t.installation_id <> u.installation_id
        WHERE u.installation_id = ANY(p_session_starters) AND u.push_token IS NOT NULL
        ORDER BY u.installation_id, t.installation_id;
    END IF;

    IF cardinality(e_installations) > 0 THEN
        RETURN QUERY
        WITH e AS (
            SELECT * FROM unnest(e_installations, e_sessions, e_profiles, e_platforms,
                                 e_kinds, e_times, e_durations, e_countries)
                 WITH ORDINALITY AS e(installation_id, session_id, profile_id, platform, kind,
                                      event_time, duration, country, ord)
        ),
        -- Every ordered aggregate in one order (event time, then request order): the
        -- batch is sorted once, not each group once per aggregate; "the latest" is the
        -- last element.
        d AS (
            SELECT e.installation_id, e.session_id,
                   (array_agg(e.profile_id ORDER BY e.event_time, e.ord))[1] AS profile_id,
                   (array_agg(e.platform ORDER BY e.event_time, e.ord))[count(*)] AS platform,
                   (array_agg(e.country ORDER BY e.event_time, e.ord)
                        FILTER (WHERE e.kind = ingest_read_event_kind('session_start')
                                AND e.country <> ''))[1] AS country,
                   min(e.event_time) AS start_time, max(e.event_time) AS last_activity_time,
                   max(e.event_time)
                       FILTER (WHERE e.kind = ingest_read_event_kind('session_end'))
                       AS end_time,
                   (array_agg(e.duration ORDER BY e.event_time, e.ord)
                        FILTER (WHERE e.kind = ingest_read_event_kind('session_end')))
                       [count(*) FILTER (WHERE e.kind = ingest_read_event_kind('session_end'))]
                       AS end_duration,
                   max(e.duration)
                       FILTER (WHERE e.kind = ingest_read_event_kind('session_heartbeat'))
                       AS longest_heartbeat,
                   count(*) AS event_count,
                   bool_or(e.kind = ingest_read_event_kind('session_start')) AS started,
                   bool_or(e.kind = ingest_read_event_kind('session_end')) AS ended
            FROM e
            GROUP BY e.installation_id, e.session_id
        ),
        upserted AS (
            INSERT INTO sessions AS s (project_id, installation_id, session_id, profile_id,
                platform, country, start_time, last_activity_time, end_time, duration,
                event_count, started, ended, closed)
            SELECT p_project, d.installation_id, d.session_id, d.profile_id, d.platform,
                   d.country, d.start_time, d.last_activity_time, d.end_time,
                   CASE WHEN d.ended THEN coalesce(d.end_duration, '0')
                        ELSE greatest(d.last_activity_time - d.start_time,
                                      coalesce(d.longest_heartbeat, '0')) END,
                   d.event_count, d.started, d.ended, d.ended
            FROM d
            ORDER BY d.installation_id, d.session_id
            ON CONFLICT ON CONSTRAINT sessions_pkey DO UPDATE SET
                platform = EXCLUDED.platform,
                country = coalesce(s.country, EXCLUDED.country),
                start_time = least(s.start_time, EXCLUDED.start_time),
                last_activity_time = greatest(s.last_activity_time,
                                              EXCLUDED.last_activity_time),
                end_time = CASE
                    WHEN EXCLUDED.ended AND (NOT s.ended OR EXCLUDED.end_time >= s.end_time)
                        THEN EXCLUDED.end_time
                    ELSE s.end_time END,
                duration = CASE
                    WHEN EXCLUDED.ended AND (NOT s.ended OR EXCLUDED.end_time >= s.end_time)
                        THEN EXCLUDED.duration
                    WHEN s.ended THEN s.duration
                    ELSE greatest(s.duration, EXCLUDED.duration,
                                  greatest(s.last_activity_time, EXCLUDED.last_activity_time)
                                  - least(s.start_time, EXCLUDED.start_time)) END,
                event_count = s.event_count + EXCLUDED.event_count,
                started = s.started OR EXCLUDED.started,
                ended = s.ended OR EXCLUDED.ended,
                closed = s.closed OR EXCLUDED.ended
            RETURNING s.installation_id, s.session_id, s.country
        )
        SELECT 'session', u.installation_id, u.session_id, u.country, NULL::text
        FROM upserted u;
    END IF;
END $$;
