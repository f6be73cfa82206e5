"""0010_attribute_replay backfills the attribute state stored before it (a base and its pending
operations) into operation logs that replay to the same values, which late operations and
merges then build on."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from shared.db import migrate, migration_paths
from tests.conftest import with_database

REPLAY_MIGRATION = "0010_attribute_replay.sql"
T = [datetime(2030, 6, 1, tzinfo=UTC) + timedelta(hours=i) for i in range(5)]
PROJECT = uuid.uuid4()
SOURCE, TARGET = uuid.uuid4(), uuid.uuid4()

# Rows in 0004's shape: value = base with pending replayed; base_time 1800-01-01 = never set.
OLD_ROWS = """
    INSERT INTO profile_attributes (project_id, profile_id, native, name, value, value_type,
                                    base, base_time, set_once, pending, update_time)
    VALUES
    ($1, $2, false, 'plan', '{"type": "string", "value": "pro"}', 'string',
     '{"type": "string", "value": "pro"}', $3, false, '[]', $3),
    ($1, $2, false, 'visits', '{"type": "number", "value": 5}', 'number', NULL,
     '1800-01-01 00:00:00+00', false,
     jsonb_build_array(jsonb_build_object('time', $4::timestamptz, 'kind', 'increment',
                                          'operand', 2),
                       jsonb_build_object('time', $5::timestamptz, 'kind', 'increment',
                                          'operand', 3)), $5),
    ($1, $2, false, 'tags', '{"type": "string_list", "value": ["b"]}', 'string_list',
     '{"type": "string_list", "value": ["a"]}', $3, true,
     jsonb_build_array(jsonb_build_object('time', $4::timestamptz, 'kind', 'append',
                                          'operand', jsonb_build_array('b')),
                       jsonb_build_object('time', $5::timestamptz, 'kind', 'remove',
                                          'operand', jsonb_build_array('a'))), $5),
    ($1, $2, false, 'gone', NULL, NULL, NULL, $4, false, '[]', $4),
    ($1, $6, false, 'plan', '{"type": "string", "value": "team"}', 'string',
     '{"type": "string", "value": "team"}', $4, false, '[]', $4)"""

STATE = """
    SELECT name, value ->> 'value' AS value, update_time FROM profile_attributes
    WHERE project_id = $1 AND profile_id = $2 ORDER BY name"""


@pytest.fixture
async def database_before_replay(
    postgres_server_url: str, tmp_path: Path
) -> AsyncIterator[tuple[str, Path]]:
    """A database migrated up to the migration before 0010, and the directory holding those."""
    name = f"m_{uuid.uuid4().hex}"
    directory = tmp_path / "migrations"
    directory.mkdir()
    for path in migration_paths():
        if path.name < REPLAY_MIGRATION:
            shutil.copy(path, directory / path.name)
    admin = await asyncpg.connect(postgres_server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = with_database(postgres_server_url, name)
        await migrate(url, directory)
        yield url, directory
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_stored_state_replays_to_the_same_values_and_takes_late_operations(
    database_before_replay: tuple[str, Path],
) -> None:
    url, directory = database_before_replay
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(OLD_ROWS, PROJECT, SOURCE, T[1], T[2], T[3], TARGET)
        (replay,) = (path for path in migration_paths() if path.name == REPLAY_MIGRATION)
        shutil.copy(replay, directory / REPLAY_MIGRATION)
        await migrate(url, directory)
        rows = [tuple(r) for r in await conn.fetch(STATE, PROJECT, SOURCE)]
        assert rows == [
            ("gone", None, T[2]),
            ("plan", "pro", T[1]),
            ("tags", '["b"]', T[3]),
            ("visits", "5", T[3]),
        ]
        # A late increment, older than everything backfilled, replays in place.
        await conn.execute(
            """INSERT INTO attribute_operations (project_id, profile_id, native, name,
                   event_time, event_id, origin, position, kind, value)
               VALUES ($1, $2, false, 'visits', $3, 'late', 'i:x', 0, 'increment',
                       '{"type": "number", "value": 10}')""",
            PROJECT,
            SOURCE,
            T[0],
        )
        await conn.execute(
            "SELECT profiles_ingest_fold_attribute($1, $2, false, 'visits', $3, 'late', 'i:x',"
            " 0::smallint)",
            PROJECT,
            SOURCE,
            T[0],
        )
        assert (
            await conn.fetchval(
                "SELECT value ->> 'value' FROM profile_attributes WHERE profile_id = $1"
                " AND name = 'visits'",
                SOURCE,
            )
            == "15"
        )
        # Two backfilled histories merge without colliding: the later set wins.
        await conn.execute(
            "SELECT profiles_merge_attribute_operations($1, $2, $3)", PROJECT, SOURCE, TARGET
        )
        await conn.execute(
            "SELECT profiles_merge_profile_attributes($1, $2, $3)", PROJECT, SOURCE, TARGET
        )
        merged = {
            r["name"]: (r["value"], r["update_time"])
            for r in await conn.fetch(STATE, PROJECT, TARGET)
        }
        assert merged["plan"] == ("team", T[2])
        assert merged["visits"] == ("15", T[3])
        assert await conn.fetch(STATE, PROJECT, SOURCE) == []
    finally:
        await conn.close()
