"""A rejected event names the profile it arrived for (`RejectedEvent.profile_id`), so that a
console can open that person from the row: the survivor after a merge, nothing when ingest
knew no profile for it."""

from __future__ import annotations

import pytest

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.query.v1 import query_service_pb2 as pb
from tests.support.identity import new_id
from tests.support.query import Suite, custom_event, start_suite


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


def no_platform(installation_id: str) -> ingest_pb.Event:
    event = custom_event(installation_id)
    event.platform = types_pb2.PLATFORM_UNSPECIFIED
    return event


async def rejected_by_installation(suite: Suite) -> dict[str, str]:
    reply = await suite.call("ListRejectedEvents", pb.ListRejectedEventsRequest(page_size=500))
    return {r.installation_id: r.profile_id for r in reply.rejected_events}


async def test_a_row_names_its_profile_the_survivor_after_a_merge_or_none(suite: Suite) -> None:
    known, merged = new_id(), new_id()
    for installation in (known, merged):
        assert (await suite.track(custom_event(installation))).rejected_count == 0
    profile = await suite.identity.profile_of(known)
    source = await suite.identity.profile_of(merged)
    unknown = new_id()  # no accepted event: identity knows no profile for it yet
    await suite.track(no_platform(known), no_platform(merged), no_platform(unknown))

    rows = await rejected_by_installation(suite)
    assert rows == {known: profile, merged: source, unknown: ""}

    await suite.identity.merge(source, profile)
    assert (await rejected_by_installation(suite))[merged] == profile
    # The profile's own list names it on each row too.
    mine = await suite.call("ListRejectedEvents", pb.ListRejectedEventsRequest(profile_id=profile))
    assert {r.profile_id for r in mine.rejected_events} == {profile}
