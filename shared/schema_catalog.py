"""Each owner's current schema, read from the catalog: what its `schema.sql` file shows.

The migrations are the history; an owner's `schema/schema.sql` is the map: its tables (columns,
constraints, indexes), functions, views, triggers, comments and declared profile hooks as they
stand after every migration, grouped and with the comments its migrations wrote above each
object. The file is generated, never edited by hand: after adding a migration, run

    python -m shared.schema_catalog --write            # every owner's file
    python -m shared.schema_catalog ingest             # print one owner's schema

and commit the files with the migration. tests/integration/test_schema_files.py fails while
a file differs from what the migrations produce.

Who owns an object: the owner of the migration that created it (applying the migrations one
at a time and looking at what each one added), except that an index, a trigger or a comment
belongs to the owner of its table (or function), and a profile hook row to the owner it names.
Owners' files apply in OWNER_ORDER: an owner's objects may use only those of the owners before
it (a view or SQL function must find what it reads when it is created).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from shared.db import (
    SCHEMA_FILE_NAME,
    SERVICES_DIR,
    SHARED_SCHEMA_DIR,
    load_migrations,
    migration_paths,
)

# The order the owners' schema files apply in, each depending only on those before it: shared's
# plumbing, identity's profiles, ingest's events (which name profiles), segments' derived state,
# query's projection (which reads all of them).
OWNER_ORDER = ("shared", "identity", "ingest", "segments", "query")

# Kinds of catalog objects, in the order a schema file shows them.
TYPE, TABLE, INDEX, FUNCTION, AGGREGATE, VIEW, TRIGGER, COMMENT, HOOK = (
    "type",
    "table",
    "index",
    "function",
    "aggregate",
    "view",
    "trigger",
    "comment",
    "hook",
)
ROUTINES = (FUNCTION, AGGREGATE, VIEW)

# Base tables of the public schema (schema_migrations is the runner's, not an owner's). Of a
# partitioned table's partitions only the DEFAULT one is part of the schema: the periodic ones
# (events_2027_01...) are made at run time by their owner (ingest's partition maintenance,
# docs/partitions.md) and depend on the date, so they are left out, with their indexes and
# triggers (copies of the partitioned table's).
SELECT_TABLES = """
    SELECT c.oid, c.relname, pg_get_partkeydef(c.oid) AS partition_key,
        parent.relname AS parent_name, array_to_string(c.reloptions, ', ') AS options
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_inherits h ON c.relispartition AND h.inhrelid = c.oid
    LEFT JOIN pg_class parent ON parent.oid = h.inhparent
    WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND c.relname <> 'schema_migrations'
        AND (NOT c.relispartition OR pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT')
    ORDER BY c.oid"""
SELECT_COLUMNS = """
    SELECT a.attrelid AS table_oid, a.attname, format_type(a.atttypid, a.atttypmod) AS type,
        a.attnotnull, a.attidentity::text, a.attgenerated::text,
        pg_get_expr(d.adbin, d.adrelid) AS expr,
        CASE WHEN a.attidentity <> '' THEN
            nullif(pg_get_serial_sequence(a.attrelid::regclass::text, a.attname),
                   'public.' || a.attrelid::regclass::text || '_' || a.attname || '_seq')
        END AS identity_sequence,
        CASE WHEN a.attcollation <> t.typcollation THEN co.collname END AS collation
    FROM pg_attribute a
    JOIN pg_type t ON t.oid = a.atttypid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    LEFT JOIN pg_collation co ON co.oid = a.attcollation
    WHERE a.attrelid = ANY($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
    ORDER BY a.attrelid, a.attnum"""
# NOT NULL constraints (contype 'n', PostgreSQL 18) are shown as the columns' NOT NULL.
SELECT_CONSTRAINTS = """
    SELECT conrelid AS table_oid, conname, pg_get_constraintdef(oid) AS definition
    FROM pg_constraint WHERE conrelid = ANY($1::oid[]) AND contype <> 'n'
    ORDER BY conrelid, contype = 'p' DESC, conname"""
# Indexes that back a constraint are part of the table's definition.
SELECT_INDEXES = """
    SELECT i.indexrelid::regclass::text AS name, c.relname AS table_name,
        pg_get_indexdef(i.indexrelid) AS definition
    FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'public' AND c.relname <> 'schema_migrations' AND NOT c.relispartition
        AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
    ORDER BY i.indexrelid"""
SELECT_FUNCTIONS = """
    SELECT p.oid, p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')' AS name,
        pg_get_functiondef(p.oid) AS definition
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = 'public' AND p.prokind <> 'a' ORDER BY p.oid"""
# Aggregates (pg_get_functiondef refuses them), as far as the schema uses them: a state
# function, a state type, an optional final function and initial state.
SELECT_AGGREGATES = """
    SELECT p.oid, p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')' AS name,
        p.proname AS bare_name, pg_get_function_identity_arguments(p.oid) AS arguments,
        a.aggtransfn::regproc::text AS state_function,
        format_type(a.aggtranstype, NULL) AS state_type,
        CASE WHEN a.aggfinalfn <> 0 THEN a.aggfinalfn::regproc::text END AS final_function,
        a.agginitval AS initial_state
    FROM pg_proc p JOIN pg_aggregate a ON a.aggfnoid = p.oid
    JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = 'public' ORDER BY p.oid"""
# Composite types of the public schema (not tables' row types).
SELECT_TYPES = """
    SELECT t.oid, t.typname AS name,
        string_agg(quote_ident(a.attname) || ' ' || format_type(a.atttypid, a.atttypmod), ', '
                   ORDER BY a.attnum) AS fields
    FROM pg_type t
    JOIN pg_class c ON c.oid = t.typrelid AND c.relkind = 'c'
    JOIN pg_namespace n ON n.oid = t.typnamespace
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    WHERE n.nspname = 'public'
    GROUP BY t.oid, t.typname
    ORDER BY t.oid"""
SELECT_VIEWS = """
    SELECT c.oid, c.relname AS name, c.relkind, pg_get_viewdef(c.oid) AS definition
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'public' AND c.relkind IN ('v', 'm') ORDER BY c.oid"""
SELECT_TRIGGERS = """
    SELECT t.tgname || ' ON ' || c.relname AS name, c.relname AS table_name,
        pg_get_triggerdef(t.oid) AS definition
    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'public' AND NOT t.tgisinternal AND NOT c.relispartition
    ORDER BY t.oid"""
# COMMENT ON a table, column, view, index (a partitioned table's too: relkind I) or function
# of the public schema.
SELECT_COMMENTS = """
    SELECT CASE
            WHEN d.classoid = 'pg_proc'::regclass THEN 'FUNCTION ' || d.objoid::regprocedure::text
            WHEN d.objsubid > 0 THEN 'COLUMN ' || c.relname || '.' || quote_ident(a.attname)
            WHEN c.relkind IN ('v', 'm') THEN 'VIEW ' || c.relname
            WHEN c.relkind IN ('i', 'I') THEN 'INDEX ' || c.relname
            ELSE 'TABLE ' || c.relname END AS target,
        CASE WHEN d.classoid = 'pg_proc'::regclass THEN 'function'
             WHEN c.relkind IN ('i', 'I') THEN 'index' ELSE 'relation' END AS target_kind,
        coalesce(c.relname, d.objoid::regprocedure::text) AS target_name,
        (SELECT i.indrelid::regclass::text FROM pg_index i WHERE i.indexrelid = d.objoid)
            AS index_table,
        d.description
    FROM pg_description d
    LEFT JOIN pg_class c ON d.classoid = 'pg_class'::regclass AND c.oid = d.objoid
    LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.objsubid
    LEFT JOIN pg_proc p ON d.classoid = 'pg_proc'::regclass AND p.oid = d.objoid
    WHERE coalesce(c.relnamespace, p.pronamespace) = 'public'::regnamespace
    ORDER BY 1"""
# The profile hooks each owner declares (shared/schema, profile_hooks), once that table exists.
SELECT_HOOKS = """
    SELECT kind, owner, function_name, run_order FROM profile_hooks
    ORDER BY kind, run_order, function_name"""


@dataclass(frozen=True, slots=True)
class CatalogObject:
    """One object of the schema: its kind, name, and the SQL that creates it as it stands."""

    kind: str
    name: str
    sql: str
    # Whose object it follows: an index's or trigger's table, a comment's object.
    table: str | None = None
    # For hooks: the owner the row names. For ordering: creation order (oid).
    owner: str | None = None
    order: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.name)


@dataclass(slots=True)
class Catalog:
    """Every object of the public schema, by (kind, name)."""

    objects: dict[tuple[str, str], CatalogObject] = field(default_factory=dict)

    def definitions(self) -> dict[tuple[str, str], str]:
        return {key: obj.sql for key, obj in self.objects.items()}


def _quote(name: str) -> str:
    return name if re.fullmatch(r"[a-z_][a-z0-9_]*", name) else '"' + name.replace('"', '""') + '"'


def _column_sql(row: asyncpg.Record) -> str:
    parts = [_quote(row["attname"]), row["type"]]
    if row["collation"] is not None:
        parts.append(f'COLLATE "{row["collation"]}"')
    # An identity's sequence is named only when a migration named it (a read contract may
    # read it): PostgreSQL's default name is the one CREATE TABLE gives again.
    sequence = (
        "" if row["identity_sequence"] is None else f" (SEQUENCE NAME {row['identity_sequence']})"
    )
    if row["attidentity"] == "a":
        parts.append(f"GENERATED ALWAYS AS IDENTITY{sequence}")
    elif row["attidentity"] == "d":
        parts.append(f"GENERATED BY DEFAULT AS IDENTITY{sequence}")
    elif row["attgenerated"] == "s":
        parts.append(f"GENERATED ALWAYS AS ({row['expr']}) STORED")
    if row["attnotnull"]:
        parts.append("NOT NULL")
    if row["expr"] is not None and row["attgenerated"] != "s":
        parts.append(f"DEFAULT {row['expr']}")
    return " ".join(parts)


async def read_catalog(conn: asyncpg.Connection) -> Catalog:
    """The current schema of the connection's database."""
    catalog = Catalog()

    def add(obj: CatalogObject) -> None:
        catalog.objects[obj.key] = obj

    tables = await conn.fetch(SELECT_TABLES)
    oids = [t["oid"] for t in tables]
    lines: dict[int, list[str]] = {oid: [] for oid in oids}
    for row in await conn.fetch(SELECT_COLUMNS, oids):
        lines[row["table_oid"]].append(_column_sql(row))
    for row in await conn.fetch(SELECT_CONSTRAINTS, oids):
        lines[row["table_oid"]].append(f"CONSTRAINT {_quote(row['conname'])} {row['definition']}")
    for t in tables:
        body = ",\n".join(f"    {line}" for line in lines[t["oid"]])
        if t["parent_name"] is not None:
            # Its columns, constraints and indexes are its partitioned table's.
            sql = f"CREATE TABLE {t['relname']} PARTITION OF {t['parent_name']} DEFAULT;"
        elif t["partition_key"] is not None:
            sql = f"CREATE TABLE {t['relname']} (\n{body}\n) PARTITION BY {t['partition_key']};"
        else:
            # Storage parameters (a fillfactor) are part of the table's definition.
            options = f" WITH ({t['options']})" if t["options"] else ""
            sql = f"CREATE TABLE {t['relname']} (\n{body}\n){options};"
        add(CatalogObject(TABLE, t["relname"], sql, order=t["oid"]))
    for row in await conn.fetch(SELECT_INDEXES):
        # A partitioned table's index is shown ON ONLY it: created without ONLY from the file,
        # it is the same index (on each partition too).
        sql = row["definition"].replace(" ON ONLY public.", " ON ").replace(" ON public.", " ON ")
        sql += ";"
        add(CatalogObject(INDEX, row["name"], sql, table=row["table_name"]))
    for row in await conn.fetch(SELECT_FUNCTIONS):
        add(
            CatalogObject(FUNCTION, row["name"], row["definition"].rstrip() + ";", order=row["oid"])
        )
    for row in await conn.fetch(SELECT_AGGREGATES):
        clauses = [f"SFUNC = {row['state_function']}", f"STYPE = {row['state_type']}"]
        if row["final_function"] is not None:
            clauses.append(f"FINALFUNC = {row['final_function']}")
        if row["initial_state"] is not None:
            clauses.append("INITCOND = '" + row["initial_state"].replace("'", "''") + "'")
        body = ",\n".join(f"    {clause}" for clause in clauses)
        sql = f"CREATE AGGREGATE {row['bare_name']}({row['arguments']}) (\n{body}\n);"
        add(CatalogObject(AGGREGATE, row["name"], sql, order=row["oid"]))
    for row in await conn.fetch(SELECT_TYPES):
        sql = f"CREATE TYPE {row['name']} AS ({row['fields']});"
        add(CatalogObject(TYPE, row["name"], sql, order=row["oid"]))
    for row in await conn.fetch(SELECT_VIEWS):
        materialized = "MATERIALIZED " if row["relkind"] == "m" else ""
        sql = f"CREATE {materialized}VIEW {row['name']} AS\n{row['definition'].rstrip(';')};"
        add(CatalogObject(VIEW, row["name"], sql, order=row["oid"]))
    for row in await conn.fetch(SELECT_TRIGGERS):
        sql = row["definition"].replace(" ON public.", " ON ") + ";"
        add(CatalogObject(TRIGGER, row["name"], sql, table=row["table_name"]))
    for row in await conn.fetch(SELECT_COMMENTS):
        text = row["description"].replace("'", "''")
        follows = row["index_table"] if row["target_kind"] == "index" else row["target_name"]
        add(
            CatalogObject(
                COMMENT, row["target"], f"COMMENT ON {row['target']} IS '{text}';", table=follows
            )
        )
    if ("table", "profile_hooks") in catalog.objects:
        for row in await conn.fetch(SELECT_HOOKS):
            sql = (
                "INSERT INTO profile_hooks (kind, owner, function_name, run_order) VALUES"
                f" ('{row['kind']}', '{row['owner']}', '{row['function_name']}',"
                f" {row['run_order']});"
            )
            name = f"{row['kind']} {row['function_name']}"
            add(CatalogObject(HOOK, name, sql, owner=row["owner"]))
    return catalog


def owner_of_path(path: Path) -> str:
    """`shared` for shared/schema, else the service whose folder holds the file."""
    directory = path.resolve().parent
    if directory == SHARED_SCHEMA_DIR.resolve():
        return "shared"
    if directory.parent.parent == SERVICES_DIR.resolve():
        return directory.parent.name
    raise ValueError(f"not in an owner's schema folder: {path}")


def schema_file(owner: str) -> Path:
    directory = SHARED_SCHEMA_DIR if owner == "shared" else SERVICES_DIR / owner / "schema"
    return directory / SCHEMA_FILE_NAME


@dataclass(slots=True)
class Attribution:
    """Who created what, found by applying scripts one at a time."""

    catalog: Catalog = field(default_factory=Catalog)
    owner_of: dict[tuple[str, str], str] = field(default_factory=dict)
    # Objects an owner's script changed although another owner created them.
    foreign_changes: list[str] = field(default_factory=list)


async def apply_in_steps(conn: asyncpg.Connection, steps: Iterable[tuple[str, str]]) -> Attribution:
    """Applies each (owner, sql) in order, each in its own transaction, and attributes every
    object to the owner of the step that created it; then indexes, triggers and comments to the
    owner of their table or function, hook rows to the owner they name."""
    result = Attribution()
    before: dict[tuple[str, str], str] = {}
    for owner, sql in steps:
        async with conn.transaction():
            await conn.execute(sql)
        catalog = await read_catalog(conn)
        after = catalog.definitions()
        for key, definition in after.items():
            if key not in before:
                result.owner_of[key] = owner
            elif before[key] != definition and result.owner_of.get(key) != owner:
                result.foreign_changes.append(
                    f"{owner} changes {key[0]} {key[1]} of {result.owner_of.get(key)}"
                )
        for key in set(before) - set(after):
            result.owner_of.pop(key, None)
        before = after
        result.catalog = catalog
    objects = result.catalog.objects
    for key, obj in objects.items():
        if obj.kind == HOOK:
            result.owner_of[key] = obj.owner or result.owner_of[key]
    for key, obj in objects.items():
        if obj.kind in (INDEX, TRIGGER, COMMENT) and obj.table is not None:
            followed = _followed(objects, obj.table)
            if followed is not None and followed in result.owner_of:
                result.owner_of[key] = result.owner_of[followed]
    return result


def _followed(objects: dict[tuple[str, str], CatalogObject], name: str) -> tuple[str, str] | None:
    for kind in (TABLE, VIEW, FUNCTION):
        if (kind, name) in objects:
            return (kind, name)
    return None


def migration_steps() -> list[tuple[str, str]]:
    paths = {int(p.name[:4]): p for p in migration_paths()}
    return [(owner_of_path(paths[m.version]), m.sql) for m in load_migrations()]


def schema_file_steps() -> list[tuple[str, str]]:
    return [
        (owner, schema_file(owner).read_text())
        for owner in OWNER_ORDER
        if schema_file(owner).exists()
    ]


# -- Rendering ---------------------------------------------------------------------------------

_CREATE = re.compile(
    r"^\s*(?:CREATE\s+(?:OR\s+REPLACE\s+)?(?:UNIQUE\s+)?(?:MATERIALIZED\s+)?"
    r"(TABLE|INDEX|FUNCTION|AGGREGATE|TYPE|VIEW|TRIGGER)\s+(?:IF\s+NOT\s+EXISTS\s+)?|"
    r"ALTER\s+(TABLE|INDEX)\s+(?:IF\s+EXISTS\s+)?)(\w+)",
    re.IGNORECASE,
)


def migration_notes() -> dict[tuple[str, str], list[str]]:
    """The comment block written directly above each CREATE (or ALTER) of an object in the
    migrations, by (kind, bare name), oldest first; a CREATE's block replaces earlier ones."""
    notes: dict[tuple[str, str], list[str]] = {}
    for migration_path in migration_paths():
        lines = migration_path.read_text().splitlines()
        block: list[str] = []
        for line in lines:
            if line.startswith("--"):
                block.append(line)
                continue
            match = _CREATE.match(line)
            if match and block:
                kind = (match[1] or match[2]).lower()
                key = (kind, match[3].lower())
                text = "\n".join(block)
                if match[1]:
                    notes[key] = [text]
                elif text not in notes.setdefault(key, []):
                    notes[key].append(text)
            block = []
    return notes


def _bare(obj: CatalogObject) -> str:
    return obj.name.split("(")[0].split(" ")[0].split(".")[-1].lower()


def render(owner: str, attribution: Attribution, notes: dict[tuple[str, str], list[str]]) -> str:
    """The schema file of `owner`: a header, then its tables (each with its indexes), functions
    and views, triggers, comments and hooks, each under its migrations' comment."""
    mine = [
        o for k, o in attribution.catalog.objects.items() if attribution.owner_of.get(k) == owner
    ]
    out = [
        f"-- The current schema of {owner}: what its migrations (the NNNN_*.sql files of this",
        "-- folder) produce, applied after the schema files of "
        + (", ".join(OWNER_ORDER[: OWNER_ORDER.index(owner)]) or "no other owner")
        + ".",
        "-- Generated by `python -m shared.schema_catalog --write`; do not edit by hand (the",
        "-- comments come from the migrations). tests/integration/test_schema_files.py checks it.",
    ]

    def note(kind: str, obj: CatalogObject) -> None:
        for text in notes.get((kind, _bare(obj)), []):
            out.append(text)

    def section(title: str) -> None:
        out.extend(["", "", f"-- {'=' * 92}", f"-- {title}", f"-- {'=' * 92}"])

    def listing(title: str, objects: list[CatalogObject]) -> None:
        """A section of objects, each under its migrations' comment (none when empty)."""
        if objects:
            section(title)
            for obj in objects:
                out.append("")
                note(obj.kind, obj)
                out.append(obj.sql)

    tables = sorted((o for o in mine if o.kind == TABLE), key=lambda o: o.order)
    indexes = [o for o in mine if o.kind == INDEX]
    routines = sorted((o for o in mine if o.kind in ROUTINES), key=lambda o: o.order)
    # Composite types name only built-in types: they come first.
    listing("Types", sorted((o for o in mine if o.kind == TYPE), key=lambda o: o.order))
    # A function that a column's expression calls (a generated column's) must exist before its
    # table; such functions read no table, so they can come first.
    tables_sql = "\n".join(t.sql for t in tables)
    used_by_columns = [
        r for r in routines if r.kind == FUNCTION and re.search(rf"\b{_bare(r)}\(", tables_sql)
    ]
    listing("Functions that columns use", used_by_columns)
    routines = [r for r in routines if r not in used_by_columns]
    if tables or indexes:
        section("Tables")
        for table in tables:
            out.append("")
            note(TABLE, table)
            out.append(table.sql)
            for index in (i for i in indexes if i.table == table.name):
                note(INDEX, index)
                out.append(index.sql)
        others = [i for i in indexes if i.table not in {t.name for t in tables}]
        for index in others:
            out.append("")
            note(INDEX, index)
            out.append(index.sql)
    listing("Functions, aggregates and views", routines)
    for kind, title in ((TRIGGER, "Triggers"), (COMMENT, "Comments"), (HOOK, "Profile hooks")):
        objects = sorted((o for o in mine if o.kind == kind), key=lambda o: o.name)
        if objects:
            section(title)
            out.append("")
            for obj in objects:
                if kind == TRIGGER:
                    note(TRIGGER, obj)
                out.append(obj.sql)
    return "\n".join(out) + "\n"


# -- Command line ------------------------------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


async def attribute_migrations(server_url: str) -> Attribution:
    """Applies every migration, one at a time, to a scratch database of the server."""
    name = f"schema_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            conn = await asyncpg.connect(_with_database(server_url, name))
            try:
                return await apply_in_steps(conn, migration_steps())
            finally:
                await conn.close()
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _main(server_url: str, owners: list[str], write: bool) -> None:
    attribution = await attribute_migrations(server_url)
    notes = migration_notes()
    for owner in owners:
        text = render(owner, attribution, notes)
        if write:
            schema_file(owner).write_text(text)
            print(f"wrote {schema_file(owner)}", file=sys.stderr)
        else:
            sys.stdout.write(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("owners", nargs="*", metavar="OWNER", help=" ".join(OWNER_ORDER))
    parser.add_argument("--write", action="store_true", help="rewrite the owners' schema.sql")
    parser.add_argument(
        "--database-url",
        help="a PostgreSQL server to make a scratch database on (default: a temporary one)",
    )
    args = parser.parse_args(argv)
    owners = args.owners or list(OWNER_ORDER)
    unknown = set(owners) - set(OWNER_ORDER)
    if unknown:
        parser.error(f"unknown owners: {sorted(unknown)}")
    if args.database_url:
        asyncio.run(_main(args.database_url, owners, args.write))
        return
    from shared.embedded import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="profiles-schema-") as directory:
        server = EmbeddedPostgres(Path(directory) / "pg", fast_unsafe=True)
        try:
            url = server.start()
            asyncio.run(_main(url, owners, args.write))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
