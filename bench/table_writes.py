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
