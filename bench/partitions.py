"""Removing a month of events: detaching and dropping its partition against a DELETE of the
same rows.

Pairs of months of events (2040-01 to 2040-04, far from any other data) get the same number of
events each, spread over 2,000 profiles, each event with a small JSON payload like a custom
event's; every index and trigger of events is in place, as in production. Then, in the same
run, one month of a pair is removed by a DELETE of its rows (what a table without partitions
has to do) and a VACUUM of its dead rows (until then their space is not reusable), and the other
the way global retention removes a month (services/ingest/maintenance_repository.py): DETACH of
its partition (the month leaves the table: from the commit on readers no longer see it, as
after a committed DELETE) and then DROP TABLE of the detached table (its space is freed, as
after the VACUUM), each step its own committed transaction, timed apart.

The hot pair is removed just after it was written, every page of it cached. The cold pair is
removed as retention meets a month in production, months after anything last read it: the
server restarted (its shared buffers empty) and the pair's files dropped from the kernel's page
cache first. That matters to the DROP: a kernel frees every cached page of a file it unlinks,
tens of milliseconds for the month's 500 MB. The cold pair needs this run's embedded server.
The filesystem matters too (the log names it): one mounted with `discard` trims the freed blocks
as the files are unlinked; `TMPDIR` chooses where the embedded server keeps its data.

    python -m bench.partitions            # 1,000,000 events a month (several minutes)
    python -m bench.partitions --quick    # 100,000
    python -m bench.partitions --smoke    # 2,000: checks that it runs

The last lines are JSON figures, for each pair (the cold one's names start with `cold_`): the
detach against the DELETE, the detach plus drop against the DELETE plus VACUUM, and the whole
removal (detach plus drop) against the DELETE alone, each speed-up beside the issue's aim, 100x.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

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
from shared.embedded import EmbeddedPostgres

BENCH = "partitions"
AIM_SPEEDUP = 100.0
PROFILES = 2_000


@dataclass(frozen=True, slots=True)
class Month:
    start: datetime
    end: datetime

    @property
    def partition(self) -> str:
        return f"events_{self.start:%Y_%m}"

    @property
    def bounds(self) -> tuple[datetime, datetime]:
        return self.start, self.end


def _month(year: int, month: int) -> Month:
    following = (year, month + 1) if month < 12 else (year + 1, 1)
    return Month(datetime(year, month, 1, tzinfo=UTC), datetime(*following, 1, tzinfo=UTC))


@dataclass(frozen=True, slots=True)
class MonthPair:
    """Two months of as many events: one removed by DELETE + VACUUM, the other by detach + drop."""

    deleted: Month
    dropped: Month


# Just written: the months' pages are in PostgreSQL's and the kernel's caches.
HOT = MonthPair(deleted=_month(2040, 2), dropped=_month(2040, 1))
# Removed after a restart of the server and with their files out of the kernel's page cache, as a
# month past retention is: nothing has read it for months (embedded server only).
COLD = MonthPair(deleted=_month(2040, 4), dropped=_month(2040, 3))

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
# Plans (never runs) what a step will read, so that the connection's catalog caches are warm
# before the first timed step after a restart, and neither side pays for them.
PLAN_MONTH = "EXPLAIN " + COUNT_MONTH

# The files of a partition: its heap, each of its indexes, its TOAST table and that one's index.
MONTH_FILES = """
    WITH month AS (SELECT $1::regclass::oid AS oid),
    relations AS (
        SELECT oid FROM month
        UNION ALL SELECT indexrelid FROM pg_index WHERE indrelid = (SELECT oid FROM month)
        UNION ALL SELECT reltoastrelid FROM pg_class
            WHERE oid = (SELECT oid FROM month) AND reltoastrelid <> 0
        UNION ALL SELECT i.indexrelid
            FROM pg_index i JOIN pg_class c ON c.reltoastrelid = i.indrelid
            WHERE c.oid = (SELECT oid FROM month))
    SELECT current_setting('data_directory') AS data_dir, pg_relation_filepath(oid) AS path
    FROM relations"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.partitions", description=__doc__.split("\n\n")[0]
    )
    add_backend_arguments(parser)
    return parser.parse_args(argv)


async def load(database_url: str, project_id: object, count: int, pairs: list[MonthPair]) -> None:
    repository_pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        repository = MaintenanceRepository(repository_pool)
        months = [month for pair in pairs for month in (pair.dropped, pair.deleted)]
        for month in months:
            await repository.ensure_partition("events", "event_time", *month.bounds)
        async with repository_pool.acquire() as conn:
            for tag, month in enumerate(months):
                await conn.execute(LOAD_MONTH, project_id, *month.bounds, count, PROFILES, str(tag))
            await conn.execute("VACUUM ANALYZE events")
            for month in months:
                assert await conn.fetchval(COUNT_MONTH, *month.bounds) == count, month
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


async def month_files(database_url: str, partitions: list[str]) -> list[Path]:
    """Every file of the partitions: each relation's segments and forks (`<node>`, `<node>.1`,
    `<node>_fsm`, `<node>_vm.1`, ...)."""
    conn = await asyncpg.connect(database_url)
    try:
        bases = [
            Path(r["data_dir"], r["path"])
            for partition in partitions
            for r in await conn.fetch(MONTH_FILES, partition)
        ]
    finally:
        await conn.close()
    files = []
    for base in bases:
        pattern = re.compile(re.escape(base.name) + r"(_[a-z]+)?(\.[0-9]+)?")
        files += [f for f in base.parent.iterdir() if pattern.fullmatch(f.name)]
    return files


def cached_bytes(files: list[Path]) -> int | None:
    """How much of the files the kernel's page cache holds (util-linux `fincore`), or None."""
    if not files or shutil.which("fincore") is None:
        return None
    result = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return None
    return sum(int(line) for line in result.stdout.split())


def evict_from_page_cache(files: list[Path]) -> None:
    """Writes the files' dirty pages out, then asks the kernel to drop their cached pages."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def make_cold(postgres: EmbeddedPostgres, database_url: str, pair: MonthPair) -> tuple[int, ...]:
    """Restarts the server (its shared buffers empty) and drops the pair's files from the
    kernel's page cache; answers the bytes cached before and after (when fincore can tell)."""
    files = asyncio.run(month_files(database_url, [pair.deleted.partition, pair.dropped.partition]))
    postgres.stop()  # its shutdown checkpoint writes every dirty buffer out to the kernel
    before = cached_bytes(files)
    evict_from_page_cache(files)
    after = cached_bytes(files)
    postgres.start()
    return () if before is None or after is None else (before, after)


async def measure(database_url: str, count: int, pair: MonthPair) -> Timings:
    """Removes one month by DELETE then VACUUM, the other by detach then drop (retention's two
    transactions), timing each step. One connection: its catalog caches warmed first by plans
    that read no data, so neither side pays for them."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            for month in (pair.deleted, pair.dropped):
                await conn.execute(PLAN_MONTH, *month.bounds)
            started = time.perf_counter()
            async with conn.transaction():
                await conn.execute(MARK_RETENTION)
                status = await conn.execute(DELETE_MONTH, *pair.deleted.bounds)
            delete_s = time.perf_counter() - started
            started = time.perf_counter()
            await conn.execute(f"VACUUM {pair.deleted.partition}")
            vacuum_s = time.perf_counter() - started
        assert int(status.split()[-1]) == count, status
        repository = MaintenanceRepository(pool)
        started = time.perf_counter()
        assert await repository.detach_partition("events", pair.dropped.partition)
        detach_s = time.perf_counter() - started
        assert await pool.fetchval(COUNT_MONTH, *pair.dropped.bounds) == 0
        started = time.perf_counter()
        assert await repository.drop_expired(pair.dropped.partition + EXPIRED_SUFFIX)
        drop_s = time.perf_counter() - started
        assert await repository.expired_tables("events") == []
        return Timings(delete_s, vacuum_s, detach_s, drop_s)
    finally:
        await pool.close()


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def _report(label: str, count: int, t: Timings) -> list[Figure]:
    """Prints one pair's steps and speed-ups; answers its figures, named with `label`."""
    removal_s = t.detach_s + t.drop_s
    detach_speedup = _ratio(t.delete_s, t.detach_s)
    removal_speedup = _ratio(t.delete_s + t.vacuum_s, removal_s)
    print(f"{label or 'hot'} months:")
    print(f"  DELETE of a month ({count:,} events), committed: {t.delete_s * 1000:,.1f} ms")
    print(f"    then VACUUM of its dead rows:                {t.vacuum_s * 1000:,.1f} ms")
    print(f"  DETACH of its partition, committed:           {t.detach_s * 1000:,.1f} ms")
    print(f"    then DROP TABLE of the detached table:      {t.drop_s * 1000:,.1f} ms")
    print(
        f"  detach against the DELETE: {detach_speedup:,.1f}x; detach + drop against"
        f" DELETE + VACUUM: {removal_speedup:,.1f}x; detach + drop against the DELETE alone:"
        f" {_ratio(t.delete_s, removal_s):,.1f}x (aim: at least {AIM_SPEEDUP:.0f}x)",
        flush=True,
    )
    prefix = f"{label}_" if label else ""
    return [
        # The month leaves what readers see: a committed DETACH against a committed DELETE.
        Figure(
            f"{prefix}detach_month_partition_ms",
            t.detach_s * 1000,
            "ms",
            f"{prefix}delete_month_rows_ms",
            t.delete_s * 1000,
        ),
        Figure(f"{prefix}month_detach_speedup", detach_speedup, "x", "aim", AIM_SPEEDUP),
        # The month's space is freed: DETACH + DROP against DELETE + VACUUM.
        Figure(
            f"{prefix}detach_and_drop_month_partition_ms",
            removal_s * 1000,
            "ms",
            f"{prefix}delete_and_vacuum_month_rows_ms",
            (t.delete_s + t.vacuum_s) * 1000,
        ),
        Figure(f"{prefix}month_detach_and_drop_speedup", removal_speedup, "x", "aim", AIM_SPEEDUP),
        # The whole removal (detach + drop) against the DELETE alone (earlier runs' names for
        # the hot pair).
        Figure(
            f"{prefix}drop_month_partition_ms",
            removal_s * 1000,
            "ms",
            f"{prefix}delete_month_rows_ms",
            t.delete_s * 1000,
        ),
        Figure(
            f"{prefix}month_removal_speedup",
            _ratio(t.delete_s, removal_s),
            "x",
            "aim",
            AIM_SPEEDUP,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    count = size_choice(args, 2_000, 100_000, 1_000_000)
    with contextlib.ExitStack() as stack:
        work_dir = make_work_dir(stack)
        backends = start_backends(stack, work_dir, args.database_url, args.redis_url)
        postgres = backends.postgres
        pairs = [HOT, COLD] if postgres is not None else [HOT]
        project = asyncio.run(create_project(backends.database_url, roles=("admin",)))
        print(f"data directory on: {work_dir} ({_filesystem(work_dir)})")
        print(f"loading {2 * len(pairs)} months of {count:,} events each ...", flush=True)
        started = time.perf_counter()
        asyncio.run(load(backends.database_url, project.project_id, count, pairs))
        print(f"  loaded in {time.perf_counter() - started:.1f} s", flush=True)
        sizes = asyncio.run(month_sizes(backends.database_url, HOT.dropped.partition))
        total = sum(size for _, size in sizes)
        print(f"the month's files: {total / 2**20:,.1f} MB", flush=True)
        for name, size in sizes:
            print(f"  {name}: {size / 2**20:,.1f} MB ({100 * size / total:.0f}%)")
        figures = _report("", count, asyncio.run(measure(backends.database_url, count, HOT)))
        if postgres is None:
            print("cold months: skipped (the server must be this run's embedded one)")
        else:
            cached = make_cold(postgres, backends.database_url, COLD)
            if cached:
                print(
                    f"server restarted; the cold months' files in the page cache:"
                    f" {cached[0] / 2**20:,.1f} MB before eviction, {cached[1] / 2**20:,.1f} MB"
                    " after"
                )
            figures += _report(
                "cold", count, asyncio.run(measure(backends.database_url, count, COLD))
            )
    print_figures(BENCH, figures, quick=labelled_quick(args))
    return 0


def _filesystem(path: Path) -> str:
    """The filesystem type and mount options of the mount holding path (Linux), for the log:
    whether blocks are discarded as they are freed matters to a DROP."""
    best = ""
    found = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount_point, kind, options, *_ = line.split()
            inside = str(path) == mount_point or str(path).startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, found = mount_point, f"{kind} at {mount_point}, options {options}"
    return found


if __name__ == "__main__":
    run_main(main)
