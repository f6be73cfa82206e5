"""Retention applied by hand in API tests: ingest's storage maintenance run on the test's
database with a clock of the test's choosing, the way a replica's round would run it."""

from __future__ import annotations

import json
from datetime import datetime
from uuid import UUID

import asyncpg

from services.ingest.maintenance_repository import MaintenanceRepository
from services.ingest.retention import StorageMaintenance
from shared.clock import FrozenClock

# The two ways events are aged out (docs/partitions.md): PROFILES_EVENTS_RETENTION_DAYS (whole
# months detached and dropped, DEFAULT rows deleted) and a project's events.retention_days (a
# bounded sweep of that project's rows).
RETENTION_MODES = ("global", "project")
RETENTION_DAYS = 90

COUNT_EVENTS = "SELECT count(*) FROM events WHERE project_id = $1"


async def make_months(database_url: str, *moments: datetime) -> None:
    """Creates the monthly partitions of these moments (as a round at that time would), so
    that events imported there land in a month's partition, not in DEFAULT."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        for moment in moments:
            await StorageMaintenance(
                MaintenanceRepository(pool), FrozenClock(moment), ahead=0
            ).ensure_partitions()
    finally:
        await pool.close()


async def apply_retention(
    database_url: str, project_id: UUID, mode: str, now: datetime, days: int = RETENTION_DAYS
) -> list[str]:
    """Runs maintenance rounds at `now` with `days` of retention, global or for the project
    only, until nothing is left to remove; returns the months dropped."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        if mode == "project":
            await pool.execute(
                "INSERT INTO project_settings (project_id, name, value) VALUES ($1, $2, $3)"
                " ON CONFLICT (project_id, name) DO UPDATE SET value = EXCLUDED.value",
                project_id,
                "events.retention_days",
                json.dumps(days),
            )
        maintenance = StorageMaintenance(
            MaintenanceRepository(pool),
            FrozenClock(now),
            retention_days=days if mode == "global" else 0,
        )
        dropped: list[str] = []
        while True:
            report = await maintenance.run_once()
            dropped.extend(report.dropped or [])
            if not report.events_deleted and not report.detached:
                return dropped
    finally:
        await pool.close()


async def stored_events(database_url: str, project_id: UUID) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(COUNT_EVENTS, project_id))
    finally:
        await conn.close()
