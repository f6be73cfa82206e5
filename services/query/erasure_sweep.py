"""The erasure sweep: query purges what its projection still holds of the profiles identity
erased, for the erasures whose ProfileDeleted it never handled (its consumer group stopped or
failing for longer than the bus retention, PROFILES_BUS_RETENTION_HOURS, which trimmed the
message away).

Identity records every erased profile ID in the erasure's own transaction (0061,
identity_read_erased_profiles). On start, then every PROFILES_ERASURE_SWEEP_MINUTES, the sweep
reads that record from its watermark on and recounts, with RollupService.recount (what the
ProfileDeleted handler does: one rule, written once), the erased profiles query still holds a
row of (in query_profiles, or event name counts kept under the ID: a tombstone's too): a
recount finds them gone from identity, deletes their rows (and name tails), moves the
overview's counters down and takes their events out of ListEventNames' counts. ProfileDeleted
also names the profile's installations, which identity keeps no trace of after the erasure; in
a project where the sweep found such a profile, it recounts the installation rows identity no
longer knows (only an erasure removes one), walked in key order. The installations go first:
a sweep stopped midway finds the profiles still there next time, and walks again.

The watermark lives in memory: a process starts from the beginning of the record (one pass over
every erasure, probes of primary keys), later sweeps read only the erasures committed since (and
the few still running at the previous sweep).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from uuid import UUID

import structlog
from prometheus_client import Counter

from services.query.repository import ErasedProfile, QueryRepository
from services.query.service import RollupService
from shared.bus import sleep_unless

log = structlog.get_logger(__name__)

PURGED = Counter(
    "profiles_query_erasure_sweep_purged_total",
    "Rows of erased profiles (`profiles`) and of their installations (`installations`) that"
    " query's projection still held (a lost or not yet handled ProfileDeleted) and its erasure"
    " sweep purged.",
    ["rows"],
)
# Rows of identity's record, and installation rows, read per statement.
PAGE_SIZE = 500
# Profiles or installations recounted per transaction (the recount locks each one's key).
RECOUNT_SIZE = 100


def kept_by_project(rows: Sequence[ErasedProfile]) -> dict[UUID, list[UUID]]:
    """The erased IDs query still holds, by project, in the record's order."""
    found: dict[UUID, list[UUID]] = {}
    for row in rows:
        if row.kept:
            found.setdefault(row.project_id, []).append(row.profile_id)
    return found


class ErasureSweepWorker:
    """Runs the erasure sweep on start and every `interval_s`. A failing sweep is logged and
    the next one runs as planned, from the same watermark."""

    def __init__(
        self,
        repository: QueryRepository,
        rollups: RollupService,
        *,
        interval_s: float,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self._repository = repository
        self._rollups = rollups
        self._interval_s = interval_s
        self._page_size = page_size
        self._stop = asyncio.Event()
        # xid8 0: nothing read yet, so the whole record.
        self._watermark = 0

    async def sweep_once(self) -> tuple[int, int]:
        """Purges what the projection holds of every erased profile recorded from the
        watermark on, and moves the watermark; returns how many profile and installation rows
        were purged. Stopped midway, it keeps the old watermark."""
        horizon = await self._repository.erasure_horizon()
        kept: dict[UUID, list[UUID]] = {}
        after: ErasedProfile | None = None
        while True:
            if self._stop.is_set():
                return 0, 0
            page = await self._repository.erased_profiles(self._watermark, after, self._page_size)
            for project_id, profile_ids in kept_by_project(page).items():
                kept.setdefault(project_id, []).extend(profile_ids)
            if len(page) < self._page_size:
                break
            after = page[-1]
        profiles = installations = 0
        for project_id, profile_ids in kept.items():
            installations += await self._purge_unknown_installations(project_id)
            for start in range(0, len(profile_ids), RECOUNT_SIZE):
                if self._stop.is_set():
                    return profiles, installations
                chunk = profile_ids[start : start + RECOUNT_SIZE]
                await self._rollups.recount(project_id, chunk, ())
                profiles += len(chunk)
                PURGED.labels("profiles").inc(len(chunk))
        self._watermark = horizon
        if profiles or installations:
            log.info(
                "query_erased_profiles_purged",
                projects=len(kept),
                profiles=profiles,
                installations=installations,
            )
        return profiles, installations

    async def _purge_unknown_installations(self, project_id: UUID) -> int:
        """Recounts the project's installation rows identity no longer knows, which deletes
        them and moves their counters down; returns how many."""
        purged = 0
        after_key = ""
        while not self._stop.is_set():
            keys = await self._repository.installation_keys(project_id, after_key, self._page_size)
            for start in range(0, len(keys.unknown), RECOUNT_SIZE):
                chunk = keys.unknown[start : start + RECOUNT_SIZE]
                await self._rollups.recount(project_id, (), chunk)
                purged += len(chunk)
                PURGED.labels("installations").inc(len(chunk))
            if keys.last_key is None or keys.read < self._page_size:
                break
            after_key = keys.last_key
        return purged

    async def run(self) -> None:
        self._stop.clear()
        while not self._stop.is_set():
            try:
                await self.sweep_once()
            except Exception:
                log.exception("query_erasure_sweep_failed")
            await sleep_unless(self._stop, self._interval_s)

    async def stop(self) -> None:
        self._stop.set()
