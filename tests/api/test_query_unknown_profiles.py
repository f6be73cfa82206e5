"""ListEvents, ListSessions and GetActivity answer NOT_FOUND (PROFILE_NOT_FOUND) for a profile the
caller's project does not hold: an ID never issued, an erased profile, or another project's
profile. An empty page would tell a caller that a stranger's profile exists and is quiet."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from profiles.query.v1 import query_service_pb2 as pb
from tests.conftest import create_test_project, eventually
from tests.support.identity import error_info, new_id
from tests.support.query import NOW, Suite, custom_event, session_end, session_start, start_suite

FIRST_DAY = (NOW - timedelta(days=1)).date()

# Each RPC with a well-formed request for `profile_id`: only the profile can make it fail.
REQUESTS: dict[str, Callable[[str], Message]] = {
    "ListEvents": lambda profile_id: pb.ListEventsRequest(profile_id=profile_id),
    "ListSessions": lambda profile_id: pb.ListSessionsRequest(profile_id=profile_id),
    "GetActivity": lambda profile_id: pb.GetActivityRequest(
        profile_id=profile_id,
        start_date=FIRST_DAY.isoformat(),
        end_date=NOW.date().isoformat(),
        time_zone="UTC",
    ),
}


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


async def profile_with_a_session(suite: Suite) -> str:
    """A profile of the suite's project with one ended session and a custom event in it, as
    each of the three RPCs shows it to its own project."""
    inst = new_id()
    start = NOW - timedelta(hours=1)
    await suite.track(
        session_start(inst, "s1", start),
        custom_event(inst, time=start + timedelta(minutes=1)),
        session_end(inst, "s1", start + timedelta(minutes=2), 120),
    )
    profile_id = await suite.identity.profile_of(inst)
    events = await suite.call("ListEvents", REQUESTS["ListEvents"](profile_id))
    assert [e.custom.name for e in events.events if e.HasField("custom")] != []
    sessions = await suite.call("ListSessions", REQUESTS["ListSessions"](profile_id))
    assert [s.session_id for s in sessions.sessions] == ["s1"]
    activity = await suite.call("GetActivity", REQUESTS["GetActivity"](profile_id))
    assert sum(d.session_count for d in activity.days) == 1
    return profile_id


async def erased(suite: Suite) -> tuple[str, Any]:
    profile_id = await profile_with_a_session(suite)
    await suite.identity.delete(profile_id)

    async def gone() -> bool:
        try:
            await suite.get(profile_id=profile_id)
        except grpc.aio.AioRpcError as error:
            return error.code() == grpc.StatusCode.NOT_FOUND
        return False

    await eventually(gone, within=20)
    return profile_id, suite.project


async def never_issued(suite: Suite) -> tuple[str, Any]:
    return str(uuid.uuid4()), suite.project


async def another_projects(suite: Suite) -> tuple[str, Any]:
    profile_id = await profile_with_a_session(suite)
    return profile_id, await create_test_project(suite.database_url)


@pytest.mark.parametrize("profile", [never_issued, erased, another_projects])
@pytest.mark.parametrize("rpc", list(REQUESTS))
async def test_a_profile_the_project_does_not_hold_is_not_found_by_the_timeline_rpcs(
    suite: Suite, rpc: str, profile: Callable[[Suite], Any]
) -> None:
    profile_id, caller = await profile(suite)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(suite.query, rpc)(
            REQUESTS[rpc](profile_id), metadata=caller.metadata("read"), timeout=20
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "PROFILE_NOT_FOUND"
