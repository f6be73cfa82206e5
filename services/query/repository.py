"""Every SQL statement of query, and only SQL. Query reads the tables of identity (profiles,
installations, identity_changes, custom_id_aliases), ingest (events, rejected_events,
profile_attributes, profile_subscriptions, installation_details) and segments
(segment_sessions, segment_states, segment_distribution()), read-only, through the read
contracts their migrations document; it writes only its own projection (query_profiles,
query_installations, query_counters in 0006), recounted from those tables when the bus says
they changed. Every statement filters on project_id first.

Reads that make one view run in one READ ONLY REPEATABLE READ transaction, so a view is "as of
one consistent read" even though it takes several statements.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast
from uuid import UUID

import asyncpg

from services.query.rollup import CounterKey, InstallationFacts, ProfileFacts
from services.query.views import (
    AttributeView,
    CountersView,
    CrashView,
    DayView,
    EventView,
    IdentityChangeView,
    InstallationView,
    ProfileRowView,
    RejectedView,
    SessionView,
    SmartSegmentView,
    SubscriptionView,
)

# profiles.common.v1.EventKind numbers, as events.kind stores them.
KIND_SESSION_START = 2
KIND_SESSION_HEARTBEAT = 3
KIND_SESSION_END = 4
KIND_CRASH = 8
MAX_BIGINT = 9_223_372_036_854_775_807

# -- lookups ----------------------------------------------------------------------------------

# A tombstone points at its survivor in one hop (read contract of 0002), so one primary-key
# read resolves a merged-away ID.
RESOLVE_PROFILE_ID = """
    SELECT coalesce(merged_into, profile_id) AS profile_id, merged_into IS NOT NULL AS merged
    FROM profiles
    WHERE project_id = $1 AND profile_id = $2"""

# A custom ID is on a live profile (unique index profiles_by_custom_id) or is an alias left by an
# operator merge, whose target identity keeps live; both reads are by key.
RESOLVE_CUSTOM_ID = """
    SELECT profile_id FROM profiles WHERE project_id = $1 AND custom_id = $2
    UNION ALL
    SELECT target_profile_id FROM custom_id_aliases WHERE project_id = $1 AND custom_id = $2
    LIMIT 1"""

# installations.profile_id is always a live profile (read contract of 0002).
RESOLVE_INSTALLATION = """
    SELECT profile_id FROM installations WHERE project_id = $1 AND installation_id = $2"""

# Emails (stored lower-case) and phones are native attribute values, which several profiles may
# share: up to 11 distinct live holders are read, enough to say "more than 10". The expression
# index query_attributes_by_native_value (0006) makes this a key lookup.
RESOLVE_NATIVE_VALUE = """
    SELECT DISTINCT a.profile_id
    FROM profile_attributes a
    JOIN profiles p ON p.project_id = a.project_id AND p.profile_id = a.profile_id
    WHERE a.project_id = $1 AND a.native AND a.name = $2 AND (a.value ->> 'value') = $3
      AND p.merged_into IS NULL
    ORDER BY a.profile_id
    LIMIT 11"""

# -- the profile view -------------------------------------------------------------------------

# The profile row and its event totals in one round trip; the aggregate is an index-only scan
# of events_by_profile_time. No row when the profile is not live.
SELECT_PROFILE = """
    SELECT p.profile_id, p.custom_id, p.version, s.first_seen, s.last_seen, s.event_count,
           s.crash_count
    FROM profiles p
    CROSS JOIN LATERAL (
        SELECT min(e.event_time) AS first_seen, max(e.event_time) AS last_seen,
               count(*) AS event_count, count(*) FILTER (WHERE e.kind = 8) AS crash_count
        FROM events e
        WHERE e.project_id = p.project_id AND e.profile_id = p.profile_id
    ) s
    WHERE p.project_id = $1 AND p.profile_id = $2 AND p.merged_into IS NULL"""

SELECT_INSTALLATION_PROFILES = """
    SELECT installation_id, profile_id FROM installations
    WHERE project_id = $1 AND installation_id = ANY($2::text[])"""

# An installation known to identity but never seen by ingest (Identify before any event) has
# no details yet: LEFT JOIN, first seen from its creation. Most recently seen first.
SELECT_INSTALLATIONS = """
    SELECT i.installation_id, i.create_time, d.platform, d.app_version, d.os_version,
           d.device_model, d.push_token IS NOT NULL AS push_token_present, d.push_opt_in,
           d.language, d.timezone, d.uninstalled, d.first_seen, d.last_seen, d.imported
    FROM installations i
    LEFT JOIN installation_details d
        ON d.project_id = i.project_id AND d.installation_id = i.installation_id
    WHERE i.project_id = $1 AND i.profile_id = $2
    ORDER BY d.last_seen DESC NULLS LAST, i.installation_id"""

# value IS NULL rows are unset tombstones kept by ingest's event-time rules: not shown.
SELECT_ATTRIBUTES = """
    SELECT native, name, value, update_time
    FROM profile_attributes
    WHERE project_id = $1 AND profile_id = $2 AND value IS NOT NULL
    ORDER BY native DESC, name"""

SELECT_SUBSCRIPTIONS = """
    SELECT channel, kind, subscribed, change_time
    FROM profile_subscriptions
    WHERE project_id = $1 AND profile_id = $2"""

# The newest event of one kind walks events_by_profile_time from the top and stops at the first
# match.
SELECT_LAST_CRASH = """
    SELECT event_id, coalesce(installation_id, '') AS installation_id, event_time, payload
    FROM events
    WHERE project_id = $1 AND profile_id = $2 AND kind = 8
    ORDER BY event_time DESC, event_seq DESC
    LIMIT 1"""

SELECT_LAST_SESSION_COUNTRY = """
    SELECT country
    FROM sessions
    WHERE project_id = $1 AND profile_id = $2 AND coalesce(country, '') <> ''
    ORDER BY start_time DESC
    LIMIT 1"""

# Sessions come from ingest's sessions table (read contract of 0004: one row per session,
# `closed` says whether it still counts as live), by sessions_by_profile_time.
SELECT_SESSION_TOTALS = """
    SELECT count(*) AS session_count,
           coalesce(sum(extract(epoch FROM duration) * 1000), 0)::bigint AS total_time_ms
    FROM sessions
    WHERE project_id = $1 AND profile_id = $2"""

# A profile's history names it, or one of the tombstones merged into it, on either side. The
# tombstones come from profiles_by_survivor; each side has its own index.
PROFILE_AND_TOMBSTONES = """
    SELECT $2::uuid AS id
    UNION ALL
    SELECT profile_id FROM profiles WHERE project_id = $1 AND merged_into = $2"""

SELECT_IDENTITY_CHANGES = f"""
    WITH ids AS ({PROFILE_AND_TOMBSTONES})
    SELECT change_id, kind, cause, change_time, source_profile_id, target_profile_id,
           installation_ids, alias_custom_id
    FROM identity_changes c
    WHERE c.project_id = $1
      AND (c.source_profile_id IN (SELECT id FROM ids)
           OR c.target_profile_id IN (SELECT id FROM ids))
    ORDER BY c.change_time DESC, c.change_id DESC
    LIMIT $3"""

# Segments' stored classification over all platforms (platform 0), with its schedule of
# time-only transitions, so the state "as of the read" is computed without waiting for the
# sweep (the same rule as segment_distribution() in 0005).
SELECT_SMART_SEGMENT = """
    SELECT segment, flag, next_transition_time, upcoming_times, upcoming_segments,
           upcoming_flags
    FROM segment_states
    WHERE project_id = $1 AND profile_id = $2 AND platform = 0"""

# Engagement over segments' session history (0005 segment_sessions: one row per session, kept
# by segments from the events stream, merged with the profile). Segments documents no
# per-profile engagement read contract, so query applies segments' formula
# (services/segments/model.py `engagement`) to the same rows: sessions started in
# [now - 168 h, now], their count, average duration, and distinct calendar days in the
# profile's time zone as segments keeps it (segment_profiles.time_zone), else UTC.
SELECT_ENGAGEMENT = """
    SELECT count(*) AS session_count, coalesce(avg(s.duration_ms), 0)::float8 AS average_ms,
           count(DISTINCT (s.start_time AT TIME ZONE coalesce(
               (SELECT sp.time_zone FROM segment_profiles sp
                WHERE sp.project_id = $1 AND sp.profile_id = $2), 'UTC'))::date) AS active_days
    FROM segment_sessions s
    WHERE s.project_id = $1 AND s.profile_id = $2
      AND s.start_time >= $3::timestamptz - interval '168 hours' AND s.start_time <= $3"""

# -- timelines --------------------------------------------------------------------------------

# The snapshot the first page fixes: the newest event_seq of the project (a backward scan of
# the primary key) and the newest identity change of the profile. Later pages read nothing
# newer, so events arriving while a client pages cause no repeats and no gaps.
SELECT_TIMELINE_SNAPSHOT = f"""
    WITH ids AS ({PROFILE_AND_TOMBSTONES})
    SELECT (SELECT coalesce(max(event_seq), 0) FROM events WHERE project_id = $1) AS max_seq,
           (SELECT max(change_time) FROM identity_changes c
            WHERE c.project_id = $1
              AND (c.source_profile_id IN (SELECT id FROM ids)
                   OR c.target_profile_id IN (SELECT id FROM ids))) AS max_change_time"""

# Keyset paging on events_by_profile_time: the row comparison continues strictly after the
# last row of the previous page (the first page passes 'infinity'), so the index is entered at
# the position instead of skipping an offset. Optional filters are constants when unused
# (empty arrays, '', ±infinity) rather than NULL, so the plan stays an index range scan.
SELECT_EVENTS_PAGE = """
    SELECT event_seq, event_id, kind, event_time, receive_time,
           coalesce(installation_id, '') AS installation_id, coalesce(session_id, '') AS session_id,
           platform, payload, imported
    FROM events
    WHERE project_id = $1 AND profile_id = $2 AND event_seq <= $3
      AND (event_time, event_seq) < ($4::timestamptz, $5::bigint)
      AND event_time >= $6 AND event_time < $7
      AND kind = ANY($8::smallint[])
      AND (cardinality($9::text[]) = 0 OR name = ANY($9::text[]))
      AND ($10::text = '' OR session_id = $10)
      AND payload IS NOT NULL
    ORDER BY event_time DESC, event_seq DESC
    LIMIT $11"""

# Merges and splits in the timeline come from identity_changes (identity records them there,
# not as events); keyset on (change_time, change_id), bounded by the snapshot's change time.
SELECT_CHANGES_PAGE = f"""
    WITH ids AS ({PROFILE_AND_TOMBSTONES})
    SELECT change_id, kind, cause, change_time, source_profile_id, target_profile_id,
           installation_ids, alias_custom_id
    FROM identity_changes c
    WHERE c.project_id = $1
      AND (c.source_profile_id IN (SELECT id FROM ids)
           OR c.target_profile_id IN (SELECT id FROM ids))
      AND c.kind = ANY($3::text[])
      AND c.change_time <= $4
      AND (c.change_time, c.change_id) < ($5::timestamptz, $6::uuid)
      AND c.change_time >= $7 AND c.change_time < $8
    ORDER BY c.change_time DESC, c.change_id DESC
    LIMIT $9"""

# The snapshot of a session history: its newest start when the first page was read (sessions
# have no arrival sequence; one that starts later is not in the pages of this listing).
SELECT_SESSIONS_SNAPSHOT = """
    SELECT max(start_time) FROM sessions WHERE project_id = $1 AND profile_id = $2"""

# Keyset on sessions_by_profile_time; (installation_id, session_id) is the key that breaks ties.
SELECT_SESSIONS_PAGE = """
    SELECT installation_id, session_id, platform, coalesce(country, '') AS country, start_time,
           end_time, (extract(epoch FROM duration) * 1000)::bigint AS duration_ms, event_count,
           ended, closed
    FROM sessions
    WHERE project_id = $1 AND profile_id = $2 AND start_time <= $3
      AND (start_time, installation_id, session_id) < ($4::timestamptz, $5::text, $6::text)
      AND start_time >= $7 AND start_time < $8
    ORDER BY start_time DESC, installation_id DESC, session_id DESC
    LIMIT $9"""

SELECT_NOW = "SELECT now()"

# Days in the caller's time zone ($3): events by the day of their event time, sessions by the
# day they started.
SELECT_EVENT_DAYS = """
    SELECT to_char(event_time AT TIME ZONE $3, 'YYYY-MM-DD') AS day, count(*) AS event_count
    FROM events
    WHERE project_id = $1 AND profile_id = $2 AND event_time >= $4 AND event_time < $5
      AND payload IS NOT NULL
    GROUP BY 1"""

SELECT_SESSION_DAYS = """
    SELECT to_char(start_time AT TIME ZONE $3, 'YYYY-MM-DD') AS day, count(*) AS session_count,
           coalesce(sum(extract(epoch FROM duration) * 1000), 0)::bigint AS time_spent_ms
    FROM sessions
    WHERE project_id = $1 AND profile_id = $2 AND start_time >= $4 AND start_time < $5
    GROUP BY 1"""

# The time zone days are counted in when the caller names none: the `timezone` attribute, else
# the most recently seen installation's.
SELECT_PROFILE_TIMEZONE = """
    SELECT coalesce(
        (SELECT value ->> 'value' FROM profile_attributes
         WHERE project_id = $1 AND profile_id = $2 AND native AND name = 'timezone'
           AND value IS NOT NULL),
        (SELECT d.timezone FROM installations i
         JOIN installation_details d
             ON d.project_id = i.project_id AND d.installation_id = i.installation_id
         WHERE i.project_id = $1 AND i.profile_id = $2 AND d.timezone IS NOT NULL
         ORDER BY d.last_seen DESC LIMIT 1))"""

# -- rejected events --------------------------------------------------------------------------

SELECT_REJECTED_SNAPSHOT = """
    SELECT coalesce(max(rejected_seq), 0) FROM rejected_events WHERE project_id = $1"""

# Keyset on rejected_events_by_time (or _by_reason with a reason filter), as for events.
SELECT_REJECTED_PAGE = """
    SELECT rejected_seq, receive_time, reason, field_path, message, event_id,
           coalesce(installation_id, '') AS installation_id, payload
    FROM rejected_events
    WHERE project_id = $1 AND rejected_seq <= $2
      AND (receive_time, rejected_seq) < ($3::timestamptz, $4::bigint)
      AND receive_time >= $5 AND receive_time < $6
      AND (cardinality($7::text[]) = 0 OR reason = ANY($7::text[]))
    ORDER BY receive_time DESC, rejected_seq DESC
    LIMIT $8"""

# -- the users table --------------------------------------------------------------------------

# Direct SQL over live profiles: each row's columns come from lateral reads of its events,
# installations and attributes, so the figures are exact as of the read but the cost grows
# with the project (a projection fed by the bus is the planned replacement, see the report).
# The sort key is one bigint, ascending: the requested column (last seen in microseconds,
# sessions, time spent in ms), negated for a descending order, and the largest bigint for a
# profile never seen, so it sorts last in both directions; ties by profile_id. Filters that are
# not asked for are constants (0, '') so one statement serves every combination.
PROFILE_ROWS_FRAGMENT = """
    SELECT p.profile_id, coalesce(p.custom_id, '') AS custom_id,
           coalesce(fn.value ->> 'value', '') AS first_name,
           coalesce(ln.value ->> 'value', '') AS last_name,
           coalesce(dev.device_model, '') AS device_model,
           coalesce(dev.platform, 0)::int AS platform,
           ls.last_seen, coalesce(ss.session_count, 0) AS session_count,
           coalesce(ss.time_spent_ms, 0) AS time_spent_ms,
           coalesce(lc.country, '') AS country,
           coalesce(sg.segment, 0)::int AS smart_segment,
           coalesce(sg.flag, 0)::int AS smart_segment_flag
    FROM profiles p
    LEFT JOIN profile_attributes fn ON fn.project_id = p.project_id
        AND fn.profile_id = p.profile_id AND fn.native AND fn.name = 'first_name'
    LEFT JOIN profile_attributes ln ON ln.project_id = p.project_id
        AND ln.profile_id = p.profile_id AND ln.native AND ln.name = 'last_name'
    LEFT JOIN LATERAL (
        SELECT d.device_model, d.platform
        FROM installations i
        JOIN installation_details d
            ON d.project_id = i.project_id AND d.installation_id = i.installation_id
        WHERE i.project_id = p.project_id AND i.profile_id = p.profile_id
        ORDER BY d.last_seen DESC, i.installation_id
        LIMIT 1
    ) dev ON true
    LEFT JOIN LATERAL (
        SELECT max(e.event_time) AS last_seen FROM events e
        WHERE e.project_id = p.project_id AND e.profile_id = p.profile_id
    ) ls ON true
    LEFT JOIN LATERAL (
        SELECT count(*) AS session_count,
               coalesce(sum(extract(epoch FROM s.duration) * 1000), 0)::bigint AS time_spent_ms
        FROM sessions s
        WHERE s.project_id = p.project_id AND s.profile_id = p.profile_id
    ) ss ON true
    LEFT JOIN LATERAL (
        SELECT s.country FROM sessions s
        WHERE s.project_id = p.project_id AND s.profile_id = p.profile_id
          AND coalesce(s.country, '') <> ''
        ORDER BY s.start_time DESC
        LIMIT 1
    ) lc ON true
    LEFT JOIN LATERAL (
        SELECT CASE WHEN s.next_transition_time > $2 THEN s.segment ELSE u.segment END AS segment,
               CASE WHEN s.next_transition_time > $2 THEN s.flag ELSE u.flag END AS flag
        FROM segment_states s
        LEFT JOIN LATERAL (
            SELECT x.segment, x.flag
            FROM unnest(s.upcoming_times, s.upcoming_segments, s.upcoming_flags)
                AS x(step_time, segment, flag)
            WHERE x.step_time <= $2
            ORDER BY x.step_time DESC
            LIMIT 1
        ) u ON true
        WHERE s.project_id = p.project_id AND s.profile_id = p.profile_id AND s.platform = 0
    ) sg ON true
    WHERE p.project_id = $1 AND p.merged_into IS NULL
      AND ($3 = 0
           OR ($3 = 1 AND p.custom_id IS NOT NULL)
           OR ($3 = 2 AND p.custom_id IS NULL)
           OR ($3 = 3 AND EXISTS (
                SELECT 1 FROM profile_attributes a
                WHERE a.project_id = p.project_id AND a.profile_id = p.profile_id AND a.native
                  AND a.name IN ('first_name', 'last_name', 'email', 'phone')
                  AND a.value IS NOT NULL)))
      AND ($4 = 0 OR EXISTS (
            SELECT 1 FROM installations i
            JOIN installation_details d
                ON d.project_id = i.project_id AND d.installation_id = i.installation_id
            WHERE i.project_id = p.project_id AND i.profile_id = p.profile_id
              AND d.platform = $4))"""

SELECT_PROFILE_ROWS_PAGE = f"""
    WITH r AS ({PROFILE_ROWS_FRAGMENT}),
    k AS (
        SELECT r.*,
               CASE WHEN v.value IS NULL THEN {MAX_BIGINT}
                    WHEN $8 THEN v.value ELSE -v.value END AS sort_key
        FROM r
        CROSS JOIN LATERAL (
            SELECT CASE $7::int
                       WHEN 1 THEN (extract(epoch FROM r.last_seen) * 1000000)::bigint
                       WHEN 2 THEN r.session_count
                       ELSE r.time_spent_ms
                   END AS value
        ) v
        WHERE ($5 = '' OR r.country = $5)
          AND ($6::int = 0 OR r.smart_segment = $6)
          AND ($9::int = 0 OR r.smart_segment_flag = $9)
    )
    SELECT * FROM k
    WHERE (k.sort_key, k.profile_id) > ($10::bigint, $11::uuid)
    ORDER BY k.sort_key, k.profile_id
    LIMIT $12"""

# -- the overview -----------------------------------------------------------------------------

# Segments' read contract (0005): the distribution exact as of $3, per platform ($2, 0 = all).
SELECT_SEGMENT_DISTRIBUTION = """
    SELECT segment, flag, profile_count FROM segment_distribution($1, $2::smallint, $3)"""

# -- the rollups (query's projection, 0006) ---------------------------------------------------

# GetOverview reads one project's and platform's counters: an index range of the primary key,
# as many rows as distinct values (languages, countries, app versions...), whatever the number
# of profiles.
SELECT_COUNTERS = """
    SELECT metric, value, count FROM query_counters
    WHERE project_id = $1 AND platform = $2 AND count <> 0"""

# The facts of live profiles, recounted from identity's and ingest's tables (read contracts of
# 0002 and 0004); each lateral read is one profile's rows by its index. {where} narrows it to
# the profiles a message touched, or to nothing more for a rebuild of the whole project.
PROFILE_FACTS = """
    SELECT p.profile_id, p.custom_id IS NOT NULL AS identified, p.custom_id,
           coalesce(a.has_email, false) AS has_email,
           coalesce(a.has_phone, false) AS has_phone,
           coalesce(inst.has_token, false) AS has_token,
           coalesce(inst.push_reachable, false) AS push_reachable,
           coalesce(sub.subscribed, '{{}}') AS subscribed,
           coalesce(a.language, inst.language) AS language,
           a.region, ss.country,
           coalesce(inst.platforms, '{{}}') AS platforms,
           a.first_name, a.last_name, coalesce(a.has_details, false) AS has_details,
           inst.device_model, coalesce(inst.device_platform, 0) AS device_platform,
           ls.last_seen, coalesce(ss.session_count, 0) AS session_count,
           coalesce(ss.time_spent_ms, 0) AS time_spent_ms
    FROM profiles p
    LEFT JOIN LATERAL (
        SELECT bool_or(a.name = 'email') AS has_email,
               bool_or(a.name = 'phone') AS has_phone,
               max(a.value ->> 'value') FILTER (WHERE a.name = 'language') AS language,
               max(a.value ->> 'value') FILTER (WHERE a.name = 'region') AS region,
               max(a.value ->> 'value') FILTER (WHERE a.name = 'first_name') AS first_name,
               max(a.value ->> 'value') FILTER (WHERE a.name = 'last_name') AS last_name,
               bool_or(a.name IN ('first_name', 'last_name', 'email', 'phone')) AS has_details
        FROM profile_attributes a
        WHERE a.project_id = p.project_id AND a.profile_id = p.profile_id AND a.native
          AND a.value IS NOT NULL
    ) a ON true
    LEFT JOIN LATERAL (
        SELECT bool_or(d.push_token IS NOT NULL) AS has_token,
               bool_or(d.push_token IS NOT NULL AND d.push_opt_in) AS push_reachable,
               (array_agg(d.language ORDER BY d.last_seen DESC)
                    FILTER (WHERE d.language IS NOT NULL))[1] AS language,
               array_agg(DISTINCT d.platform) FILTER (WHERE d.platform > 0) AS platforms,
               (array_agg(d.device_model ORDER BY d.last_seen DESC, i.installation_id))[1]
                   AS device_model,
               (array_agg(d.platform ORDER BY d.last_seen DESC, i.installation_id))[1]
                   AS device_platform
        FROM installations i
        JOIN installation_details d
            ON d.project_id = i.project_id AND d.installation_id = i.installation_id
        WHERE i.project_id = p.project_id AND i.profile_id = p.profile_id
    ) inst ON true
    LEFT JOIN LATERAL (
        SELECT array_agg(s.channel || ':' || s.kind ORDER BY s.channel, s.kind) AS subscribed
        FROM profile_subscriptions s
        WHERE s.project_id = p.project_id AND s.profile_id = p.profile_id AND s.subscribed
    ) sub ON true
    LEFT JOIN LATERAL (
        SELECT count(*) AS session_count,
               coalesce(sum(extract(epoch FROM s.duration) * 1000), 0)::bigint AS time_spent_ms,
               (array_agg(s.country ORDER BY s.start_time DESC)
                    FILTER (WHERE coalesce(s.country, '') <> ''))[1] AS country
        FROM sessions s
        WHERE s.project_id = p.project_id AND s.profile_id = p.profile_id
    ) ss ON true
    LEFT JOIN LATERAL (
        SELECT e.event_time AS last_seen FROM events e
        WHERE e.project_id = p.project_id AND e.profile_id = p.profile_id
        ORDER BY e.event_time DESC
        LIMIT 1
    ) ls ON true
    WHERE p.project_id = $1 AND p.merged_into IS NULL {where}"""

PROFILE_FACT_COLUMNS = """identified, custom_id, has_email, has_phone, has_token,
    push_reachable, subscribed, language, region, country, platforms, first_name, last_name,
    has_details, device_model, device_platform, last_seen, session_count, time_spent_ms"""

# Concurrent recounts of one profile or installation (replicas, redeliveries) take turns, so
# each diffs against the facts the previous one stored. Keys are locked in one order.
LOCK_FACTS = """
    SELECT pg_advisory_xact_lock(hashtextextended($1::text || ':' || k, 0))
    FROM unnest($2::text[]) AS k ORDER BY k"""

SELECT_STORED_PROFILES = f"""
    SELECT profile_id, {PROFILE_FACT_COLUMNS}
    FROM query_profiles
    WHERE project_id = $1 AND profile_id = ANY($2::uuid[])"""

# Recounts the touched profiles and stores the result in one statement: live ones are upserted,
# the others (merged away, erased) deleted. Returns the recounted facts.
RECOUNT_PROFILES = f"""
    WITH f AS ({PROFILE_FACTS.format(where="AND p.profile_id = ANY($2::uuid[])")}),
    gone AS (
        DELETE FROM query_profiles q
        WHERE q.project_id = $1 AND q.profile_id = ANY($2::uuid[])
          AND NOT EXISTS (SELECT 1 FROM f WHERE f.profile_id = q.profile_id)
    ),
    up AS (
        INSERT INTO query_profiles (project_id, profile_id, {PROFILE_FACT_COLUMNS}, update_time)
        SELECT $1, f.*, $3 FROM f
        ORDER BY f.profile_id
        ON CONFLICT (project_id, profile_id) DO UPDATE SET
            identified = EXCLUDED.identified, custom_id = EXCLUDED.custom_id,
            has_email = EXCLUDED.has_email, has_phone = EXCLUDED.has_phone,
            has_token = EXCLUDED.has_token, push_reachable = EXCLUDED.push_reachable,
            subscribed = EXCLUDED.subscribed, language = EXCLUDED.language,
            region = EXCLUDED.region, country = EXCLUDED.country,
            platforms = EXCLUDED.platforms, first_name = EXCLUDED.first_name,
            last_name = EXCLUDED.last_name, has_details = EXCLUDED.has_details,
            device_model = EXCLUDED.device_model, device_platform = EXCLUDED.device_platform,
            last_seen = EXCLUDED.last_seen, session_count = EXCLUDED.session_count,
            time_spent_ms = EXCLUDED.time_spent_ms, update_time = EXCLUDED.update_time
    )
    SELECT * FROM f"""

# A rebuild of one project's profile facts (bench, operators): the same recount over all of it.
REBUILD_PROFILES = f"""
    INSERT INTO query_profiles (project_id, profile_id, {PROFILE_FACT_COLUMNS}, update_time)
    SELECT $1, f.*, $2 FROM ({PROFILE_FACTS.format(where="")}) f"""

# An installation known to identity but never seen by ingest has no details: platform 0.
INSTALLATION_FACTS = """
    SELECT i.installation_id, coalesce(d.platform, 0)::smallint AS platform, d.app_version,
           coalesce(d.uninstalled, false) AS uninstalled,
           coalesce(d.push_token IS NOT NULL, false) AS has_token,
           coalesce(d.push_opt_in, false) AS push_opt_in,
           coalesce(d.imported, false) AS imported
    FROM installations i
    LEFT JOIN installation_details d
        ON d.project_id = i.project_id AND d.installation_id = i.installation_id
    WHERE i.project_id = $1 {where}"""

INSTALLATION_FACT_COLUMNS = "platform, app_version, uninstalled, has_token, push_opt_in, imported"

SELECT_STORED_INSTALLATIONS = f"""
    SELECT installation_key AS installation_id, {INSTALLATION_FACT_COLUMNS}
    FROM query_installations
    WHERE project_id = $1 AND installation_key = ANY($2::text[])"""

RECOUNT_INSTALLATIONS = f"""
    WITH f AS ({INSTALLATION_FACTS.format(where="AND i.installation_id = ANY($2::text[])")}),
    gone AS (
        DELETE FROM query_installations q
        WHERE q.project_id = $1 AND q.installation_key = ANY($2::text[])
          AND NOT EXISTS (SELECT 1 FROM f WHERE f.installation_id = q.installation_key)
    ),
    up AS (
        INSERT INTO query_installations (project_id, installation_key,
                                         {INSTALLATION_FACT_COLUMNS})
        SELECT $1, f.* FROM f
        ORDER BY f.installation_id
        ON CONFLICT (project_id, installation_key) DO UPDATE SET
            platform = EXCLUDED.platform, app_version = EXCLUDED.app_version,
            uninstalled = EXCLUDED.uninstalled, has_token = EXCLUDED.has_token,
            push_opt_in = EXCLUDED.push_opt_in, imported = EXCLUDED.imported
    )
    SELECT * FROM f"""

REBUILD_INSTALLATIONS = f"""
    INSERT INTO query_installations (project_id, installation_key, {INSTALLATION_FACT_COLUMNS})
    SELECT $1, f.* FROM ({INSTALLATION_FACTS.format(where="")}) f"""

# Counters move by deltas, in key order (the caller sorts them) so two writers never wait on
# each other's rows in opposite orders.
MOVE_COUNTERS = """
    INSERT INTO query_counters AS c (project_id, platform, metric, value, count)
    SELECT $1, k.* FROM unnest($2::smallint[], $3::text[], $4::text[], $5::bigint[])
        AS k(platform, metric, value, count)
    ON CONFLICT (project_id, platform, metric, value) DO UPDATE
        SET count = c.count + EXCLUDED.count"""

DELETE_PROJECT_ROLLUPS = (
    "DELETE FROM query_profiles WHERE project_id = $1",
    "DELETE FROM query_installations WHERE project_id = $1",
    "DELETE FROM query_counters WHERE project_id = $1",
)
SELECT_ALL_PROFILE_FACTS = f"""
    SELECT profile_id, {PROFILE_FACT_COLUMNS} FROM query_profiles WHERE project_id = $1"""
SELECT_ALL_INSTALLATION_FACTS = f"""
    SELECT installation_key AS installation_id, {INSTALLATION_FACT_COLUMNS}
    FROM query_installations WHERE project_id = $1"""

# -- live feed --------------------------------------------------------------------------------

SELECT_PROFILE_VERSION = """
    SELECT version FROM profiles
    WHERE project_id = $1 AND profile_id = $2 AND merged_into IS NULL"""

# The current state of the attributes a live notice's events operated on.
SELECT_ATTRIBUTES_NAMED = """
    SELECT native, name, value, update_time
    FROM profile_attributes
    WHERE project_id = $1 AND profile_id = $2
      AND (native, name) IN (SELECT * FROM unnest($3::boolean[], $4::text[]))"""

UNAVAILABLE: tuple[type[Exception], ...] = (
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.TooManyConnectionsError,
    OSError,
)


@dataclass(frozen=True, slots=True)
class SessionTotals:
    session_count: int
    total_time_ms: int


def _text(value: str | None) -> str:
    return value or ""


def _change(r: asyncpg.Record) -> IdentityChangeView:
    return IdentityChangeView(
        change_id=r["change_id"],
        kind=r["kind"],
        cause=r["cause"],
        change_time=r["change_time"],
        source_profile_id=r["source_profile_id"],
        target_profile_id=r["target_profile_id"],
        installation_ids=tuple(r["installation_ids"]),
        alias_custom_id=_text(r["alias_custom_id"]),
    )


def _installation(r: asyncpg.Record) -> InstallationView:
    return InstallationView(
        installation_id=r["installation_id"],
        platform=r["platform"] or 0,
        app_version=_text(r["app_version"]),
        os_version=_text(r["os_version"]),
        device_model=_text(r["device_model"]),
        push_token_present=bool(r["push_token_present"]),
        push_opt_in=bool(r["push_opt_in"]),
        language=_text(r["language"]),
        timezone=_text(r["timezone"]),
        first_seen=r["first_seen"] or r["create_time"],
        last_seen=r["last_seen"],
        uninstalled=bool(r["uninstalled"]),
        imported=bool(r["imported"]),
    )


def _session(r: asyncpg.Record) -> SessionView:
    return SessionView(
        session_id=r["session_id"],
        installation_id=r["installation_id"],
        platform=r["platform"],
        start_time=r["start_time"],
        end_time=r["end_time"] if r["closed"] or r["ended"] else None,
        duration_ms=r["duration_ms"],
        timed_out=r["closed"] and not r["ended"],
        country=r["country"],
        event_count=r["event_count"],
    )


class QueryRepository:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[QueryReads]:
        """A READ ONLY REPEATABLE READ transaction: every read in it sees one snapshot."""
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            yield QueryReads(cast(asyncpg.Connection, conn))

    @asynccontextmanager
    async def rollup_writes(self) -> AsyncIterator[RollupWrites]:
        """A short READ COMMITTED transaction for one recount: each statement reads what is
        committed when it starts, after the recount's locks are held."""
        async with self._pool.acquire() as conn, conn.transaction():
            yield RollupWrites(cast(asyncpg.Connection, conn))

    @asynccontextmanager
    async def reads(self) -> AsyncIterator[QueryReads]:
        """One pooled connection, no transaction: for single-statement reads."""
        async with self._pool.acquire() as conn:
            yield QueryReads(cast(asyncpg.Connection, conn))


def _profile_facts(r: asyncpg.Record) -> ProfileFacts:
    return ProfileFacts(
        identified=r["identified"],
        has_email=r["has_email"],
        has_phone=r["has_phone"],
        has_token=r["has_token"],
        push_reachable=r["push_reachable"],
        subscribed=frozenset(r["subscribed"]),
        language=_text(r["language"]),
        region=_text(r["region"]),
        country=_text(r["country"]),
        platforms=frozenset(r["platforms"]),
        has_session=r["session_count"] > 0,
    )


def _installation_facts(r: asyncpg.Record) -> InstallationFacts:
    return InstallationFacts(
        platform=r["platform"],
        app_version=_text(r["app_version"]),
        uninstalled=r["uninstalled"],
        has_token=r["has_token"],
        push_opt_in=r["push_opt_in"],
        imported=r["imported"],
    )


class RollupWrites:
    """The projection's statements, in one transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def lock(self, project_id: UUID, keys: Sequence[str]) -> None:
        await self._conn.execute(LOCK_FACTS, str(project_id), sorted(set(keys)))

    async def stored_profiles(
        self, project_id: UUID, profile_ids: Sequence[UUID]
    ) -> dict[UUID, ProfileFacts]:
        rows = await self._conn.fetch(SELECT_STORED_PROFILES, project_id, list(profile_ids))
        return {r["profile_id"]: _profile_facts(r) for r in rows}

    async def recount_profiles(
        self, project_id: UUID, profile_ids: Sequence[UUID], now: datetime
    ) -> dict[UUID, ProfileFacts]:
        """Recounts and stores the facts of the profiles; the live ones' facts are returned."""
        rows = await self._conn.fetch(RECOUNT_PROFILES, project_id, list(profile_ids), now)
        return {r["profile_id"]: _profile_facts(r) for r in rows}

    async def stored_installations(
        self, project_id: UUID, installation_ids: Sequence[str]
    ) -> dict[str, InstallationFacts]:
        rows = await self._conn.fetch(
            SELECT_STORED_INSTALLATIONS, project_id, list(installation_ids)
        )
        return {r["installation_id"]: _installation_facts(r) for r in rows}

    async def recount_installations(
        self, project_id: UUID, installation_ids: Sequence[str]
    ) -> dict[str, InstallationFacts]:
        rows = await self._conn.fetch(RECOUNT_INSTALLATIONS, project_id, list(installation_ids))
        return {r["installation_id"]: _installation_facts(r) for r in rows}

    async def move_counters(
        self, project_id: UUID, changes: Sequence[tuple[CounterKey, int]]
    ) -> None:
        if not changes:
            return
        await self._conn.execute(
            MOVE_COUNTERS,
            project_id,
            [k[0] for k, _ in changes],
            [k[1] for k, _ in changes],
            [k[2] for k, _ in changes],
            [n for _, n in changes],
        )

    async def rebuild(self, project_id: UUID, now: datetime) -> None:
        """Recounts every profile and installation of the project and its counters."""
        for statement in DELETE_PROJECT_ROLLUPS:
            await self._conn.execute(statement, project_id)
        await self._conn.execute(REBUILD_PROFILES, project_id, now)
        await self._conn.execute(REBUILD_INSTALLATIONS, project_id)
        totals: Counter[CounterKey] = Counter()
        for statement, facts_of in (
            (SELECT_ALL_PROFILE_FACTS, _profile_facts),
            (SELECT_ALL_INSTALLATION_FACTS, _installation_facts),
        ):
            async for r in self._conn.cursor(statement, project_id, prefetch=10_000):
                totals.update(facts_of(r).counter_keys())
        await self.move_counters(project_id, sorted(totals.items()))


class QueryReads:
    """The read statements, on one connection."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    # -- lookups

    async def profile_exists(self, project_id: UUID, profile_id: UUID) -> tuple[UUID, bool] | None:
        """The live profile for `profile_id` and whether it was merged away, or None."""
        row = await self._conn.fetchrow(RESOLVE_PROFILE_ID, project_id, profile_id)
        return None if row is None else (row["profile_id"], row["merged"])

    async def resolve_custom_id(self, project_id: UUID, custom_id: str) -> UUID | None:
        return cast(
            UUID | None, await self._conn.fetchval(RESOLVE_CUSTOM_ID, project_id, custom_id)
        )

    async def resolve_installation(self, project_id: UUID, installation_id: str) -> UUID | None:
        return cast(
            UUID | None,
            await self._conn.fetchval(RESOLVE_INSTALLATION, project_id, installation_id),
        )

    async def installation_profiles(
        self, project_id: UUID, installation_ids: Sequence[str]
    ) -> dict[str, UUID]:
        rows = await self._conn.fetch(
            SELECT_INSTALLATION_PROFILES, project_id, list(installation_ids)
        )
        return {r["installation_id"]: r["profile_id"] for r in rows}

    async def resolve_native_value(self, project_id: UUID, name: str, value: str) -> list[UUID]:
        rows = await self._conn.fetch(RESOLVE_NATIVE_VALUE, project_id, name, value)
        return [r["profile_id"] for r in rows]

    # -- the profile view

    async def profile(self, project_id: UUID, profile_id: UUID) -> asyncpg.Record | None:
        return await self._conn.fetchrow(SELECT_PROFILE, project_id, profile_id)

    async def installations(
        self, project_id: UUID, profile_id: UUID
    ) -> tuple[InstallationView, ...]:
        rows = await self._conn.fetch(SELECT_INSTALLATIONS, project_id, profile_id)
        return tuple(_installation(r) for r in rows)

    async def attributes(self, project_id: UUID, profile_id: UUID) -> tuple[AttributeView, ...]:
        rows = await self._conn.fetch(SELECT_ATTRIBUTES, project_id, profile_id)
        return tuple(
            AttributeView(r["native"], r["name"], r["value"], r["update_time"]) for r in rows
        )

    async def attributes_state(
        self, project_id: UUID, profile_id: UUID, names: Sequence[tuple[bool, str]]
    ) -> dict[tuple[bool, str], tuple[dict[str, Any] | None, datetime] | None]:
        """The current (value, update time) of the named attributes (value None once unset);
        None for an attribute the profile never had."""
        rows = await self._conn.fetch(
            SELECT_ATTRIBUTES_NAMED,
            project_id,
            profile_id,
            [n for n, _ in names],
            [name for _, name in names],
        )
        found: dict[tuple[bool, str], tuple[dict[str, Any] | None, datetime] | None]
        found = dict.fromkeys(names)
        for r in rows:
            found[(r["native"], r["name"])] = (r["value"], r["update_time"])
        return found

    async def subscriptions(
        self, project_id: UUID, profile_id: UUID
    ) -> tuple[SubscriptionView, ...]:
        rows = await self._conn.fetch(SELECT_SUBSCRIPTIONS, project_id, profile_id)
        return tuple(
            SubscriptionView(r["channel"], r["kind"], r["subscribed"], r["change_time"])
            for r in rows
        )

    async def last_crash(self, project_id: UUID, profile_id: UUID) -> CrashView | None:
        r = await self._conn.fetchrow(SELECT_LAST_CRASH, project_id, profile_id)
        if r is None:
            return None
        payload = r["payload"] or {}
        return CrashView(
            event_id=r["event_id"],
            installation_id=r["installation_id"],
            crash_time=r["event_time"],
            name=str(payload.get("name", "")),
            reason=str(payload.get("reason", "")),
            fatal=bool(payload.get("fatal", False)),
        )

    async def last_session_country(self, project_id: UUID, profile_id: UUID) -> str:
        return _text(await self._conn.fetchval(SELECT_LAST_SESSION_COUNTRY, project_id, profile_id))

    async def session_totals(self, project_id: UUID, profile_id: UUID) -> SessionTotals:
        r = await self._conn.fetchrow(SELECT_SESSION_TOTALS, project_id, profile_id)
        assert r is not None
        return SessionTotals(r["session_count"], r["total_time_ms"])

    async def identity_changes(
        self, project_id: UUID, profile_id: UUID, limit: int
    ) -> tuple[IdentityChangeView, ...]:
        rows = await self._conn.fetch(SELECT_IDENTITY_CHANGES, project_id, profile_id, limit)
        return tuple(_change(r) for r in rows)

    async def smart_segment(
        self, project_id: UUID, profile_id: UUID, now: datetime
    ) -> SmartSegmentView | None:
        r = await self._conn.fetchrow(SELECT_SMART_SEGMENT, project_id, profile_id)
        if r is None:
            return None
        segment, flag = r["segment"], r["flag"]
        upcoming = list(
            zip(r["upcoming_times"], r["upcoming_segments"], r["upcoming_flags"], strict=True)
        )
        next_time = None
        for step_time, step_segment, step_flag in sorted(upcoming):
            if step_time <= now:
                segment, flag = step_segment, step_flag
            elif next_time is None:
                next_time = step_time
        stored_next = r["next_transition_time"]
        # 'infinity' (no transition ahead) reads back as datetime.max.
        if next_time is None and stored_next.year < 9999 and stored_next > now:
            next_time = stored_next
        return SmartSegmentView(segment, flag, next_time)

    async def engagement_inputs(
        self, project_id: UUID, profile_id: UUID, now: datetime
    ) -> tuple[int, float, int]:
        """(sessions, average duration in ms, active days) over the 168 h before `now`."""
        r = await self._conn.fetchrow(SELECT_ENGAGEMENT, project_id, profile_id, now)
        assert r is not None
        return r["session_count"], r["average_ms"], r["active_days"]

    async def counters(
        self, project_id: UUID, profile_id: UUID, event_count: int, crash_count: int
    ) -> CountersView:
        totals = await self.session_totals(project_id, profile_id)
        return CountersView(
            event_count=event_count,
            crash_count=crash_count,
            session_count=totals.session_count,
            total_time_ms=totals.total_time_ms,
            last_crash=await self.last_crash(project_id, profile_id) if crash_count else None,
        )

    # -- timelines

    async def timeline_snapshot(
        self, project_id: UUID, profile_id: UUID
    ) -> tuple[int, datetime | None]:
        r = await self._conn.fetchrow(SELECT_TIMELINE_SNAPSHOT, project_id, profile_id)
        assert r is not None
        return r["max_seq"], r["max_change_time"]

    async def events_page(
        self,
        project_id: UUID,
        profile_id: UUID,
        *,
        max_seq: int,
        after: tuple[datetime, int],
        start: datetime,
        end: datetime,
        kinds: Sequence[int],
        names: Sequence[str],
        session_id: str,
        limit: int,
    ) -> list[EventView]:
        rows = await self._conn.fetch(
            SELECT_EVENTS_PAGE,
            project_id,
            profile_id,
            max_seq,
            after[0],
            after[1],
            start,
            end,
            list(kinds),
            list(names),
            session_id,
            limit,
        )
        return [
            EventView(
                event_seq=r["event_seq"],
                event_id=r["event_id"],
                kind=r["kind"],
                event_time=r["event_time"],
                receive_time=r["receive_time"],
                installation_id=r["installation_id"],
                session_id=r["session_id"],
                platform=r["platform"],
                payload=r["payload"],
                imported=r["imported"],
            )
            for r in rows
        ]

    async def changes_page(
        self,
        project_id: UUID,
        profile_id: UUID,
        *,
        kinds: Sequence[str],
        max_change_time: datetime,
        after: tuple[datetime, UUID],
        start: datetime,
        end: datetime,
        limit: int,
    ) -> list[IdentityChangeView]:
        rows = await self._conn.fetch(
            SELECT_CHANGES_PAGE,
            project_id,
            profile_id,
            list(kinds),
            max_change_time,
            after[0],
            after[1],
            start,
            end,
            limit,
        )
        return [_change(r) for r in rows]

    async def now(self) -> datetime:
        return cast(datetime, await self._conn.fetchval(SELECT_NOW))

    async def sessions_page(
        self,
        project_id: UUID,
        profile_id: UUID,
        *,
        max_start: datetime,
        after: tuple[datetime, str, str],
        start: datetime,
        end: datetime,
        limit: int,
    ) -> list[SessionView]:
        rows = await self._conn.fetch(
            SELECT_SESSIONS_PAGE,
            project_id,
            profile_id,
            max_start,
            after[0],
            after[1],
            after[2],
            start,
            end,
            limit,
        )
        return [_session(r) for r in rows]

    async def sessions_snapshot(self, project_id: UUID, profile_id: UUID) -> datetime | None:
        return cast(
            datetime | None,
            await self._conn.fetchval(SELECT_SESSIONS_SNAPSHOT, project_id, profile_id),
        )

    async def profile_timezone(self, project_id: UUID, profile_id: UUID) -> str:
        return _text(await self._conn.fetchval(SELECT_PROFILE_TIMEZONE, project_id, profile_id))

    async def activity(
        self, project_id: UUID, profile_id: UUID, time_zone: str, start: datetime, end: datetime
    ) -> dict[str, DayView]:
        days: dict[str, DayView] = {}
        for r in await self._conn.fetch(
            SELECT_EVENT_DAYS, project_id, profile_id, time_zone, start, end
        ):
            days[r["day"]] = DayView(r["day"], 0, r["event_count"], 0)
        for r in await self._conn.fetch(
            SELECT_SESSION_DAYS, project_id, profile_id, time_zone, start, end
        ):
            held = days.get(r["day"])
            days[r["day"]] = DayView(
                r["day"],
                r["session_count"],
                held.event_count if held else 0,
                r["time_spent_ms"],
            )
        return days

    # -- rejected events

    async def rejected_snapshot(self, project_id: UUID) -> int:
        return cast(int, await self._conn.fetchval(SELECT_REJECTED_SNAPSHOT, project_id))

    async def rejected_page(
        self,
        project_id: UUID,
        *,
        max_seq: int,
        after: tuple[datetime, int],
        start: datetime,
        end: datetime,
        reasons: Sequence[str],
        limit: int,
    ) -> list[tuple[int, RejectedView]]:
        rows = await self._conn.fetch(
            SELECT_REJECTED_PAGE,
            project_id,
            max_seq,
            after[0],
            after[1],
            start,
            end,
            list(reasons),
            limit,
        )
        found = []
        for r in rows:
            payload = r["payload"]
            platform = payload.get("platform") if isinstance(payload, dict) else None
            found.append(
                (
                    r["rejected_seq"],
                    RejectedView(
                        receive_time=r["receive_time"],
                        reason=r["reason"],
                        field_path=r["field_path"],
                        message=r["message"],
                        event_id=r["event_id"],
                        installation_id=r["installation_id"],
                        platform=platform if isinstance(platform, int) else 0,
                        payload=payload,
                    ),
                )
            )
        return found

    # -- the users table

    async def profile_rows_page(
        self,
        project_id: UUID,
        *,
        now: datetime,
        identity_filter: int,
        platform: int,
        country: str,
        smart_segment: int,
        smart_segment_flag: int,
        order_by: int,
        ascending: bool,
        after: tuple[int, UUID],
        limit: int,
    ) -> list[tuple[int, ProfileRowView]]:
        rows = await self._conn.fetch(
            SELECT_PROFILE_ROWS_PAGE,
            project_id,
            now,
            identity_filter,
            platform,
            country,
            smart_segment,
            order_by,
            ascending,
            smart_segment_flag,
            after[0],
            after[1],
            limit,
        )
        return [
            (
                r["sort_key"],
                ProfileRowView(
                    profile_id=r["profile_id"],
                    custom_id=r["custom_id"],
                    first_name=r["first_name"],
                    last_name=r["last_name"],
                    device_model=r["device_model"],
                    platform=r["platform"],
                    session_count=r["session_count"],
                    last_seen=r["last_seen"],
                    time_spent_ms=r["time_spent_ms"],
                    country=r["country"],
                    smart_segment=r["smart_segment"],
                    smart_segment_flag=r["smart_segment_flag"],
                ),
            )
            for r in rows
        ]

    # -- the overview

    async def overview_counters(
        self, project_id: UUID, platform: int
    ) -> list[tuple[str, str, int]]:
        rows = await self._conn.fetch(SELECT_COUNTERS, project_id, platform)
        return [(r["metric"], r["value"], r["count"]) for r in rows]

    async def segment_distribution(
        self, project_id: UUID, platform: int, as_of: datetime
    ) -> list[tuple[int, int, int]]:
        rows = await self._conn.fetch(SELECT_SEGMENT_DISTRIBUTION, project_id, platform, as_of)
        return [(r["segment"], r["flag"], r["profile_count"]) for r in rows]

    # -- live feed

    async def profile_version(self, project_id: UUID, profile_id: UUID) -> int | None:
        return cast(
            int | None, await self._conn.fetchval(SELECT_PROFILE_VERSION, project_id, profile_id)
        )
