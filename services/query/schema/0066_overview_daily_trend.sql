-- GetOverview's daily trend (trend_days): active profiles (a session started that UTC day) and
-- new profiles (first seen that UTC day) per day. Counted live from sessions, a trend read
-- every session its profiles started in the window (about 3 s for 1,000,000 sessions); kept
-- here as counters instead, it reads one row per day and figure, whatever the user base.
--
-- The counters follow the rollups' rule (services/query/rollup.py): each profile's facts are
-- stored beside it, and a recount moves the counters by (keys of the new facts) - (keys of the
-- stored ones), so merges (both sides recounted: the survivor holds the sessions and the
-- earliest first event), erasures (the row deleted) and late events (the profile recounted)
-- keep them exact within the bus lag.
--
-- query_profiles.first_seen: the profile's earliest event time of all time (ingest's
-- profile_event_counts, exact after retention). session_days: "platform:YYYY-MM-DD" for each
-- platform and UTC day on which the profile started a session, from 99 days before the
-- recount's day on: a trend shows at most 90 days, so every day it shows is in the facts of
-- any recount made before the read, and the facts do not grow with a profile's history. A day
-- older than that leaves the facts at the profile's next recount, so the counters of days
-- over 99 days old fall below the truth; they are never read.
ALTER TABLE query_profiles
    ADD COLUMN first_seen timestamptz,
    ADD COLUMN session_days text[] NOT NULL DEFAULT '{}';

-- Per project, platform (0: all; otherwise active: sessions started on it, new: profiles with
-- an installation of it), UTC day and metric ('active_day', 'new_day'): a count of profiles.
-- Day leads metric so that a trend is one range of the key. Rows of days that leave the window
-- stay (8 a day per project at most); nothing reads them.
CREATE TABLE query_day_counts (
    project_id uuid NOT NULL,
    platform smallint NOT NULL,
    day date NOT NULL,
    metric text NOT NULL,
    count bigint NOT NULL,
    PRIMARY KEY (project_id, platform, day, metric)
);

-- The facts and counters of the profiles already projected, as a recount now would store them
-- (one pass over query_profiles, ingest's event totals and sessions: minutes at millions of
-- sessions, under this migration's lock; RollupService.rebuild stores the same).
UPDATE query_profiles q SET first_seen = c.first_event_time
FROM ingest_read_profile_event_counts() c
WHERE c.project_id = q.project_id AND c.profile_id = q.profile_id;

UPDATE query_profiles q SET session_days = d.days
FROM (
    SELECT s.project_id, s.profile_id,
           array_agg(DISTINCT s.platform || ':'
                     || to_char(s.start_time AT TIME ZONE 'UTC', 'YYYY-MM-DD')) AS days
    FROM ingest_read_sessions() s
    WHERE s.start_time
          >= (date_trunc('day', now() AT TIME ZONE 'UTC') - interval '99 days') AT TIME ZONE 'UTC'
    GROUP BY s.project_id, s.profile_id
) d
WHERE d.project_id = q.project_id AND d.profile_id = q.profile_id;

INSERT INTO query_day_counts (project_id, platform, day, metric, count)
SELECT k.project_id, k.platform, k.day, k.metric, count(*)
FROM (
    SELECT DISTINCT q.project_id, q.profile_id, 0::smallint AS platform,
           split_part(d, ':', 2)::date AS day, 'active_day' AS metric
    FROM query_profiles q, unnest(q.session_days) d
    UNION ALL
    SELECT q.project_id, q.profile_id, split_part(d, ':', 1)::smallint,
           split_part(d, ':', 2)::date, 'active_day'
    FROM query_profiles q, unnest(q.session_days) d
    WHERE split_part(d, ':', 1) <> '0'
    UNION ALL
    SELECT q.project_id, q.profile_id, p, (q.first_seen AT TIME ZONE 'UTC')::date, 'new_day'
    FROM query_profiles q, unnest(array_prepend(0::smallint, q.platforms)) p
    WHERE q.first_seen IS NOT NULL
) k
GROUP BY k.project_id, k.platform, k.day, k.metric;
