"""Query's repository: its connection scopes, and QueryReads, the read statements of every
page on one connection. The SQL lives beside each page's reads: profile_reads.py (GetProfile
and the live feed's checks), timeline_reads.py (events, sessions, activity), list_reads.py
(the users table, rejected events), overview_reads.py, and rollup_writes.py (query's own
projection: query_profiles, query_installations, query_counters, services/query/schema). The
erasure sweep's reads (erasure_sweep.py) are here.

Query reads other services' data only through the read contracts they publish
(docs/read-contracts.md): identity_read_* (profiles, installations, identity changes, custom ID
aliases, erased profiles), ingest_read_* (events, rejected events, event counts, attributes,
subscriptions, installation details, sessions) and segments_read_* (smart segment, engagement,
custom segment members and names, distribution, funnel progress), never their tables, and restates
none of their rules; it writes only its own projection, recounted from those contracts when the bus
says they changed. Every statement filters on project_id first.

Reads that make one view run in one READ ONLY REPEATABLE READ transaction, so a view is "as of
one consistent read" even though it takes several statements.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import cast
from uuid import UUID

import asyncpg

from services.query.list_reads import ListReads
from services.query.overview_reads import OverviewReads
from services.query.profile_reads import ProfileReads
from services.query.rollup_writes import RollupWrites
from services.query.timeline_reads import TimelineReads
from shared.erasure_record import ErasedProfile, erased_profiles_page, erasure_horizon

UNAVAILABLE: tuple[type[Exception], ...] = (
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.TooManyConnectionsError,
    OSError,
)

# -- the erasure sweep (erasure_sweep.py) -----------------------------------------------------
# (The record's horizon and row shape: shared/erasure_record.py.)
# A page of identity's record from a position on (its index, in its order; $2/$3 the last row
# of the previous page, NULL for the first), each erased ID with whether query still holds its
# row of query_profiles or event name counts under it (query_profile_event_names, 0067; a
# tombstone has no query_profiles row but may have those): a primary-key probe per row and
# table, as LATERAL subqueries (EXISTS in the select list may be planned as a hash of the whole
# table, read at every sweep).
SELECT_ERASED_PROFILES = """
    SELECT e.position, e.project_id, e.profile_id,
           q.found IS NOT NULL OR n.found IS NOT NULL AS kept
    FROM (
        SELECT e.erase_position::text AS position, e.project_id, e.profile_id
        FROM identity_read_erased_profiles() e
        WHERE e.erase_position >= $1::text::xid8
            AND ($2::uuid IS NULL
                 OR (e.erase_position, e.project_id, e.profile_id)
                    > ($1::text::xid8, $2::uuid, $3::uuid))
        ORDER BY e.erase_position, e.project_id, e.profile_id
        LIMIT $4
    ) e
    LEFT JOIN LATERAL (
        SELECT true AS found FROM query_profiles q
        WHERE q.project_id = e.project_id AND q.profile_id = e.profile_id
        LIMIT 1
    ) q ON true
    LEFT JOIN LATERAL (
        SELECT true AS found FROM query_profile_event_names n
        WHERE n.project_id = e.project_id AND n.profile_id = e.profile_id
        LIMIT 1
    ) n ON true
    ORDER BY e.position::xid8, e.project_id, e.profile_id"""

# A page of the project's query_installations rows after a key, in key order (the primary key),
# each with whether identity still knows the installation (a primary-key probe of
# identity_read_installations, as a LATERAL subquery: not a hash of every installation). Only
# an erasure removes an installation from identity, and identity keeps no installation ID of
# an erased person, so the installations of an erased profile whose ProfileDeleted query never
# handled are found this way: rows identity no longer knows.
SELECT_INSTALLATION_KEYS = """
    SELECT q.installation_key, i.found IS NULL AS unknown
    FROM (
        SELECT q.project_id, q.installation_key FROM query_installations q
        WHERE q.project_id = $1 AND q.installation_key > $2
        ORDER BY q.installation_key
        LIMIT $3
    ) q
    LEFT JOIN LATERAL (
        SELECT true AS found FROM identity_read_installations() i
        WHERE i.project_id = q.project_id AND i.installation_id = q.installation_key
        LIMIT 1
    ) i ON true
    ORDER BY q.installation_key"""


@dataclass(frozen=True, slots=True)
class InstallationKeys:
    """A page of a project's installation rows: the last key read (where the next page starts;
    None for an empty page) and the keys identity no longer knows."""

    last_key: str | None
    read: int
    unknown: list[str]


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

    async def erasure_horizon(self) -> int:
        """Where the erasure sweep may start next time, if it reads the record now."""
        return await erasure_horizon(self._pool)

    async def erased_profiles(
        self, position: int, after: ErasedProfile | None, limit: int
    ) -> list[ErasedProfile]:
        """At most `limit` rows of identity's record of erasures from `position` on, after
        `after` (the previous page's last row), in the record's order."""
        return await erased_profiles_page(
            self._pool, SELECT_ERASED_PROFILES, position, after, limit
        )

    async def installation_keys(
        self, project_id: UUID, after_key: str, limit: int
    ) -> InstallationKeys:
        """At most `limit` of the project's installation rows after `after_key`, in key
        order, and which of them identity no longer knows."""
        rows = await self._pool.fetch(SELECT_INSTALLATION_KEYS, project_id, after_key, limit)
        return InstallationKeys(
            rows[-1]["installation_key"] if rows else None,
            len(rows),
            [r["installation_key"] for r in rows if r["unknown"]],
        )

    @asynccontextmanager
    async def reads(self) -> AsyncIterator[QueryReads]:
        """One pooled connection, no transaction: for single-statement reads."""
        async with self._pool.acquire() as conn:
            yield QueryReads(cast(asyncpg.Connection, conn))


class QueryReads(ProfileReads, TimelineReads, ListReads, OverviewReads):
    """The read statements, on one connection: each page's reads live in its own module."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
