"""Where a value is written in the database: every text-like cell of every table, for the
erasure tests that check nothing names an erased person any more."""

from __future__ import annotations

import asyncpg

# Text-like columns of every table (partitions read through their partitioned table), read as
# text: where an ID can be written.
TEXT_COLUMNS = """
    SELECT c.table_name, c.column_name, c.data_type
    FROM information_schema.columns c
    JOIN information_schema.tables t
        ON t.table_schema = c.table_schema AND t.table_name = c.table_name
    WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE'
        AND c.data_type IN ('text', 'character varying', 'jsonb', 'json', 'ARRAY', 'bytea')
        AND NOT EXISTS (
            SELECT 1 FROM pg_class pc
            WHERE pc.oid = to_regclass(quote_ident(c.table_name)) AND pc.relispartition
        )
    ORDER BY c.table_name, c.column_name"""


async def cells_naming(db: asyncpg.Pool, value: str) -> dict[str, int]:
    """How many cells of each table.column hold `value` (bytea read with its printable bytes)."""
    found = {}
    for column in await db.fetch(TEXT_COLUMNS):
        table, name = column["table_name"], column["column_name"]
        cell = (
            f"encode(\"{name}\", 'escape')" if column["data_type"] == "bytea" else f'"{name}"::text'
        )
        hits = await db.fetchval(
            f'SELECT count(*) FROM "{table}" WHERE strpos({cell}, $1) > 0', value
        )
        if hits:
            found[f"{table}.{name}"] = int(hits)
    return found
