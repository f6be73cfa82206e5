"""The timeline's reads (ListEvents, ListSessions, GetActivity): keyset pages of a profile's
events, identity changes and sessions, and its activity by day."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast
from uuid import UUID

import asyncpg

from services.query.paging import NEG_INFINITY, POS_INFINITY
from services.query.rows import identity_change, text_or_empty
from services.query.views import (
    DayView,
    EventView,
    IdentityChangeView,
    SessionView,
)

# -- timelines --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventsPageConditions:
    """Which conditions a timeline page puts on its events, beyond the profile and the erasure
    markers: each one a request leaves out is left out of the statement, not passed as a
    constant that matches everything. PostgreSQL compiles a page's conditions once per
    partition of events it scans, on every call (the months retention keeps, the months ahead,
    DEFAULT): with every condition in, a first page without filters spent a tenth of its
    database time on conditions that held for every row."""

    # A later page: the snapshot's bound ($3) and the keyset position after the last row
    # ($4, $5), entered as a range of events_by_profile_time rather than skipped as an offset.
    later_page: bool
    time_range: bool  # $6 <= event_time < $7
    kinds: bool  # kind = ANY($8)
    names: bool  # name = ANY($9) (custom events' names)
    session: bool  # session_id = $10


# Each condition with the parameters it reads, and their types.
_CONDITIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "later_page": (
        "e.event_seq <= $3 AND (e.event_time, e.event_seq) < ($4, $5)",
        ("$3::bigint", "$4::timestamptz", "$5::bigint"),
    ),
    "time_range": ("e.event_time >= $6 AND e.event_time < $7", ()),
    "kinds": ("e.kind = ANY($8::smallint[])", ()),
    "names": ("e.name = ANY($9)", ("$9::text[]",)),
    "session": ("e.session_id = $10", ("$10::text",)),
}

# A page of the timeline in one statement (one round trip, one snapshot), of the shape
# timeline_page_sql gives it: the live profile ($2 or its survivor), the snapshot a first page
# fixes (asked for by $16: the newest event_seq handed out, read off ingest's sequence rather than
# as the project's max(event_seq), which probes every partition of events (0039); the newest
# identity change of the profile), the events page (keyset on events_by_profile_time; skipped when
# $8 asks for no kind of event), the merges and splits page (keyset on (change_time, change_id),
# bounded by the snapshot's change time; skipped without kinds or bound) and, when $17 asks and
# the profile has any identity change, what tells which profile each event was first attached to:
# the newest changes and the current profile of each installation on the page. The events come as
# one JSON array of arrays, which the pool's codec parses in one call (times are ISO 8601 with
# their offset, which datetime.fromisoformat reads faster than arithmetic on epoch numbers): a
# profile of ListEvents put a json.loads per payload and the decoding of an array of records at a
# third of the service's own CPU per page. The other lists are arrays of anonymous records; the
# service orders them. No row: no such live profile.
_TIMELINE_PAGE = """
    WITH {declared}live AS (
        SELECT coalesce(merged_into, profile_id) AS profile_id FROM identity_read_profiles()
        WHERE project_id = $1 AND profile_id = $2
    ),
    ids AS (
        SELECT profile_id AS id FROM live
        UNION ALL
        SELECT m.profile_id FROM identity_read_profiles() m
        WHERE m.project_id = $1 AND m.merged_into = (SELECT profile_id FROM live)
    ),
    changed AS (
        SELECT max(c.change_time) AS max_change_time FROM identity_read_identity_changes() c
        WHERE c.project_id = $1
          AND (c.source_profile_id IN (SELECT id FROM ids)
               OR c.target_profile_id IN (SELECT id FROM ids))
    ),
    page AS (
        SELECT e.event_seq, e.event_id, e.kind, e.event_time, e.receive_time,
               coalesce(e.installation_id, '') AS installation_id,
               coalesce(e.session_id, '') AS session_id, e.platform, e.payload, e.imported
        FROM ingest_read_events() e
        WHERE e.project_id = $1 AND e.profile_id = (SELECT profile_id FROM live)
          AND ($8::smallint[] IS NULL OR cardinality($8::smallint[]) > 0)
          AND e.payload IS NOT NULL{conditions}
        ORDER BY e.event_time DESC, e.event_seq DESC
        LIMIT $11
    ),
    attributed AS (
        SELECT $17::boolean AND EXISTS (SELECT 1 FROM page)
               AND (SELECT max_change_time FROM changed) IS NOT NULL AS wanted
    )
    SELECT l.profile_id,
           CASE WHEN $16::boolean THEN
               (SELECT last_event_seq FROM ingest_read_last_event_seq())
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
               FROM identity_read_identity_changes() c
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
               FROM identity_read_identity_changes() c
               WHERE c.project_id = $1 AND (SELECT wanted FROM attributed)
                 AND (c.source_profile_id IN (SELECT id FROM ids)
                      OR c.target_profile_id IN (SELECT id FROM ids))
               ORDER BY c.change_time DESC, c.change_id DESC
               LIMIT $18) AS attribution_changes,
           ARRAY(
               SELECT ROW(i.installation_id, i.profile_id)
               FROM identity_read_installations() i
               WHERE i.project_id = $1 AND (SELECT wanted FROM attributed)
                 AND i.installation_id IN (SELECT installation_id FROM page)
           ) AS installation_profiles
    FROM live l"""


@functools.cache
def timeline_page_sql(conditions: EventsPageConditions) -> str:
    """SELECT_TIMELINE_PAGE with the events page's conditions of one request shape: at most 32
    statements, each prepared once per connection. The parameters a shape leaves unread are
    declared in a CTE nothing reads (PostgreSQL must know every parameter's type; the planner
    drops such a CTE)."""
    used: list[str] = []
    unread: list[str] = []
    for name, (condition, parameters) in _CONDITIONS.items():
        if getattr(conditions, name):
            used.append(f"\n          AND {condition}")
        else:
            unread.extend(parameters)
    declared = f"unread_parameters AS (SELECT {', '.join(unread)}),\n    " if unread else ""
    return _TIMELINE_PAGE.format(declared=declared, conditions="".join(used))


# The snapshot of a session history: its newest start when the first page was read (sessions
# have no arrival sequence; one that starts later is not in the pages of this listing).
SELECT_SESSIONS_SNAPSHOT = """
    SELECT max(start_time) FROM ingest_read_sessions() WHERE project_id = $1 AND profile_id = $2"""

# Keyset on sessions_by_profile_time; (installation_id, session_id) is the key that breaks ties.
SELECT_SESSIONS_PAGE = """
    SELECT installation_id, session_id, platform, coalesce(country, '') AS country, start_time,
           end_time, (extract(epoch FROM duration) * 1000)::bigint AS duration_ms, event_count,
           ended, closed
    FROM ingest_read_sessions()
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
    FROM ingest_read_events()
    WHERE project_id = $1 AND profile_id = $2 AND event_time >= $4 AND event_time < $5
      AND payload IS NOT NULL
    GROUP BY 1"""

SELECT_SESSION_DAYS = """
    SELECT to_char(start_time AT TIME ZONE $3, 'YYYY-MM-DD') AS day, count(*) AS session_count,
           coalesce(sum(extract(epoch FROM duration) * 1000), 0)::bigint AS time_spent_ms
    FROM ingest_read_sessions()
    WHERE project_id = $1 AND profile_id = $2 AND start_time >= $4 AND start_time < $5
    GROUP BY 1"""

# The time zone days are counted in when the caller names none: the profile's, by ingest's rule
# (0045), the one the profile view shows and segments counts engagement days in.
SELECT_PROFILE_TIMEZONE = "SELECT ingest_read_profile_time_zone($1, $2)"


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


class TimelineReads:
    """The timeline's statements, on the connection of QueryReads."""

    _conn: asyncpg.Connection

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
        kinds: Sequence[int] | None,
        names: Sequence[str],
        session_id: str,
        limit: int,
        change_kinds: Sequence[str],
        max_change_time: datetime | None,
        change_after: tuple[datetime, UUID],
        attribute: bool,
        max_attributed: int,
    ) -> TimelineRead | None:
        """A page of events and of identity changes (timeline_page_sql), unordered; None when
        the profile is not found. `first_page` reads the snapshot's max_seq; `kinds` None means
        every kind of event (empty: none); `start` and `end` at NEG_INFINITY and POS_INFINITY
        bound nothing; the changes page is read when `change_kinds` and `max_change_time` (its
        upper bound) are given."""
        conditions = EventsPageConditions(
            later_page=not first_page,
            time_range=start != NEG_INFINITY or end != POS_INFINITY,
            kinds=kinds is not None,
            names=bool(names),
            session=bool(session_id),
        )
        r = await self._conn.fetchrow(
            timeline_page_sql(conditions),
            project_id,
            profile_id,
            max_seq,
            after[0],
            after[1],
            start,
            end,
            None if kinds is None else list(kinds),
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
            changes=[identity_change(c) for c in r["changes"]],
            attribution_changes=[identity_change(c) for c in r["attribution_changes"]],
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
        return text_or_empty(
            await self._conn.fetchval(SELECT_PROFILE_TIMEZONE, project_id, profile_id)
        )

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
