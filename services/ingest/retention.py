"""Ingest's storage maintenance: partitions ahead, dedupe keys, and event retention.

One round (StorageMaintenance.run_once), on start and then every `interval_s`:
  1. every partitioned table gets its current month's partition and the next MONTHS_AHEAD,
     each moving the DEFAULT partition's rows of its month into it;
  2. dedupe keys received over EVENT_KEY_DAYS ago are pruned, a bounded batch at a time;
  3. with PROFILES_EVENTS_RETENTION_DAYS set, monthly partitions wholly older than it are
     detached and then dropped (two short transactions: the parent is locked only for the
     detach), and the DEFAULT partition's older rows deleted in bounded batches;
  4. each project with `events.retention_days` set loses its older events, in bounded batches
     (at most `sweep_batches` per project and round: a large backlog takes several rounds and
     never holds locks long).
Retention never touches what was derived from events: profile totals and first/last seen
(profile_event_counts), sessions, attributes, consent, segment state (docs/partitions.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial

import asyncpg
import structlog

from services.ingest.maintenance_repository import EXPIRED_SUFFIX, MaintenanceRepository
from services.ingest.partitions import (
    EVENT_KEY_DAYS,
    MONTHS_AHEAD,
    PARTITIONED_TABLES,
    expired,
    parse_period,
    periods_due,
    retention_cutoff,
)
from shared.bus import sleep_unless
from shared.clock import Clock

log = structlog.get_logger(__name__)

# Hourly: partitions are made two months ahead, so a round may fail for weeks without harm;
# retention only needs to keep up with a day's worth of events.
MAINTENANCE_INTERVAL_S = 3600.0
# Rows per delete statement (one short transaction each), and statements per round.
SWEEP_BATCH_ROWS = 5000
SWEEP_BATCHES = 20


@dataclass(slots=True)
class MaintenanceReport:
    """What one round did, for logs and tests."""

    created: list[str]
    moved_from_default: int = 0
    # Months past retention detached from their table, and dropped (this round's detached
    # ones and any a failed round left).
    detached: list[str] = field(default_factory=list)
    dropped: list[str] | None = None
    keys_pruned: int = 0
    events_deleted: int = 0


class StorageMaintenance:
    def __init__(
        self,
        repository: MaintenanceRepository,
        clock: Clock,
        *,
        retention_days: int = 0,
        ahead: int = MONTHS_AHEAD,
        batch_rows: int = SWEEP_BATCH_ROWS,
        sweep_batches: int = SWEEP_BATCHES,
    ) -> None:
        self._repository = repository
        self._clock = clock
        self._retention_days = retention_days
        self._ahead = ahead
        self._batch_rows = batch_rows
        self._sweep_batches = sweep_batches

    async def ensure_partitions(self) -> MaintenanceReport:
        """Creates the partitions due now (idempotent; safe with several replicas)."""
        report = MaintenanceReport(created=[])
        now = self._clock.now()
        for parent, key in PARTITIONED_TABLES.items():
            for period in periods_due(parent, now, self._ahead):
                moved = await self._repository.ensure_partition(
                    parent, key, period.start, period.end
                )
                if moved is not None:
                    report.created.append(period.name)
                    report.moved_from_default += moved
                    log.info("partition_created", partition=period.name, moved=moved)
        return report

    async def run_once(self) -> MaintenanceReport:
        report = await self.ensure_partitions()
        now = self._clock.now()
        report.keys_pruned = await self._in_batches(
            partial(
                self._repository.delete_old_event_keys,
                now - timedelta(days=EVENT_KEY_DAYS),
                self._batch_rows,
            )
        )
        report.dropped = []
        cutoff = retention_cutoff(now, self._retention_days)
        for parent, key in PARTITIONED_TABLES.items():
            if cutoff is not None:
                await self._detach_expired(report, parent, cutoff)
            # Dropped in a transaction of their own (their files' unlinking locks nothing of the
            # parent); also what a round that failed between the two steps left, even if
            # retention was turned off since: those months had already left the table.
            for table in await self._repository.expired_tables(parent):
                if await self._repository.drop_expired(table):
                    name = table.removesuffix(EXPIRED_SUFFIX)
                    report.dropped.append(name)
                    log.info("partition_dropped", partition=name)
            if cutoff is not None:
                report.events_deleted += await self._in_batches(
                    partial(
                        self._repository.delete_old_default_rows,
                        parent,
                        key,
                        cutoff,
                        self._batch_rows,
                    )
                )
        for project_id, days in (await self._repository.project_retention()).items():
            project_cutoff = retention_cutoff(now, days)
            if project_cutoff is None:
                continue
            deleted = await self._in_batches(
                partial(
                    self._repository.delete_old_project_events,
                    project_id,
                    project_cutoff,
                    self._batch_rows,
                )
            )
            if deleted:
                log.info("project_events_aged_out", project_id=str(project_id), count=deleted)
            report.events_deleted += deleted
        return report

    async def _detach_expired(
        self, report: MaintenanceReport, parent: str, cutoff: datetime
    ) -> None:
        """Detaches each monthly partition of `parent` wholly older than `cutoff`, each in its
        own short transaction (the parent is locked for an instant)."""
        periods = [
            p
            for name in await self._repository.partitions(parent)
            if (p := parse_period(parent, name)) is not None
        ]
        for period in expired(periods, cutoff):
            if await self._repository.detach_partition(parent, period.name):
                report.detached.append(period.name)
                log.info("partition_detached", partition=period.name)

    async def _in_batches(self, step: Callable[[], Awaitable[int]]) -> int:
        """Runs `step` (a coroutine factory returning rows done) until a batch comes back short
        or the round's budget of batches is spent."""
        total = 0
        for _ in range(self._sweep_batches):
            done = await step()
            total += done
            if done < self._batch_rows:
                break
        return total


class StorageMaintainer:
    """Runs StorageMaintenance on start and then every `interval_s`. Failures are logged and
    retried at the next round (partitions exist months ahead: nothing waits on a round)."""

    def __init__(
        self, maintenance: StorageMaintenance, interval_s: float = MAINTENANCE_INTERVAL_S
    ) -> None:
        self._maintenance = maintenance
        self._interval_s = interval_s
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                await self._maintenance.run_once()
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("storage_maintenance_failed", error=type(exc).__name__)
            await sleep_unless(self._stop, self._interval_s)

    async def stop(self) -> None:
        self._stop.set()
