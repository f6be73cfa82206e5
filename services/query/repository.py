"""Query's repository: its connection scopes, and QueryReads, the read statements of every
page on one connection. The SQL lives beside each page's reads: profile_reads.py (GetProfile
and the live feed's checks), timeline_reads.py (events, sessions, activity), list_reads.py
(the users table, rejected events), overview_reads.py, and rollup_writes.py (query's own
projection: query_profiles, query_installations, query_counters, services/query/schema).

Query reads other services' data only through the read contracts they publish
(docs/read-contracts.md): identity_read_* (profiles, installations, identity changes, custom
ID aliases), ingest_read_* (events, rejected events, event counts, attributes, subscriptions,
installation details, sessions) and segments_read_* (smart segment, engagement, custom segment
members and names, distribution, funnel progress), never their tables, and restates none of
their rules; it writes only its own projection, recounted from those contracts when the bus
says they changed. Every statement filters on project_id first.

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
