"""A database migrated through 0023, holding events of every kind and merged profiles, upgrades in
place to partitioned events (0024): GetProfile, ListEvents, funnel progress and the overview
answer the same before and after, read through the real services."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from google.protobuf.duration_pb2 import Duration

from profiles.query.v1 import query_service_pb2 as pb
from profiles.segments.v1 import funnels_pb2
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from shared.db import migrate, migration_paths
from tests.api.test_query_overview import workload
from tests.conftest import create_test_project, with_database
from tests.support.query import (
    NOW,
    Suite,
    crash,
    custom_event,
    session_end,
    start_suite,
)

# What the current services need of 0024 to 0028 to write and read a 0023 database (the dedupe
# keys; first and last event times and the last crash, filled from the events just before the
# first reading, and the read contracts showing them), created for the workload and dropped
# before the upgrade: the rows are then exactly what a 0023 database holds.
WRITE_PATH_OF_0024 = """
    CREATE FUNCTION profiles_ingest_event_key(installation_id text, custom_id text, event_id text)
    RETURNS uuid LANGUAGE sql IMMUTABLE AS $$
        SELECT md5(CASE WHEN installation_id IS NOT NULL
                        THEN 'i' || length(installation_id) || ':' || installation_id
                        ELSE 'c' || length(custom_id) || ':' || custom_id END
                   || event_id)::uuid
    $$;
    CREATE TABLE event_keys (project_id uuid NOT NULL, event_key uuid NOT NULL,
                             receive_time timestamptz NOT NULL,
                             PRIMARY KEY (project_id, event_key));
    ALTER TABLE profile_event_counts ADD COLUMN first_event_time timestamptz,
                                     ADD COLUMN last_event_time timestamptz;
    DROP FUNCTION ingest_read_profile_event_counts();
    CREATE FUNCTION ingest_read_profile_event_counts()
    RETURNS TABLE (project_id uuid, profile_id uuid, event_count bigint, crash_count bigint,
                   first_event_time timestamptz, last_event_time timestamptz)
    LANGUAGE sql STABLE AS $$
        SELECT project_id, profile_id, event_count, crash_count, first_event_time,
               last_event_time
        FROM profile_event_counts
    $$;
    CREATE TABLE profile_last_crashes (project_id uuid, profile_id uuid, event_id text,
                                       installation_id text, event_time timestamptz, name text,
                                       reason text, fatal boolean);
    CREATE FUNCTION ingest_read_profile_last_crashes()
    RETURNS TABLE (project_id uuid, profile_id uuid, event_id text, installation_id text,
                   crash_time timestamptz, name text, reason text, fatal boolean)
    LANGUAGE sql STABLE AS $$
        SELECT project_id, profile_id, event_id, installation_id, event_time, name, reason, fatal
        FROM profile_last_crashes
    $$;"""
FILL_LAST_CRASHES = """
    INSERT INTO profile_last_crashes
    SELECT DISTINCT ON (project_id, profile_id) project_id, profile_id, event_id,
           installation_id, event_time, coalesce(payload ->> 'name', ''),
           coalesce(payload ->> 'reason', ''), coalesce((payload ->> 'fatal')::boolean, false)
    FROM events WHERE kind = 8 AND profile_id IS NOT NULL
    ORDER BY project_id, profile_id, event_time DESC, event_seq DESC"""
FILL_EVENT_TIMES = """
    UPDATE profile_event_counts c SET first_event_time = t.a, last_event_time = t.b
    FROM (SELECT project_id, profile_id, min(event_time) AS a, max(event_time) AS b
          FROM events GROUP BY 1, 2) t
    WHERE c.project_id = t.project_id AND c.profile_id = t.profile_id"""
# And what they need of 0027: ingest's locked part of a batch (its functions) and the insert
# trigger that leaves ingest's own totals to it (without it they would be counted twice),
# installed from the migration itself; the undo restores 0020's trigger function, the one a
# 0023 database runs.
# Of 0029 and then 0038, the locked part's versions that keep the last crash, with that rule a
# no-op: a 0023 database keeps no last crash (FILL_LAST_CRASHES writes them before the first
# reading).
MIGRATIONS = {int(p.name[:4]): p for p in migration_paths()}
_LOCKED_PART_OF_0029 = MIGRATIONS[29].read_text()
_LOCKED_PART_OF_0038 = MIGRATIONS[38].read_text()
WRITE_PATH_OF_0027 = (
    MIGRATIONS[27].read_text()
    + """
    CREATE FUNCTION profiles_ingest_keep_last_crashes(uuid[], uuid[], bigint[], text[], text[],
                                                      timestamptz[], text[], text[], boolean[])
    RETURNS void LANGUAGE sql AS $$ SELECT $$;
    """
    + _LOCKED_PART_OF_0029[
        _LOCKED_PART_OF_0029.index("DROP FUNCTION profiles_ingest_lock_batch_profiles") :
    ]
    + _LOCKED_PART_OF_0038[
        _LOCKED_PART_OF_0038.index(
            "DROP FUNCTION profiles_ingest_lock_batch_profiles"
        ) : _LOCKED_PART_OF_0038.index("CREATE FUNCTION profiles_ingest_keep_last_crashes")
    ]
    + """
    CREATE FUNCTION profiles_ingest_keep_last_crashes(uuid[], uuid[], bigint[], text[], text[],
                                                      timestamptz[], jsonb[])
    RETURNS void LANGUAGE sql AS $$ SELECT $$;
    """
    + _LOCKED_PART_OF_0038[
        _LOCKED_PART_OF_0038.index("CREATE FUNCTION profiles_ingest_lock_batch_profiles") :
    ]
    # 0049's version of it, which also answers the attributes' latest changes.
    + MIGRATIONS[49].read_text()
    # 0047's column of the rejected events, which ingest's insert names.
    + "ALTER TABLE rejected_events ADD COLUMN profile_id uuid;"
)
# Of 0034, identity's read of installations for a batch it resolves (its repository calls it).
_CONTRACTS_OF_0034 = MIGRATIONS[34].read_text()
_RESOLUTIONS_START = _CONTRACTS_OF_0034.index(
    "CREATE FUNCTION identity_read_installation_resolutions"
)
READ_PATH_OF_0034 = _CONTRACTS_OF_0034[
    _RESOLUTIONS_START : _CONTRACTS_OF_0034.index("$$;", _RESOLUTIONS_START) + len("$$;")
]
# Of 0039, the timeline's bound (query's first page reads it), on the 0023 table's sequence.
READ_PATH_OF_0039 = MIGRATIONS[39].read_text()
# Of 0042, the custom segments' sizes (the overview reads them).
READ_PATH_OF_0042 = MIGRATIONS[42].read_text()
# Of 0045, a profile's time zone (the profile view and segments read it).
READ_PATH_OF_0045 = MIGRATIONS[45].read_text()
# Of 0052, the users table's email column (query's rows and recounts name it).
READ_PATH_OF_0052 = MIGRATIONS[52].read_text()
# Of 0066, the overview's daily counters and the facts they move by (query's recounts name them).
READ_PATH_OF_0066 = MIGRATIONS[66].read_text()
# Of 0067, ListEventNames' counts (query's recounts fold into them and take erasures out), and
# of 0061 identity's record of erasures, by which the folds leave erased profiles out.
READ_PATH_OF_0067 = MIGRATIONS[67].read_text()
READ_PATH_OF_0061 = MIGRATIONS[61].read_text()
# Of 0057, the installations a profile left (identity's Logout keeps one, the profile view and
# the recounts read the language and time zone rules over them); on 0045's time zone rule.
READ_PATH_OF_0057 = MIGRATIONS[57].read_text()
# Of 0050, segments' case folding (the display name check of a new funnel or segment calls it).
_FOLDING_OF_0050 = MIGRATIONS[50].read_text()
READ_PATH_OF_0050 = _FOLDING_OF_0050[: _FOLDING_OF_0050.index("$migration$;") + len("$migration$;")]
_TRIGGER_OF_0020 = MIGRATIONS[20].read_text()
_TRIGGER_START = _TRIGGER_OF_0020.index("CREATE OR REPLACE FUNCTION profile_event_counts_apply()")
UNDO_WRITE_PATH_OF_0027 = """
    DROP FUNCTION profiles_ingest_apply_batch_state;
    DROP FUNCTION profiles_ingest_lock_batch_profiles;
    DROP FUNCTION profiles_ingest_add_event_counts;
    DROP FUNCTION profiles_ingest_keep_last_crashes;
    """ + _TRIGGER_OF_0020[
    _TRIGGER_START : _TRIGGER_OF_0020.index("END $$;", _TRIGGER_START) + len("END $$;")
]
UNDO_WRITE_PATH = """
    DROP FUNCTION ingest_read_profile_language(uuid, uuid);
    DROP FUNCTION ingest_read_profile_former_installations();
    DELETE FROM profile_hooks
    WHERE function_name IN ('ingest_merge_former_installations',
                            'ingest_erase_former_installations');
    DROP FUNCTION ingest_erase_former_installations(uuid, uuid[], text[], text[]);
    DROP FUNCTION ingest_merge_former_installations(uuid, uuid, uuid);
    DROP FUNCTION ingest_apply_installation_left(uuid, uuid, text, timestamptz);
    DROP FUNCTION segments_fold_case(text);
    ALTER TABLE query_profiles DROP COLUMN email;
    DROP TABLE query_event_names, query_profile_event_names, query_event_name_batches,
               query_event_names_backfilled;
    DROP TRIGGER profiles_erased ON profiles;
    DROP FUNCTION identity_record_erased_profiles();
    DROP FUNCTION identity_read_erased_profiles();
    DROP TABLE erased_profiles;
    DROP TABLE query_day_counts;
    ALTER TABLE query_profiles DROP COLUMN first_seen, DROP COLUMN session_days;
    ALTER TABLE rejected_events DROP COLUMN profile_id;
    DROP FUNCTION ingest_read_profile_time_zone(uuid, uuid);
    DROP TABLE profile_former_installations;
    DROP FUNCTION segments_read_custom_segment_sizes(uuid);
    DROP FUNCTION ingest_read_last_event_seq();
    ALTER SEQUENCE events_event_seq RENAME TO events_event_seq_seq;
    DROP FUNCTION identity_read_installation_resolutions(uuid, text[]);
    DROP FUNCTION ingest_read_profile_last_crashes();
    DROP TABLE profile_last_crashes;
    DROP FUNCTION ingest_read_profile_event_counts();
    CREATE FUNCTION ingest_read_profile_event_counts()
    RETURNS TABLE (project_id uuid, profile_id uuid, event_count bigint, crash_count bigint)
    LANGUAGE sql STABLE PARALLEL SAFE AS $$
        SELECT project_id, profile_id, event_count, crash_count FROM profile_event_counts
    $$;
    DROP TABLE event_keys;
    DROP FUNCTION profiles_ingest_event_key(text, text, text);
    ALTER TABLE profile_event_counts DROP COLUMN first_event_time, DROP COLUMN last_event_time;"""


@pytest.fixture
async def database_0023(
    postgres_server_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    """A database migrated through 0023; services started on it until monkeypatch.undo() stop
    there too (a service migrates on start), like the services of that version."""
    folder = tmp_path / "through_0023"
    folder.mkdir()
    for path in migration_paths():
        if int(path.name[:4]) <= 23:
            shutil.copy(path, folder / path.name)
    name = f"u_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(postgres_server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = with_database(postgres_server_url, name)
        assert await migrate(url, folder) == list(range(1, 24))
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(WRITE_PATH_OF_0024)
            await conn.execute(WRITE_PATH_OF_0027)
            await conn.execute(READ_PATH_OF_0034)
            await conn.execute(READ_PATH_OF_0039)
            await conn.execute(READ_PATH_OF_0042)
            await conn.execute(READ_PATH_OF_0045)
            await conn.execute(READ_PATH_OF_0052)
            await conn.execute(READ_PATH_OF_0066)
            await conn.execute(READ_PATH_OF_0061)
            await conn.execute(READ_PATH_OF_0067)
            await conn.execute(READ_PATH_OF_0057)
            await conn.execute(READ_PATH_OF_0050)
        finally:
            await conn.close()
        monkeypatch.setattr("shared.server.migrate", partial(migrate, directories=folder))
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def window(hours: float) -> Duration:
    duration = Duration()
    duration.FromTimedelta(timedelta(hours=hours))
    return duration


async def readings(suite: Suite, profile_ids: list[str]) -> dict[str, Any]:
    """Every read the upgrade must not change, as comparable messages."""
    seen: dict[str, Any] = {}
    for profile_id in profile_ids:
        seen[f"profile {profile_id}"] = (await suite.get(profile_id=profile_id)).profile
        pages = []
        token = ""
        while True:
            reply = await suite.call(
                "ListEvents",
                pb.ListEventsRequest(profile_id=profile_id, page_size=3, page_token=token),
            )
            pages.append([e for e in reply.events])
            token = reply.next_page_token
            if not token:
                break
        seen[f"events {profile_id}"] = pages
    seen["overview"] = (await suite.call("GetOverview", pb.GetOverviewRequest())).overview
    return seen


async def test_a_0023_database_with_events_upgrades_in_place_and_reads_the_same(
    database_0023: str,
    start_services: Any,
    settings_for_test: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_for_test.with_changes(database_url=database_0023)
    project = await create_test_project(database_0023)
    suite = await start_suite(start_services, settings, project, database_0023)
    segments = segments_grpc.SegmentsServiceStub(
        (await start_services("segments", settings=settings, clock=suite.clock))["segments"].channel
    )
    await segments.CreateFunnel(
        segments_pb.CreateFunnelRequest(
            display_name="Checkout",
            steps=[
                funnels_pb2.FunnelStep(event_name="view"),
                funnels_pb2.FunnelStep(event_name="pay"),
            ],
            conversion_window=window(24),
        ),
        metadata=project.metadata("admin"),
    )
    # Every kind: installation updates, sessions, attributes, consent (the overview's workload,
    # with merges and a logout), custom events for the funnel, session ends, crashes, and
    # server-side events by custom ID.
    installations = await workload(suite)
    ios = installations["ios"]
    await suite.track(
        custom_event(ios, time=NOW - timedelta(hours=2), name="view"),
        custom_event(ios, time=NOW - timedelta(hours=1), name="pay"),
        session_end(ios, "s1", NOW - timedelta(minutes=30), 600),
        crash(ios, NOW - timedelta(minutes=20)),
        custom_event(None, custom_id="u1", time=NOW - timedelta(minutes=10), name="invoice"),
    )
    await suite.settle()
    profile_ids = sorted(
        {
            str(r["profile_id"])
            for r in await suite.fetch(
                "SELECT DISTINCT profile_id FROM events WHERE project_id = $1",
                project.project_id,
            )
        }
    )
    assert len(profile_ids) >= 4
    kinds = await suite.fetch("SELECT DISTINCT kind FROM events ORDER BY kind")
    assert len(kinds) >= 6
    await suite.fetch(FILL_EVENT_TIMES)
    await suite.fetch(FILL_LAST_CRASHES)
    before = await readings(suite, profile_ids)
    funnel = before[f"profile {await suite.identity.profile_of(ios)}"].funnels
    assert funnel
    assert funnel[0].converted

    conn = await asyncpg.connect(database_0023)
    try:
        await conn.execute(UNDO_WRITE_PATH_OF_0027)
        await conn.execute(UNDO_WRITE_PATH)
    finally:
        await conn.close()
    monkeypatch.undo()
    assert await migrate(database_0023) == [
        int(p.name[:4]) for p in migration_paths() if int(p.name[:4]) > 23
    ]
    # Fresh services, so no connection keeps a plan of the table that was swapped.
    after_suite = await start_suite(start_services, settings, project, database_0023)
    assert (
        await after_suite.fetchval("SELECT relkind FROM pg_class WHERE relname = 'events'") == b"p"
    )
    after = await readings(after_suite, profile_ids)

    assert after == before
