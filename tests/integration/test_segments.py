"""Segments on real PostgreSQL and Redis: consumers fed through the real streams, replays and
crashes, merges, erasures, the sweep of time-only transitions, and the distribution."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

import asyncpg
import pytest
from google.protobuf.message import Message

from services.segments.change_stream import ChangeStream
from services.segments.consumers import (
    SweepWorker,
    activities_of,
    on_events_ingested,
    on_identity_change,
)
from services.segments.errors import ProfileNotFound
from services.segments.model import Classification, SegmentFlag, SmartSegment
from services.segments.repository import SegmentsRepository
from services.segments.service import SegmentsService
from shared.bus import Bus, Consumer
from shared.clock import FrozenClock
from shared.db import create_pool
from shared.tenancy import TenancyRepository
from shared.topics import EVENTS, IDENTITY
from tests.support.segments import (
    ANDROID,
    IOS,
    deleted,
    describe,
    drained,
    merged,
    new_id,
    outbox_changes,
    publish_events,
    publish_identity,
    session,
    time_zone_event,
)

if TYPE_CHECKING:
    from tests.conftest import TestProject

NOW = datetime(2024, 3, 20, 12, 0, tzinfo=UTC)


def at(day: int, hour: int = 12, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2024, 3, day, hour, minute, second, tzinfo=UTC)


@dataclass
class Harness:
    pool: asyncpg.Pool
    bus: Bus
    clock: FrozenClock
    service: SegmentsService
    project_id: UUID
    tasks: list[tuple[Consumer, asyncio.Task[None]]] = field(default_factory=list)

    def start_consumer(
        self, topic: Any = EVENTS, name: str = "c1", handler: Callable[..., Any] | None = None
    ) -> Consumer:
        default = on_events_ingested if topic is EVENTS else on_identity_change
        consumer = Consumer(
            self.bus,
            topic,
            "segments",
            name,
            handler or functools.partial(default, self.service),
            block_ms=100,
            claim_idle_ms=60_000,
        )
        self.tasks.append((consumer, asyncio.create_task(consumer.run())))
        return consumer

    async def kill(self, consumer: Consumer) -> None:
        """Cancels the consumer's task, like a process that dies: nothing is acked after."""
        for item in list(self.tasks):
            if item[0] is consumer:
                item[1].cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await item[1]
                self.tasks.remove(item)

    async def stop(self) -> None:
        for consumer, task in self.tasks:
            consumer.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)

    async def settle(self, eventually: Callable[..., Any]) -> None:
        await eventually(lambda: drained(self.bus, EVENTS), message="events drained")
        await eventually(lambda: drained(self.bus, IDENTITY), message="identity drained")

    async def facts(self, profile_id: str, platform: int = 0) -> Any:
        return (await self.service.get_smart_segment(self.project_id, UUID(profile_id), platform))[
            1
        ]


@pytest.fixture
async def harness(
    database_url: str, redis_url: str, redis_prefix: str, project: TestProject
) -> AsyncIterator[Harness]:
    pool = await create_pool(database_url, max_size=5)
    bus = Bus.from_url(redis_url, redis_prefix)
    clock = FrozenClock(NOW)
    service = SegmentsService(
        SegmentsRepository(pool), TenancyRepository(pool), clock, ChangeStream(bus)
    )
    harness = Harness(pool, bus, clock, service, project.project_id)
    try:
        yield harness
    finally:
        await harness.stop()
        await bus.aclose()
        await pool.close()


async def test_sessions_from_the_stream_score_and_classify(
    harness: Harness, eventually: Callable[..., Any]
) -> None:
    harness.start_consumer()
    profile = new_id()
    hours_by_day = {14: (9, 10), 16: (9, 10, 11), 18: (9,), 19: (9, 10, 11)}
    events = [
        e
        for day, hours in hours_by_day.items()
        for hour in hours
        for e in session(profile, at(day, hour), 1.5)
    ]
    await publish_events(harness.bus, harness.project_id, events)
    await harness.settle(eventually)
    _, score = await harness.service.get_engagement(harness.project_id, UUID(profile))
    assert (score.score1, score.score2, score.score3, score.percentage) == (1.5, 9, 4, 19.29)
    facts = await harness.facts(profile)
    assert facts.classification == Classification(SmartSegment.NEW, SegmentFlag.PROMISING_NEW)
    assert facts.session_count == 9
    assert facts.total_active_days == 4
    assert facts.next_transition_time == at(21, 9)  # New ends 7 x 24 h after the first session
    # Entering is announced at the batch's latest event time.
    changes = await outbox_changes(harness.pool)
    assert [describe(c) for c in changes] == [
        (profile, "ENTERED", "NEW", "EVENT"),
        (profile, "ENTERED", "PROMISING_NEW", "EVENT"),
    ]
    assert {c.change_time.ToDatetime(tzinfo=UTC) for c in changes} == {at(19, 11, 1, 30)}


async def test_a_replayed_stream_message_counts_nothing_twice(
    harness: Harness, eventually: Callable[..., Any]
) -> None:
    harness.start_consumer()
    profile = new_id()
    events = [*session(profile, at(19, 9), 2), *session(profile, at(20, 9), 2)]
    for _ in range(3):  # the same events published three times, as a relay retry would
        await publish_events(harness.bus, harness.project_id, events)
    await harness.settle(eventually)
    facts = await harness.facts(profile)
    assert facts.session_count == 2
    assert facts.classification == Classification(SmartSegment.NEW, SegmentFlag.PROMISING_NEW)
    assert len(await outbox_changes(harness.pool)) == 2  # NEW and PROMISING_NEW, once


async def test_a_consumer_killed_mid_batch_and_restarted_loses_and_doubles_nothing(
    harness: Harness, eventually: Callable[..., Any]
) -> None:
    first, second = new_id(), new_id()
    events = [*session(first, at(19, 9), 3), *session(second, at(19, 10), 4)]
    halfway = asyncio.Event()

    async def dies_after_the_first_profile(project_id: str, message: Message, _: str) -> None:
        activities = activities_of(message)  # type: ignore[arg-type]
        await harness.service.record_activity(UUID(project_id), activities[:1])
        halfway.set()
        await asyncio.Event().wait()  # the process dies here, before the entry is acked

    doomed = harness.start_consumer(name="c1", handler=dies_after_the_first_profile)
    await publish_events(harness.bus, harness.project_id, events)
    await asyncio.wait_for(halfway.wait(), 10)
    await harness.kill(doomed)
    assert (await harness.facts(first)).session_count == 1
    with pytest.raises(ProfileNotFound):
        await harness.facts(second)

    harness.start_consumer(name="c1")  # the same replica restarted: re-reads its pending entry
    await harness.settle(eventually)
    for profile, minutes in ((first, 3), (second, 4)):
        facts = await harness.facts(profile)
        assert facts.session_count == 1
        _, score = await harness.service.get_engagement(harness.project_id, UUID(profile))
        assert score.average_session_duration == timedelta(minutes=minutes)
    assert [describe(c)[:3] for c in await outbox_changes(harness.pool)] == [
        (first, "ENTERED", "NEW"),
        (second, "ENTERED", "NEW"),
    ]


async def test_two_consumers_share_one_stream_and_count_each_session_once(
    harness: Harness, eventually: Callable[..., Any]
) -> None:
    harness.start_consumer(name="c1")
    harness.start_consumer(name="c2")
    profiles = [new_id() for _ in range(6)]
    for index, profile in enumerate(profiles):
        for day in (17, 19):
            await publish_events(
                harness.bus, harness.project_id, session(profile, at(day, 8 + index))
            )
    await harness.settle(eventually)
    for profile in profiles:
        facts = await harness.facts(profile)
        assert facts.session_count == 2
        assert facts.classification == Classification(SmartSegment.NEW, SegmentFlag.PROMISING_NEW)


async def test_a_merge_gives_the_survivor_the_union_of_both_histories(
    harness: Harness, eventually: Callable[..., Any]
) -> None:
    harness.start_consumer(EVENTS)
    harness.start_consumer(IDENTITY)
    source, target = new_id(), new_id()
    await publish_events(harness.bus, harness.project_id, session(source, at(1), 1))
    await publish_events(
        harness.bus, harness.project_id, session(target, at(2), 1) + session(target, at(19), 1)
    )
    await harness.settle(eventually)
    assert (await harness.facts(target)).classification == Classification(
        SmartSegment.DORMANT, SegmentFlag.PROMISING_DORMANT
    )

    await publish_identity(
        harness.bus, harness.project_id, merged(harness.project_id, source, target)
    )
    await harness.settle(eventually)
    # Replayed merge: nothing changes.
    await publish_identity(
        harness.bus, harness.project_id, merged(harness.project_id, source, target)
    )
    await harness.settle(eventually)

    facts = await harness.facts(target)
    assert facts.session_count == 3
    assert facts.first_session_time == at(1)
    live_id, by_old_id = await harness.service.get_smart_segment(
        harness.project_id, UUID(source), 0
    )
    assert str(live_id) == target
    assert by_old_id.session_count == 3
    # A late event of the merged-away profile lands on the survivor.
    await publish_events(harness.bus, harness.project_id, session(source, at(20, 9), 1))
    await harness.settle(eventually)
    facts = await harness.facts(target)
    assert facts.session_count == 4
    assert facts.classification == Classification(SmartSegment.ENGAGED)
    changes = [describe(c) for c in await outbox_changes(harness.pool)]
    assert changes[1:] == [
        (target, "ENTERED", "DORMANT", "EVENT"),
        (target, "ENTERED", "PROMISING_DORMANT", "EVENT"),
        (source, "LEFT", "ONE_TIME", "MERGE"),
        # The survivor stays Promising Dormant (March 1 is outside the window): no change.
        (target, "LEFT", "PROMISING_DORMANT", "EVENT"),
        (target, "LEFT", "DORMANT", "EVENT"),
        (target, "ENTERED", "ENGAGED", "EVENT"),
    ]


async def test_a_deletion_removes_every_trace_and_skips_late_events(
    harness: Harness, eventually: Callable[..., Any]
) -> None:
    harness.start_consumer(EVENTS)
    harness.start_consumer(IDENTITY)
    profile = new_id()
    await publish_events(harness.bus, harness.project_id, session(profile, at(19), 1))
    await harness.settle(eventually)
    await publish_identity(harness.bus, harness.project_id, deleted(harness.project_id, profile))
    await harness.settle(eventually)
    await publish_events(harness.bus, harness.project_id, session(profile, at(20, 9), 1))
    await harness.settle(eventually)
    with pytest.raises(ProfileNotFound):
        await harness.facts(profile)
    for table in ("segment_sessions", "segment_states"):
        count = await harness.pool.fetchval(
            f"SELECT count(*) FROM {table} WHERE profile_id = $1",
            UUID(profile),
        )
        assert count == 0, table
    row = await harness.pool.fetchrow(
        "SELECT time_zone, merged_into, erase_time FROM segment_profiles WHERE profile_id = $1",
        UUID(profile),
    )
    assert row is not None
    assert (row["time_zone"], row["merged_into"]) == (None, None)
    assert row["erase_time"] is not None
    changes = [describe(c) for c in await outbox_changes(harness.pool)]
    assert changes == [
        (profile, "ENTERED", "NEW", "EVENT"),
        (profile, "LEFT", "NEW", "DELETION"),
    ]


async def test_time_alone_moves_the_distribution_and_the_sweep_announces_it(
    harness: Harness, eventually: Callable[..., Any]
) -> None:
    harness.start_consumer()
    engaged, one_time = new_id(), new_id()
    await publish_events(
        harness.bus,
        harness.project_id,
        [
            *session(engaged, at(1)),
            *session(engaged, at(15)),
            *session(engaged, at(18)),
            *session(one_time, at(18)),
        ],
    )
    await harness.settle(eventually)
    distribution = await harness.service.distribution(harness.project_id)
    assert distribution.counts == {
        Classification(SmartSegment.ENGAGED): 1,
        Classification(SmartSegment.NEW): 1,
    }
    before = len(await outbox_changes(harness.pool))

    # March 29 00:00: March 15 left the window; March 25 12:00 was Risky, then New ended.
    harness.clock.set(datetime(2024, 3, 29, 0, 0, tzinfo=UTC))
    distribution = await harness.service.distribution(harness.project_id)
    assert distribution.counts == {
        Classification(SmartSegment.DORMANT, SegmentFlag.PROMISING_DORMANT): 1,
        Classification(SmartSegment.ONE_TIME): 1,
    }
    assert len(await outbox_changes(harness.pool)) == before  # exact before any sweep

    sweep = SweepWorker(harness.service, harness.clock, batch=1)
    assert await sweep.sweep_once() == 4  # all platforms and iOS, for each profile
    assert await sweep.sweep_once() == 0
    changes = await outbox_changes(harness.pool)
    assert [(describe(c), c.change_time.ToDatetime(tzinfo=UTC)) for c in changes[before:]] == [
        ((engaged, "ENTERED", "RISKY_ENGAGED", "TIME"), at(25)),
        ((engaged, "LEFT", "RISKY_ENGAGED", "TIME"), at(29, 0)),
        ((engaged, "LEFT", "ENGAGED", "TIME"), at(29, 0)),
        ((engaged, "ENTERED", "DORMANT", "TIME"), at(29, 0)),
        ((engaged, "ENTERED", "PROMISING_DORMANT", "TIME"), at(29, 0)),
        ((one_time, "LEFT", "NEW", "TIME"), at(25)),
        ((one_time, "ENTERED", "ONE_TIME", "TIME"), at(25)),
    ]
    assert (await harness.service.distribution(harness.project_id)).counts == distribution.counts
    # Reads agree with the stored columns.
    assert (await harness.facts(engaged)).classification == Classification(
        SmartSegment.DORMANT, SegmentFlag.PROMISING_DORMANT
    )


async def test_an_event_after_a_missed_transition_announces_both(
    harness: Harness, eventually: Callable[..., Any]
) -> None:
    harness.start_consumer()
    profile = new_id()
    await publish_events(harness.bus, harness.project_id, session(profile, at(18)))
    await harness.settle(eventually)
    harness.clock.set(at(27))  # New ended on March 25 with no sweep since
    await publish_events(harness.bus, harness.project_id, session(profile, at(27, 9)))
    await harness.settle(eventually)
    changes = await outbox_changes(harness.pool)
    assert [(describe(c)[1:], c.change_time.ToDatetime(tzinfo=UTC)) for c in changes] == [
        (("ENTERED", "NEW", "EVENT"), at(18, 12, 1)),
        (("LEFT", "NEW", "TIME"), at(25)),
        (("ENTERED", "ONE_TIME", "TIME"), at(25)),
        # March 18 and 27 are two active days of the window: Engaged.
        (("LEFT", "ONE_TIME", "EVENT"), at(27, 9, 1)),
        (("ENTERED", "ENGAGED", "EVENT"), at(27, 9, 1)),
    ]


async def test_the_distribution_per_platform_classifies_by_that_platform_only(
    harness: Harness, eventually: Callable[..., Any]
) -> None:
    harness.start_consumer()
    both, android_only = new_id(), new_id()
    await publish_events(
        harness.bus,
        harness.project_id,
        [
            *session(both, at(1), platform=IOS),
            *session(both, at(19), platform=IOS),
            *session(both, at(2), platform=ANDROID),
            *session(android_only, at(19), platform=ANDROID),
        ],
    )
    await harness.settle(eventually)
    dist = harness.service.distribution
    assert (await dist(harness.project_id)).counts == {
        Classification(SmartSegment.DORMANT, SegmentFlag.PROMISING_DORMANT): 1,
        Classification(SmartSegment.NEW): 1,
    }
    assert (await dist(harness.project_id, IOS)).counts == {
        Classification(SmartSegment.DORMANT, SegmentFlag.PROMISING_DORMANT): 1
    }
    assert (await dist(harness.project_id, ANDROID)).counts == {
        Classification(SmartSegment.ONE_TIME): 1,
        Classification(SmartSegment.NEW): 1,
    }
    assert (await harness.facts(both, ANDROID)).classification == Classification(
        SmartSegment.ONE_TIME
    )
    web = await harness.facts(both, 3)
    assert web.classification == Classification()
    assert web.session_count == 0


async def test_days_follow_the_profile_time_zone(
    harness: Harness, eventually: Callable[..., Any]
) -> None:
    harness.start_consumer()
    profile = new_id()
    # 09:30 and 10:30 UTC on March 19: one UTC day, two days in Kiritimati (UTC+14).
    events = [*session(profile, at(19, 9, 30), 1), *session(profile, at(19, 10, 30), 1)]
    await publish_events(harness.bus, harness.project_id, events)
    await harness.settle(eventually)
    _, score = await harness.service.get_engagement(harness.project_id, UUID(profile))
    assert (score.score3, score.time_zone) == (1, "UTC")
    await publish_events(
        harness.bus,
        harness.project_id,
        [
            await time_zone_event(
                harness.pool, harness.project_id, profile, "Pacific/Kiritimati", at(19)
            )
        ],
    )
    await harness.settle(eventually)
    _, score = await harness.service.get_engagement(harness.project_id, UUID(profile))
    assert (score.score3, score.time_zone) == (2, "Pacific/Kiritimati")
    facts = await harness.facts(profile)
    assert facts.classification == Classification(SmartSegment.NEW, SegmentFlag.PROMISING_NEW)
