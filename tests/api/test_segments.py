"""Segments over real gRPC, PostgreSQL and Redis: engagement and smart segments exact as of a
moved clock, platform filters, errors with field paths, and the resumable change stream."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from profiles.common.v1 import types_pb2
from profiles.segments.v1 import segments_pb2
from profiles.segments.v1 import segments_service_pb2 as pb
from profiles.segments.v1 import segments_service_pb2_grpc as pb_grpc
from shared.bus import Bus
from shared.clock import FrozenClock
from shared.topics import EVENTS, SEGMENT_CHANGES
from tests.conftest import eventually
from tests.support.segments import (
    ANDROID,
    IOS,
    WEB,
    drained,
    new_id,
    publish_events,
    session,
)

if TYPE_CHECKING:
    from tests.conftest import StartServices, TestProject

NOW = datetime(2024, 3, 20, 12, 0, tzinfo=UTC)
ENGAGED = types_pb2.SMART_SEGMENT_ENGAGED
DORMANT = types_pb2.SMART_SEGMENT_DORMANT
NEW = types_pb2.SMART_SEGMENT_NEW
ONE_TIME = types_pb2.SMART_SEGMENT_ONE_TIME
RISKY = types_pb2.SMART_SEGMENT_FLAG_RISKY_ENGAGED
PROMISING_DORMANT = types_pb2.SMART_SEGMENT_FLAG_PROMISING_DORMANT
NO_FLAG = types_pb2.SMART_SEGMENT_FLAG_UNSPECIFIED


def at(day: int, hour: int = 12, minute: int = 0) -> datetime:
    return datetime(2024, 3, day, hour, minute, tzinfo=UTC)


def error_details(error: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    """(ErrorInfo reason, BadRequest field paths) of a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    reason, fields = "", []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(bad):
            fields.extend(v.field for v in bad.field_violations)
    return reason, fields


@dataclass
class Segments:
    stub: pb_grpc.SegmentsServiceStub
    bus: Bus
    clock: FrozenClock
    project: TestProject

    @property
    def read(self) -> Any:
        return self.project.metadata("read")

    async def publish(self, events: list[Any]) -> None:
        await publish_events(self.bus, self.project.project_id, events)
        await eventually(lambda: drained(self.bus, EVENTS))

    async def smart_segment(self, profile_id: str, platform: int = 0) -> pb.GetSmartSegmentResponse:
        return await self.stub.GetSmartSegment(
            pb.GetSmartSegmentRequest(profile_id=profile_id, platform=platform),  # type: ignore[arg-type]
            metadata=self.read,
        )


@pytest.fixture
async def segments(start_services: StartServices, project: TestProject) -> Segments:
    clock = FrozenClock(NOW)
    handle = (await start_services("segments", clock=clock))["segments"]
    runtime = handle.running.runtime  # type: ignore[attr-defined]
    return Segments(pb_grpc.SegmentsServiceStub(handle.channel), runtime.bus, clock, project)


async def test_get_engagement_returns_the_three_parts_and_the_percentage(
    segments: Segments,
) -> None:
    profile = new_id()
    hours_by_day = {14: (9, 10), 16: (9, 10, 11), 18: (9,), 19: (9, 10, 11)}
    await segments.publish(
        [
            e
            for d, hours in hours_by_day.items()
            for h in hours
            for e in session(profile, at(d, h), 1.5)
        ]
    )
    response = await segments.stub.GetEngagement(
        pb.GetEngagementRequest(profile_id=profile), metadata=segments.read
    )
    assert (response.score1, response.score2, response.score3) == (1.5, 9, 4)
    assert response.score == pytest.approx(54.0)
    assert response.percentage == 19.29
    assert response.session_count == 9
    assert response.average_session_duration.ToSeconds() == 90
    assert response.window_end_time.ToDatetime(tzinfo=UTC) == NOW
    assert response.time_zone == "UTC"
    # A week later every session is outside the 168 h window.
    segments.clock.set(at(26, 11, 1))
    later = await segments.stub.GetEngagement(
        pb.GetEngagementRequest(profile_id=profile), metadata=segments.read
    )
    assert (later.score2, later.score, later.percentage) == (0, 0.0, 0.0)


async def test_smart_segment_follows_the_clock_at_both_sides_of_each_threshold(
    segments: Segments,
) -> None:
    profile = new_id()
    await segments.publish(
        [*session(profile, at(1)), *session(profile, at(15)), *session(profile, at(18))]
    )
    response = await segments.smart_segment(profile)
    assert (response.segment, response.flag) == (ENGAGED, NO_FLAG)
    assert response.next_transition_time.ToDatetime(tzinfo=UTC) == at(25)
    assert (response.recent_active_days, response.total_active_days) == (2, 3)
    assert response.session_count == 3
    assert response.first_session_time.ToDatetime(tzinfo=UTC) == at(1)
    assert response.last_session_time.ToDatetime(tzinfo=UTC) == at(18)

    expected = [
        (at(25, 11, 59), ENGAGED, NO_FLAG),
        (at(25), ENGAGED, RISKY),
        (at(28, 23, 59), ENGAGED, RISKY),
        (at(29, 0), DORMANT, PROMISING_DORMANT),
        (at(31, 23, 59), DORMANT, PROMISING_DORMANT),
        (datetime(2024, 4, 1, tzinfo=UTC), DORMANT, NO_FLAG),
    ]
    for moment, segment, flag in expected:
        segments.clock.set(moment)
        response = await segments.smart_segment(profile)
        assert (response.segment, response.flag) == (segment, flag), moment
        assert response.as_of_time.ToDatetime(tzinfo=UTC) == moment
    assert not response.HasField("next_transition_time")


async def test_new_becomes_one_time_exactly_seven_days_after_the_first_session(
    segments: Segments,
) -> None:
    profile = new_id()
    await segments.publish(session(profile, at(18)))
    segments.clock.set(at(25, 11, 59))
    assert (await segments.smart_segment(profile)).segment == NEW
    segments.clock.set(at(25))
    assert (await segments.smart_segment(profile)).segment == ONE_TIME


async def test_a_platform_filter_classifies_by_that_platform_only(segments: Segments) -> None:
    profile = new_id()
    await segments.publish(
        [
            *session(profile, at(1), platform=IOS),
            *session(profile, at(19), platform=IOS),
            *session(profile, at(18), platform=ANDROID),
        ]
    )
    assert (await segments.smart_segment(profile)).segment == ENGAGED
    ios = await segments.smart_segment(profile, IOS)
    assert (ios.segment, ios.flag, ios.platform) == (DORMANT, PROMISING_DORMANT, IOS)
    assert (await segments.smart_segment(profile, ANDROID)).segment == NEW
    web = await segments.smart_segment(profile, WEB)
    assert (web.segment, web.session_count) == (types_pb2.SMART_SEGMENT_UNSPECIFIED, 0)


async def test_bad_and_unknown_profiles_are_refused_with_field_paths(segments: Segments) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await segments.stub.GetEngagement(
            pb.GetEngagementRequest(profile_id="not-a-uuid"), metadata=segments.read
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(bad.value) == ("PROFILE_ID_INVALID", ["profile_id"])

    with pytest.raises(grpc.aio.AioRpcError) as platform:
        await segments.smart_segment(new_id(), 42)
    assert error_details(platform.value) == ("PLATFORM_INVALID", ["platform"])

    for call in (segments.stub.GetEngagement, segments.stub.GetSmartSegment):
        request_class = (
            pb.GetEngagementRequest
            if call is segments.stub.GetEngagement
            else pb.GetSmartSegmentRequest
        )
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await call(request_class(profile_id=new_id()), metadata=segments.read)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_details(missing.value)[0] == "PROFILE_NOT_FOUND"


async def read_changes(
    segments: Segments, request: pb.WatchSegmentChangesRequest, count: int
) -> list[segments_pb2.SegmentChange]:
    """Reads `count` changes from a new watch, then hangs up."""
    call = segments.stub.WatchSegmentChanges(request, metadata=segments.read)
    received: list[segments_pb2.SegmentChange] = []
    try:
        async with asyncio.timeout(15):
            async for response in call:
                assert 1 <= len(response.changes) <= 500
                received.extend(response.changes)
                if len(received) >= count:
                    break
    finally:
        call.cancel()
    return received


def summary(change: segments_pb2.SegmentChange) -> tuple[str, str]:
    which = change.WhichOneof("segment")
    name = (
        types_pb2.SmartSegment.Name(change.smart_segment)
        if which == "smart_segment"
        else types_pb2.SmartSegmentFlag.Name(change.flag)
    )
    return segments_pb2.SegmentTransition.Name(change.transition)[19:], name


async def stream_length(segments: Segments) -> int:
    return int(await segments.bus.redis.xlen(segments.bus.stream_key(SEGMENT_CHANGES.name)))


async def test_a_watcher_reconnecting_with_its_cursor_misses_nothing(segments: Segments) -> None:
    first, second = new_id(), new_id()
    await segments.publish([*session(first, at(18)), *session(first, at(19))])
    await eventually(lambda: _at_least(segments, 2))

    start = pb.WatchSegmentChangesRequest()
    start.start_time.FromDatetime(datetime(2000, 1, 1, tzinfo=UTC))
    opening = await read_changes(segments, start, 1)
    # The watcher handled only the first change before its connection dropped.
    assert (opening[0].profile_id, summary(opening[0])) == (first, ("ENTERED", "SMART_SEGMENT_NEW"))
    cursor = opening[0].cursor

    # While nobody watches, more changes are appended.
    await segments.publish([*session(second, at(19, 9))])
    await eventually(lambda: _at_least(segments, 3))

    resumed = await read_changes(segments, pb.WatchSegmentChangesRequest(start_after=cursor), 2)
    assert [(c.profile_id, summary(c)) for c in resumed] == [
        (first, ("ENTERED", "SMART_SEGMENT_FLAG_PROMISING_NEW")),
        (second, ("ENTERED", "SMART_SEGMENT_NEW")),
    ]
    assert resumed[0].cursor > cursor
    assert all(c.cause == segments_pb2.SEGMENT_CHANGE_CAUSE_EVENT for c in resumed)

    only_new = pb.WatchSegmentChangesRequest(smart_segment=NEW, start_after=cursor)
    filtered = await read_changes(segments, only_new, 1)
    assert [(c.profile_id, summary(c)) for c in filtered] == [
        (second, ("ENTERED", "SMART_SEGMENT_NEW"))
    ]


async def _at_least(segments: Segments, count: int) -> bool:
    return await stream_length(segments) >= count


async def test_bad_watch_requests_are_refused(segments: Segments) -> None:
    cases: list[tuple[pb.WatchSegmentChangesRequest, grpc.StatusCode, str, list[str]]] = [
        (
            pb.WatchSegmentChangesRequest(start_after="yesterday"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "CURSOR_INVALID",
            ["start_after"],
        ),
        (
            pb.WatchSegmentChangesRequest(smart_segment=types_pb2.SMART_SEGMENT_UNSPECIFIED),
            grpc.StatusCode.INVALID_ARGUMENT,
            "SEGMENT_FILTER_INVALID",
            ["smart_segment"],
        ),
        (
            pb.WatchSegmentChangesRequest(start_after="1-0"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "CURSOR_EXPIRED",
            [],
        ),
        (
            pb.WatchSegmentChangesRequest(custom_segment_id=new_id()),
            grpc.StatusCode.NOT_FOUND,
            "SEGMENT_NOT_FOUND",
            [],
        ),
    ]
    # A start time no change can carry yet: the watch would wait silently until then.
    for ahead in (timedelta(minutes=11), timedelta(days=365 * 7000)):
        future = pb.WatchSegmentChangesRequest()
        future.start_time.FromDatetime(datetime.now(UTC) + ahead)
        cases.append(
            (future, grpc.StatusCode.INVALID_ARGUMENT, "START_TIME_INVALID", ["start_time"])
        )
    for request, code, reason, fields in cases:
        call = segments.stub.WatchSegmentChanges(request, metadata=segments.read)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in call:
                pass
        assert error.value.code() == code, reason
        assert error_details(error.value) == (reason, fields)
