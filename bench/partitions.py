"""Removing a month of events: detaching and dropping its partition against a DELETE of the
same rows.

Two months of events (2040-01 and 2040-02, far from any other data) get the same number of
events each, spread over 2,000 profiles, each event with a small JSON payload like a custom
event's; every index and trigger of events is in place, as in production. Then, in the same
run, one month is removed by a DELETE of its rows (what a table without partitions has to do)
and a VACUUM of its dead rows (until then their space is not reusable), and the other the way
global retention removes a month (services/ingest/maintenance_repository.py): DETACH of its
partition (the month leaves the table: from the commit on readers no longer see it, as after a
committed DELETE) and then DROP TABLE of the detached table (its space is freed, as after the
VACUUM), each step its own committed transaction, timed apart.

    python -m bench.partitions            # 1,000,000 events a month (a few minutes)
    python -m bench.partitions --quick    # 100,000
    python -m bench.partitions --smoke    # 2,000: checks that it runs

The last lines are JSON figures: the detach against the DELETE and the detach plus drop against
the DELETE plus VACUUM (each with its speed-up beside the issue's aim, 100x), and, under the
names of earlier runs, the whole removal (detach plus drop) against the DELETE.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from dataclasses import dataclass
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
from services.ingest.maintenance_repository import EXPIRED_SUFFIX, MaintenanceRepository

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


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds of each committed step (each checked to have removed the month's rows)."""

    delete_s: float
    vacuum_s: float
    detach_s: float
    drop_s: float


# What the drop unlinks: the month's heap and each of its indexes, largest first.
MONTH_SIZES = """
    SELECT c.relname, pg_relation_size(c.oid) AS bytes
    FROM pg_class c
    WHERE c.oid = $1::regclass
        OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = $1::regclass)
    ORDER BY bytes DESC"""


async def month_sizes(database_url: str, partition: str) -> list[tuple[str, int]]:
    conn = await asyncpg.connect(database_url)
    try:
        return [(r["relname"], r["bytes"]) for r in await conn.fetch(MONTH_SIZES, partition)]
    finally:
        await conn.close()


async def measure(database_url: str, count: int) -> Timings:
    """Removes one month by DELETE then VACUUM, the other by detach then drop (retention's two
    transactions), timing each step."""
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
        assert await repository.detach_partition("events", "events_2040_01")
        detach_s = time.perf_counter() - started
        assert await pool.fetchval(COUNT_MONTH, *DROPPED_MONTH) == 0
        started = time.perf_counter()
        assert await repository.drop_expired("events_2040_01" + EXPIRED_SUFFIX)
        drop_s = time.perf_counter() - started
        assert await repository.expired_tables("events") == []
        return Timings(delete_s, vacuum_s, detach_s, drop_s)
    finally:
        await pool.close()


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


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
        sizes = asyncio.run(month_sizes(backends.database_url, "events_2040_01"))
        t = asyncio.run(measure(backends.database_url, count))
    total = sum(size for _, size in sizes)
    print(f"the month's files: {total / 2**20:,.1f} MB", flush=True)
    for name, size in sizes:
        print(f"  {name}: {size / 2**20:,.1f} MB ({100 * size / total:.0f}%)")
    removal_s = t.detach_s + t.drop_s
    detach_speedup = _ratio(t.delete_s, t.detach_s)
    removal_speedup = _ratio(t.delete_s + t.vacuum_s, removal_s)
    print(f"DELETE of a month ({count:,} events), committed: {t.delete_s * 1000:,.1f} ms")
    print(f"  then VACUUM of its dead rows:                {t.vacuum_s * 1000:,.1f} ms")
    print(f"DETACH of its partition, committed:           {t.detach_s * 1000:,.1f} ms")
    print(f"  then DROP TABLE of the detached table:      {t.drop_s * 1000:,.1f} ms")
    print(
        f"detach against the DELETE: {detach_speedup:,.1f}x; detach + drop against"
        f" DELETE + VACUUM: {removal_speedup:,.1f}x (aim: at least {AIM_SPEEDUP:.0f}x);"
        f" detach + drop against the DELETE alone: {_ratio(t.delete_s, removal_s):,.1f}x"
    )
    print_figures(
        BENCH,
        [
            # The month leaves what readers see: a committed DETACH against a committed DELETE.
            Figure(
                "detach_month_partition_ms",
                t.detach_s * 1000,
                "ms",
                "delete_month_rows_ms",
                t.delete_s * 1000,
            ),
            Figure("month_detach_speedup", detach_speedup, "x", "aim", AIM_SPEEDUP),
            # The month's space is freed: DETACH + DROP against DELETE + VACUUM.
            Figure(
                "detach_and_drop_month_partition_ms",
                removal_s * 1000,
                "ms",
                "delete_and_vacuum_month_rows_ms",
                (t.delete_s + t.vacuum_s) * 1000,
            ),
            Figure("month_detach_and_drop_speedup", removal_speedup, "x", "aim", AIM_SPEEDUP),
            # Earlier runs' names: the whole removal (now detach + drop) against the DELETE
            # alone, and that speed-up.
            Figure(
                "drop_month_partition_ms",
                removal_s * 1000,
                "ms",
                "delete_month_rows_ms",
                t.delete_s * 1000,
            ),
            Figure("month_removal_speedup", _ratio(t.delete_s, removal_s), "x", "aim", AIM_SPEEDUP),
        ],
        quick=labelled_quick(args),
    )
    return 0


if __name__ == "__main__":
    run_main(main)
