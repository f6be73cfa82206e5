"""events and rejected_events partitioned by month (0024): partitions made ahead, the DEFAULT
partition emptied into the months created over it, replicas maintaining at once, and retention
(global by partition, per project by a bounded sweep) leaving the profile's totals exact."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from services.identity.hooks import load_profile_hooks, run_merge_hooks
from services.ingest.maintenance_repository import MaintenanceRepository
from services.ingest.retention import StorageMaintenance
from shared.clock import FrozenClock

# Far from the tests' other dates, so only this module's maintenance creates these months.
NOW = datetime(2031, 3, 20, 12, 0, tzinfo=UTC)

INSERT_EVENTS = """
    INSERT INTO events (project_id, installation_id, event_id, profile_id, kind, name,
                        event_time, receive_time, platform, payload)
    SELECT $1, 'inst', 'e' || n, $2, CASE WHEN n % 5 = 0 THEN 8 ELSE 1 END, 'view',
           $3::timestamptz + n * $4::interval, $3::timestamptz + n * $4::interval, 1,
           '{"name": "view"}'::jsonb
    FROM generate_series(1, $5) AS n"""

INSERT_REJECTED = """
    INSERT INTO rejected_events (project_id, receive_time, reason, field_path, message, event_id)
    VALUES ($1, $2, 'EVENT_TIME_TOO_OLD', 'event_time', 'too old', 'r1')"""

PARTITIONS = """
    SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = $1::regclass ORDER BY c.relname"""

WHERE_ROWS_ARE = """
    SELECT tableoid::regclass::text AS part, count(*) AS n FROM events
    WHERE project_id = $1 GROUP BY 1 ORDER BY 1"""

TOTALS = """
    SELECT event_count, crash_count FROM profile_event_counts
    WHERE project_id = $1 AND profile_id = $2"""

# Totals with first and last event times (0025): what the profile view shows.
STORED = """
    SELECT event_count, crash_count, first_event_time, last_event_time FROM profile_event_counts
    WHERE project_id = $1 AND profile_id = $2"""


def maintenance(pool: asyncpg.Pool, now: datetime, **kwargs: object) -> StorageMaintenance:
    return StorageMaintenance(MaintenanceRepository(pool), FrozenClock(now), **kwargs)  # type: ignore[arg-type]


async def partitions_of(db: asyncpg.Pool, parent: str) -> list[str]:
    return [r["relname"] for r in await db.fetch(PARTITIONS, parent)]


async def test_maintenance_creates_this_month_and_two_ahead_for_both_tables_once(
    db: asyncpg.Pool,
) -> None:
    first = await maintenance(db, NOW).ensure_partitions()
    again = await maintenance(db, NOW).ensure_partitions()

    due = ["2031_03", "2031_04", "2031_05"]
    assert sorted(first.created) == sorted(
        [f"events_{m}" for m in due] + [f"rejected_events_{m}" for m in due]
    )
    assert again.created == []
    for parent in ("events", "rejected_events"):
        names = await partitions_of(db, parent)
        assert {f"{parent}_{m}" for m in due} | {f"{parent}_default"} <= set(names)
        assert f"{parent}_2031_06" not in names


async def test_a_month_created_over_default_rows_takes_them_and_totals_stay(
    db: asyncpg.Pool,
) -> None:
    project_id, profile_id = uuid.uuid4(), uuid.uuid4()
    # Events of April 2031 and rejected events received then, before any partition covers it.
    await db.execute(
        INSERT_EVENTS, project_id, profile_id, NOW + timedelta(days=15), timedelta(minutes=1), 50
    )
    await db.execute(INSERT_REJECTED, project_id, NOW + timedelta(days=15))
    assert await db.fetch(WHERE_ROWS_ARE, project_id) == [("events_default", 50)]
    totals = await db.fetchrow(TOTALS, project_id, profile_id)
    assert tuple(totals) == (50, 10)

    report = await maintenance(db, NOW).ensure_partitions()

    assert report.moved_from_default >= 51
    assert [tuple(r) for r in await db.fetch(WHERE_ROWS_ARE, project_id)] == [
        ("events_2031_04", 50)
    ]
    rejected_in = await db.fetchval(
        "SELECT tableoid::regclass::text FROM rejected_events WHERE project_id = $1", project_id
    )
    assert rejected_in == "rejected_events_2031_04"
    assert tuple(await db.fetchrow(TOTALS, project_id, profile_id)) == (50, 10)
    # The moved rows read as before through every index the readers use.
    newest = await db.fetchval(
        "SELECT max(event_time) FROM events WHERE project_id = $1 AND profile_id = $2",
        project_id,
        profile_id,
    )
    assert newest == NOW + timedelta(days=15, minutes=50)


async def test_replicas_maintaining_at_once_create_every_partition_once(
    db: asyncpg.Pool, database_url: str
) -> None:
    later = NOW + timedelta(days=120)  # July 2031: three months nobody created yet
    pools = [await asyncpg.create_pool(database_url, min_size=1, max_size=2) for _ in range(3)]
    try:
        reports = await asyncio.gather(*(maintenance(p, later).ensure_partitions() for p in pools))
    finally:
        for pool in pools:
            await pool.close()
    created = [name for report in reports for name in report.created]
    assert sorted(created) == sorted(
        f"{parent}_{m}"
        for parent in ("events", "rejected_events")
        for m in ("2031_07", "2031_08", "2031_09")
    )


async def test_global_retention_drops_whole_months_and_old_default_rows_keeping_totals(
    db: asyncpg.Pool,
) -> None:
    project_id, profile_id = uuid.uuid4(), uuid.uuid4()
    await maintenance(db, NOW).ensure_partitions()
    # Twenty events a day from 2031-03-05 on: March and April 2031, plus far-back imports
    # (the DEFAULT partition).
    await db.execute(
        INSERT_EVENTS,
        project_id,
        profile_id,
        datetime(2031, 3, 5, tzinfo=UTC),
        timedelta(hours=1.2),
        1000,
    )
    await db.execute(
        INSERT_EVENTS.replace("'e' || n", "'old' || n"),
        project_id,
        profile_id,
        datetime(2001, 1, 1, tzinfo=UTC),
        timedelta(days=1),
        10,
    )
    before = tuple(await db.fetchrow(STORED, project_id, profile_id))
    assert before[:3] == (1010, 202, datetime(2001, 1, 2, tzinfo=UTC))

    # Sixty days later with 45 days of retention: March is wholly past it, April is not.
    later = NOW + timedelta(days=60)
    report = await maintenance(db, later, retention_days=45).run_once()

    assert "events_2031_03" in (report.dropped or [])
    assert "events_2031_04" in await partitions_of(db, "events")
    left = await db.fetch(
        "SELECT min(event_time) AS first, count(*) AS n FROM events WHERE project_id = $1",
        project_id,
    )
    assert left[0]["first"] >= datetime(2031, 4, 1, tzinfo=UTC)
    assert (
        await db.fetchval("SELECT count(*) FROM events_default WHERE project_id = $1", project_id)
        == 0
    )
    assert tuple(await db.fetchrow(STORED, project_id, profile_id)) == before


async def test_project_retention_sweeps_only_that_projects_older_events_in_bounded_batches(
    db: asyncpg.Pool,
) -> None:
    await maintenance(db, NOW).ensure_partitions()
    kept_project, swept_project = uuid.uuid4(), uuid.uuid4()
    profile_id = uuid.uuid4()
    for project_id in (kept_project, swept_project):
        await db.execute(
            "INSERT INTO projects (project_id, name) VALUES ($1, $2)", project_id, str(project_id)
        )
        # 400 events, one every 12 hours back from NOW: 200 days.
        await db.execute(
            INSERT_EVENTS,
            project_id,
            profile_id,
            NOW - timedelta(days=200),
            timedelta(hours=12),
            400,
        )
    await db.execute(
        "INSERT INTO project_settings (project_id, name, value) VALUES ($1, $2, $3)",
        swept_project,
        "events.retention_days",
        json.dumps(90),
    )
    totals = tuple(await db.fetchrow(STORED, swept_project, profile_id))

    # 30 rows a batch and 3 batches a round: a round removes at most 90 events.
    sweep = maintenance(db, NOW, batch_rows=30, sweep_batches=3)
    first = await sweep.run_once()
    assert first.events_deleted == 90
    while (await sweep.run_once()).events_deleted:
        pass

    cutoff = NOW - timedelta(days=90)
    oldest = await db.fetchval(
        "SELECT min(event_time) FROM events WHERE project_id = $1", swept_project
    )
    assert oldest >= cutoff
    assert (
        await db.fetchval("SELECT count(*) FROM events WHERE project_id = $1", swept_project) == 181
    )  # n = 220..400: at or after the cutoff
    assert (
        await db.fetchval("SELECT count(*) FROM events WHERE project_id = $1", kept_project) == 400
    )
    assert tuple(await db.fetchrow(STORED, swept_project, profile_id)) == totals


async def test_a_merge_after_retention_gives_the_survivor_every_total_and_time(
    db: asyncpg.Pool,
) -> None:
    """Identity's merge moves events with an UPDATE, then calls profiles_merge_ functions in
    table-name order (events before profile_event_counts): the source's totals of events that
    retention removed go to the survivor as well."""
    await maintenance(db, NOW).ensure_partitions()
    project_id, source, target = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await db.execute(
        "INSERT INTO projects (project_id, name) VALUES ($1, $2)", project_id, str(project_id)
    )
    await db.execute(
        "INSERT INTO project_settings (project_id, name, value) VALUES ($1, $2, $3)",
        project_id,
        "events.retention_days",
        json.dumps(90),
    )
    await db.execute(
        INSERT_EVENTS, project_id, source, NOW - timedelta(days=200), timedelta(days=1), 150
    )
    await db.execute(
        INSERT_EVENTS.replace("'e' || n", "'t' || n"),
        project_id,
        target,
        NOW - timedelta(days=30),
        timedelta(days=1),
        20,
    )
    while (await maintenance(db, NOW).run_once()).events_deleted:
        pass
    assert (
        await db.fetchval(
            "SELECT count(*) FROM events WHERE project_id = $1 AND profile_id = $2",
            project_id,
            source,
        )
        == 41  # n = 110..150: at or after the cutoff
    )

    # As identity's merge does: every declared merge hook, in run order (ingest_merge_events
    # moves the events, then ingest_merge_profile_event_counts what retention removed).
    async with db.acquire() as conn, conn.transaction():
        await run_merge_hooks(conn, await load_profile_hooks(conn), project_id, source, target)

    assert await db.fetchrow(STORED, project_id, source) is None
    merged = tuple(await db.fetchrow(STORED, project_id, target))
    assert merged == (170, 34, NOW - timedelta(days=199), NOW - timedelta(days=10))


async def test_a_month_is_detached_then_dropped_and_a_detached_leftover_goes_next_round(
    db: asyncpg.Pool,
) -> None:
    """Global retention's two steps: DETACH (the month leaves the table) and DROP of the
    detached table, each its own transaction. A round that stopped between the two leaves the
    `_expired` table; the next round drops it, even with retention turned off since."""
    project_id, profile_id = uuid.uuid4(), uuid.uuid4()
    await maintenance(db, NOW).ensure_partitions()
    await db.execute(
        INSERT_EVENTS,
        project_id,
        profile_id,
        datetime(2031, 3, 1, tzinfo=UTC),
        timedelta(hours=1),
        100,
    )
    before = tuple(await db.fetchrow(STORED, project_id, profile_id))
    repository = MaintenanceRepository(db)

    # Step 1 alone, as a round that failed right after it.
    assert await repository.detach_partition("events", "events_2031_03")
    assert not await repository.detach_partition("events", "events_2031_03")  # done already
    assert "events_2031_03" not in await partitions_of(db, "events")
    assert await db.fetchval("SELECT count(*) FROM events WHERE project_id = $1", project_id) == 0
    assert await repository.expired_tables("events") == ["events_2031_03_expired"]
    assert await db.fetchval("SELECT count(*) FROM events_2031_03_expired") == 100

    report = await maintenance(db, NOW).run_once()  # retention off: only the leftover goes

    assert report.detached == []
    assert report.dropped == ["events_2031_03"]
    assert await db.fetchval("SELECT to_regclass('events_2031_03_expired')") is None
    assert await repository.expired_tables("events") == []
    assert tuple(await db.fetchrow(STORED, project_id, profile_id)) == before
    # Only retention's detached tables are ever dropped: never an attached partition.
    with pytest.raises(ValueError, match="not a detached partition"):
        await repository.drop_expired("events_2031_04")
    assert not await repository.drop_expired("events_2031_04_expired")
    assert "events_2031_04" in await partitions_of(db, "events")


async def test_replicas_applying_retention_at_once_detach_and_drop_each_month_once(
    db: asyncpg.Pool, database_url: str
) -> None:
    """Replicas' rounds at once, a month later than the partitions made so far: the new months
    are created (DEFAULT rows moved) and the expired ones detached and dropped, each by one
    replica, under the one advisory lock, without an error."""
    project_id, profile_id = uuid.uuid4(), uuid.uuid4()
    await maintenance(db, NOW).ensure_partitions()
    # Four a day from March 1st 2031: March to May in their months, June (no partition yet)
    # in DEFAULT.
    await db.execute(
        INSERT_EVENTS,
        project_id,
        profile_id,
        datetime(2031, 3, 1, tzinfo=UTC),
        timedelta(hours=6),
        480,
    )
    before = tuple(await db.fetchrow(STORED, project_id, profile_id))
    later = datetime(2031, 6, 20, tzinfo=UTC)  # 45 days: March and April are wholly past it
    pools = [await asyncpg.create_pool(database_url, min_size=1, max_size=2) for _ in range(3)]
    try:
        reports = await asyncio.gather(
            *(maintenance(p, later, retention_days=45).run_once() for p in pools)
        )
    finally:
        for pool in pools:
            await pool.close()

    expired = [
        "events_2031_03",
        "events_2031_04",
        "rejected_events_2031_03",
        "rejected_events_2031_04",
    ]
    # (The months the migration made around today's date are past the cutoff too.)
    assert sorted(n for r in reports for n in r.detached if "_2031_" in n) == expired
    assert sorted(n for r in reports for n in r.dropped or [] if "_2031_" in n) == expired
    detached = [n for r in reports for n in r.detached]
    assert sorted(detached) == sorted(set(detached))
    assert sorted(n for r in reports for n in r.dropped or []) == sorted(detached)
    assert sorted(n for r in reports for n in r.created) == sorted(
        f"{parent}_{m}"
        for parent in ("events", "rejected_events")
        for m in ("2031_06", "2031_07", "2031_08")
    )
    assert await MaintenanceRepository(db).expired_tables("events") == []
    left = await db.fetchrow(
        "SELECT min(event_time) AS first, count(*) AS n FROM events WHERE project_id = $1",
        project_id,
    )
    assert left["first"] >= datetime(2031, 5, 1, tzinfo=UTC)
    assert [tuple(r) for r in await db.fetch(WHERE_ROWS_ARE, project_id)] == [
        ("events_2031_05", 124),
        ("events_2031_06", 113),
    ]
    assert tuple(await db.fetchrow(STORED, project_id, profile_id)) == before
