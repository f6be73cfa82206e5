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

# A month past retention leaves in two short transactions, so that the parent is locked only
# for the first:
# 1. DETACH: the month leaves the table (what readers see from the commit on) and is renamed
#    `<partition>_expired`, the mark of a table retention has taken out. Plain DETACH holds
#    ACCESS EXCLUSIVE locks on the parent, the month and the DEFAULT partition for an instant
#    (catalog changes only; no rows read or written, no trigger fired: profile totals and
#    dedupe keys stay as they are), under the lock timeout so it never queues long behind a
#    reader. Not DETACH ... CONCURRENTLY: it is
#    refused while the table has a DEFAULT partition (checked on PostgreSQL 15 and 18), and the
#    DEFAULT partition must stay (docs/partitions.md); it also cannot run in a transaction, so
#    the advisory lock could not guard it.
# 2. DROP TABLE of the detached table: the space is freed. Its commit unlinks the month's files
#    (hundreds of MB: most of the time removal takes), and now holds no lock of the parent: a
#    reader or writer of events no longer waits for the filesystem. A round that fails between
#    the two leaves the `_expired` table for the next round to drop.
DETACH_PARTITION = "ALTER TABLE {parent} DETACH PARTITION {name}"
RENAME_DETACHED = "ALTER TABLE {name} RENAME TO {expired}"
DROP_DETACHED = "DROP TABLE {name}"
EXPIRED_SUFFIX = "_expired"
# Whether `$1` is attached to `$2` now (another replica may have detached it first).
IS_PARTITION_OF = """
    SELECT EXISTS (
        SELECT 1 FROM pg_inherits
        WHERE inhrelid = to_regclass($1) AND inhparent = to_regclass($2))"""
# Retention's detached tables of a parent not dropped yet: plain tables (never a partition)
# named `<parent>_YYYY_MM_expired` in the events' schema.
SELECT_EXPIRED = """
    SELECT c.relname AS name FROM pg_class c
    WHERE c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = to_regclass($1))
      AND c.relkind = 'r' AND NOT c.relispartition
      AND c.relname ~ ('^' || $1 || '_[0-9]{4}_[0-9]{2}_expired$')
    ORDER BY c.relname"""
# Only a plain table may be dropped here, never a partition still attached.
IS_DETACHED_TABLE = """
    SELECT NOT relispartition FROM pg_class WHERE oid = to_regclass($1) AND relkind = 'r'"""

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

    async def detach_partition(self, parent: str, name: str) -> bool:
        """Detaches `parent`'s partition `name` and renames it `<name>_expired` (step 1 of
        removing a month); False when it is no longer attached (another replica was first)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await self._lock(conn)
            if not await conn.fetchval(IS_PARTITION_OF, _quoted(name), _quoted(parent)):
                return False
            await conn.execute(DETACH_PARTITION.format(parent=_quoted(parent), name=_quoted(name)))
            await conn.execute(
                RENAME_DETACHED.format(name=_quoted(name), expired=_quoted(name + EXPIRED_SUFFIX))
            )
            return True

    async def expired_tables(self, parent: str) -> list[str]:
        """The detached `<parent>_YYYY_MM_expired` tables not dropped yet."""
        return [r["name"] for r in await self._pool.fetch(SELECT_EXPIRED, parent)]

    async def drop_expired(self, name: str) -> bool:
        """Drops a table detach_partition left (step 2); False when it is gone already, and
        refused for anything but a plain table (never a partition still attached)."""
        if not name.endswith(EXPIRED_SUFFIX):
            raise ValueError(f"not a detached partition: {name}")
        async with self._pool.acquire() as conn, conn.transaction():
            await self._lock(conn)
            if not await conn.fetchval(IS_DETACHED_TABLE, _quoted(name)):
                return False
            await conn.execute(DROP_DETACHED.format(name=_quoted(name)))
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
