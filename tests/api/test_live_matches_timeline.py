"""The live feed (WatchProfile) shows the events the timeline (ListEvents) shows after a reload,
and no others: sessions ingest derives for SDKs that send none (Segment, PostHog without
`$session_id`) are listed by ListSessions and told to segments on the events stream, but their
session start is no stored event, so it is no live `event` item either."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.query.v1 import query_service_pb2 as pb
from services.ingest.app import make_build
from services.ingest.derived_sessions import derived_session_id
from services.ingest.session_derivation import start_event_id
from tests.conftest import eventually
from tests.support.identity import new_id
from tests.support.ingest_running import stream_events
from tests.support.query import (
    NOW,
    Suite,
    custom_event,
    pages,
    round_trip,
    session_start,
    start_suite,
)

MINUTE = timedelta(minutes=1)


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


def inactive(installation_id: str, name: str, minutes_ago: float) -> ingest_pb.Event:
    """An event as the edge sends Segment's: no session ID, ingest derives its session."""
    event = custom_event(installation_id, name=name, time=NOW - minutes_ago * MINUTE)
    event.platform = types_pb2.PLATFORM_ANDROID
    event.session_rule = ingest_pb.SESSION_RULE_INACTIVITY
    return event


async def live_events_until(
    call: grpc.aio.UnaryStreamCall,  # type: ignore[type-arg]
    wanted: set[str],
) -> list[pb.WatchProfileResponse]:
    """The feed's `event` items, read until every ID in `wanted` came."""
    seen: list[pb.WatchProfileResponse] = []
    async with asyncio.timeout(20):
        while not wanted <= {i.event.event_id for i in seen}:
            item = await call.read()
            assert item is not grpc.aio.EOF
            round_trip(item)
            assert item.WhichOneof("item") != "dropped", item
            if item.WhichOneof("item") == "event":
                seen.append(item)
    return seen


async def test_every_live_event_of_a_derived_session_is_in_the_timeline_and_back(
    suite: Suite,
) -> None:
    inst = new_id()
    # The profile exists before the watch; this event asks for no session (all events here are
    # within 30 minutes of the clock: the sweeper closes no session while the test runs).
    await suite.track(custom_event(inst, name="installed", time=NOW - 29 * MINUTE))
    profile_id = await suite.identity.profile_of(inst)
    call = suite.query.WatchProfile(
        pb.WatchProfileRequest(profile_id=profile_id), metadata=suite.project.metadata("read")
    )
    async with asyncio.timeout(10):
        started = await call.read()
    assert started.WhichOneof("item") == "started"

    # A new derived session (its start published for segments), a later batch joining it, a
    # late event moving its start earlier, and a session the SDK started itself (PostHog's
    # `$session_id`: a stored event like any other).
    first = [inactive(inst, "coupon_applied", 10), inactive(inst, "viewed", 9)]
    later = [inactive(inst, "paid", 5)]
    late = [
        inactive(inst, "opened", 20),
        session_start(inst, "ph-1", NOW - 2 * MINUTE, platform=types_pb2.PLATFORM_ANDROID),
    ]
    tracked: list[str] = []
    for batch in (first, later, late):
        reply = await suite.track(*batch)
        assert reply.accepted_count == len(batch)
        tracked.extend(e.event_id for e in batch)
    live = await live_events_until(call, set(tracked))
    call.cancel()

    timeline = await pages(
        suite, "ListEvents", pb.ListEventsRequest(profile_id=profile_id, page_size=100), "events"
    )
    listed = {e.event_id: e for e in timeline}
    # Every live event is in the timeline, as the timeline shows it; every tracked one came live.
    for item in live:
        assert item.event.event_id in listed, item.event
        assert item.event == listed[item.event.event_id]
    assert set(tracked) <= {i.event.event_id for i in live}
    assert len(live) == len({i.event.event_id for i in live})  # each once

    # The derived session is not lost: its events carry it, ListSessions lists it from its
    # earliest event, and segments still get its start on the events stream.
    session_id = derived_session_id(inst, first[0].event_id)
    assert {listed[e.event_id].session_id for e in [*first, *later, late[0]]} == {session_id}
    sessions = await pages(
        suite, "ListSessions", pb.ListSessionsRequest(profile_id=profile_id), "sessions"
    )
    derived = [s for s in sessions if s.session_id == session_id]
    assert [s.start_time for s in derived] == [late[0].event_time]

    async def start_on_the_stream() -> bool:
        published = await stream_events(suite.redis_url, suite.redis_prefix)
        return start_event_id(session_id) in {e.event_id for e in published}

    await eventually(start_on_the_stream)


@pytest.fixture
async def sweeping_suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    # The idle sweep every 50 ms: a session idle for over 30 minutes closes at once.
    return await start_suite(
        start_services,
        settings_for_test,
        project,
        database_url,
        ingest_build=make_build(sweep_interval_s=0.05),
    )


async def test_a_session_closed_idle_is_no_live_event_as_it_is_in_no_timeline(
    sweeping_suite: Suite,
) -> None:
    """The idle sweep closes a session with an end of its own making (`session_timeout:...`),
    told to segments on the events stream but stored as no event: a live feed showing it would
    show what no reload shows."""
    suite = sweeping_suite
    installation = new_id()
    await suite.track(custom_event(installation, name="first", time=NOW - 180 * MINUTE))
    profile_id = await suite.identity.profile_of(installation)
    call = suite.query.WatchProfile(
        pb.WatchProfileRequest(profile_id=profile_id), metadata=suite.project.metadata("read")
    )
    try:
        assert (await call.read()).WhichOneof("item") == "started"
        await suite.track(session_start(installation, "s1", NOW - 120 * MINUTE))

        async def closed_idle() -> bool:
            sessions = await pages(
                suite, "ListSessions", pb.ListSessionsRequest(profile_id=profile_id), "sessions"
            )
            return [s.timed_out for s in sessions] == [True]

        await eventually(closed_idle, within=20)
        # A later event, told after the sweep: every live item before it has come.
        marker = custom_event(installation, name="marker", time=NOW - 60 * MINUTE)
        await suite.track(marker)
        live = await live_events_until(call, {marker.event_id})
    finally:
        call.cancel()
    timeline = await pages(
        suite, "ListEvents", pb.ListEventsRequest(profile_id=profile_id), "events"
    )
    stored = {e.event_id for e in timeline}
    assert [i.event.event_id for i in live if i.event.event_id not in stored] == []
