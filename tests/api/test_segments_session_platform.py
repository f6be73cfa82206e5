"""A session's platform in segments is its device's, by ingest's rule (0056): SDKs send their
platform with some requests only (Countly's metrics come with begin_session, not with its
heartbeats and events; a Segment track without context is on API), and the edge sends the others
on PLATFORM_API. A device platform (iOS, Android, Web) always wins over API, whatever the order
of the events, of the bus messages, or of the parts a merge folds; a session only ever seen on
API is an API one. Checked where the platform shows: GetSmartSegment on one platform, and the
per-platform distribution the overview reads (segments_read_distribution).

Segments once kept the platform of the first event it saw of a session: an API heartbeat handled
before its start, or a derived session (whose start ingest publishes on its first event's
platform) followed by the SDK's events, stayed an API session in the per-platform segments."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.segments.v1 import segments_service_pb2 as pb
from profiles.segments.v1 import segments_service_pb2_grpc as pb_grpc
from shared.bus import Bus
from shared.clock import FrozenClock
from shared.topics import EVENTS, IDENTITY
from tests.conftest import eventually
from tests.support.ingest import custom_event
from tests.support.query import start_suite
from tests.support.segments import (
    ANDROID,
    drained,
    event,
    merged,
    new_id,
    publish_events,
    publish_identity,
)

if TYPE_CHECKING:
    from tests.conftest import StartServices, TestProject

NOW = datetime(2024, 3, 20, 12, 0, tzinfo=UTC)
API = types_pb2.PLATFORM_API
START = types_pb2.EVENT_KIND_SESSION_START
HEARTBEAT = types_pb2.EVENT_KIND_SESSION_HEARTBEAT
END = types_pb2.EVENT_KIND_SESSION_END
CUSTOM = types_pb2.EVENT_KIND_CUSTOM


def at(minute: int) -> datetime:
    """A time on the day before NOW (sessions of yesterday: New, one session each)."""
    return datetime(2024, 3, 19, 9, minute, tzinfo=UTC)


def session_event(
    profile_id: str,
    kind: int,
    minute: int,
    platform: int,
    session_id: str,
    *,
    duration: timedelta | None = None,
) -> Any:
    return event(
        profile_id,
        kind,
        at(minute),
        installation_id="phone",
        session_id=session_id,
        platform=platform,
        duration=duration,
    )


@dataclass
class Segments:
    stub: pb_grpc.SegmentsServiceStub
    bus: Bus
    project: TestProject
    database_url: str

    async def publish(self, *batches: list[Any]) -> None:
        """Each batch as one EventsIngested message, in order."""
        for batch in batches:
            await publish_events(self.bus, self.project.project_id, batch)
        await eventually(lambda: drained(self.bus, EVENTS))

    async def sessions_on(self, profile_id: str, platform: int) -> int:
        """The profile's sessions on the platform, as GetSmartSegment classifies them."""
        reply = await self.stub.GetSmartSegment(
            pb.GetSmartSegmentRequest(profile_id=profile_id, platform=platform),  # type: ignore[arg-type]
            metadata=self.project.metadata("read"),
        )
        return reply.session_count

    async def distributed_on(self, platform: int) -> int:
        """Profiles the per-platform distribution counts on the platform (stored states)."""
        conn = await asyncpg.connect(self.database_url)
        try:
            return await conn.fetchval(  # type: ignore[no-any-return]
                "SELECT coalesce(sum(profile_count), 0)"
                " FROM segments_read_distribution($1, $2::smallint, $3)",
                self.project.project_id,
                platform,
                NOW,
            )
        finally:
            await conn.close()


@pytest.fixture
async def segments(
    start_services: StartServices, project: TestProject, database_url: str
) -> Segments:
    handle = (await start_services("segments", clock=FrozenClock(NOW)))["segments"]
    runtime = handle.running.runtime  # type: ignore[attr-defined]
    return Segments(pb_grpc.SegmentsServiceStub(handle.channel), runtime.bus, project, database_url)


async def test_a_countly_session_is_its_device_s_whatever_comes_first(segments: Segments) -> None:
    apart, together, server = new_id(), new_id(), new_id()
    # Countly: the API heartbeat (from the edge, without metrics) handled before the Android
    # begin_session, in separate bus messages ...
    await segments.publish(
        [session_event(apart, HEARTBEAT, 1, API, "s1", duration=timedelta(minutes=1))],
        [session_event(apart, START, 0, ANDROID, "s1")],
        # ... a later API end and API event keep it on Android.
        [
            session_event(apart, CUSTOM, 2, API, "s1"),
            session_event(apart, END, 3, API, "s1", duration=timedelta(minutes=3)),
        ],
    )
    # ... and in one message, the API heartbeat first, an API event after the start.
    await segments.publish(
        [
            session_event(together, HEARTBEAT, 1, API, "s2", duration=timedelta(minutes=1)),
            session_event(together, START, 0, ANDROID, "s2"),
            session_event(together, CUSTOM, 2, API, "s2"),
        ]
    )
    # A session only ever seen on API (a server's heartbeats) stays an API one.
    await segments.publish(
        [session_event(server, HEARTBEAT, 1, API, "s3", duration=timedelta(minutes=1))],
        [session_event(server, END, 2, API, "s3", duration=timedelta(minutes=2))],
    )
    for profile in (apart, together):
        assert (await segments.sessions_on(profile, ANDROID), profile) == (1, profile)
        assert (await segments.sessions_on(profile, API), profile) == (0, profile)
        assert (await segments.sessions_on(profile, 0), profile) == (1, profile)
    assert await segments.sessions_on(server, API) == 1
    assert await segments.sessions_on(server, ANDROID) == 0
    assert (await segments.distributed_on(ANDROID), await segments.distributed_on(API)) == (2, 1)


async def test_a_derived_session_first_seen_on_api_becomes_its_device_s(
    segments: Segments,
) -> None:
    apart, together = new_id(), new_id()
    # Ingest publishes a derived session's start on its first event's platform, here a Segment
    # track without context (API); the SDK's next track brings Android, in a later message ...
    await segments.publish(
        [
            session_event(apart, START, 0, API, "d1"),
            session_event(apart, CUSTOM, 0, API, "d1"),
        ],
        [session_event(apart, CUSTOM, 5, ANDROID, "d1")],
        [session_event(apart, CUSTOM, 6, API, "d1")],
    )
    # ... or in the same one.
    await segments.publish(
        [
            session_event(together, START, 0, API, "d2"),
            session_event(together, CUSTOM, 0, API, "d2"),
            session_event(together, CUSTOM, 5, ANDROID, "d2"),
            session_event(together, CUSTOM, 6, API, "d2"),
        ]
    )
    for profile in (apart, together):
        assert (await segments.sessions_on(profile, ANDROID), profile) == (1, profile)
        assert (await segments.sessions_on(profile, API), profile) == (0, profile)
    assert (await segments.distributed_on(ANDROID), await segments.distributed_on(API)) == (2, 0)


async def test_other_events_of_a_session_tell_its_platform_but_count_none(
    segments: Segments,
) -> None:
    profile = new_id()
    await segments.publish(
        [session_event(profile, START, 0, API, "k1")],
        # Events of a session segments never saw a start, heartbeat or end of: no session.
        [session_event(profile, CUSTOM, 1, ANDROID, "k2")],
        [session_event(profile, CUSTOM, 2, ANDROID, "k1")],
    )
    assert await segments.sessions_on(profile, 0) == 1
    assert await segments.sessions_on(profile, ANDROID) == 1
    assert await segments.sessions_on(profile, API) == 0


async def test_a_merge_keeps_the_device_platform_of_either_part(segments: Segments) -> None:
    project_id = segments.project.project_id
    # Two parts of one session (a person who logged out and back in within it): the API part
    # merged into the Android part, and the Android part into the API part.
    (api_source, android_target), (android_source, api_target) = pairs = [
        (new_id(), new_id()),
        (new_id(), new_id()),
    ]
    # Three parts, two of them moving: the source's API part with the known start (a derived
    # session's), and the Android part of a tombstone the merge redirects.
    source, tombstone, target = new_id(), new_id(), new_id()
    await segments.publish(
        [
            session_event(android_target, START, 0, ANDROID, "m1"),
            session_event(api_source, HEARTBEAT, 5, API, "m1", duration=timedelta(minutes=5)),
            session_event(api_target, HEARTBEAT, 1, API, "m2", duration=timedelta(minutes=1)),
            # The Android part's activity ends earlier: the device platform still wins.
            session_event(android_source, START, 0, ANDROID, "m2"),
            session_event(target, HEARTBEAT, 2, API, "m3", duration=timedelta(minutes=2)),
            session_event(source, START, 0, API, "m3"),
            session_event(tombstone, HEARTBEAT, 1, ANDROID, "m3", duration=timedelta(minutes=1)),
        ]
    )
    for one, other in pairs:
        await publish_identity(segments.bus, project_id, merged(project_id, one, other))
    three = merged(project_id, source, target)
    three.redirected_profile_ids.append(tombstone)
    await publish_identity(segments.bus, project_id, three)
    await eventually(lambda: drained(segments.bus, IDENTITY))
    for profile in (android_target, api_target, target):
        assert (await segments.sessions_on(profile, ANDROID), profile) == (1, profile)
        assert (await segments.sessions_on(profile, API), profile) == (0, profile)
    assert (await segments.distributed_on(ANDROID), await segments.distributed_on(API)) == (3, 0)


async def test_a_segment_sdk_session_through_ingest_is_its_device_s(
    start_services: StartServices,
    settings_for_test: Any,
    project: TestProject,
    database_url: str,
) -> None:
    """End to end: a derived session whose first track is on API (no context), its next on
    Android, each sent alone to ingest; segments classifies it on Android."""
    suite = await start_suite(start_services, settings_for_test, project, database_url)
    handles = await start_services("segments", clock=suite.clock)
    stub = pb_grpc.SegmentsServiceStub(handles["segments"].channel)
    profile_id = ""
    for minute, platform in ((-10, API), (-5, ANDROID), (-4, API)):
        track = custom_event("phone", time=suite.clock.now() + timedelta(minutes=minute))
        track.platform = platform  # type: ignore[assignment]
        track.session_rule = ingest_pb.SESSION_RULE_INACTIVITY
        reply = await suite.track(track)
        profile_id = profile_id or reply.results[0].profile_id
    await suite.settle(groups=("query", "segments"))

    async def on(platform: int) -> int:
        reply = await stub.GetSmartSegment(
            pb.GetSmartSegmentRequest(profile_id=profile_id, platform=platform),  # type: ignore[arg-type]
            metadata=project.metadata("read"),
        )
        return reply.session_count

    assert (await on(0), await on(ANDROID), await on(API)) == (1, 1, 0)
