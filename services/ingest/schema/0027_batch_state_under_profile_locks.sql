-- Ingest's batches add their events' totals after locking the profiles they touch, not in
-- the statement that inserts the events (issue 19). The insert trigger's upsert of
-- profile_event_counts locked each touched profile's row from the events insert to the commit,
-- early in the transaction: concurrent batches over the same profiles (every batch, with
-- 500 events over a few thousand installations) waited there for each other's whole
-- transaction, 233 to 314 ms of a batch's 295 to 454 ms of database time with 4 clients
-- (docs/benchmarks.md, "Where a batch's database time goes"). Ingest now inserts its events
-- with the counts deferred (the transaction-local setting profiles.event_counts = 'deferred'),
-- then, after identity_apply_profile_versions has locked those profiles in profile_id order,
-- adds their totals with the same function the trigger uses: the inserts of concurrent batches
-- overlap, and only the part of the transaction under the profile locks is serialized, which
-- it was already (the version bump). Every other writer (bulk loads, tests, the query bench)
-- keeps the trigger: one rule, profiles_ingest_add_event_counts, two callers.

-- Adds inserted events to their profiles' totals and first/last event times: one row per
-- event (project, profile, kind, event time), aggregated per profile, upserted in key order.
CREATE FUNCTION profiles_ingest_add_event_counts(
    p_projects uuid[], p_profiles uuid[], p_kinds smallint[], p_times timestamptz[]
) RETURNS void LANGUAGE sql AS $$
    INSERT INTO profile_event_counts AS c (project_id, profile_id, event_count, crash_count,
                                           first_event_time, last_event_time)
    SELECT e.project_id, e.profile_id, count(*),
           count(*) FILTER (WHERE e.kind = ingest_read_event_kind('crash')),
           min(e.event_time), max(e.event_time)
    FROM unnest(p_projects, p_profiles, p_kinds, p_times)
         AS e(project_id, profile_id, kind, event_time)
    WHERE e.profile_id IS NOT NULL
    GROUP BY e.project_id, e.profile_id
    ORDER BY e.project_id, e.profile_id
    ON CONFLICT (project_id, profile_id) DO UPDATE SET
        event_count = c.event_count + EXCLUDED.event_count,
        crash_count = c.crash_count + EXCLUDED.crash_count,
        first_event_time = least(c.first_event_time, EXCLUDED.first_event_time),
        last_event_time = greatest(c.last_event_time, EXCLUDED.last_event_time)
$$;

-- 0025's trigger function; only its INSERT branch changes: it calls the function above, unless
-- the inserting transaction said it adds the totals itself.
CREATE OR REPLACE FUNCTION profile_event_counts_apply() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF current_setting('profiles.event_counts', true) = 'deferred' THEN
            RETURN NULL;
        END IF;
        PERFORM profiles_ingest_add_event_counts(array_agg(project_id), array_agg(profile_id),
                                                 array_agg(kind), array_agg(event_time))
        FROM new_rows
        WHERE profile_id IS NOT NULL;
        RETURN NULL;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO profile_event_counts AS c (project_id, profile_id, event_count, crash_count,
                                               first_event_time, last_event_time)
        SELECT project_id, profile_id, sum(n), sum(crashes), min(t), max(t)
        FROM (SELECT project_id, profile_id, 1 AS n, (kind = ingest_read_event_kind('crash'))::int AS crashes,
                     event_time AS t
              FROM new_rows WHERE profile_id IS NOT NULL
              UNION ALL
              SELECT project_id, profile_id, -1, -(kind = ingest_read_event_kind('crash'))::int, NULL
              FROM old_rows WHERE profile_id IS NOT NULL) x
        GROUP BY project_id, profile_id
        HAVING sum(n) <> 0 OR sum(crashes) <> 0
        ORDER BY project_id, profile_id
        ON CONFLICT (project_id, profile_id) DO UPDATE SET
            event_count = c.event_count + EXCLUDED.event_count,
            crash_count = c.crash_count + EXCLUDED.crash_count,
            first_event_time = least(c.first_event_time, EXCLUDED.first_event_time),
            last_event_time = greatest(c.last_event_time, EXCLUDED.last_event_time);
    ELSIF TG_OP = 'DELETE' THEN
        IF current_setting('profiles.retention', true) = 'on' THEN
            RETURN NULL;
        END IF;
        INSERT INTO profile_event_counts AS c (project_id, profile_id, event_count, crash_count)
        SELECT project_id, profile_id, -count(*), -count(*) FILTER (WHERE kind = ingest_read_event_kind('crash'))
        FROM old_rows
        WHERE profile_id IS NOT NULL
        GROUP BY project_id, profile_id
        ORDER BY project_id, profile_id
        ON CONFLICT (project_id, profile_id) DO UPDATE SET
            event_count = c.event_count + EXCLUDED.event_count,
            crash_count = c.crash_count + EXCLUDED.crash_count;
        UPDATE profile_event_counts c SET
            first_event_time = CASE WHEN d.first_time <= c.first_event_time
                THEN (SELECT min(e.event_time) FROM events e
                      WHERE e.project_id = c.project_id AND e.profile_id = c.profile_id)
                ELSE c.first_event_time END,
            last_event_time = CASE WHEN d.last_time >= c.last_event_time
                THEN (SELECT max(e.event_time) FROM events e
                      WHERE e.project_id = c.project_id AND e.profile_id = c.profile_id)
                ELSE c.last_event_time END
        FROM (SELECT project_id, profile_id, min(event_time) AS first_time,
                     max(event_time) AS last_time
              FROM old_rows WHERE profile_id IS NOT NULL
              GROUP BY project_id, profile_id) d
        WHERE c.project_id = d.project_id AND c.profile_id = d.profile_id AND c.event_count > 0
            AND (d.first_time <= c.first_event_time OR d.last_time >= c.last_event_time);
    ELSE  -- TRUNCATE
        DELETE FROM profile_event_counts;
        RETURN NULL;
    END IF;
    DELETE FROM profile_event_counts c
    USING (SELECT DISTINCT project_id, profile_id FROM old_rows WHERE profile_id IS NOT NULL) o
    WHERE c.project_id = o.project_id AND c.profile_id = o.profile_id AND c.event_count = 0;
    RETURN NULL;
END $$;

-- The part of a batch's transaction that holds the touched profiles' locks, in two calls
-- instead of eight statements (issue 19). Concurrent batches over the same profiles wait for
-- each other's locked part, so its length bounds the rate, and it was as much ingest's own
-- event loop as the database: between two statements the loop ran other batches' Python work
-- (validation, messages) while the locks stayed held. Two round trips leave one gap: ingest's
-- attribute-limit decision, which needs the held names under the locks.

-- Call 1: locks and bumps the profiles (identity's contract, profile_id order), adds the
-- inserted events' totals (ingest inserted them with the counts deferred), and answers each
-- profile's new version (held_names NULL), then for each profile of p_held_of the custom
-- attributes it holds (version NULL; held_names NULL for none).
CREATE FUNCTION profiles_ingest_lock_batch_profiles(
    p_project uuid, p_profiles uuid[],
    p_event_profiles uuid[], p_event_kinds smallint[], p_event_times timestamptz[],
    p_held_of uuid[]
) RETURNS TABLE (profile_id uuid, version bigint, held_names text[])
LANGUAGE plpgsql AS $$
DECLARE
    bumped_profiles uuid[];
    bumped_versions bigint[];
BEGIN
    SELECT array_agg(v.profile_id), array_agg(v.version)
    INTO bumped_profiles, bumped_versions
    FROM identity_apply_profile_versions(p_project, p_profiles) v;
    PERFORM profiles_ingest_add_event_counts(
        array_fill(p_project, ARRAY[cardinality(p_event_profiles)]), p_event_profiles,
        p_event_kinds, p_event_times);
    RETURN QUERY
    SELECT b.profile_id, b.version, NULL::text[]
    FROM unnest(bumped_profiles, bumped_versions) AS b(profile_id, version);
    -- One index probe per asked profile (LATERAL), whatever the plan cache assumes of sizes.
    RETURN QUERY
    SELECT k.id, NULL::bigint, h.names
    FROM (SELECT DISTINCT u.id FROM unnest(p_held_of) AS u(id)) k
    CROSS JOIN LATERAL (
        SELECT array_agg(a.name) AS names FROM profile_attributes a
        WHERE a.project_id = p_project AND a.profile_id = k.id AND NOT a.native
            AND a.value IS NOT NULL
    ) h;
END $$;

-- Call 2: the batch's derived state, each kind by one set-based statement over the rows of
-- the events that carry it, in this order: attribute operations joined to their logs and the
-- touched attributes replayed (profiles_ingest_fold_attribute); the events refused for the
-- attribute limit deleted (their totals with them, by the delete trigger); consent by event
-- time; installation details by event time per field; sessions merged. Answers, per
-- (installation, session) the batch touched, the session's country (what = 'session'), and per
-- installation of p_session_starters now holding the push token of an imported installation
-- not yet folded, that installation (what = 'reintegration'). The statements are the ones
-- ingest ran one by one before, with the same rules and the same key orders.
CREATE FUNCTION profiles_ingest_apply_batch_state(
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
        PERFORM profiles_ingest_fold_attribute(p_project, f.profile_id, f.native, f.name,
                                               f.event_time, f.event_id, f.origin, f.position)
        FROM (
            SELECT DISTINCT ON (o.profile_id, o.native, o.name) o.*
            FROM unnest(o_profiles, o_natives, o_names, o_times, o_event_ids, o_origins,
                        o_positions)
                 AS o(profile_id, native, name, event_time, event_id, origin, position)
            ORDER BY o.profile_id, o.native, o.name, o.event_time, o.event_id COLLATE "C",
                     o.origin COLLATE "C", o.position
        ) f
        ORDER BY f.profile_id, f.native, f.name;
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
                   jsonb_build_object('platform', c.platform) || coalesce(c.changes, '{}')
                       AS changes
            FROM unnest(i_installations, i_times, i_platforms, i_changes)
                 WITH ORDINALITY AS c(installation_id, event_time, platform, changes, ord)
        ),
        latest AS (
            SELECT DISTINCT ON (b.installation_id, f.key) b.installation_id, f.key, f.value,
                   b.event_time
            FROM batch b CROSS JOIN LATERAL jsonb_each(b.changes) AS f
            ORDER BY b.installation_id, f.key, b.event_time DESC, b.ord DESC
        ),
        merged AS (
            SELECT l.installation_id, jsonb_object_agg(l.key, l.value) AS v,
                   jsonb_object_agg(l.key, l.event_time) AS times,
                   min(s.first_seen) AS first_seen, max(s.last_seen) AS last_seen
            FROM latest l
            JOIN (SELECT b.installation_id, min(b.event_time) AS first_seen,
                         max(b.event_time) AS last_seen
                  FROM batch b GROUP BY b.installation_id) s USING (installation_id)
            GROUP BY l.installation_id
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
                field_times = profiles_ingest_field_times(EXCLUDED.field_times, d.field_times),
                first_seen = least(d.first_seen, EXCLUDED.first_seen),
                last_seen = greatest(d.last_seen, EXCLUDED.last_seen)
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
        d AS (
            SELECT e.installation_id, e.session_id,
                   (array_agg(e.profile_id ORDER BY e.event_time, e.ord))[1] AS profile_id,
                   (array_agg(e.platform ORDER BY e.event_time DESC, e.ord DESC))[1]
                       AS platform,
                   (array_agg(e.country ORDER BY e.event_time, e.ord)
                        FILTER (WHERE e.kind = ingest_read_event_kind('session_start')
                                AND e.country <> ''))[1] AS country,
                   min(e.event_time) AS start_time, max(e.event_time) AS last_activity_time,
                   (array_agg(e.event_time ORDER BY e.event_time DESC, e.ord DESC)
                        FILTER (WHERE e.kind = ingest_read_event_kind('session_end')))[1]
                       AS end_time,
                   (array_agg(e.duration ORDER BY e.event_time DESC, e.ord DESC)
                        FILTER (WHERE e.kind = ingest_read_event_kind('session_end')))[1]
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
