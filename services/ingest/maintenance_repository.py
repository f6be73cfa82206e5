"""The SQL of ingest's storage maintenance: partitions, dedupe keys, retention (retention.py).

Kept apart from repository.py (the write path) because it runs on its own schedule, each step
in a short transaction of its own under one advisory lock, so several replicas never do the
same work at once: the second waits for the first (a few seconds at most, then gives up until
its next round) and then finds the work done.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import asyncpg

# pg_advisory_xact_lock key: "ingest partitions", an arbitrary constant of this service.
MAINTENANCE_LOCK_ID = 0x1A6E_57_0013

# Waits for table locks are short: a step that cannot get its lock (a long report holding the
# DEFAULT partition, say) gives up and runs again next round, instead of queueing every writer
# of events behind it.
SET_LOCK_TIMEOUT = "SET LOCAL lock_timeout = '5s'"

LOCK = "SELECT pg_advisory_xact_lock($1)"

# profiles_ingest_ensure_partition (0024) creates the month's partition unless it exists and
# moves the DEFAULT partition's rows of that month into it; NULL when it existed.
ENSURE_PARTITION = "SELECT profiles_ingest_ensure_partition($1, $2, $3, $4)"

# The partitions of a table, DEFAULT included (relpartbound says which).
SELECT_PARTITIONS = """
    SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT' AS is_default
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = to_regclass($1)
    ORDER BY c.relname"""

# Dropping a partition holds the parent's ACCESS EXCLUSIVE lock for an instant (no rows are
# read or written: that is the point); the lock timeout keeps it from queueing behind a long
# reader. No trigger fires: profile totals and dedupe keys stay as they are.
DROP_PARTITION = "DROP TABLE {name}"
PARTITION_EXISTS = "SELECT to_regclass($1)"

# Retention's deletes are marked (profiles.retention, read by events' delete triggers, 0024) so
# they age events out without moving what was derived from them: profile totals, first seen.
MARK_RETENTION = "SELECT set_config('profiles.retention', 'on', true)"

# A bounded batch of the DEFAULT partition's rows older than the cutoff ($1). The DEFAULT
# partition is small (rows no month covers: far-back imports), so a scan of it is cheap.
DELETE_OLD_DEFAULT_ROWS = """
    DELETE FROM {parent} t
    WHERE t.ctid IN (SELECT ctid FROM {default} WHERE {key} < $1 LIMIT $2)"""

# Project retention: a bounded batch of one project's events older than its cutoff. Partition
# pruning keeps the search to the months before the cutoff; in each, events_pkey
# (project_id, event_seq, event_time) finds the project's rows.
DELETE_OLD_PROJECT_EVENTS = """
    DELETE FROM events e
    USING (
        SELECT event_seq, event_time FROM events
        WHERE project_id = $1 AND event_time < $2
        LIMIT $3
    ) old
    WHERE e.project_id = $1 AND e.event_seq = old.event_seq AND e.event_time = old.event_time"""

# Projects that set events.retention_days (shared's project_settings; 0 means keep forever).
SELECT_PROJECT_RETENTION = """
    SELECT project_id, (value #>> '{}')::int AS days FROM project_settings
    WHERE name = 'events.retention_days' AND (value #>> '{}')::int > 0
    ORDER BY project_id"""

# Dedupe keys past their window, a bounded batch at a time (BRIN on receive_time).
DELETE_OLD_EVENT_KEYS = """
    DELETE FROM event_keys
    WHERE ctid IN (SELECT ctid FROM event_keys WHERE receive_time < $1 LIMIT $2)"""


def _quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


class MaintenanceRepository:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def ensure_partition(
        self, parent: str, key: str, start: datetime, end: datetime
    ) -> int | None:
        """Creates the partition of [start, end) unless it exists; the rows moved into it out of
        DEFAULT, or None if it existed."""
        async with self._pool.acquire() as conn, conn.transaction():
            await self._lock(conn)
            moved = await conn.fetchval(ENSURE_PARTITION, parent, key, start, end)
            return None if moved is None else int(moved)

    async def partitions(self, parent: str) -> list[str]:
        """The names of `parent`'s partitions, DEFAULT excluded."""
        rows = await self._pool.fetch(SELECT_PARTITIONS, parent)
        return [r["name"] for r in rows if not r["is_default"]]

    async def drop_partition(self, name: str) -> bool:
        """Drops one partition; False when it is gone already (another replica dropped it)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await self._lock(conn)
            if await conn.fetchval(PARTITION_EXISTS, _quoted(name)) is None:
                return False
            await conn.execute(DROP_PARTITION.format(name=_quoted(name)))
            return True

    async def delete_old_default_rows(
        self, parent: str, key: str, cutoff: datetime, limit: int
    ) -> int:
        statement = DELETE_OLD_DEFAULT_ROWS.format(
            parent=_quoted(parent), default=_quoted(parent + "_default"), key=_quoted(key)
        )
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(MARK_RETENTION)
            return _row_count(await conn.execute(statement, cutoff, limit))

    async def project_retention(self) -> dict[UUID, int]:
        rows = await self._pool.fetch(SELECT_PROJECT_RETENTION)
        return {r["project_id"]: r["days"] for r in rows}

    async def delete_old_project_events(
        self, project_id: UUID, cutoff: datetime, limit: int
    ) -> int:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(MARK_RETENTION)
            return _row_count(
                await conn.execute(DELETE_OLD_PROJECT_EVENTS, project_id, cutoff, limit)
            )

    async def delete_old_event_keys(self, cutoff: datetime, limit: int) -> int:
        return _row_count(await self._pool.execute(DELETE_OLD_EVENT_KEYS, cutoff, limit))

    async def _lock(self, conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record]) -> None:
        await conn.execute(SET_LOCK_TIMEOUT)
        await conn.execute(LOCK, MAINTENANCE_LOCK_ID)


def _row_count(status: str) -> int:
    """The row count of a command status such as "DELETE 3"."""
    return int(status.rsplit(" ", 1)[-1])
