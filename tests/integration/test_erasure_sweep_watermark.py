"""The erasure sweeps of segments and query on real PostgreSQL: identity's record of erasures
(0061) is written in the erasure's own transaction, and each sweep reads it from a watermark,
so an erasure that commits after a later one was swept is not passed over, and a sweep with
nothing new to do purges nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

import asyncpg
import pytest

from services.query import erasure_sweep as query_sweep
from services.query.repository import QueryRepository
from services.query.service import RollupService
from services.segments import erasure_sweep as segments_sweep
from services.segments.change_stream import ChangeStream
from services.segments.repository import SegmentsRepository
from services.segments.service import SegmentsService
from shared.bus import Bus
from shared.clock import FrozenClock
from shared.db import create_pool
from shared.tenancy import TenancyRepository

if TYPE_CHECKING:
    from tests.conftest import TestProject

NOW = datetime(2024, 3, 20, 12, 0, tzinfo=UTC)

# What identity's erasure does to its own rows (services/identity/erasure.py), in one
# transaction: the installations, then the profile.
ERASE = (
    "DELETE FROM installations WHERE project_id = $1 AND profile_id = $2",
    "DELETE FROM profiles WHERE project_id = $1 AND profile_id = $2",
)


@dataclass
class Sweeps:
    pool: asyncpg.Pool
    project_id: UUID
    segments: segments_sweep.ErasureSweepWorker
    query: query_sweep.ErasureSweepWorker
    segments_service: SegmentsService
    rollups: RollupService

    async def person(self) -> UUID:
        """A profile with an installation, known to identity, segments and query."""
        profile_id, installation_id = uuid4(), f"inst-{uuid4().hex[:8]}"
        await self.pool.execute(
            "INSERT INTO profiles (project_id, profile_id) VALUES ($1, $2)",
            self.project_id,
            profile_id,
        )
        await self.pool.execute(
            "INSERT INTO installations (project_id, installation_id, profile_id)"
            " VALUES ($1, $2, $3)",
            self.project_id,
            installation_id,
            profile_id,
        )
        await self.segments_service.register_profiles(self.project_id, [profile_id])
        await self.rollups.recount(self.project_id, [profile_id], [installation_id])
        return profile_id

    async def sweep(self) -> tuple[int, tuple[int, int]]:
        return await self.segments.sweep_once(), await self.query.sweep_once()

    async def kept(self, profile_id: UUID) -> dict[str, int]:
        """The profile's rows: segments' unmarked profile row, query's profile row, and query's
        rows of installations identity no longer knows."""
        return {
            "segment_profiles": await self.pool.fetchval(
                "SELECT count(*) FROM segment_profiles"
                " WHERE project_id = $1 AND profile_id = $2 AND erase_time IS NULL",
                self.project_id,
                profile_id,
            ),
            "query_profiles": await self.pool.fetchval(
                "SELECT count(*) FROM query_profiles WHERE project_id = $1 AND profile_id = $2",
                self.project_id,
                profile_id,
            ),
        }

    async def unknown_installation_rows(self) -> int:
        return await self.pool.fetchval(
            "SELECT count(*) FROM query_installations q WHERE q.project_id = $1"
            " AND NOT EXISTS (SELECT 1 FROM installations i WHERE i.project_id = q.project_id"
            " AND i.installation_id = q.installation_key)",
            self.project_id,
        )


@pytest.fixture
async def sweeps(
    database_url: str, redis_url: str, redis_prefix: str, project: TestProject
) -> AsyncIterator[Sweeps]:
    pool = await create_pool(database_url, max_size=5)
    bus = Bus.from_url(redis_url, redis_prefix)
    clock = FrozenClock(NOW)
    segments_service = SegmentsService(
        SegmentsRepository(pool), TenancyRepository(pool), clock, ChangeStream(bus)
    )
    rollups = RollupService(QueryRepository(pool), clock)
    try:
        yield Sweeps(
            pool,
            project.project_id,
            segments_sweep.ErasureSweepWorker(
                SegmentsRepository(pool), segments_service, interval_s=3600, page_size=2
            ),
            query_sweep.ErasureSweepWorker(
                QueryRepository(pool), rollups, interval_s=3600, page_size=2
            ),
            segments_service,
            rollups,
        )
    finally:
        await bus.aclose()
        await pool.close()


async def test_an_erasure_committed_after_a_later_one_was_swept_is_still_purged(
    sweeps: Sweeps, database_url: str
) -> None:
    first, second, survivor, *others = [await sweeps.person() for _ in range(5)]
    assert await sweeps.sweep() == (0, (0, 0))

    # The first erasure takes its transaction ID, then waits (long hooks, a slow client...)
    # while a second one commits: the sweep sees only the second.
    slow: Any = await asyncpg.connect(database_url)
    try:
        transaction = slow.transaction()
        await transaction.start()
        for statement in ERASE:
            await slow.execute(statement, sweeps.project_id, first)
        async with sweeps.pool.acquire() as conn, conn.transaction():
            for statement in ERASE:
                await conn.execute(statement, sweeps.project_id, second)
        positions = await sweeps.pool.fetch(
            "SELECT profile_id, erase_position::text::bigint AS position"
            " FROM identity_read_erased_profiles() WHERE project_id = $1",
            sweeps.project_id,
        )
        assert [r["profile_id"] for r in positions] == [second]

        assert await sweeps.sweep() == (1, (1, 1))

        assert await sweeps.kept(second) == {"segment_profiles": 0, "query_profiles": 0}
        assert await sweeps.kept(first) == {"segment_profiles": 1, "query_profiles": 1}
        await transaction.commit()
    finally:
        await slow.close()
    # Recorded below the position the sweep already read past, and found all the same.
    first_position = await sweeps.pool.fetchval(
        "SELECT erase_position::text::bigint FROM identity_read_erased_profiles()"
        " WHERE project_id = $1 AND profile_id = $2",
        sweeps.project_id,
        first,
    )
    assert first_position < positions[0]["position"]

    assert await sweeps.sweep() == (1, (1, 1))

    assert await sweeps.kept(first) == {"segment_profiles": 0, "query_profiles": 0}
    assert await sweeps.unknown_installation_rows() == 0
    for profile_id in (survivor, *others):
        assert await sweeps.kept(profile_id) == {"segment_profiles": 1, "query_profiles": 1}
    assert await sweeps.pool.fetchval(
        "SELECT count(*) FROM query_installations WHERE project_id = $1", sweeps.project_id
    ) == 1 + len(others)
    # Nothing new: the sweep rereads at most the erasures at its watermark and purges nothing.
    assert await sweeps.sweep() == (0, (0, 0))


async def test_a_restarted_sweep_reads_the_record_from_its_start(sweeps: Sweeps) -> None:
    # Erasures recorded while no sweep ran (a process that was down, or not started yet):
    # more than a page of them (pages of 2 here), each read once.
    people = [await sweeps.person() for _ in range(5)]
    for profile_id in people[:4]:
        async with sweeps.pool.acquire() as conn, conn.transaction():
            for statement in ERASE:
                await conn.execute(statement, sweeps.project_id, profile_id)

    assert await sweeps.sweep() == (4, (4, 4))

    for profile_id in people[:4]:
        assert await sweeps.kept(profile_id) == {"segment_profiles": 0, "query_profiles": 0}
    assert await sweeps.kept(people[4]) == {"segment_profiles": 1, "query_profiles": 1}
    assert await sweeps.sweep() == (0, (0, 0))
