-- Issue 19: the installation details line of the locked part's breakdown, cut down.

-- The installation details of a batch (0040's statement, rules unchanged), written in two
-- parts. Most events change no field of their installation: they only carry its platform and
-- widen its span (87% of installations a batch touches in bench.ingest's mix). Those with a
-- stored row are now a plain UPDATE of the platform, its time and the span, and only when the
-- batch moves one of them; the rest (a field changed, or no row yet) take 0040's upsert with
-- its per-field rule. Before, every installation went through the upsert: a speculative
-- insertion's probe, the stored row locked before the conflict filter ran, ten per-field
-- CASEs and two JSON objects built per row (13.0 ms of the statement's 13.1 for a batch of
-- 500 over 476 installations, auto_explain; issue 19's breakdown, line "installation
-- details").
--
-- The two parts take disjoint rows: the upsert takes the installations with a changed field and
-- those without a stored row in the statement's snapshot; the UPDATE the others. A row another
-- transaction inserts meanwhile (an import of that ID) is a conflict of the upsert, which its
-- rule resolves as before; a row another one updates meanwhile is updated again from its new
-- version (the UPDATE rechecks it). Ingest's own batches never race here: this runs under the
-- batch's profile locks, which every batch of these installations takes. Sequential scans off:
-- each installation is a probe of the primary key however the table's statistics read when
-- the plan was made (0034).
CREATE FUNCTION profiles_ingest_apply_installation_details(
    p_project uuid, i_installations text[], i_times timestamptz[], i_platforms smallint[],
    i_changes jsonb[], p_session_starters text[]
) RETURNS TABLE (installation_id text, imported_installation_id text)
LANGUAGE sql SET enable_seqscan TO off AS $$
    WITH batch AS (
        SELECT c.installation_id, c.event_time, c.ord,
               coalesce((c.changes->>'platform')::smallint, c.platform) AS platform,
               c.changes - 'platform' AS changes
        FROM unnest(i_installations, i_times, i_platforms, i_changes)
             WITH ORDINALITY AS c(installation_id, event_time, platform, changes, ord)
    ),
    -- Every event carries its platform: the latest event's on a device platform, else the
    -- latest API event's (profiles_ingest_platform_wins), with the installation's span, in one
    -- sort of the batch.
    seen AS (
        SELECT DISTINCT ON (b.installation_id) b.installation_id, b.platform,
               b.event_time AS platform_time,
               min(b.event_time) OVER w AS first_seen, max(b.event_time) OVER w AS last_seen
        FROM batch b
        WINDOW w AS (PARTITION BY b.installation_id ORDER BY b.event_time DESC, b.ord DESC
                     ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
        ORDER BY b.installation_id, b.platform = 4, b.event_time DESC, b.ord DESC
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
    -- The installations whose batch changes no field (the platform and the span only), and
    -- whether each has a stored row: one probe each (OFFSET 0 keeps the subquery a probe, not
    -- a hashed scan of the project's rows).
    spans AS (
        SELECT s.installation_id, s.platform,
               jsonb_build_object('platform', s.platform_time) AS times, s.first_seen,
               s.last_seen, x.found IS NOT NULL AS stored
        FROM seen s
        LEFT JOIN LATERAL (
            SELECT true AS found FROM installation_details x
            WHERE x.project_id = p_project AND x.installation_id = s.installation_id
            OFFSET 0
        ) x ON true
        WHERE NOT EXISTS (SELECT FROM changed c WHERE c.installation_id = s.installation_id)
    ),
    widened AS (
        UPDATE installation_details d SET
            platform = CASE WHEN profiles_ingest_platform_wins(s.platform, s.times, d.platform,
                                                               d.field_times)
                THEN s.platform ELSE d.platform END,
            field_times = CASE WHEN profiles_ingest_platform_wins(s.platform, s.times,
                                                                  d.platform, d.field_times)
                THEN d.field_times || s.times ELSE d.field_times END,
            first_seen = least(d.first_seen, s.first_seen),
            last_seen = greatest(d.last_seen, s.last_seen)
        FROM spans s
        WHERE s.stored AND d.project_id = p_project AND d.installation_id = s.installation_id
            -- Not written when the batch changes nothing (a late event inside the span seen,
            -- carrying only an older platform).
            AND (s.first_seen < d.first_seen OR s.last_seen > d.last_seen
                 OR profiles_ingest_platform_wins(s.platform, s.times, d.platform,
                                                  d.field_times))
        RETURNING d.installation_id, d.platform, d.push_token
    ),
    -- The rest: a field changed, or no stored row.
    merged AS (
        SELECT s.installation_id,
               jsonb_build_object('platform', s.platform) || coalesce(c.v, '{}') AS v,
               jsonb_build_object('platform', s.platform_time) || coalesce(c.times, '{}')
                   AS times,
               s.first_seen, s.last_seen
        FROM seen s
        LEFT JOIN changed c USING (installation_id)
        LEFT JOIN spans p USING (installation_id)
        WHERE c.installation_id IS NOT NULL OR NOT p.stored
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
            platform = CASE WHEN profiles_ingest_platform_wins(EXCLUDED.platform,
                EXCLUDED.field_times, d.platform, d.field_times)
                THEN EXCLUDED.platform ELSE d.platform END,
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
            -- The platform's time is that of the platform kept, which an API event's
            -- later time must not move past a device platform's.
            field_times = CASE
                WHEN EXCLUDED.field_times - 'platform' <> '{}'
                    THEN profiles_ingest_field_times(EXCLUDED.field_times - 'platform',
                                                     d.field_times)
                         || CASE WHEN profiles_ingest_platform_wins(EXCLUDED.platform,
                                     EXCLUDED.field_times, d.platform, d.field_times)
                            THEN jsonb_build_object('platform',
                                                    EXCLUDED.field_times->'platform')
                            ELSE '{}'::jsonb END
                WHEN profiles_ingest_platform_wins(EXCLUDED.platform, EXCLUDED.field_times,
                                                   d.platform, d.field_times)
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
            OR profiles_ingest_platform_wins(EXCLUDED.platform, EXCLUDED.field_times,
                                             d.platform, d.field_times)
        RETURNING d.installation_id, d.platform, d.push_token
    ),
    written AS (
        SELECT w.installation_id, w.platform, w.push_token FROM widened w
        UNION ALL
        SELECT u.installation_id, u.platform, u.push_token FROM upserted u
    )
    -- The imported installations (ImportTokens) holding the push token of an installation
    -- that started a session in this batch.
    SELECT u.installation_id, t.installation_id
    FROM written u
    JOIN installation_details t
        ON t.project_id = p_project AND t.platform = u.platform
           AND t.push_token = u.push_token AND t.imported
           AND t.installation_id <> u.installation_id
    WHERE u.installation_id = ANY(p_session_starters) AND u.push_token IS NOT NULL
$$;

-- 0040's function, the installation details now written by the function above.
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
        SELECT 'reintegration', r.installation_id, NULL::text, NULL::text,
               r.imported_installation_id
        FROM profiles_ingest_apply_installation_details(
            p_project, i_installations, i_times, i_platforms, i_changes, p_session_starters) r
        ORDER BY r.installation_id, r.imported_installation_id;
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

