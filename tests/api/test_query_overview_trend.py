"""GetOverview's daily trend (`trend_days`): active profiles (a session started that UTC day) and
new profiles (first seen that day) per day, from events sent with past event times."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import grpc
import pytest

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.query.v1 import query_service_pb2 as pb
from tests.conftest import create_test_project
from tests.support.identity import new_id, violations
from tests.support.query import NOW, Suite, custom_event, session_start, start_suite

IOS, ANDROID, WEB = types_pb2.PLATFORM_IOS, types_pb2.PLATFORM_ANDROID, types_pb2.PLATFORM_WEB
TODAY = datetime.combine(NOW.date(), time(), UTC)


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


def day(days_ago: int, hour: int = 12) -> datetime:
    """A time of the UTC day `days_ago` days before NOW's."""
    return TODAY - timedelta(days=days_ago) + timedelta(hours=hour)


def trend(reply: pb.GetOverviewResponse) -> dict[int, tuple[int, int]]:
    """The days with a figure, by days before today: (active, new)."""
    days = list(reply.overview.daily)
    starts = [d.start_time.ToDatetime(tzinfo=UTC) for d in days]
    assert starts == [TODAY - timedelta(days=n) for n in reversed(range(len(days)))]
    return {
        len(days) - 1 - n: (d.active_profile_count, d.new_profile_count)
        for n, d in enumerate(days)
        if d.active_profile_count or d.new_profile_count
    }


async def overview(suite: Suite, **request: int) -> pb.GetOverviewResponse:
    reply: pb.GetOverviewResponse = await suite.call(
        "GetOverview", pb.GetOverviewRequest(**request)
    )
    return reply


async def test_the_trend_counts_each_profile_once_a_day_by_session_start_and_first_event(
    suite: Suite,
) -> None:
    a, b, c1, c2, f, g = (new_id() for _ in range(6))
    android_visit = custom_event(b, time=day(5))
    android_visit.platform = ANDROID
    await suite.track(
        # a: two sessions on one day count once; first seen 10 days ago.
        session_start(a, "a1", day(10, 9), platform=IOS),
        session_start(a, "a2", day(10, 15), platform=IOS),
        session_start(a, "a3", day(3), platform=IOS),
        # b: an event without a session makes it new, not active.
        android_visit,
        session_start(b, "b1", day(3), platform=ANDROID),
        # c1 and c2: one person on two devices, merged below.
        session_start(c1, "c1", day(7, 8), platform=IOS),
        session_start(c2, "c2", day(7, 20), platform=WEB),
        session_start(c2, "c3", day(2), platform=WEB),
        # f: today; g: a session starting at midnight belongs to the day it starts.
        session_start(f, "f1", NOW - timedelta(hours=1), platform=IOS),
        session_start(g, "g1", TODAY - timedelta(days=1), platform=IOS),
    )
    await suite.identity.identify(c1, "u-c")
    await suite.identity.identify(c2, "u-c")  # merges c2's profile into u-c's
    other = await create_test_project(suite.database_url)
    theirs = session_start(new_id(), "o1", day(3), platform=IOS)
    await suite.ingest.TrackEvents(
        ingest_pb.TrackEventsRequest(events=[theirs]), metadata=other.metadata("sdk"), timeout=20
    )
    await suite.settle()

    reply = await overview(suite, trend_days=30)
    assert len(reply.overview.daily) == 30
    assert trend(reply) == {
        10: (1, 1),
        7: (1, 1),
        5: (0, 1),
        3: (2, 0),
        2: (1, 0),
        1: (1, 1),
        0: (1, 1),
    }
    # The other figures are unchanged by the trend.
    plain = await overview(suite)
    assert list(plain.overview.daily) == []
    assert plain.overview.anonymous_profile_count == reply.overview.anonymous_profile_count == 4
    assert reply.overview.identified_profile_count == 1

    # A platform: sessions started on it, profiles with an installation of it.
    assert trend(await overview(suite, trend_days=30, platform=ANDROID)) == {5: (0, 1), 3: (1, 0)}
    # Fewer days: the same days counted back from today.
    assert trend(await overview(suite, trend_days=3)) == {2: (1, 0), 1: (1, 1), 0: (1, 1)}
    # The other project sees its own profile only.
    mine = await suite.query.GetOverview(
        pb.GetOverviewRequest(trend_days=30), metadata=other.metadata("read"), timeout=10
    )
    assert trend(mine) == {3: (1, 1)}

    # Redelivered messages recount without moving the counters again.
    await suite.replay_rollups()
    assert trend(await overview(suite, trend_days=30)) == {
        10: (1, 1),
        7: (1, 1),
        5: (0, 1),
        3: (2, 0),
        2: (1, 0),
        1: (1, 1),
        0: (1, 1),
    }
    # An erased profile no longer counts on any of its days.
    await suite.identity.delete(await suite.identity.profile_of(a))
    await suite.settle()
    assert trend(await overview(suite, trend_days=30)) == {
        7: (1, 1),
        5: (0, 1),
        3: (1, 0),
        2: (1, 0),
        1: (1, 1),
        0: (1, 1),
    }


async def test_the_trend_has_every_day_with_zeros_when_nothing_happened(suite: Suite) -> None:
    reply = await overview(suite, trend_days=90)
    assert len(reply.overview.daily) == 90
    assert trend(reply) == {}
    assert len((await overview(suite, trend_days=1)).overview.daily) == 1


@pytest.mark.parametrize("days", [-1, 91])
async def test_trend_days_outside_0_to_90_is_invalid(suite: Suite, days: int) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await overview(suite, trend_days=days)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == ["trend_days"]
