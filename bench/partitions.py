"""Removing a month of events: dropping its partition against a DELETE of the same rows.

Two months of events (2040-01 and 2040-02, far from any other data) get the same number of
events each, spread over 2,000 profiles, each event with a small JSON payload like a custom
event's; every index and trigger of events is in place, as in production. Then, in the same
run, one month is removed by a DELETE of its rows (what a table without partitions has to do;
the DELETE still leaves dead rows for VACUUM, not counted here), and the other by dropping its
partition, the way global retention does (services/ingest/maintenance_repository.py).

    python -m bench.partitions            # 1,000,000 events a month (a few minutes)
    python -m bench.partitions --quick    # 100,000
    python -m bench.partitions --smoke    # 2,000: checks that it runs

The last lines are JSON figures: the drop's time against the DELETE's, and the speed-up with
the issue's aim (100x) as its baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from datetime import UTC, datetime

import asyncpg

from bench.common import (
    Figure,
    add_backend_arguments,
    create_project,
    labelled_quick,
    make_work_dir,
    print_figures,
    run_main,
    size_choice,
    start_backends,
)
from services.ingest.maintenance_repository import MaintenanceRepository

BENCH = "partitions"
AIM_SPEEDUP = 100.0
PROFILES = 2_000
DELETED_MONTH = (datetime(2040, 2, 1, tzinfo=UTC), datetime(2040, 3, 1, tzinfo=UTC))
DROPPED_MONTH = (datetime(2040, 1, 1, tzinfo=UTC), datetime(2040, 2, 1, tzinfo=UTC))

# One month of events: event n at start + n * (month / count), on profile n % PROFILES.
LOAD_MONTH = """
    INSERT INTO events (project_id, installation_id, event_id, profile_id, kind, name,
                        event_time, receive_time, session_id, platform, payload)
    SELECT $1::uuid, 'inst-' || (n % $5), 'ev-' || $6 || '-' || n,
           md5($1::uuid::text || (n % $5))::uuid, 1, 'view',
           $2::timestamptz + (n * ($3::timestamptz - $2::timestamptz) / $4),
           $2::timestamptz + (n * ($3::timestamptz - $2::timestamptz) / $4), 's-' || (n / 50), 1,
           jsonb_build_object('name', 'view', 'attributes',
                              jsonb_build_object('screen', 'home', 'n', n))
    FROM generate_series(0, $4 - 1) AS n"""

# The DELETE a table without partitions needs (marked as retention's, as the sweep does, so
# the triggers skip their work on profile totals: the cheapest DELETE there is).
DELETE_MONTH = """
    DELETE FROM events WHERE event_time >= $1 AND event_time < $2"""
MARK_RETENTION = "SELECT set_config('profiles.retention', 'on', true)"
COUNT_MONTH = "SELECT count(*) FROM events WHERE event_time >= $1 AND event_time < $2"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.partitions", description=__doc__.split("\n\n")[0]
    )
    add_backend_arguments(parser)
    return parser.parse_args(argv)


async def load(database_url: str, project_id: object, count: int) -> None:
    repository_pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        repository = MaintenanceRepository(repository_pool)
        for start, end in (DROPPED_MONTH, DELETED_MONTH):
            await repository.ensure_partition("events", "event_time", start, end)
        async with repository_pool.acquire() as conn:
            for tag, (start, end) in (("a", DROPPED_MONTH), ("b", DELETED_MONTH)):
                await conn.execute(LOAD_MONTH, project_id, start, end, count, PROFILES, tag)
            await conn.execute("VACUUM ANALYZE events")
    finally:
        await repository_pool.close()


async def measure(database_url: str, count: int) -> tuple[float, float, float]:
    """(DELETE seconds, VACUUM seconds after it, drop seconds), each checked to have removed
    `count` rows. The VACUUM is what makes the DELETE's space reusable, which the drop does at
    once."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            started = time.perf_counter()
            async with conn.transaction():
                await conn.execute(MARK_RETENTION)
                status = await conn.execute(DELETE_MONTH, *DELETED_MONTH)
            delete_s = time.perf_counter() - started
            started = time.perf_counter()
            await conn.execute("VACUUM events_2040_02")
            vacuum_s = time.perf_counter() - started
        assert int(status.split()[-1]) == count, status
        assert await pool.fetchval(COUNT_MONTH, *DROPPED_MONTH) == count
        repository = MaintenanceRepository(pool)
        started = time.perf_counter()
        assert await repository.drop_partition("events_2040_01")
        drop_s = time.perf_counter() - started
        assert await pool.fetchval(COUNT_MONTH, *DROPPED_MONTH) == 0
        return delete_s, vacuum_s, drop_s
    finally:
        await pool.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    count = size_choice(args, 2_000, 100_000, 1_000_000)
    with contextlib.ExitStack() as stack:
        work_dir = make_work_dir(stack)
        backends = start_backends(stack, work_dir, args.database_url, args.redis_url)
        project = asyncio.run(create_project(backends.database_url, roles=("admin",)))
        print(f"loading 2 months of {count:,} events each ...", flush=True)
        started = time.perf_counter()
        asyncio.run(load(backends.database_url, project.project_id, count))
        print(f"  loaded in {time.perf_counter() - started:.1f} s", flush=True)
        delete_s, vacuum_s, drop_s = asyncio.run(measure(backends.database_url, count))
    speedup = delete_s / drop_s if drop_s else float("nan")
    print(f"DELETE of a month ({count:,} events): {delete_s * 1000:,.1f} ms")
    print(f"  then VACUUM of its dead rows:     {vacuum_s * 1000:,.1f} ms")
    print(f"DROP of its partition (committed):  {drop_s * 1000:,.1f} ms")
    print(f"speed-up against the DELETE alone: {speedup:,.1f}x (aim: at least {AIM_SPEEDUP:.0f}x)")
    print(f"speed-up against DELETE + VACUUM:  {(delete_s + vacuum_s) / drop_s:,.1f}x")
    print_figures(
        BENCH,
        [
            Figure(
                "drop_month_partition_ms",
                drop_s * 1000,
                "ms",
                "delete_month_rows_ms",
                delete_s * 1000,
            ),
            Figure(
                "drop_month_partition_ms",
                drop_s * 1000,
                "ms",
                "delete_and_vacuum_month_rows_ms",
                (delete_s + vacuum_s) * 1000,
            ),
            Figure("month_removal_speedup", speedup, "x", "aim", AIM_SPEEDUP),
        ],
        quick=labelled_quick(args),
    )
    return 0


if __name__ == "__main__":
    run_main(main)
