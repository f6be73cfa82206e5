"""The profile view's reads (GetProfile, and the live feed's checks of one profile): lookups of
a profile by any of its IDs, the whole view in one statement, and the smaller reads it is made
of."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast
from uuid import UUID

import asyncpg

from services.query.rows import identity_change, text_or_empty
from services.query.views import (
    AttributeView,
    CountersView,
    CrashView,
    EngagementView,
    FunnelProgressView,
    FunnelStepView,
    InstallationView,
    ProfileView,
    SegmentMembershipView,
    SmartSegmentView,
    SubscriptionView,
)

# -- lookups ----------------------------------------------------------------------------------

# A tombstone points at its survivor in one hop (identity_read_profiles), so one primary-key
# read resolves a merged-away ID.
RESOLVE_PROFILE_ID = """
    SELECT coalesce(merged_into, profile_id) AS profile_id, merged_into IS NOT NULL AS merged
    FROM identity_read_profiles()
    WHERE project_id = $1 AND profile_id = $2"""

# A custom ID is on a live profile (unique index profiles_by_custom_id) or is an alias left by an
# operator merge, whose target identity keeps live; both reads are by key.
RESOLVE_CUSTOM_ID = """
    SELECT profile_id FROM identity_read_profiles() WHERE project_id = $1 AND custom_id = $2
    UNION ALL
    SELECT target_profile_id FROM identity_read_custom_id_aliases()
    WHERE project_id = $1 AND custom_id = $2
    LIMIT 1"""

# An installation's profile_id is always a live profile (identity_read_installations).
RESOLVE_INSTALLATION = """
    SELECT profile_id FROM identity_read_installations()
    WHERE project_id = $1 AND installation_id = $2"""

# Emails (stored lower-case) and phones are native attribute values, which several profiles may
# share: up to 11 distinct live holders are read, enough to say "more than 10". The expression
# index query_attributes_by_native_value (0006) makes this a key lookup.
RESOLVE_NATIVE_VALUE = """
    SELECT DISTINCT a.profile_id
    FROM ingest_read_profile_attributes() a
    JOIN identity_read_profiles() p ON p.project_id = a.project_id AND p.profile_id = a.profile_id
    WHERE a.project_id = $1 AND a.native AND a.name = $2 AND (a.value ->> 'value') = $3
      AND p.merged_into IS NULL
    ORDER BY a.profile_id
    LIMIT 11"""

# -- the profile view -------------------------------------------------------------------------

SELECT_INSTALLATION_PROFILES = """
    SELECT installation_id, profile_id FROM identity_read_installations()
    WHERE project_id = $1 AND installation_id = ANY($2::text[])"""

# The whole profile view in one statement, hence one round trip and one snapshot (a single
# statement needs no transaction to read consistently). {target} resolves the lookup to at most
# one row (profile_id, resolved_from, holders): the live profile, the merged-away ID looked up,
# and for an email or phone every holder (up to 11, to tell an ambiguous lookup). The columns
# are correlated subqueries on the target profile; lists come back as arrays of
# anonymous records (asyncpg decodes them to tuples; a jsonb inside one is cast to json, whose
# binary form is the text the pool's JSON codec reads). The smart segment, the engagement,
# custom segment memberships and funnel progress are segments' (its read contracts:
# segments_read_smart_segment and segments_read_engagement as of $3,
# segments_read_custom_segment_members, current as of segments' last evaluation of the profile,
# and segments_read_funnel_progress as of $3), so query restates none of its rules. $1 project,
# $2 the looked-up value, $3 now (engagement's window end, funnels' as-of). No row: nothing
# found by the lookup; a row with a NULL profile_id: ambiguous, or found but not live.
# Two averages of session length, on purpose over two windows: the session totals' third column is
# the all-time average over ingest's closed sessions (ended, or closed by the idle sweep;
# Counters.average_session_duration), engagement's the average over segments' ended sessions
# started in the 168 hours up to $3 (score1, segments' rule); an open session's length is not
# known yet, so neither counts it. Sessions that all ended inside the window give both the same
# value. Nothing here grows with the profile's events: their totals, first and last seen come
# from ingest_read_profile_event_counts (kept exact after retention removed old events:
# ingest's 0025), and the last crash from ingest_read_profile_last_crashes (kept by ingest, so
# it is still shown once retention removed the crash event: ingest's 0028). The language and
# the time zone are ingest's rules (ingest_read_profile_language, ingest_read_profile_time_zone:
# the attribute, else the installations held, else those the profile left, as they were then:
# ingest's 0057), the rules the users table and the overview count by too.
PROFILE_VIEW = """
    WITH target AS ({target})
    SELECT t.holders, t.resolved_from, p.profile_id, p.custom_id, p.version,
           s.first_event_time AS first_seen, s.last_event_time AS last_seen,
           coalesce(s.event_count, 0) AS event_count, coalesce(s.crash_count, 0) AS crash_count,
           (SELECT x.country FROM ingest_read_sessions() x
            WHERE x.project_id = $1 AND x.profile_id = p.profile_id
              AND coalesce(x.country, '') <> ''
            ORDER BY x.start_time DESC
            LIMIT 1) AS last_session_country,
           (SELECT l.language FROM ingest_read_profile_language($1, p.profile_id) l)
               AS language,
           ingest_read_profile_time_zone($1, p.profile_id) AS time_zone,
           ARRAY(
               SELECT ROW(i.installation_id, i.create_time, d.platform, d.app_version,
                          d.os_version, d.device_model, d.push_token_present, d.push_opt_in,
                          d.language, d.timezone, d.uninstalled, d.first_seen, d.last_seen,
                          d.imported)
               FROM identity_read_installations() i
               LEFT JOIN ingest_read_installation_details() d
                   ON d.project_id = i.project_id AND d.installation_id = i.installation_id
               WHERE i.project_id = $1 AND i.profile_id = p.profile_id
               ORDER BY d.last_seen DESC NULLS LAST, i.installation_id) AS installations,
           ARRAY(
               SELECT ROW(a.native, a.name, a.value::json, a.update_time)
               FROM ingest_read_profile_attributes() a
               WHERE a.project_id = $1 AND a.profile_id = p.profile_id AND a.value IS NOT NULL
               ORDER BY a.native DESC, a.name) AS attributes,
           ARRAY(
               SELECT ROW(b.channel, b.kind, b.subscribed, b.change_time)
               FROM ingest_read_profile_subscriptions() b
               WHERE b.project_id = $1 AND b.profile_id = p.profile_id) AS subscriptions,
           (SELECT ROW(count(*),
                       coalesce(sum(extract(epoch FROM x.duration) * 1000), 0)::bigint,
                       coalesce(avg(extract(epoch FROM x.duration) * 1000)
                                    FILTER (WHERE x.closed), 0)::bigint)
            FROM ingest_read_sessions() x
            WHERE x.project_id = $1 AND x.profile_id = p.profile_id) AS session_totals,
           (SELECT ROW(c.event_id, coalesce(c.installation_id, ''), c.crash_time, c.name,
                       c.reason, c.fatal)
            FROM ingest_read_profile_last_crashes() c
            WHERE c.project_id = $1 AND c.profile_id = p.profile_id) AS last_crash,
           ARRAY(
               SELECT ROW(c.change_id, c.kind, c.cause, c.change_time, c.source_profile_id,
                          c.target_profile_id, c.installation_ids, c.alias_custom_id)
               FROM identity_read_identity_changes() c
               WHERE c.project_id = $1
                 AND (c.source_profile_id IN (
                          SELECT p.profile_id UNION ALL
                          SELECT m.profile_id FROM identity_read_profiles() m
                          WHERE m.project_id = $1 AND m.merged_into = p.profile_id)
                      OR c.target_profile_id IN (
                          SELECT p.profile_id UNION ALL
                          SELECT m.profile_id FROM identity_read_profiles() m
                          WHERE m.project_id = $1 AND m.merged_into = p.profile_id))
               ORDER BY c.change_time DESC, c.change_id DESC
               LIMIT $4) AS identity_changes,
           g.segment, g.flag, g.next_transition_time,
           (SELECT ROW(x.score1, x.score2, x.score3)
            FROM segments_read_engagement($1, p.profile_id, $3::timestamptz) x) AS engagement,
           ARRAY(
               SELECT ROW(m.segment_id, c.display_name, m.enter_time)
               FROM segments_read_custom_segment_members() m
               JOIN segments_read_custom_segments() c
                   ON c.project_id = m.project_id AND c.segment_id = m.segment_id
               WHERE m.project_id = $1 AND m.profile_id = p.profile_id
               ORDER BY lower(c.display_name), c.segment_id) AS segment_memberships,
           CASE WHEN p.profile_id IS NOT NULL THEN ARRAY(
               SELECT ROW(f.funnel_id, f.display_name, f.step_number, f.event_name,
                          f.complete_time)
               FROM segments_read_funnel_progress($1, p.profile_id, $3::timestamptz)
                   WITH ORDINALITY AS f
               ORDER BY f.ordinality) END AS funnel_steps
    FROM target t
    LEFT JOIN identity_read_profiles() p
        ON p.project_id = $1 AND p.profile_id = t.profile_id AND p.merged_into IS NULL
    LEFT JOIN ingest_read_profile_event_counts() s
        ON s.project_id = $1 AND s.profile_id = p.profile_id
    -- Columns, not a record: asyncpg decodes a record's arrays only of types it already knows.
    LEFT JOIN LATERAL segments_read_smart_segment($1, p.profile_id, $3::timestamptz) g
        ON true"""

# The lookups above, shaped as PROFILE_VIEW's target.
PROFILE_VIEW_TARGETS = {
    "profile_id": """
        SELECT coalesce(merged_into, profile_id) AS profile_id,
               CASE WHEN merged_into IS NOT NULL THEN profile_id END AS resolved_from,
               NULL::uuid[] AS holders
        FROM identity_read_profiles()
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

# -- live feed --------------------------------------------------------------------------------

SELECT_PROFILE_VERSION = """
    SELECT version FROM identity_read_profiles()
    WHERE project_id = $1 AND profile_id = $2 AND merged_into IS NULL"""

# The current state of the attributes a live notice's events operated on.
SELECT_ATTRIBUTES_NAMED = """
    SELECT native, name, value, update_time
    FROM ingest_read_profile_attributes()
    WHERE project_id = $1 AND profile_id = $2
      AND (native, name) IN (SELECT * FROM unnest($3::boolean[], $4::text[]))"""


@dataclass(frozen=True, slots=True)
class ProfileRead:
    """What PROFILE_VIEW read: `view` is None when the lookup found no live profile (or several
    holders)."""

    holders: tuple[UUID, ...]
    resolved_from: UUID | None
    view: ProfileView | None


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


def _installation(r: Sequence[Any] | asyncpg.Record) -> InstallationView:
    """An installation from a record of the profile view's installations column, in its order."""
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


class ProfileReads:
    """The profile view's statements, on the connection of QueryReads."""

    _conn: asyncpg.Connection

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
        if r["profile_id"] is None:
            return ProfileRead(holders, r["resolved_from"], None)
        score1, score2, score3 = r["engagement"]
        session_count, total_time_ms, average_session_ms = r["session_totals"]
        crash = r["last_crash"]
        view = ProfileView(
            profile_id=r["profile_id"],
            custom_id=r["custom_id"] or "",
            version=r["version"],
            first_seen=r["first_seen"],
            last_seen=r["last_seen"],
            last_session_country=text_or_empty(r["last_session_country"]),
            language=text_or_empty(r["language"]),
            time_zone=text_or_empty(r["time_zone"]),
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
            identity_changes=tuple(identity_change(c) for c in r["identity_changes"]),
            smart_segment=(
                None
                if r["segment"] is None
                else SmartSegmentView(r["segment"], r["flag"], r["next_transition_time"])
            ),
            segment_memberships=tuple(SegmentMembershipView(*m) for m in r["segment_memberships"]),
            funnels=_funnels(r["funnel_steps"] or ()),
            engagement=EngagementView(score1, score2, score3, window_end_time=now),
        )
        return ProfileRead(holders, r["resolved_from"], view)

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

    # -- live feed

    async def profile_version(self, project_id: UUID, profile_id: UUID) -> int | None:
        return cast(
            int | None, await self._conn.fetchval(SELECT_PROFILE_VERSION, project_id, profile_id)
        )
