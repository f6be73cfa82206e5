"""RecomputeAll's batched reclassification (200 profiles per transaction, a few statements each)
stores exactly what the one-profile path of an event stores: nothing moves when the thresholds
did not change, and after a change every stored state equals the classification computed from
the sessions at read time, per platform and in each profile's time zone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

from services.segments.definitions import DefinitionsService
from services.segments.definitions_repository import DefinitionsRepository
from services.segments.model import RecomputePhase
from services.segments.repository import SegmentsRepository
from services.segments.service import SegmentsService
from shared.tenancy import TenancyRepository
from shared.topics import EVENTS
from tests.integration.test_segments import Harness, at, harness
from tests.support.segments import (
    ANDROID,
    IOS,
    WEB,
    new_id,
    publish_events,
    session,
    time_zone_event,
)

__all__ = ["harness"]

STATES = """
    SELECT profile_id, platform, segment, flag, next_transition_time, upcoming_times,
           upcoming_segments, upcoming_flags
    FROM segment_states WHERE project_id = $1 ORDER BY profile_id, platform"""


async def stored(h: Harness) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await h.pool.fetch(STATES, h.project_id)]


async def recompute(h: Harness) -> int:
    progress = [p async for p in h.service.recompute_all(h.project_id)]
    assert progress[-1].phase == RecomputePhase.DONE
    return progress[-1].changed_profile_count


async def test_batched_recompute_stores_what_each_profile_classifies_to(
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
    profiles = [new_id() for _ in range(6)]
    tokyo, engaged, new, multi, late, once = profiles
    await publish_events(
        h.bus,
        h.project_id,
        [
            await time_zone_event(h.pool, h.project_id, tokyo, "Asia/Tokyo", at(1)),
            *session(tokyo, at(14, 23, 30)),  # the 15th in Tokyo
            *session(tokyo, at(15, 1)),
            *session(engaged, at(2)),
            *session(engaged, at(16)),
            *session(engaged, at(18)),
            *session(new, at(18), platform=WEB),
            *session(multi, at(3), platform=IOS),
            *session(multi, at(17), platform=ANDROID),
            *session(multi, at(19), platform=WEB),
            await time_zone_event(h.pool, h.project_id, late, "America/Los_Angeles", at(1)),
            *session(late, at(5)),
            *session(late, at(19, 6)),  # the 18th in Los Angeles
            *session(once, at(4)),
        ],
    )
    await h.settle(eventually)
    before = await stored(h)
    assert {r[0] for r in before} == {UUID(p) for p in profiles}

    # Same thresholds: nothing to change, nothing announced.
    assert await recompute(h) == 0
    assert await stored(h) == before

    # New thresholds: every stored state is what the sessions classify to now, per platform.
    # (New lasts 3 days: the Tokyo profile, 6 days old, has one active day in its zone, two in
    # UTC, so it is Dormant, flagged Promising Dormant, only if its zone is used.)
    await tenancy.set_setting(h.project_id, "segments.new_days", 3)
    assert await recompute(h) > 0
    rows = await stored(h)
    assert rows != before
    for profile_id, platform, segment, flag, *_ in rows:
        _, facts = await h.service.get_smart_segment(h.project_id, profile_id, platform)
        assert (segment, flag) == (facts.classification.segment, facts.classification.flag), (
            profile_id,
            platform,
        )
    assert {(r[0], r[1]) for r in rows} == {(r[0], r[1]) for r in before}
    dormant, promising_dormant = 4, 2
    assert [(r[2], r[3]) for r in rows if r[0] == UUID(tokyo) and r[1] == 0] == [
        (dormant, promising_dormant)
    ]
