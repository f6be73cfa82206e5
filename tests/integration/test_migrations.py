"""Migrations: applied once, safely when processes race, never edited, and tenant-keyed."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from shared.db import MigrationError, load_migrations, migrate, migration_paths
from tests.conftest import with_database

# Tables that are not a tenant's data, so their key need not start with project_id.
GLOBAL_TABLES = {"schema_migrations", "projects", "profile_hooks"}

SCHEMA_QUERY = """
    SELECT table_name, column_name, data_type, is_nullable, column_default
    FROM information_schema.columns WHERE table_schema = 'public'
    ORDER BY table_name, ordinal_position"""
INDEX_QUERY = "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1"
PRIMARY_KEYS = """
    SELECT c.relname AS table_name,
           (SELECT array_agg(a.attname ORDER BY k.ord)
              FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
              JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum) AS columns
    FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE i.indisprimary AND n.nspname = 'public'"""


@pytest.fixture
async def empty_database_url(postgres_server_url: str) -> AsyncIterator[str]:
    name = f"m_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(postgres_server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield with_database(postgres_server_url, name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def schema_of(url: str) -> tuple[list[tuple], list[tuple]]:
    conn = await asyncpg.connect(url)
    try:
        columns = [tuple(r) for r in await conn.fetch(SCHEMA_QUERY)]
        indexes = [tuple(r) for r in await conn.fetch(INDEX_QUERY)]
        return columns, indexes
    finally:
        await conn.close()


async def test_migrating_twice_applies_nothing_the_second_time(empty_database_url: str) -> None:
    versions = [m.version for m in load_migrations()]
    assert await migrate(empty_database_url) == versions
    first = await schema_of(empty_database_url)
    assert await migrate(empty_database_url) == []
    assert await schema_of(empty_database_url) == first


async def test_concurrent_starts_apply_each_migration_exactly_once(empty_database_url: str) -> None:
    results = await asyncio.gather(*(migrate(empty_database_url) for _ in range(5)))
    applied = sorted(v for result in results for v in result)
    assert applied == [m.version for m in load_migrations()]
    conn = await asyncpg.connect(empty_database_url)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    assert [r["version"] for r in rows] == applied


async def test_the_schema_is_the_one_the_files_describe(empty_database_url: str) -> None:
    await migrate(empty_database_url)
    columns, _ = await schema_of(empty_database_url)
    tables = {c[0] for c in columns}
    assert {"projects", "api_keys", "project_settings", "outbox", "schema_migrations"} <= tables
    conn = await asyncpg.connect(empty_database_url)
    try:
        keys = {r["table_name"]: r["columns"] for r in await conn.fetch(PRIMARY_KEYS)}
    finally:
        await conn.close()
    assert set(keys) == tables, "every table has a primary key"
    for table, key_columns in keys.items():
        if table not in GLOBAL_TABLES:
            assert key_columns[0] == "project_id", f"{table} key must lead with project_id"


async def test_an_edited_migration_stops_start_up(empty_database_url: str, tmp_path: Path) -> None:
    copy = tmp_path / "migrations"
    copy.mkdir()
    for path in migration_paths():
        shutil.copy(path, copy / path.name)
    await migrate(empty_database_url, copy)
    first = sorted(copy.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationError, match="edited"):
        await migrate(empty_database_url, copy)


def test_migration_files_are_numbered_without_gaps() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))


async def test_a_database_migrated_in_one_folder_upgrades_in_place_from_owners_folders(
    empty_database_url: str, postgres_server_url: str, tmp_path: Path
) -> None:
    """Until 0012 every migration lived in one folder, shared/migrations; moving each to its
    owner's folder must leave a database migrated through 0009 (the last before the move was
    planned) with only the later versions to apply, and the same schema as a fresh one."""
    flat = tmp_path / "migrations"
    flat.mkdir()
    for path in migration_paths():
        if int(path.name[:4]) <= 9:
            shutil.copy(path, flat / path.name)
    assert await migrate(empty_database_url, flat) == list(range(1, 10))
    later = [m.version for m in load_migrations() if m.version > 9]
    assert await migrate(empty_database_url) == later
    name = f"m_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(postgres_server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        fresh = with_database(postgres_server_url, name)
        await migrate(fresh)
        assert await schema_of(empty_database_url) == await schema_of(fresh)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
