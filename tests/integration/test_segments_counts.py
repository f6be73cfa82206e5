"""The distribution's stored counts (segment_state_counts, kept by triggers on segment_states):
after every kind of write they give what a full recount of segment_states, classified as of
now, gives; and concurrent writers add to different shards instead of queueing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

from services.segments.consumers import SweepWorker
from services.segments.definitions import DefinitionsService
from services.segments.definitions_repository import DefinitionsRepository
from services.segments.model import RecomputePhase
from services.segments.repository import SegmentsRepository
from services.segments.service import SegmentsService
from shared.tenancy import TenancyRepository
from shared.topics import EVENTS, IDENTITY
from tests.integration.test_segments import Harness, at, harness
from tests.support.segments import (
    ANDROID,
    IOS,
    WEB,
    deleted,
    merged,
    new_id,
    publish_events,
    publish_identity,
    session,
)

__all__ = ["harness"]

DISTRIBUTION = "SELECT segment, flag, profile_count FROM segment_distribution($1, $2::smallint, $3)"
# The reference: every row of the project and platform, classified as of $3 by the same rule
# (segment_state_at), with no stored count involved.
RECOUNT = """
    SELECT c[1] AS segment, c[2] AS flag, count(*) AS profile_count
    FROM (SELECT segment_state_at(segment, flag, next_transition_time, upcoming_times,
                                  upcoming_segments, upcoming_flags, $3) AS c
          FROM segment_states WHERE project_id = $1 AND platform = $2) r
    WHERE c IS NOT NULL
    GROUP BY 1, 2"""
# The invariant the triggers keep, over every project: the shards of a stored (segment, flag)
# add up to the rows that hold it.
STORED = """
    SELECT project_id, platform, segment, flag, count(*) AS n
    FROM segment_states GROUP BY 1, 2, 3, 4"""
COUNTED = """
    SELECT project_id, platform, segment, flag, sum(profile_count) AS n
    FROM segment_state_counts GROUP BY 1, 2, 3, 4 HAVING sum(profile_count) <> 0"""
DUE = "SELECT count(*) FROM segment_states WHERE project_id = $1 AND next_transition_time <= $2"
INSERT_STATE = """
    INSERT INTO segment_states (project_id, profile_id, platform, segment, flag, update_time)
    VALUES ($1, $2, 0, 1, 0, $3)"""


async def assert_counts_match_a_recount(h: Harness) -> None:
    now = h.clock.now()
    stored = {tuple(r) for r in await h.pool.fetch(STORED)}
    assert {tuple(r) for r in await h.pool.fetch(COUNTED)} == stored
    for platform in (0, IOS, ANDROID, WEB):
        got = {tuple(r) for r in await h.pool.fetch(DISTRIBUTION, h.project_id, platform, now)}
        want = {tuple(r) for r in await h.pool.fetch(RECOUNT, h.project_id, platform, now)}
        assert got == want, f"platform {platform} at {now}"
    via_service = await h.service.distribution(h.project_id)
    recount = await h.pool.fetch(RECOUNT, h.project_id, 0, now)
    assert {(int(c.segment), int(c.flag)): n for c, n in via_service.counts.items()} == {
        (r["segment"], r["flag"]): r["profile_count"] for r in recount
    }


async def test_counts_follow_events_merges_deletions_time_sweeps_and_recompute(
    harness: Harness, eventually: Callable[..., Any]
) -> None:
    h = harness
    definitions = DefinitionsRepository(h.pool)
    tenancy = TenancyRepository(h.pool)
    h.service = SegmentsService(
        SegmentsRepository(h.pool),
        tenancy,
        h.clock,
        h.service._changes,
        DefinitionsService(definitions, h.clock),
        definitions,
    )
    h.start_consumer(EVENTS)
    h.start_consumer(IDENTITY)
    engaged, new, both, web, source, erased, android = (new_id() for _ in range(7))
    await publish_events(
        h.bus,
        h.project_id,
        [
            *session(engaged, at(1)),
            *session(engaged, at(15)),
            *session(engaged, at(18)),
            *session(new, at(18)),
            *session(both, at(2), platform=IOS),
            *session(both, at(19), platform=ANDROID),
            *session(web, at(10), platform=WEB),
            *session(web, at(19), platform=WEB),
            *session(source, at(5), platform=ANDROID),
            *session(source, at(17), platform=WEB),
            *session(erased, at(19)),
            *session(android, at(12), platform=ANDROID),
            *session(android, at(13), platform=ANDROID),
        ],
    )
    await h.settle(eventually)
    await assert_counts_match_a_recount(h)

    await publish_identity(h.bus, h.project_id, merged(h.project_id, source, both))
    await publish_identity(h.bus, h.project_id, deleted(h.project_id, erased))
    await h.settle(eventually)
    await assert_counts_match_a_recount(h)

    # Time alone: transitions pass with no write; the counts are corrected by the due rows.
    h.clock.set(at(26))
    assert await h.pool.fetchval(DUE, h.project_id, h.clock.now()) > 0
    await assert_counts_match_a_recount(h)
    assert await h.service.sweep(limit=2) == 2  # part of the due rows moved
    assert await h.pool.fetchval(DUE, h.project_id, h.clock.now()) > 0
    await assert_counts_match_a_recount(h)
    await publish_events(h.bus, h.project_id, session(new, at(26, 9)))
    await h.settle(eventually)
    await assert_counts_match_a_recount(h)

    h.clock.set(datetime(2024, 3, 29, 0, 0, tzinfo=UTC))
    await assert_counts_match_a_recount(h)
    assert await SweepWorker(h.service, h.clock, batch=3).sweep_once() > 0
    assert await h.pool.fetchval(DUE, h.project_id, h.clock.now()) == 0
    await assert_counts_match_a_recount(h)

    # A rule change applied by RecomputeAll rewrites stored states project-wide.
    await tenancy.set_setting(h.project_id, "segments.new_days", 2)
    progress = [p async for p in h.service.recompute_all(h.project_id)]
    assert progress[-1].phase == RecomputePhase.DONE
    await assert_counts_match_a_recount(h)
    h.clock.set(at(31))
    await assert_counts_match_a_recount(h)


async def test_concurrent_writers_add_to_different_shards_without_waiting(harness: Harness) -> None:
    h = harness
    now = h.clock.now()
    async with h.pool.acquire() as first, h.pool.acquire() as second:
        first_tx, second_tx = first.transaction(), second.transaction()
        await first_tx.start()
        await second_tx.start()
        try:
            await first.execute(INSERT_STATE, h.project_id, uuid4(), now)
            # On one shard the second insert would wait for the first transaction's counter row.
            await asyncio.wait_for(second.execute(INSERT_STATE, h.project_id, uuid4(), now), 10)
        finally:
            await first_tx.commit()
            await second_tx.commit()
    rows = await h.pool.fetch(
        "SELECT shard, profile_count FROM segment_state_counts WHERE project_id = $1",
        h.project_id,
    )
    assert len({r["shard"] for r in rows}) == 2
    assert [r["profile_count"] for r in rows] == [1, 1]
    got = await h.pool.fetch(DISTRIBUTION, h.project_id, 0, now)
    assert [tuple(r) for r in got] == [(1, 0, 2)]


async def test_a_rolled_back_write_and_a_truncate_leave_exact_counts(harness: Harness) -> None:
    h = harness
    now = h.clock.now()
    await h.pool.execute(INSERT_STATE, h.project_id, uuid4(), now)
    async with h.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute(INSERT_STATE, h.project_id, uuid4(), now)
        await conn.execute("DELETE FROM segment_states WHERE project_id = $1", h.project_id)
        await tx.rollback()
    assert [tuple(r) for r in await h.pool.fetch(COUNTED)] == [(h.project_id, 0, 1, 0, 1)]
    await h.pool.execute("TRUNCATE segment_states")
    assert await h.pool.fetch(COUNTED) == []
    assert await h.pool.fetch(DISTRIBUTION, h.project_id, 0, now) == []
