"""A change of a project's smart segment thresholds reaches the stored states (the distribution,
custom segments reading them) with no RecomputeAll: segments notices it and recomputes the
project, announcing the changes with cause RECOMPUTE."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from profiles.common.v1 import types_pb2
from profiles.segments.v1 import filters_pb2 as f
from profiles.segments.v1 import segments_pb2
from profiles.segments.v1 import segments_service_pb2 as pb
from services.segments.app import make_build
from shared.server import Build
from tests.conftest import eventually
from tests.support.ingest import NOW
from tests.support.segments_custom import Stack, condition, session, stack

__all__ = ["stack"]

NEW, ONE_TIME = types_pb2.SMART_SEGMENT_NEW, types_pb2.SMART_SEGMENT_ONE_TIME
DISTRIBUTION = "SELECT segment, flag, profile_count FROM segment_distribution($1, 0::smallint, $2)"
APPLIED = "SELECT thresholds FROM segment_thresholds_applied WHERE project_id = $1"


@pytest.fixture
def segments_build() -> Build:
    """Thresholds checked every 50 ms (the evaluation sweep stays hourly)."""
    return make_build(evaluation_interval_s=3600.0, thresholds_interval_s=0.05)


async def distribution(stack: Stack) -> dict[int, int]:
    rows = await stack.pool.fetch(DISTRIBUTION, stack.project.project_id, stack.clock.now())
    return {r["segment"]: r["profile_count"] for r in rows}


async def size(stack: Stack, segment_id: str) -> int:
    reply = await stack.segments.GetSegment(
        pb.GetSegmentRequest(segment_id=segment_id), metadata=stack.read
    )
    return reply.segment.size


async def changes(stack: Stack, count: int) -> list[segments_pb2.SegmentChange]:
    start = pb.WatchSegmentChangesRequest()
    start.start_time.FromDatetime(NOW - timedelta(days=3650))
    received: list[segments_pb2.SegmentChange] = []
    call = stack.segments.WatchSegmentChanges(start, metadata=stack.read)
    try:
        async with asyncio.timeout(10):
            async for response in call:
                received.extend(response.changes)
                if len(received) >= count:
                    break
    finally:
        call.cancel()
    return received


async def test_a_thresholds_change_is_applied_without_recompute_all(stack: Stack) -> None:
    profiles = [
        (await stack.track(*session(f"i-{i}", NOW - timedelta(days=3))))[0] for i in range(3)
    ]
    new = f.SmartSegmentCondition(segments=[NEW])
    created = await stack.segments.CreateSegment(
        pb.CreateSegmentRequest(display_name="New", filter=condition(smart_segment=new)),
        metadata=stack.admin,
    )
    segment_id = created.segment.segment_id
    assert created.segment.size == 3
    assert await distribution(stack) == {NEW: 3}
    before = len(await changes(stack, 6))  # the sessions' ENTERED New, the creation's ENTERED

    # New now lasts 2 days: the 3-day-old profiles are One-time, though nothing happened.
    await stack.tenancy.set_setting(stack.project.project_id, "segments.new_days", 2)

    async def applied() -> bool:
        return await distribution(stack) == {ONE_TIME: 3} and await size(stack, segment_id) == 0

    await eventually(applied)
    row = await stack.pool.fetchval(APPLIED, stack.project.project_id)
    assert '"segments.new_days": 2' in row
    # Each profile left New and entered One-time, and left the custom segment, all announced
    # as a recomputation.
    announced = (await changes(stack, before + 9))[before:]
    assert {c.cause for c in announced} == {segments_pb2.SEGMENT_CHANGE_CAUSE_RECOMPUTE}
    assert {(c.profile_id, c.transition, c.WhichOneof("segment")) for c in announced} == {
        (p, t, kind)
        for p in profiles
        for t, kind in (
            (segments_pb2.SEGMENT_TRANSITION_LEFT, "smart_segment"),
            (segments_pb2.SEGMENT_TRANSITION_ENTERED, "smart_segment"),
            (segments_pb2.SEGMENT_TRANSITION_LEFT, "custom_segment_id"),
        )
    }

    # And back: the default again (the setting set to it) restores New.
    await stack.tenancy.set_setting(stack.project.project_id, "segments.new_days", 7)

    async def restored() -> bool:
        return await distribution(stack) == {NEW: 3} and await size(stack, segment_id) == 3

    await eventually(restored)


async def test_recomputed_states_show_only_together_with_their_thresholds_record(
    stack: Stack,
) -> None:
    """The record of the thresholds applied commits with the recomputation's last states, so
    nobody sees the states recomputed and the record missing (what made the test above fail
    under load): while the record cannot be written, the recomputed states stay invisible."""
    for i in range(3):
        await stack.track(*session(f"i-{i}", NOW - timedelta(days=3)))
    assert await distribution(stack) == {NEW: 3}
    blocker = await stack.pool.acquire()
    try:
        transaction = blocker.transaction()
        await transaction.start()
        # Lets readers in and keeps every writer of the table waiting.
        await blocker.execute("LOCK TABLE segment_thresholds_applied IN EXCLUSIVE MODE")
        await stack.tenancy.set_setting(stack.project.project_id, "segments.new_days", 2)

        async def recording_waits() -> bool:
            waiting = await stack.pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE '%segment_thresholds_applied%'"
            )
            return bool(waiting)

        await eventually(recording_waits)
        assert await distribution(stack) == {NEW: 3}
        assert await stack.pool.fetchval(APPLIED, stack.project.project_id) is None
        await transaction.rollback()
    finally:
        await stack.pool.release(blocker)

    async def applied() -> bool:
        return await distribution(stack) == {ONE_TIME: 3}

    await eventually(applied)
    row = await stack.pool.fetchval(APPLIED, stack.project.project_id)
    assert '"segments.new_days": 2' in row
