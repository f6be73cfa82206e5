"""Every SQL statement of query, and only SQL. Query reads the tables of identity (profiles,
installations, identity_changes, custom_id_aliases), ingest (events, rejected_events,
profile_attributes, profile_subscriptions, installation_details) and segments
(segment_sessions, segment_states, segment_distribution(), custom_segment_members,
profile_funnel_progress()), read-only, through the read
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
from datetime import UTC, datetime
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
    FunnelProgressView,
    FunnelStepView,
    IdentityChangeView,
    InstallationView,
    ProfileRowView,
    ProfileView,
    RejectedView,
    SegmentMembershipView,
    SessionView,
    SmartSegmentView,
    SubscriptionView,
)

MAX_BIGINT = 9_223_372_036_854_775_807
# Keyset positions before the first row of an ascending or descending walk.
NEG_INFINITY = datetime(1, 1, 1, tzinfo=UTC)
POS_INFINITY = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
NIL_UUID = UUID(int=0)
# Above every name in code point order (collation "C"): the start of a descending name walk.
MAX_TEXT = "\U0010ffff" * 4
MAX_UUID = UUID(int=(1 << 128) - 1)

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

# The whole profile view in one statement, hence one round trip and one snapshot (a single
# statement needs no transaction to read consistently). {target} resolves the lookup to at most
# one row (profile_id, resolved_from, holders): the live profile, the merged-away ID looked up,
# and for an email or phone every holder (up to 11, to tell an ambiguous lookup). The columns
# are the statements above, correlated on the target profile; lists come back as arrays of
# anonymous records (asyncpg decodes them to tuples; a jsonb inside one is cast to json, whose
# binary form is the text the pool's JSON codec reads). Custom segment memberships and funnel
# progress come from segments' read contracts (0005): custom_segment_members (current as of
# segments' last evaluation of the profile: its last event, or the periodic sweep for changes
# time alone makes) and profile_funnel_progress() (computed from events as of $3). $1 project,
# $2 the looked-up value, $3 now (engagement's window end, funnels' as-of). No row: nothing
# found by the lookup; a row with a NULL profile_id: ambiguous, or found but not live.
# Two averages of session length, on purpose over two windows: session_totals' third column
# is the all-time average over ingest's closed sessions (ended, or closed by the idle sweep;
# Counters.average_session_duration), engagement's the average over segments' ended sessions
# started in the 168 hours up to $3 (score1, segments' rule, 0011); an open session's length
# is not known yet, so neither counts it. Sessions that all ended inside the window give both
# the same value.
# Nothing here grows with the profile's events: their totals, first and last seen come from
# profile_event_counts (0008, 0014: kept exact after retention removed old events), the last
# crash is the top of events_crashes_by_profile.
PROFILE_VIEW = """
    WITH target AS ({target})
    SELECT t.holders, t.resolved_from, p.profile_id, p.custom_id, p.version,
           s.first_event_time AS first_seen, s.last_event_time AS last_seen,
           coalesce(s.event_count, 0) AS event_count, coalesce(s.crash_count, 0) AS crash_count,
           (SELECT x.country FROM sessions x
            WHERE x.project_id = $1 AND x.profile_id = p.profile_id
              AND coalesce(x.country, '') <> ''
            ORDER BY x.start_time DESC
            LIMIT 1) AS last_session_country,
           ARRAY(
               SELECT ROW(i.installation_id, i.create_time, d.platform, d.app_version,
                          d.os_version, d.device_model, d.push_token IS NOT NULL, d.push_opt_in,
                          d.language, d.timezone, d.uninstalled, d.first_seen, d.last_seen,
                          d.imported)
               FROM installations i
               LEFT JOIN installation_details d
                   ON d.project_id = i.project_id AND d.installation_id = i.installation_id
               WHERE i.project_id = $1 AND i.profile_id = p.profile_id
               ORDER BY d.last_seen DESC NULLS LAST, i.installation_id) AS installations,
           ARRAY(
               SELECT ROW(a.native, a.name, a.value::json, a.update_time)
               FROM profile_attributes a
               WHERE a.project_id = $1 AND a.profile_id = p.profile_id AND a.value IS NOT NULL
               ORDER BY a.native DESC, a.name) AS attributes,
           ARRAY(
               SELECT ROW(b.channel, b.kind, b.subscribed, b.change_time)
               FROM profile_subscriptions b
               WHERE b.project_id = $1 AND b.profile_id = p.profile_id) AS subscriptions,
           (SELECT ROW(count(*),
                       coalesce(sum(extract(epoch FROM x.duration) * 1000), 0)::bigint,
                       coalesce(avg(extract(epoch FROM x.duration) * 1000)
                                    FILTER (WHERE x.closed), 0)::bigint)
            FROM sessions x
            WHERE x.project_id = $1 AND x.profile_id = p.profile_id) AS session_totals,
           CASE WHEN s.crash_count > 0 THEN (
               SELECT ROW(e.event_id, coalesce(e.installation_id, ''), e.event_time,
                          coalesce(e.payload ->> 'name', ''), coalesce(e.payload ->> 'reason', ''),
                          coalesce((e.payload ->> 'fatal')::boolean, false))
               FROM events e
               WHERE e.project_id = $1 AND e.profile_id = p.profile_id AND e.kind = 8
               ORDER BY e.event_time DESC, e.event_seq DESC
               LIMIT 1) END AS last_crash,
           ARRAY(
               SELECT ROW(c.change_id, c.kind, c.cause, c.change_time, c.source_profile_id,
                          c.target_profile_id, c.installation_ids, c.alias_custom_id)
               FROM identity_changes c
               WHERE c.project_id = $1
                 AND (c.source_profile_id IN (
                          SELECT p.profile_id UNION ALL
                          SELECT m.profile_id FROM profiles m
                          WHERE m.project_id = $1 AND m.merged_into = p.profile_id)
                      OR c.target_profile_id IN (
                          SELECT p.profile_id UNION ALL
                          SELECT m.profile_id FROM profiles m
                          WHERE m.project_id = $1 AND m.merged_into = p.profile_id))
               ORDER BY c.change_time DESC, c.change_id DESC
               LIMIT $4) AS identity_changes,
           g.segment, g.flag, g.next_transition_time, g.upcoming_times, g.upcoming_segments,
           g.upcoming_flags,
           (SELECT ROW(count(*), coalesce(avg(x.duration_ms) FILTER (WHERE x.ended), 0)::float8,
                       count(DISTINCT (x.start_time AT TIME ZONE coalesce(
                           (SELECT sp.time_zone FROM segment_profiles sp
                            WHERE sp.project_id = $1 AND sp.profile_id = p.profile_id),
                           'UTC'))::date))
            FROM segment_sessions x
            WHERE x.project_id = $1 AND x.profile_id = p.profile_id
              AND x.start_time >= $3::timestamptz - interval '168 hours'
              AND x.start_time <= $3::timestamptz) AS engagement,
           ARRAY(
               SELECT ROW(m.segment_id, c.display_name, m.enter_time)
               FROM custom_segment_members m
               JOIN custom_segments c
                   ON c.project_id = m.project_id AND c.segment_id = m.segment_id
               WHERE m.project_id = $1 AND m.profile_id = p.profile_id
               ORDER BY lower(c.display_name), c.segment_id) AS segment_memberships,
           CASE WHEN p.profile_id IS NOT NULL THEN ARRAY(
               SELECT ROW(f.funnel_id, f.display_name, f.step_number, f.event_name,
                          f.complete_time)
               FROM profile_funnel_progress($1, p.profile_id, $3::timestamptz)
                   WITH ORDINALITY AS f
               ORDER BY f.ordinality) END AS funnel_steps
    FROM target t
    LEFT JOIN profiles p
        ON p.project_id = $1 AND p.profile_id = t.profile_id AND p.merged_into IS NULL
    LEFT JOIN profile_event_counts s ON s.project_id = $1 AND s.profile_id = p.profile_id
    -- Columns, not a record: asyncpg decodes a record's arrays only of types it already knows.
    LEFT JOIN segment_states g
        ON g.project_id = $1 AND g.profile_id = p.profile_id AND g.platform = 0"""

# The lookups above, shaped as PROFILE_VIEW's target.
PROFILE_VIEW_TARGETS = {
    "profile_id": """
        SELECT coalesce(merged_into, profile_id) AS profile_id,
               CASE WHEN merged_into IS NOT NULL THEN profile_id END AS resolved_from,
               NULL::uuid[] AS holders
        FROM profiles
        WHERE project_id = $1 AND profile_id = $2::uuid""",
    "custom_id": f"""
        SELECT r.profile_id, NULL::uuid AS resolved_from, NULL::uuid[] AS holders
        FROM ({RESOLVE_CUSTOM_ID}) r""",
    "installation_id": f"""
        SELECT r.profile_id, NULL::uuid AS resolved_from, NULL::uuid[] AS holders
        FROM ({RESOLVE_INSTALLATION}) r""",
    **{
        name: f"""
        SELECT CASE WHEN cardinality(h.ids) = 1 THEN h.ids[1] END AS profile_id,
               NULL::uuid AS resolved_from, h.ids AS holders
        FROM (SELECT ARRAY({RESOLVE_NATIVE_VALUE.replace("$2", f"'{name}'").replace("$3", "$2")})
              AS ids) h"""
        for name in ("email", "phone")
    },
}
PROFILE_VIEW_BY_LOOKUP = {
    kind: PROFILE_VIEW.format(target=target) for kind, target in PROFILE_VIEW_TARGETS.items()
}

# -- timelines --------------------------------------------------------------------------------

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

# A page of the timeline in one statement (one round trip, one snapshot): the live profile ($2
# or its survivor), the snapshot a first page fixes (newest event_seq of the project, newest
# identity change of the profile: asked for by $16), the events page (SELECT_EVENTS_PAGE; no
# kinds, no scan), the merges and splits page (SELECT_CHANGES_PAGE; skipped without kinds or
# bound) and, when $17 asks and the profile has any identity change, what tells which
# profile each event was first attached to: the newest changes and the current profile of
# each installation on the page. The events come as one JSON array of arrays, which the
# pool's codec parses in one call (times are ISO 8601 with their offset, which
# datetime.fromisoformat reads faster than arithmetic on epoch numbers): a profile of
# ListEvents put a json.loads per payload and the decoding of an array of records at a third
# of the service's own CPU per page. The other lists are arrays of anonymous records; the
# service orders them. No row: no such live profile.
SELECT_TIMELINE_PAGE = """
    WITH live AS (
        SELECT coalesce(merged_into, profile_id) AS profile_id FROM profiles
        WHERE project_id = $1 AND profile_id = $2
    ),
    ids AS (
        SELECT profile_id AS id FROM live
        UNION ALL
        SELECT m.profile_id FROM profiles m
        WHERE m.project_id = $1 AND m.merged_into = (SELECT profile_id FROM live)
    ),
    changed AS (
        SELECT max(c.change_time) AS max_change_time FROM identity_changes c
        WHERE c.project_id = $1
          AND (c.source_profile_id IN (SELECT id FROM ids)
               OR c.target_profile_id IN (SELECT id FROM ids))
    ),
    page AS (
        SELECT e.event_seq, e.event_id, e.kind, e.event_time, e.receive_time,
               coalesce(e.installation_id, '') AS installation_id,
               coalesce(e.session_id, '') AS session_id, e.platform, e.payload, e.imported
        FROM events e
        WHERE e.project_id = $1 AND e.profile_id = (SELECT profile_id FROM live)
          AND cardinality($8::smallint[]) > 0
          AND e.event_seq <= $3
          AND (e.event_time, e.event_seq) < ($4::timestamptz, $5::bigint)
          AND e.event_time >= $6 AND e.event_time < $7
          AND e.kind = ANY($8::smallint[])
          AND (cardinality($9::text[]) = 0 OR e.name = ANY($9::text[]))
          AND ($10::text = '' OR e.session_id = $10)
          AND e.payload IS NOT NULL
        ORDER BY e.event_time DESC, e.event_seq DESC
        LIMIT $11
    ),
    attributed AS (
        SELECT $17::boolean AND EXISTS (SELECT 1 FROM page)
               AND (SELECT max_change_time FROM changed) IS NOT NULL AS wanted
    )
    SELECT l.profile_id,
           CASE WHEN $16::boolean THEN
               (SELECT coalesce(max(event_seq), 0) FROM events WHERE project_id = $1)
           END AS max_seq,
           (SELECT max_change_time FROM changed) AS max_change_time,
           (SELECT json_agg(json_build_array(
                       page.event_seq, page.event_id, page.kind, page.event_time,
                       page.receive_time, page.installation_id, page.session_id, page.platform,
                       page.payload, page.imported))
            FROM page) AS events,
           ARRAY(
               SELECT ROW(c.change_id, c.kind, c.cause, c.change_time, c.source_profile_id,
                          c.target_profile_id, c.installation_ids, c.alias_custom_id)
               FROM identity_changes c
               WHERE c.project_id = $1
                 AND cardinality($12::text[]) > 0 AND $13::timestamptz IS NOT NULL
                 AND (c.source_profile_id IN (SELECT id FROM ids)
                      OR c.target_profile_id IN (SELECT id FROM ids))
                 AND c.kind = ANY($12::text[])
                 AND c.change_time <= $13
                 AND (c.change_time, c.change_id) < ($14::timestamptz, $15::uuid)
                 AND c.change_time >= $6 AND c.change_time < $7
               ORDER BY c.change_time DESC, c.change_id DESC
               LIMIT $11) AS changes,
           ARRAY(
               SELECT ROW(c.change_id, c.kind, c.cause, c.change_time, c.source_profile_id,
                          c.target_profile_id, c.installation_ids, c.alias_custom_id)
               FROM identity_changes c
               WHERE c.project_id = $1 AND (SELECT wanted FROM attributed)
                 AND (c.source_profile_id IN (SELECT id FROM ids)
                      OR c.target_profile_id IN (SELECT id FROM ids))
               ORDER BY c.change_time DESC, c.change_id DESC
               LIMIT $18) AS attribution_changes,
           ARRAY(
               SELECT ROW(i.installation_id, i.profile_id)
               FROM installations i
               WHERE i.project_id = $1 AND (SELECT wanted FROM attributed)
                 AND i.installation_id IN (SELECT installation_id FROM page)
           ) AS installation_profiles
    FROM live l"""

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

# The users table reads query's projection (query_profiles, 0006): one row per live profile
# with the table's columns, kept by the rollup consumer (so it lags writes by the bus lag), and
# indexed per sort key. A page walks one index from the keyset position, (value, profile_id)
# ascending or both descending, so its cost is the page, not the project. A profile never seen
# (last_seen NULL) sorts last in both directions, by profile_id: the second branch of the
# UNION ALL, read only when the first ends short ($8: the position is already among them, $11
# the profile_id after which they continue). The smart segment comes from segments' stored state
# as of $2 (as in SELECT_PROFILE_VIEW). Filters not asked for are constants (0, ''), so one
# statement per sort order serves every combination; the custom segment filter ($13) has
# statements of its own (PROFILE_ROWS_IN_SEGMENT), so that the planner sees a plain semi-join
# on segments' custom_segment_members (0005) and may drive a small segment from its members
# instead of walking the sort index past non-members.
PROFILE_ROWS_FROM = """
    SELECT q.profile_id, coalesce(q.custom_id, '') AS custom_id,
           coalesce(q.first_name, '') AS first_name, coalesce(q.last_name, '') AS last_name,
           coalesce(q.device_model, '') AS device_model, q.device_platform::int AS platform,
           q.last_seen, q.session_count, q.time_spent_ms, coalesce(q.country, '') AS country,
           coalesce(sg.segment, 0)::int AS smart_segment,
           coalesce(sg.flag, 0)::int AS smart_segment_flag, q.{column} AS sort_value
    FROM query_profiles q
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
        WHERE s.project_id = q.project_id AND s.profile_id = q.profile_id AND s.platform = 0
    ) sg ON true
    WHERE q.project_id = $1
      AND ($3::int = 0
           OR ($3 = 1 AND q.identified)
           OR ($3 = 2 AND NOT q.identified)
           OR ($3 = 3 AND q.has_details))
      AND ($4::int = 0 OR $4::smallint = ANY(q.platforms))
      AND ($5::text = '' OR q.country = $5)
      AND ($6::int = 0 OR coalesce(sg.segment, 0) = $6)
      AND ($7::int = 0 OR coalesce(sg.flag, 0) = $7){members}"""

# The members of custom segment $13 as segments stored them (rows naming a merged-away or
# erased profile drop out here: query_profiles holds live profiles only).
PROFILE_ROWS_IN_SEGMENT = """
      AND q.profile_id IN (SELECT m.profile_id FROM custom_segment_members m
                           WHERE m.project_id = $1 AND m.segment_id = $13::uuid)"""

PROFILE_ROWS_PAGE = f"""
    (SELECT * FROM ({PROFILE_ROWS_FROM}
          AND NOT $8::boolean AND q.{{column}} IS NOT NULL
          AND (q.{{column}}, q.profile_id) {{compare}} ($9::{{type}}, $10::uuid)
        ORDER BY q.{{column}} {{direction}}, q.profile_id {{direction}}
        LIMIT $12) seen)
    UNION ALL
    (SELECT * FROM ({PROFILE_ROWS_FROM}
          AND q.{{column}} IS NULL AND q.profile_id > $11::uuid
        ORDER BY q.profile_id
        LIMIT $12) unseen)
    LIMIT $12"""

# ProfileOrderBy -> the projection's column and its type.
PROFILE_SORT_COLUMNS = {
    1: ("last_seen", "timestamptz"),
    2: ("session_count", "bigint"),
    3: ("time_spent_ms", "bigint"),
    4: ("sort_name", "text"),  # collation "C" (0012): MAX_TEXT is above every name
}
SELECT_PROFILE_ROWS_PAGE = {
    (order_by, ascending, in_segment): PROFILE_ROWS_PAGE.format(
        column=column,
        type=type_name,
        compare=">" if ascending else "<",
        direction="ASC" if ascending else "DESC",
        members=PROFILE_ROWS_IN_SEGMENT if in_segment else "",
    )
    for order_by, (column, type_name) in PROFILE_SORT_COLUMNS.items()
    for ascending in (True, False)
    for in_segment in (True, False)
}

SELECT_SEGMENT_EXISTS = """
    SELECT 1 FROM custom_segments WHERE project_id = $1 AND segment_id = $2"""

# -- the rollups (query's projection, 0006) ---------------------------------------------------

# GetOverview reads one project's and platform's counters: an index range of the primary key,
# as many rows as distinct values (languages, countries, app versions...), whatever the number
# of profiles.
SELECT_COUNTERS = """
    SELECT metric, value, count FROM query_counters
    WHERE project_id = $1 AND platform = $2 AND count <> 0"""

# The whole overview in one statement, hence one snapshot without a transaction (BEGIN and
# COMMIT were two of its four round trips): the counters above (segment and flag NULL), then
# segments' read contract (0005), the smart segment distribution exact as of $3 on platform $2
# (0: all), with metric NULL.
SELECT_OVERVIEW = f"""
    SELECT c.metric, c.value, c.count, NULL::smallint AS segment, NULL::smallint AS flag
    FROM ({SELECT_COUNTERS}) c
    UNION ALL
    SELECT NULL, NULL, d.profile_count, d.segment, d.flag
    FROM segment_distribution($1, $2::smallint, $3) d"""

# The facts of live profiles, recounted from identity's and ingest's tables (read contracts of
# 0002 and 0004); each lateral read is one profile's rows by its index. {where} narrows it to
# the profiles a message touched, or to nothing more for a rebuild of the whole project.
# Imported installations folded into an SDK installation are left out, as in
# INSTALLATION_FACTS below: they give a profile no platform, token or device.
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
          AND d.reintegrated_into IS NULL
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


def _set_from_excluded(columns: str) -> str:
    """`a = EXCLUDED.a, b = EXCLUDED.b` for an upsert, derived from the column list so the two
    can never drift apart."""
    return ", ".join(f"{c} = EXCLUDED.{c}" for c in (c.strip() for c in columns.split(",")))


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
            {_set_from_excluded(PROFILE_FACT_COLUMNS)}, update_time = EXCLUDED.update_time
    )
    SELECT * FROM f"""

# A rebuild of one project's profile facts (bench, operators): the same recount over all of it.
REBUILD_PROFILES = f"""
    INSERT INTO query_profiles (project_id, profile_id, {PROFILE_FACT_COLUMNS}, update_time)
    SELECT $1, f.*, $2 FROM ({PROFILE_FACTS.format(where="")}) f"""

# An installation known to identity but never seen by ingest has no details: platform 0. An
# imported installation folded into the SDK installation that sent its token
# (reintegrated_into) is history, not an installation: it has no facts, so a recount deletes
# its row and takes it out of the counters, and the device counts once, as itself.
INSTALLATION_FACTS = """
    SELECT i.installation_id, coalesce(d.platform, 0)::smallint AS platform, d.app_version,
           coalesce(d.uninstalled, false) AS uninstalled,
           coalesce(d.push_token IS NOT NULL, false) AS has_token,
           coalesce(d.push_opt_in, false) AS push_opt_in,
           coalesce(d.imported, false) AS imported
    FROM installations i
    LEFT JOIN installation_details d
        ON d.project_id = i.project_id AND d.installation_id = i.installation_id
    WHERE i.project_id = $1 AND d.reintegrated_into IS NULL {where}"""

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
            {_set_from_excluded(INSTALLATION_FACT_COLUMNS)}
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
class ProfileRead:
    """What PROFILE_VIEW read: `view` is None when the lookup found no live profile (or several
    holders); engagement is left to the service, which applies segments' formula to
    `engagement_inputs` (sessions, average duration in ms, active days)."""

    holders: tuple[UUID, ...]
    resolved_from: UUID | None
    view: ProfileView | None
    engagement_inputs: tuple[int, float, int]


@dataclass(frozen=True, slots=True)
class TimelineRead:
    """What SELECT_TIMELINE_PAGE read: the live profile, the snapshot's newest event_seq and
    identity change time, a page of events and of changes, and what attributes the events
    (empty unless asked for and the profile has identity changes)."""

    profile_id: UUID
    max_seq: int
    max_change_time: datetime | None
    events: list[EventView]
    changes: list[IdentityChangeView]
    attribution_changes: list[IdentityChangeView]
    installation_profiles: dict[str, UUID]


@dataclass(frozen=True, slots=True)
class SessionTotals:
    session_count: int
    total_time_ms: int


def _text(value: str | None) -> str:
    return value or ""


def _funnels(rows: Sequence[Sequence[Any]]) -> tuple[FunnelProgressView, ...]:
    """profile_funnel_progress() rows (one per funnel and step, in order) grouped by funnel."""
    funnels: dict[UUID, tuple[str, list[FunnelStepView]]] = {}
    for funnel_id, display_name, step_number, event_name, complete_time in rows:
        _, steps = funnels.setdefault(funnel_id, (display_name, []))
        steps.append(FunnelStepView(step_number, event_name, complete_time))
    return tuple(
        FunnelProgressView(funnel_id, name, tuple(steps))
        for funnel_id, (name, steps) in funnels.items()
    )


def _smart_segment(state: Sequence[Any] | asyncpg.Record, now: datetime) -> SmartSegmentView:
    """Segments' stored state (SELECT_SMART_SEGMENT's columns, in their order) as of `now`:
    the scheduled time-only transitions already due are applied (the same rule as
    segment_distribution() in 0005)."""
    segment, flag, stored_next, upcoming_times, upcoming_segments, upcoming_flags = state
    next_time = None
    for step_time, step_segment, step_flag in sorted(
        zip(upcoming_times, upcoming_segments, upcoming_flags, strict=True)
    ):
        if step_time <= now:
            segment, flag = step_segment, step_flag
        elif next_time is None:
            next_time = step_time
    # 'infinity' (no transition ahead) reads back as datetime.max.
    if next_time is None and stored_next.year < 9999 and stored_next > now:
        next_time = stored_next
    return SmartSegmentView(segment, flag, next_time)


def _change(c: Sequence[Any] | asyncpg.Record) -> IdentityChangeView:
    """An identity change from a record of SELECT_IDENTITY_CHANGES's columns, in their order."""
    return IdentityChangeView(
        change_id=c[0],
        kind=c[1],
        cause=c[2],
        change_time=c[3],
        source_profile_id=c[4],
        target_profile_id=c[5],
        installation_ids=tuple(c[6]),
        alias_custom_id=c[7] or "",
    )


def _installation(r: Sequence[Any] | asyncpg.Record) -> InstallationView:
    """An installation from a record of SELECT_INSTALLATIONS's columns, in their order."""
    return InstallationView(
        installation_id=r[0],
        platform=r[2] or 0,
        app_version=r[3] or "",
        os_version=r[4] or "",
        device_model=r[5] or "",
        push_token_present=bool(r[6]),
        push_opt_in=bool(r[7]),
        language=r[8] or "",
        timezone=r[9] or "",
        first_seen=r[11] or r[1],
        last_seen=r[12],
        uninstalled=bool(r[10]),
        imported=bool(r[13]),
    )


def _event(e: Sequence[Any]) -> EventView:
    """An event from one array of SELECT_TIMELINE_PAGE's events JSON, in its order."""
    seq, event_id, kind, event_time, receive_time, installation_id, session_id, platform = e[:8]
    return EventView(
        seq,
        event_id,
        kind,
        datetime.fromisoformat(event_time),
        datetime.fromisoformat(receive_time),
        installation_id,
        session_id,
        platform,
        e[8],
        e[9],
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

    async def installation_profiles(
        self, project_id: UUID, installation_ids: Sequence[str]
    ) -> dict[str, UUID]:
        rows = await self._conn.fetch(
            SELECT_INSTALLATION_PROFILES, project_id, list(installation_ids)
        )
        return {r["installation_id"]: r["profile_id"] for r in rows}

    # -- the profile view

    async def profile_view(
        self, project_id: UUID, kind: str, value: str | UUID, now: datetime, max_changes: int
    ) -> ProfileRead | None:
        """The view of the profile a lookup (`kind`: profile_id, custom_id, email, phone,
        installation_id) names, in one statement; None when the lookup found nothing."""
        r = await self._conn.fetchrow(
            PROFILE_VIEW_BY_LOOKUP[kind], project_id, value, now, max_changes
        )
        if r is None:
            return None
        holders = tuple(r["holders"] or ())
        engagement_inputs = r["engagement"] or (0, 0.0, 0)
        if r["profile_id"] is None:
            return ProfileRead(holders, r["resolved_from"], None, engagement_inputs)
        session_count, total_time_ms, average_session_ms = r["session_totals"]
        crash = r["last_crash"]
        view = ProfileView(
            profile_id=r["profile_id"],
            custom_id=r["custom_id"] or "",
            version=r["version"],
            first_seen=r["first_seen"],
            last_seen=r["last_seen"],
            last_session_country=_text(r["last_session_country"]),
            installations=tuple(_installation(i) for i in r["installations"]),
            attributes=tuple(AttributeView(*a) for a in r["attributes"]),
            subscriptions=tuple(SubscriptionView(*b) for b in r["subscriptions"]),
            counters=CountersView(
                event_count=r["event_count"],
                crash_count=r["crash_count"],
                session_count=session_count,
                total_time_ms=total_time_ms,
                average_session_ms=average_session_ms,
                last_crash=None if crash is None else CrashView(*crash),
            ),
            identity_changes=tuple(_change(c) for c in r["identity_changes"]),
            smart_segment=(
                None
                if r["segment"] is None
                else _smart_segment(
                    (
                        r["segment"],
                        r["flag"],
                        r["next_transition_time"],
                        r["upcoming_times"],
                        r["upcoming_segments"],
                        r["upcoming_flags"],
                    ),
                    now,
                )
            ),
            segment_memberships=tuple(SegmentMembershipView(*m) for m in r["segment_memberships"]),
            funnels=_funnels(r["funnel_steps"] or ()),
        )
        return ProfileRead(holders, r["resolved_from"], view, engagement_inputs)

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

    async def session_totals(self, project_id: UUID, profile_id: UUID) -> SessionTotals:
        r = await self._conn.fetchrow(SELECT_SESSION_TOTALS, project_id, profile_id)
        assert r is not None
        return SessionTotals(r["session_count"], r["total_time_ms"])

    async def smart_segment(
        self, project_id: UUID, profile_id: UUID, now: datetime
    ) -> SmartSegmentView | None:
        r = await self._conn.fetchrow(SELECT_SMART_SEGMENT, project_id, profile_id)
        if r is None:
            return None
        return _smart_segment(r, now)

    # -- timelines

    async def timeline_page(
        self,
        project_id: UUID,
        profile_id: UUID,
        *,
        first_page: bool,
        max_seq: int,
        after: tuple[datetime, int],
        start: datetime,
        end: datetime,
        kinds: Sequence[int],
        names: Sequence[str],
        session_id: str,
        limit: int,
        change_kinds: Sequence[str],
        max_change_time: datetime | None,
        change_after: tuple[datetime, UUID],
        attribute: bool,
        max_attributed: int,
    ) -> TimelineRead | None:
        """A page of events and of identity changes (SELECT_TIMELINE_PAGE), unordered; None
        when the profile is not found. `first_page` reads the snapshot's max_seq; the changes
        page is read when `change_kinds` and `max_change_time` (its upper bound) are given."""
        r = await self._conn.fetchrow(
            SELECT_TIMELINE_PAGE,
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
            list(change_kinds),
            max_change_time,
            change_after[0],
            change_after[1],
            first_page,
            attribute,
            max_attributed,
        )
        if r is None:
            return None
        return TimelineRead(
            profile_id=r["profile_id"],
            max_seq=r["max_seq"] if first_page else max_seq,
            max_change_time=r["max_change_time"],
            events=[_event(e) for e in r["events"] or ()],
            changes=[_change(c) for c in r["changes"]],
            attribution_changes=[_change(c) for c in r["attribution_changes"]],
            installation_profiles=dict(r["installation_profiles"]),
        )

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

    async def segment_exists(self, project_id: UUID, segment_id: UUID) -> bool:
        """Whether the project has this custom segment (segments' custom_segments, 0005)."""
        return await self._conn.fetchval(SELECT_SEGMENT_EXISTS, project_id, segment_id) is not None

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
        after: tuple[int | datetime | str | None, UUID] | None,
        limit: int,
        segment_id: UUID | None = None,
    ) -> list[tuple[int | datetime | str | None, ProfileRowView]]:
        """A page of the users table after `after` (sort value, None for a profile never seen;
        profile ID), or from the start; each row with its sort value. With `segment_id`, only
        the members of that custom segment."""
        column_type = PROFILE_SORT_COLUMNS[order_by][1]
        in_unseen = after is not None and after[0] is None
        start: tuple[int | datetime | str | None, UUID]
        if after is None or in_unseen:
            value: int | datetime | str | None
            if column_type == "timestamptz":
                value = NEG_INFINITY if ascending else POS_INFINITY
            elif column_type == "text":
                value = "" if ascending else MAX_TEXT
            else:
                value = -MAX_BIGINT - 1 if ascending else MAX_BIGINT
            start = (value, NIL_UUID if ascending else MAX_UUID)
        else:
            start = after
        unseen_after = after[1] if after is not None and in_unseen else NIL_UUID
        in_segment = () if segment_id is None else (segment_id,)
        rows = await self._conn.fetch(
            SELECT_PROFILE_ROWS_PAGE[(order_by, ascending, bool(in_segment))],
            project_id,
            now,
            identity_filter,
            platform,
            country,
            smart_segment,
            smart_segment_flag,
            in_unseen,
            start[0],
            start[1],
            unseen_after,
            limit,
            *in_segment,
        )
        return [
            (
                r["sort_value"],
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

    async def overview(
        self, project_id: UUID, platform: int, as_of: datetime
    ) -> tuple[list[tuple[str, str, int]], list[tuple[int, int, int]]]:
        """The project's (platform's) rollup counters as (metric, value, count) and its smart
        segment distribution as of `as_of` as (segment, flag, count), read in one snapshot."""
        counters: list[tuple[str, str, int]] = []
        distribution: list[tuple[int, int, int]] = []
        for metric, value, count, segment, flag in await self._conn.fetch(
            SELECT_OVERVIEW, project_id, platform, as_of
        ):
            if metric is None:
                distribution.append((segment, flag, count))
            else:
                counters.append((metric, value, count))
        return counters, distribution

    # -- live feed

    async def profile_version(self, project_id: UUID, profile_id: UUID) -> int | None:
        return cast(
            int | None, await self._conn.fetchval(SELECT_PROFILE_VERSION, project_id, profile_id)
        )
