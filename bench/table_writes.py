"""The rows a benchmark's load wrote, table by table, from PostgreSQL's cumulative statistics.

A row written is the unit of a write path's cost below its statements: an insert or update
writes a heap tuple, and every index entry that tuple needs unless the update is HOT (no indexed
column changed and the page had room: no index is touched). A bench snapshots
`pg_stat_user_tables` when its load starts and again when it ends, and divides the difference
by the `events` rows inserted in between: the rows each stored event cost. Partitions count as
their parent table.

Backends send their counters at the end of a transaction at most once a second (and when
idle, ten seconds later), so the last second of a load may be missing from both the table
counts and the events count; the ratio of the two is what is reported, and it is not skewed by
that lag.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

READ = """
    SELECT coalesce(parent.relname, s.relname) AS name, sum(s.n_tup_ins)::bigint AS inserted,
           sum(s.n_tup_upd)::bigint AS updated, sum(s.n_tup_hot_upd)::bigint AS hot_updated,
           sum(s.n_tup_del)::bigint AS deleted
    FROM pg_stat_user_tables s
    LEFT JOIN pg_inherits i ON i.inhrelid = s.relid
    LEFT JOIN pg_class parent ON parent.oid = i.inhparent
    GROUP BY 1"""


@dataclass(frozen=True, slots=True)
class TableWrites:
    inserted: int = 0
    updated: int = 0
    hot_updated: int = 0
    deleted: int = 0

    def minus(self, earlier: TableWrites) -> TableWrites:
        return TableWrites(
            self.inserted - earlier.inserted,
            self.updated - earlier.updated,
            self.hot_updated - earlier.hot_updated,
            self.deleted - earlier.deleted,
        )

    def plus(self, other: TableWrites) -> TableWrites:
        return TableWrites(
            self.inserted + other.inserted,
            self.updated + other.updated,
            self.hot_updated + other.hot_updated,
            self.deleted + other.deleted,
        )

    @property
    def rows(self) -> int:
        return self.inserted + self.updated + self.deleted


async def read_table_writes(database_url: str) -> dict[str, TableWrites]:
    """Rows inserted, updated (HOT among them) and deleted so far, by table."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(READ)
    finally:
        await conn.close()
    return {
        r["name"]: TableWrites(r["inserted"], r["updated"], r["hot_updated"], r["deleted"])
        for r in rows
    }


# The write-ahead log's position in bytes: what a stretch of work wrote to the log is the
# difference of two readings (every change, its index entries and full-page images included).
WAL_POSITION = "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint"


async def read_wal_position(conn: asyncpg.Connection) -> int:
    """The WAL insert position now, in bytes from the log's start."""
    return int(await conn.fetchval(WAL_POSITION))


# What the log holds between two positions, by record kind and relation (pg_walinspect, shipped
# with the server since PostgreSQL 15): a row lock, a speculative insertion's confirmation, an
# index entry each have their own record, which the table counts above do not show.
WAL_RECORDS = """
    SELECT resource_manager || '/' || record_type AS record,
           coalesce(c.relname, '-') AS relation, count(*) AS records,
           sum(record_length)::bigint AS bytes
    FROM pg_get_wal_records_info($1::pg_lsn, $2::pg_lsn) w
    LEFT JOIN pg_class c
        ON pg_relation_filenode(c.oid)
           = substring(w.block_ref FROM 'rel [0-9]+/[0-9]+/([0-9]+)')::oid
    GROUP BY 1, 2
    ORDER BY sum(record_length) DESC"""


@dataclass(frozen=True, slots=True)
class WalRecords:
    record: str  # resource manager and record type, "Heap/LOCK"
    relation: str  # the first block's relation ("-" for none)
    records: int
    bytes: int


async def read_wal_records(conn: asyncpg.Connection, start: int, end: int) -> list[WalRecords]:
    """The log between two positions by record kind and relation, largest first; empty when
    the server lacks pg_walinspect (a database given by URL)."""
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        rows = await conn.fetch(WAL_RECORDS, start, end)  # asyncpg's pg_lsn is an int
    except asyncpg.PostgresError:
        return []
    return [WalRecords(r["record"], r["relation"], r["records"], r["bytes"]) for r in rows]


def wal_table(records: list[WalRecords], events: int, per_events: int, top: int = 15) -> str:
    """A Markdown table of the largest `top` kinds of log record per `per_events` events."""
    if events <= 0 or not records:
        return "no write-ahead log breakdown (no events, or no pg_walinspect)"
    scale = per_events / events
    total = sum(r.bytes for r in records)
    lines = [
        f"| record | relation | records | bytes (per {per_events} events) | share |",
        "|---|---|---:|---:|---:|",
    ]
    for r in records[:top]:
        lines.append(
            f"| {r.record} | `{r.relation}` | {r.records * scale:.0f} | {r.bytes * scale:,.0f}"
            f" | {100 * r.bytes / total:.1f}% |"
        )
    rest = records[top:]
    if rest:
        lines.append(
            f"| ({len(rest)} others) | | {sum(r.records for r in rest) * scale:.0f}"
            f" | {sum(r.bytes for r in rest) * scale:,.0f}"
            f" | {100 * sum(r.bytes for r in rest) / total:.1f}% |"
        )
    return "\n".join(lines)


def writes_between(
    before: dict[str, TableWrites], after: dict[str, TableWrites]
) -> dict[str, TableWrites]:
    """What was written between two snapshots, tables that wrote nothing left out."""
    written = {name: now.minus(before.get(name, TableWrites())) for name, now in after.items()}
    return {name: w for name, w in written.items() if w.rows > 0}


def writes_table(written: dict[str, TableWrites], per_events: int) -> str:
    """A Markdown table of the rows written per `per_events` events inserted into `events`."""
    events = written.get("events", TableWrites()).inserted
    if events <= 0:
        return "no events were inserted between the snapshots"
    scale = per_events / events
    lines = [
        f"| table | inserted | updated | of which HOT | deleted (per {per_events} events) |",
        "|---|---:|---:|---:|---:|",
    ]
    total = TableWrites()
    for name, w in sorted(written.items(), key=lambda item: -item[1].rows):
        lines.append(
            f"| `{name}` | {w.inserted * scale:.0f} | {w.updated * scale:.0f}"
            f" | {w.hot_updated * scale:.0f} | {w.deleted * scale:.0f} |"
        )
        total = total.plus(w)
    lines.append(
        f"| **all tables** | {total.inserted * scale:.0f} | {total.updated * scale:.0f}"
        f" | {total.hot_updated * scale:.0f} | {total.deleted * scale:.0f} |"
    )
    return "\n".join(lines)
