"""Where a benchmark's database time goes, statement by statement, from pg_stat_statements.

The embedded PostgreSQL ships the extension; a benchmark that wants the breakdown starts its
server with `STATEMENT_STATS_SETTINGS` (the library must be preloaded), resets the counters just
before its load and reads them right after. `track = all` records the statements that functions
and triggers run as well as the ones clients send: top-level rows add up to the database time the
clients waited for; nested rows say which part of their caller's time each inner statement took
(their time is inside their caller's, so it is never added twice).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import asyncpg

# Server settings for a breakdown run. compute_query_id groups statements that differ only in
# their constants; track_utility keeps BEGIN/COMMIT visible (a commit is part of a batch's cost).
STATEMENT_STATS_SETTINGS = {
    "shared_preload_libraries": "'pg_stat_statements'",
    "compute_query_id": "on",
    "pg_stat_statements.track": "'all'",
    "pg_stat_statements.track_utility": "on",
    "pg_stat_statements.max": "5000",
}

RESET = "SELECT pg_stat_statements_reset()"
# The counters of this database only: the bench's own setup queries ran before the reset.
READ = """
    SELECT s.query, s.toplevel, s.calls, s.total_exec_time, s.rows,
           s.shared_blks_hit + s.shared_blks_read AS blocks
    FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
    WHERE d.datname = current_database() AND s.query NOT LIKE '%pg_stat_statements%'
    ORDER BY s.toplevel DESC, s.total_exec_time DESC"""


@dataclass(frozen=True, slots=True)
class StatementCost:
    """One normalized statement's share of the load."""

    text: str
    top_level: bool
    calls: int
    total_ms: float
    rows: int
    blocks: int

    def per_unit_ms(self, units: int) -> float:
        return self.total_ms / max(1, units)


async def start_recording(database_url: str) -> bool:
    """Creates the extension and zeroes its counters; False when the server cannot (a database
    given by URL whose server does not preload the library)."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute(RESET)
    except asyncpg.PostgresError:
        return False
    finally:
        await conn.close()
    return True


async def read_costs(database_url: str) -> list[StatementCost]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(READ)
    finally:
        await conn.close()
    return [
        StatementCost(
            _one_line(r["query"]),
            r["toplevel"],
            r["calls"],
            r["total_exec_time"],
            r["rows"],
            r["blocks"],
        )
        for r in rows
    ]


def breakdown_table(
    costs: list[StatementCost], *, unit: str, units: int, limit: int = 15, width: int = 90
) -> str:
    """A Markdown table: top-level statements by share of the clients' database time, then the
    costliest statements run inside functions and triggers (part of their callers' time)."""
    top = [c for c in costs if c.top_level]
    nested = sorted((c for c in costs if not c.top_level), key=lambda c: -c.total_ms)
    total = sum(c.total_ms for c in top) or 1.0
    lines = [
        f"| statement | level | calls per {unit} | ms per {unit} | share of top-level time |",
        "|---|---|---:|---:|---:|",
    ]
    for cost in top[:limit]:
        lines.append(_row(cost, "top", units, total, width))
    rest = top[limit:]
    if rest:
        rest_ms = sum(c.total_ms for c in rest)
        lines.append(
            f"| ({len(rest)} other statements) | top | | {rest_ms / max(1, units):.2f} |"
            f" {100 * rest_ms / total:.1f}% |"
        )
    for cost in nested[:limit]:
        lines.append(_row(cost, "nested", units, total, width))
    lines.append(f"| **all top-level statements** | | | **{total / max(1, units):.2f}** | 100% |")
    return "\n".join(lines)


def _row(cost: StatementCost, level: str, units: int, total: float, width: int) -> str:
    text = headline(cost.text)
    text = text if len(text) <= width else text[: width - 1] + "…"
    text = text.replace("|", "\\|")
    return (
        f"| `{text}` | {level} | {cost.calls / max(1, units):.2f} |"
        f" {cost.per_unit_ms(units):.2f} | {100 * cost.total_ms / total:.1f}% |"
    )


def _one_line(query: str) -> str:
    return re.sub(r"\s+", " ", query).strip()


_CTE_NAME = re.compile(
    r"(\w+)\s*(?:\([^()]*\))?\s+AS\s+(?:NOT\s+)?(?:MATERIALIZED\s+)?$", re.IGNORECASE
)
_MAIN = re.compile(r"\s*(SELECT|INSERT|UPDATE|DELETE|MERGE)\b", re.IGNORECASE)


def headline(query: str) -> str:
    """A statement as the breakdown names it: a WITH statement by its CTE names and the
    statement they feed (`WITH e, claimed: INSERT INTO events ...`), which says what it does
    where its first characters would not; any other statement as it is."""
    if not re.match(r"WITH\b", query, re.IGNORECASE):
        return query
    names: list[str] = []
    depth = 0
    for index, char in enumerate(query):
        if char == "(":
            if depth == 0:
                found = _CTE_NAME.search(query[:index])
                if found:
                    names.append(found.group(1))
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                rest = query[index + 1 :]
                main = _MAIN.match(rest)
                if main and names:
                    return f"WITH {', '.join(names)}: {rest.strip()}"
    return query
