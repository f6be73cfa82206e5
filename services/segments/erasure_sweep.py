"""The erasure sweep: segments purges what it still keeps of the profiles identity erased, for
the erasures whose ProfileDeleted it never handled (its consumer group stopped or failing for
longer than the bus retention, PROFILES_BUS_RETENTION_HOURS, which trimmed the message away).

Identity records every erased profile ID in the erasure's own transaction (0061,
identity_read_erased_profiles). On start, then every PROFILES_ERASURE_SWEEP_MINUTES, the sweep
reads that record from its watermark on and hands each erasure's IDs that segments still keeps
rows of to SegmentsService.delete_profiles, the ProfileDeleted handler's own purge: the rule is
written once, and a sweep racing the handler (or another replica) does the work once, under the
profiles' row locks. The watermark lives in memory: a process starts from the beginning of the
record (one pass over every erasure, probes of primary keys), later sweeps read only the
erasures committed since (and the few still running at the previous sweep).
"""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

import structlog
from prometheus_client import Counter

from services.segments.consumers import PeriodicWorker
from services.segments.repository import ErasedProfile, SegmentsRepository
from services.segments.service import SegmentsService

log = structlog.get_logger(__name__)

PURGED = Counter(
    "profiles_segments_erased_profiles_purged_total",
    "Erased profile IDs whose rows segments still kept (a lost or not yet handled"
    " ProfileDeleted) and its erasure sweep purged.",
)
# Rows of identity's record read per statement.
PAGE_SIZE = 500


def erasures(page: Sequence[ErasedProfile]) -> dict[tuple[UUID, int], list[UUID]]:
    """The kept IDs of a page by erasure (project, position): the profile and tombstones one
    ProfileDeleted would have named, in the record's order."""
    found: dict[tuple[UUID, int], list[UUID]] = {}
    for row in page:
        if row.kept:
            found.setdefault((row.project_id, row.position), []).append(row.profile_id)
    return found


class ErasureSweepWorker(PeriodicWorker):
    """Runs the erasure sweep on start and every `interval_s`."""

    failure_event = "segments_erasure_sweep_failed"

    def __init__(
        self,
        repository: SegmentsRepository,
        service: SegmentsService,
        *,
        interval_s: float,
        page_size: int = PAGE_SIZE,
    ) -> None:
        super().__init__(interval_s)
        self._repository = repository
        self._service = service
        self._page_size = page_size
        # xid8 0: nothing read yet, so the whole record.
        self._watermark = 0

    async def sweep_once(self) -> int:
        """Purges the kept rows of every erased profile recorded from the watermark on, and
        moves the watermark; returns how many profile IDs were purged. Stopped midway, it keeps
        the old watermark (what it purged stays purged; the next run reads it again, finds
        nothing kept, and purges nothing)."""
        horizon = await self._repository.erasure_horizon()
        purged = 0
        after: ErasedProfile | None = None
        while not self._stop.is_set():
            page = await self._repository.erased_profiles(self._watermark, after, self._page_size)
            for (project_id, _position), profile_ids in erasures(page).items():
                await self._service.delete_profiles(project_id, profile_ids)
                purged += len(profile_ids)
                PURGED.inc(len(profile_ids))
            if len(page) < self._page_size:
                self._watermark = horizon
                break
            after = page[-1]
        if purged:
            log.info("segments_erased_profiles_purged", profiles=purged)
        return purged

    async def tick(self) -> None:
        await self.sweep_once()
