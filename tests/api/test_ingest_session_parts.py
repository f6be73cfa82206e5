"""One SDK session across a logout and a login on one installation (0054): each person has their
own part of it, counted from their own events; an erasure takes exactly the erased person's part;
a person who logs out and back in within the session has one part again (the merge folds them)."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest

from profiles.ingest.v1 import ingest_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from shared.clock import FrozenClock
from tests.support.identity import Identity
from tests.support.ingest import NOW, Ingest, custom_event
from tests.support.ingest_running import session_event

if TYPE_CHECKING:
    from tests.conftest import TestProject

MINUTE = timedelta(minutes=1)
START = NOW - 60 * MINUTE


@pytest.fixture
async def suite(
    start_services: Any, settings_for_test: Any, project: TestProject, database_url: str
) -> tuple[Ingest, Identity]:
    handles = await start_services("identity")
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": handles["identity"].address}
    )
    started = await start_services("ingest", settings=settings, clock=FrozenClock(NOW))
    ingest = Ingest(
        pb_grpc.IngestServiceStub(started["ingest"].channel),
        project.metadata("sdk"),
        project.metadata("admin"),
        database_url,
    )
    return ingest, Identity(handles["identity"].channel, project)


def in_session(event_id: str, minute: int) -> pb.Event:
    event = custom_event("phone", event_id=event_id, time=START + minute * MINUTE)
    event.session_id = "s1"
    return event


async def parts(ingest: Ingest) -> dict[str, dict[str, Any]]:
    """The session's rows by profile."""
    rows = await ingest.fetch(
        "SELECT profile_id::text, start_time, last_activity_time, event_count, started, ended,"
        " duration FROM sessions WHERE installation_id = 'phone' AND session_id = 's1'"
    )
    return {r["profile_id"]: dict(r) for r in rows}


async def test_two_people_in_one_session_each_have_their_part(
    suite: tuple[Ingest, Identity],
) -> None:
    ingest, identity = suite
    await ingest.track(session_event("start", "phone", "s1", START))
    bob = (await identity.identify("phone", "bob")).profile_id
    await ingest.track(in_session("b1", 2), in_session("b2", 3))
    await identity.logout("phone")
    await ingest.track(in_session("a1", 10))  # the new anonymous profile's
    carol = (await identity.identify("phone", "carol")).profile_id
    await ingest.track(
        in_session("c1", 12),
        session_event("end", "phone", "s1", START + 15 * MINUTE, duration=15 * MINUTE),
    )

    rows = await parts(ingest)
    assert set(rows) == {bob, carol}
    assert (rows[bob]["event_count"], rows[bob]["last_activity_time"]) == (3, START + 3 * MINUTE)
    assert (rows[bob]["started"], rows[bob]["ended"]) == (True, False)
    assert (rows[carol]["event_count"], rows[carol]["start_time"]) == (3, START + 10 * MINUTE)
    assert (rows[carol]["started"], rows[carol]["ended"]) == (False, True)

    # Erasing Carol leaves Bob's part as it was, and erasing Bob takes his part only.
    await identity.delete(carol)
    assert await parts(ingest) == {bob: rows[bob]}
    await identity.delete(bob)
    assert await parts(ingest) == {}


async def test_logging_out_and_back_in_within_a_session_keeps_one_part(
    suite: tuple[Ingest, Identity],
) -> None:
    ingest, identity = suite
    await ingest.track(session_event("start", "phone", "s1", START))
    bob = (await identity.identify("phone", "bob")).profile_id
    await ingest.track(in_session("b1", 2))
    await identity.logout("phone")
    await ingest.track(in_session("a1", 5), in_session("a2", 6))
    assert len(await parts(ingest)) == 2
    assert (await identity.identify("phone", "bob")).profile_id == bob
    await ingest.track(session_event("end", "phone", "s1", START + 9 * MINUTE, duration=9 * MINUTE))

    rows = await parts(ingest)
    assert set(rows) == {bob}
    assert rows[bob] == {
        "profile_id": bob,
        "start_time": START,
        "last_activity_time": START + 9 * MINUTE,
        "event_count": 5,
        "started": True,
        "ended": True,
        "duration": 9 * MINUTE,
    }
