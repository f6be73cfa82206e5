-- A session's platform is that of the device it runs on. An SDK sends its platform only with
-- some requests (Countly's metrics come with begin_session; its events, user details,
-- heartbeats and crashes without them), and the edge, which keeps no state, sends the others on
-- platform API, as it does a Segment track without context; until now a session's platform was
-- its latest event's, so the first such request made an Android session an API one in the
-- profile's sessions. Now a session's platform follows 0040's rule for installations: a device
-- platform (iOS, Android, Web) always wins over API, whatever the times; among device
-- platforms the rule is unchanged (in a batch the latest event's, later in the batch on a tie;
-- over the stored row the later batch's; in a merge the later activity's); a session only ever
-- seen on API is an API one. Validation refuses PLATFORM_UNSPECIFIED, so API is the only
-- platform that is not a device's. Stored rows are left as they are.
--
-- Both functions are 0054's, restated unchanged but for the platform: the batch's aggregate and
-- its upsert in profiles_ingest_apply_batch_state, the fold in ingest_merge_sessions.

-- 0054's function, but a session's platform: its latest device platform (iOS, Android, Web) over
-- API whatever the times, API only when the session has seen nothing else.
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
            SELECT e.installation_id, e.session_id, e.profile_id,
                   -- The latest device platform's (not API: 4), API only when every event of
                   -- the part is on API.
                   coalesce((array_agg(e.platform ORDER BY e.event_time, e.ord)
                                 FILTER (WHERE e.platform <> 4))
                                [count(*) FILTER (WHERE e.platform <> 4)],
                            4::smallint) AS platform,
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
            GROUP BY e.installation_id, e.session_id, e.profile_id
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
            ORDER BY d.installation_id, d.session_id, d.profile_id
            ON CONFLICT ON CONSTRAINT sessions_pkey DO UPDATE SET
                -- A batch only on API keeps the stored device platform; else the batch's.
                platform = CASE WHEN EXCLUDED.platform = 4 AND s.platform <> 4 THEN s.platform
                                ELSE EXCLUDED.platform END,
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
            RETURNING s.installation_id, s.session_id, s.profile_id, s.country, s.started
        )
        -- A session's heartbeats and ends carry its country on the bus, whoever's part they
        -- are: a part that never saw the start (another profile's, after a logout) and has no
        -- country answers, when the batch brings it a heartbeat or an end, the country of the
        -- session's earliest part that has one, stored before this batch (the statement's
        -- snapshot; ingest takes a part of this batch that knows it). Only those parts look.
        SELECT 'session', u.installation_id, u.session_id,
               CASE WHEN u.country IS NULL AND NOT u.started
                         AND (d.ended OR d.longest_heartbeat IS NOT NULL) THEN (
                   SELECT p.country FROM sessions p
                   WHERE p.project_id = p_project AND p.installation_id = u.installation_id
                       AND p.session_id = u.session_id AND p.country IS NOT NULL
                   ORDER BY p.start_time, p.profile_id
                   LIMIT 1)
                   ELSE u.country END,
               NULL::text
        FROM upserted u
        JOIN d ON d.installation_id = u.installation_id AND d.session_id = u.session_id
              AND d.profile_id = u.profile_id;
    END IF;
END $$;


-- 0054's merge of sessions, but the platform. The source's parts the target has no part of move
-- with a plain UPDATE; the others are two parts of one session (the source's installation was
-- the target's earlier in the session), folded into the target's part: the span and the counts
-- add up, the platform of the part with a device platform when only one has one (else of the
-- later activity), the earlier start's country, an end over no end or a later end (its time and
-- duration). The fold is closed only when it is ended or both parts were closed idle: a part the
-- sweeper closed while the session went on under another profile opens again (no end time), so
-- that the sweeper closes the whole session at its real end.
CREATE OR REPLACE FUNCTION ingest_merge_sessions(p_project uuid, p_source uuid, p_target uuid)
RETURNS void LANGUAGE sql AS $$
    UPDATE sessions s SET profile_id = p_target
    WHERE s.project_id = p_project AND s.profile_id = p_source
        AND NOT EXISTS (
            SELECT 1 FROM sessions t
            WHERE t.project_id = p_project AND t.installation_id = s.installation_id
                AND t.session_id = s.session_id AND t.profile_id = p_target);
    WITH source AS (
        DELETE FROM sessions s WHERE s.project_id = p_project AND s.profile_id = p_source
        RETURNING s.*
    )
    UPDATE sessions t SET
        -- A device platform over API (4) whatever the times, else the later activity's.
        platform = CASE
            WHEN (m.platform = 4) <> (t.platform = 4) THEN
                CASE WHEN m.platform = 4 THEN t.platform ELSE m.platform END
            WHEN m.last_activity_time > t.last_activity_time THEN m.platform
            ELSE t.platform END,
        country = CASE WHEN m.start_time < t.start_time THEN coalesce(m.country, t.country)
                       ELSE coalesce(t.country, m.country) END,
        start_time = least(t.start_time, m.start_time),
        last_activity_time = greatest(t.last_activity_time, m.last_activity_time),
        end_time = CASE
            WHEN m.ended AND (NOT t.ended OR m.end_time > t.end_time) THEN m.end_time
            WHEN t.ended THEN t.end_time
            WHEN t.closed AND m.closed THEN greatest(t.end_time, m.end_time) END,
        duration = CASE
            WHEN m.ended AND (NOT t.ended OR m.end_time > t.end_time) THEN m.duration
            WHEN t.ended THEN t.duration
            ELSE greatest(t.duration, m.duration,
                          greatest(t.last_activity_time, m.last_activity_time)
                          - least(t.start_time, m.start_time)) END,
        event_count = t.event_count + m.event_count,
        started = t.started OR m.started,
        ended = t.ended OR m.ended,
        closed = t.ended OR m.ended OR (t.closed AND m.closed),
        derived = t.derived OR m.derived
    FROM source m
    WHERE t.project_id = p_project AND t.installation_id = m.installation_id
        AND t.session_id = m.session_id AND t.profile_id = p_target;
$$;
