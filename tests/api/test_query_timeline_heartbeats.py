"""ListEvents' `exclude_heartbeats`: a timeline without the session heartbeats that clutter
every session, with the sessions' starts and ends and every other kind kept, combined with the
other filters and across pages; a page token holds only for the same value."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest

from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.query.v1 import query_service_pb2 as pb
from profiles.query.v1 import timeline_pb2 as k
from shared.convert import timestamp_of
from tests.support.identity import error_info, new_id
from tests.support.query import (
    NOW,
    Suite,
    base_event,
    custom_event,
    session_end,
    session_start,
    start_suite,
)


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


def heartbeat(
    installation_id: str, session_id: str, at: timedelta, seconds: int
) -> ingest_pb.Event:
    event = base_event(installation_id, NOW - timedelta(hours=1) + at)
    event.session_id = session_id
    event.session_heartbeat.duration.FromTimedelta(timedelta(seconds=seconds))
    return event


async def a_session_with_heartbeats(suite: Suite) -> tuple[str, dict[str, str]]:
    """A profile with one session: a start, 6 heartbeats, 2 custom events and an end; its ID
    and each event's title by ID."""
    inst = new_id()
    began = NOW - timedelta(hours=1)
    events = [
        session_start(inst, "s1", began),
        *(heartbeat(inst, "s1", timedelta(seconds=10 * n), 10 * n) for n in range(1, 7)),
        custom_event(inst, name="view", time=began + timedelta(seconds=15)),
        custom_event(inst, name="buy", time=began + timedelta(seconds=45)),
        session_end(inst, "s1", began + timedelta(seconds=70), 70),
    ]
    for event in events[-3:-1]:
        event.session_id = "s1"
    reply = await suite.track(*events)
    assert reply.rejected_count == 0, reply
    titles = {}
    for event in events:
        which = event.WhichOneof("payload")
        titles[event.event_id] = event.custom.name if which == "custom" else which
    return await suite.identity.profile_of(inst), titles


async def listed(suite: Suite, request: pb.ListEventsRequest) -> list[str]:
    """Every page's events, by the titles of `a_session_with_heartbeats`."""
    ids: list[str] = []
    for _ in range(20):
        reply = await suite.call("ListEvents", request)
        ids.extend(e.event_id for e in reply.events)
        if not reply.next_page_token:
            return ids
        request.page_token = reply.next_page_token
    raise AssertionError("a page that does not move on")


async def test_heartbeats_are_left_out_and_the_rest_kept(suite: Suite) -> None:
    profile_id, titles = await a_session_with_heartbeats(suite)

    every = await listed(suite, pb.ListEventsRequest(profile_id=profile_id, page_size=3))
    assert [titles[i] for i in every].count("session_heartbeat") == 6

    without = await listed(
        suite, pb.ListEventsRequest(profile_id=profile_id, page_size=2, exclude_heartbeats=True)
    )
    # Newest first, across pages: the end, the events, the start; no heartbeat.
    assert [titles[i] for i in without] == ["session_end", "buy", "view", "session_start"]

    # With a kind filter: the sessions' own events without their heartbeats.
    sessions = await listed(
        suite,
        pb.ListEventsRequest(
            profile_id=profile_id,
            kinds=[k.TIMELINE_EVENT_KIND_SESSION],
            exclude_heartbeats=True,
        ),
    )
    assert [titles[i] for i in sessions] == ["session_end", "session_start"]
    # With a session and a time range: the range's events of that session, no heartbeat.
    ranged = await listed(
        suite,
        pb.ListEventsRequest(
            profile_id=profile_id,
            session_id="s1",
            start_time=timestamp_of(NOW - timedelta(hours=1) + timedelta(seconds=5)),
            end_time=timestamp_of(NOW - timedelta(hours=1) + timedelta(seconds=60)),
            exclude_heartbeats=True,
        ),
    )
    assert [titles[i] for i in ranged] == ["buy", "view"]


async def test_a_page_token_holds_only_for_the_same_value(suite: Suite) -> None:
    profile_id, _ = await a_session_with_heartbeats(suite)
    first = await suite.call(
        "ListEvents",
        pb.ListEventsRequest(profile_id=profile_id, page_size=2, exclude_heartbeats=True),
    )
    assert first.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await suite.call(
            "ListEvents",
            pb.ListEventsRequest(
                profile_id=profile_id, page_size=2, page_token=first.next_page_token
            ),
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(raised.value).reason == "PAGE_TOKEN_INVALID"
    # And the other way: a token of the whole timeline does not continue one without them.
    whole = await suite.call("ListEvents", pb.ListEventsRequest(profile_id=profile_id, page_size=2))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await suite.call(
            "ListEvents",
            pb.ListEventsRequest(
                profile_id=profile_id,
                page_size=2,
                page_token=whole.next_page_token,
                exclude_heartbeats=True,
            ),
        )
    assert error_info(raised.value).reason == "PAGE_TOKEN_INVALID"
