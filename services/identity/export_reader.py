"""ExportProfile's reads, all in one REPEATABLE READ snapshot: identity's own tables, and what
ingest and segments keep about the profile through their published read contracts."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from uuid import UUID

import asyncpg

from services.identity.model import (
    ERASED_SIDE,
    ChangeCause,
    ChangeKind,
    IdentityChange,
    Profile,
)
from services.identity.profile_rows import SELECT_PROFILES_AND_SURVIVORS, profile_from_row

# -- ExportProfile (read in one REPEATABLE READ snapshot) ----------------------------------------
# What ingest keeps about the profile comes through ingest's published read contracts
# (ingest_read_export_*, in its ingest_profile_hooks migration), never its tables.
# First and last seen span the profile's events (the creation time when it has none yet, or
# when imported events are older): ingest's kept first and last event times, exact after
# retention removed events. The last crash is ingest's kept one too: its name and reason are
# stored after retention removed the crash event, so the export shows them.
SELECT_EXPORT_PROFILE = """
    SELECT p.profile_id, p.custom_id,
        least(p.create_time, ev.first_time) AS first_seen_time,
        coalesce(ev.last_time, p.create_time) AS last_seen_time,
        coalesce((SELECT array_agg(a.custom_id ORDER BY a.custom_id) FROM custom_id_aliases a
                  WHERE a.project_id = p.project_id AND a.target_profile_id = p.profile_id),
                 '{}') AS alias_custom_ids,
        coalesce((SELECT array_agg(t.profile_id ORDER BY t.profile_id) FROM profiles t
                  WHERE t.project_id = p.project_id AND t.merged_into = p.profile_id),
                 '{}') AS merged_profile_ids,
        c.event_id AS crash_event_id, c.installation_id AS crash_installation_id,
        c.crash_time, c.name AS crash_name, c.reason AS crash_reason, c.fatal AS crash_fatal
    FROM profiles p
    CROSS JOIN LATERAL ingest_read_export_event_span(p.project_id, p.profile_id) ev
    LEFT JOIN ingest_read_profile_last_crashes() c
        ON c.project_id = p.project_id AND c.profile_id = p.profile_id
    WHERE p.project_id = $1 AND p.profile_id = $2"""

# The installations the profile left, each as it was when it left (ingest's copy, 0057): what
# its language, time zone and device are read from once it holds no installation reporting
# them. Oldest departure first.
SELECT_EXPORT_FORMER_INSTALLATIONS = """
    SELECT installation_id, leave_time, platform, app_version, os_version, device_model,
        language, timezone, imported, first_seen, last_seen
    FROM ingest_read_profile_former_installations()
    WHERE project_id = $1 AND profile_id = $2
    ORDER BY leave_time, installation_id"""

# Set attributes only (ingest's contract leaves out unset ones), by native and name.
SELECT_EXPORT_ATTRIBUTES = "SELECT * FROM ingest_read_export_attributes($1, $2)"

SELECT_EXPORT_SUBSCRIPTIONS = "SELECT * FROM ingest_read_export_subscriptions($1, $2)"

# Details as one JSON object, so columns ingest adds later (say `imported`) come along.
SELECT_EXPORT_INSTALLATIONS = """
    SELECT i.installation_id, i.create_time, d.details
    FROM installations i
    LEFT JOIN LATERAL ingest_read_export_installation_details(i.project_id, i.installation_id) d
        ON true
    WHERE i.project_id = $1 AND i.profile_id = $2
    ORDER BY i.installation_id"""

# The profile's history includes that of the tombstones merged into it.
SELECT_EXPORT_CHANGES = """
    SELECT change_id, kind, cause, source_profile_id, target_profile_id, installation_ids,
        alias_custom_id, change_time
    FROM identity_changes
    WHERE project_id = $1
        AND (source_profile_id = ANY($2::uuid[]) OR target_profile_id = ANY($2::uuid[]))
    ORDER BY change_time, change_id"""

SELECT_EXPORT_SESSIONS = "SELECT * FROM ingest_read_export_sessions($1, $2)"

# Read through a cursor, a chunk at a time: a profile may hold millions of events (the contract
# is inlined, so the rows stream from the index scan).
SELECT_EXPORT_EVENTS = "SELECT * FROM ingest_read_export_events($1, $2)"

# Rejected events that arrived for the profile (or the profiles merged into it), and those of its
# custom IDs; rows stored without a profile go by its installations (ingest's 0047).
SELECT_EXPORT_REJECTED_EVENTS = """
    SELECT * FROM ingest_read_export_rejected_events($1, $2::uuid[], $3::text[], $4::text[])"""
EXPORT_FETCH_ROWS = 500

# What segments keeps about the profile comes through segments' published read contracts
# (segments_read_export_*, in its segments_export_read_contracts migration), never its tables,
# on the same connection: the snapshot holds segments' rows with everything else. Smart
# segments, engagement and funnel progress are as of $3, the export's time (segments' rules,
# applied to its stored states, sessions and ingest's events).
SELECT_EXPORT_CUSTOM_SEGMENTS = "SELECT * FROM segments_read_export_custom_segments($1, $2)"
SELECT_EXPORT_SMART_SEGMENTS = "SELECT * FROM segments_read_export_smart_segments($1, $2, $3)"
SELECT_EXPORT_ENGAGEMENT = "SELECT * FROM segments_read_export_engagement($1, $2, $3)"
SELECT_EXPORT_FUNNEL_PROGRESS = "SELECT * FROM segments_read_export_funnel_progress($1, $2, $3)"


def _own_or_other(profile_id: UUID, own: set[UUID]) -> UUID:
    return profile_id if profile_id in own else ERASED_SIDE


class ExportReader:
    """The reads of one export, all in one snapshot."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def find_profiles(
        self, project_id: UUID, profile_ids: Sequence[UUID]
    ) -> dict[UUID, Profile]:
        rows = await self._conn.fetch(SELECT_PROFILES_AND_SURVIVORS, project_id, profile_ids)
        return {r["requested_id"]: profile_from_row(r) for r in rows}

    async def profile(self, project_id: UUID, profile_id: UUID) -> asyncpg.Record | None:
        return await self._conn.fetchrow(SELECT_EXPORT_PROFILE, project_id, profile_id)

    async def former_installations(
        self, project_id: UUID, profile_id: UUID
    ) -> list[asyncpg.Record]:
        return await self._conn.fetch(SELECT_EXPORT_FORMER_INSTALLATIONS, project_id, profile_id)

    async def attributes(self, project_id: UUID, profile_id: UUID) -> list[asyncpg.Record]:
        return await self._conn.fetch(SELECT_EXPORT_ATTRIBUTES, project_id, profile_id)

    async def subscriptions(self, project_id: UUID, profile_id: UUID) -> list[asyncpg.Record]:
        return await self._conn.fetch(SELECT_EXPORT_SUBSCRIPTIONS, project_id, profile_id)

    async def installations(self, project_id: UUID, profile_id: UUID) -> list[asyncpg.Record]:
        return await self._conn.fetch(SELECT_EXPORT_INSTALLATIONS, project_id, profile_id)

    async def changes(self, project_id: UUID, profile_ids: Sequence[UUID]) -> list[IdentityChange]:
        """The history of the exported profile (`profile_ids`: it and its tombstones). A side
        that is none of them (a split's other person on a shared device, or a side erased
        since) is ERASED_SIDE: the export names nobody else (export.history_record)."""
        own = set(profile_ids)
        rows = await self._conn.fetch(SELECT_EXPORT_CHANGES, project_id, list(profile_ids))
        return [
            IdentityChange(
                change_id=r["change_id"],
                kind=ChangeKind(r["kind"]),
                cause=ChangeCause(r["cause"]),
                source_profile_id=_own_or_other(r["source_profile_id"], own),
                target_profile_id=_own_or_other(r["target_profile_id"], own),
                installation_ids=tuple(r["installation_ids"]),
                change_time=r["change_time"],
                alias_custom_id=r["alias_custom_id"],
            )
            for r in rows
        ]

    async def sessions(self, project_id: UUID, profile_id: UUID) -> list[asyncpg.Record]:
        return await self._conn.fetch(SELECT_EXPORT_SESSIONS, project_id, profile_id)

    async def events(self, project_id: UUID, profile_id: UUID) -> AsyncIterator[asyncpg.Record]:
        cursor = self._conn.cursor(
            SELECT_EXPORT_EVENTS, project_id, profile_id, prefetch=EXPORT_FETCH_ROWS
        )
        async for row in cursor:
            yield row

    async def rejected_events(
        self,
        project_id: UUID,
        profile_ids: Sequence[UUID],
        installation_ids: Sequence[str],
        custom_ids: Sequence[str],
    ) -> list[asyncpg.Record]:
        return await self._conn.fetch(
            SELECT_EXPORT_REJECTED_EVENTS,
            project_id,
            list(profile_ids),
            list(installation_ids),
            list(custom_ids),
        )

    async def custom_segments(self, project_id: UUID, profile_id: UUID) -> list[asyncpg.Record]:
        return await self._conn.fetch(SELECT_EXPORT_CUSTOM_SEGMENTS, project_id, profile_id)

    async def smart_segments(
        self, project_id: UUID, profile_id: UUID, as_of: datetime
    ) -> list[asyncpg.Record]:
        return await self._conn.fetch(SELECT_EXPORT_SMART_SEGMENTS, project_id, profile_id, as_of)

    async def engagement(
        self, project_id: UUID, profile_id: UUID, as_of: datetime
    ) -> asyncpg.Record:
        row = await self._conn.fetchrow(SELECT_EXPORT_ENGAGEMENT, project_id, profile_id, as_of)
        assert row is not None  # segments' contract: always one row
        return row

    async def funnel_progress(
        self, project_id: UUID, profile_id: UUID, as_of: datetime
    ) -> list[asyncpg.Record]:
        return await self._conn.fetch(SELECT_EXPORT_FUNNEL_PROGRESS, project_id, profile_id, as_of)
