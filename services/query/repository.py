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

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import asyncpg

from services.query.list_reads import ListReads
from services.query.overview_reads import OverviewReads
from services.query.profile_reads import ProfileReads
from services.query.rollup_writes import RollupWrites
from services.query.timeline_reads import TimelineReads

UNAVAILABLE: tuple[type[Exception], ...] = (
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.TooManyConnectionsError,
    OSError,
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


class QueryReads(ProfileReads, TimelineReads, ListReads, OverviewReads):
    """The read statements, on one connection: each page's reads live in its own module."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
