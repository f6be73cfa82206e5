"""One SDK session across a logout and a login on one installation (0054): each person has their
own part of it, counted from their own events; an erasure takes exactly the erased person's part;
a person who logs out and back in within the session has one part again (the merge folds them)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest

from profiles.common.v1 import bus_pb2, types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from shared.clock import FrozenClock
from tests.conftest import eventually
from tests.support.identity import Identity
from tests.support.ingest import NOW, Ingest, custom_event
from tests.support.ingest_running import running_ingest, session_event, stream_events

if TYPE_CHECKING:
    from shared.settings import Settings
    from tests.conftest import TestProject

MINUTE = timedelta(minutes=1)
START = NOW - 20 * MINUTE  # no part idle for 30 minutes: the sweeper leaves them


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(NOW)


@pytest.fixture
async def suite(
    start_services: Any,
    settings_for_test: Settings,
    project: TestProject,
    database_url: str,
    clock: FrozenClock,
) -> AsyncIterator[tuple[Ingest, Identity]]:
    """Identity, and ingest with its sweeper on a frozen clock (running_ingest)."""
    handles = await start_services("identity")
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": handles["identity"].address}
    )
    async with running_ingest(settings, clock) as channel:
        ingest = Ingest(
            pb_grpc.IngestServiceStub(channel),
            project.metadata("sdk"),
            project.metadata("admin"),
            database_url,
        )
        yield ingest, Identity(handles["identity"].channel, project)


def in_session(event_id: str, minute: int, start: datetime = START) -> pb.Event:
    event = custom_event("phone", event_id=event_id, time=start + minute * MINUTE)
    event.session_id = "s1"
    return event


async def ends(redis_url: str, redis_prefix: str) -> list[bus_pb2.IngestedEvent]:
    """The session ends ingest published."""
    events = await stream_events(redis_url, redis_prefix)
    return [e for e in events if e.kind == types_pb2.EVENT_KIND_SESSION_END]


async def parts(ingest: Ingest) -> dict[str, dict[str, Any]]:
    """The session's rows by profile."""
    rows = await ingest.fetch(
        "SELECT profile_id::text, start_time, last_activity_time, event_count, started, ended,"
        " duration, closed FROM sessions WHERE installation_id = 'phone' AND session_id = 's1'"
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
        "closed": True,
    }


async def test_a_later_parts_end_carries_the_sessions_country(
    suite: tuple[Ingest, Identity], redis_url: str, redis_prefix: str
) -> None:
    """The session's country, known from Bob's start, is on the end of Carol's part too (a
    heartbeat's or end's country is the session's on the bus)."""
    ingest, identity = suite
    start = NOW - 20 * MINUTE
    await ingest.track(session_event("start", "phone", "s1", start, country="FR"))
    await identity.identify("phone", "bob")
    await ingest.track(in_session("b1", 1, start))
    await identity.logout("phone")
    await identity.identify("phone", "carol")
    await ingest.track(in_session("c1", 5, start))
    await ingest.track(session_event("end", "phone", "s1", start + 9 * MINUTE, duration=9 * MINUTE))

    async def published() -> bool:  # the outbox relay publishes after commit
        return len(await ends(redis_url, redis_prefix)) == 1

    await eventually(published)
    (end,) = await ends(redis_url, redis_prefix)
    assert end.session.country == "FR"


async def test_each_part_closed_idle_is_its_own_end(
    suite: tuple[Ingest, Identity], redis_url: str, redis_prefix: str
) -> None:
    """Two parts closed by the sweeper are two session ends with two dedupe keys (installation,
    event ID), each with the session's country."""
    ingest, identity = suite
    start = NOW - 60 * MINUTE
    bob = (await identity.identify("phone", "bob")).profile_id
    await ingest.track(
        session_event("start", "phone", "s1", start, country="DE"), in_session("b1", 1, start)
    )
    await identity.logout("phone")
    carol = (await identity.identify("phone", "carol")).profile_id
    await ingest.track(in_session("c1", 5, start))

    async def both() -> bool:
        return len(await ends(redis_url, redis_prefix)) == 2

    await eventually(both)
    found = await ends(redis_url, redis_prefix)
    assert {e.profile_id for e in found} == {bob, carol}
    assert len({(e.installation_id, e.event_id) for e in found}) == 2
    assert {e.session.country for e in found} == {"DE"}


async def test_a_part_closed_idle_opens_again_when_merged_into_a_live_one(
    suite: tuple[Ingest, Identity], clock: FrozenClock, redis_url: str, redis_prefix: str
) -> None:
    """Bob logs out, the session goes on anonymously past his part's idle close, and he logs
    back in: the folded session is live again and closed once, at its real end, with its whole
    duration."""
    ingest, identity = suite
    start = NOW - 10 * MINUTE
    bob = (await identity.identify("phone", "bob")).profile_id
    await ingest.track(session_event("start", "phone", "s1", start), in_session("b1", 1, start))
    await identity.logout("phone")
    await ingest.track(in_session("a5", 5, start), in_session("a9", 9, start))
    clock.advance(25 * MINUTE)  # Bob's part idle for 34 minutes, the anonymous part for 26

    async def bob_closed() -> bool:
        return bool((await parts(ingest)).get(bob, {}).get("closed"))

    await eventually(bob_closed)
    await ingest.track(in_session("a30", 30, start))
    assert (await identity.identify("phone", "bob")).profile_id == bob
    await ingest.track(in_session("b34", 34, start))
    merged = (await parts(ingest))[bob]
    assert (merged["closed"], merged["last_activity_time"]) == (False, start + 34 * MINUTE)

    clock.advance(40 * MINUTE)  # the whole session idle for over 30 minutes

    async def whole_session_ended() -> bool:
        return any(
            e.profile_id == bob and e.session.duration.ToTimedelta() == 34 * MINUTE
            for e in await ends(redis_url, redis_prefix)
        )

    await eventually(whole_session_ended)
    closed = (await parts(ingest))[bob]
    assert (closed["closed"], closed["duration"]) == (True, 34 * MINUTE)
    published = await ends(redis_url, redis_prefix)
    assert len({e.event_id for e in published}) == len(published)


async def test_the_open_session_rule_sees_every_part_of_the_session(
    suite: tuple[Ingest, Identity],
) -> None:
    """An end asking for the installation's open session gets the duration from the session's
    start, Bob's part, though his part was idle for more than 30 minutes before the end."""
    ingest, identity = suite
    t0 = NOW - 3 * 60 * MINUTE

    def asking(event: pb.Event) -> pb.Event:
        event.session_id = ""
        event.session_rule = pb.SESSION_RULE_OPEN_SESSION
        return event

    def custom(event_id: str, minute: int) -> pb.Event:
        return asking(custom_event("phone", event_id=event_id, time=t0 + minute * MINUTE))

    await ingest.track(
        asking(session_event("heartbeat", "phone", "", t0, event_id="hb0", duration=timedelta()))
    )
    await identity.identify("phone", "bob")
    await ingest.track(custom("b1", 1), custom("b3", 3))
    await identity.logout("phone")
    for minute in (10, 20, 30, 40, 50):
        await ingest.track(custom(f"a{minute}", minute))
    end = session_event("end", "phone", "", t0 + 60 * MINUTE, event_id="end", duration=timedelta())
    await ingest.track(asking(end))
    rows = await ingest.fetch(
        "SELECT session_id, duration, ended FROM sessions WHERE installation_id = 'phone'"
    )
    assert len({r["session_id"] for r in rows}) == 1
    assert [r["duration"] for r in rows if r["ended"]] == [60 * MINUTE]


async def test_events_racing_an_erasure_never_join_the_erased_persons_session(
    suite: tuple[Ingest, Identity],
) -> None:
    """Countly-style events (the open-session rule) keep coming from a device while its person
    is erased. A batch that derived its session before the erasure committed finds the device
    gone when it stores, and is resolved again to a new anonymous profile: it was stored there
    with the erased person's session ID (a link back to them, and a session with no start),
    because the retry reused the events as derived, not as sent. Racy by nature: several
    rounds, each of which must leave no session of the erased person behind."""
    ingest, identity = suite
    for trial in range(6):
        device = f"racer-{trial}-{uuid.uuid4().hex[:6]}"
        first = custom_event(device, event_id=f"first-{trial}", time=NOW)
        first.session_rule = pb.SESSION_RULE_INACTIVITY
        profile = (await ingest.track(first)).results[0].profile_id
        await identity.identify(device, f"erased-{trial}-{uuid.uuid4().hex[:6]}")
        theirs = {
            r["session_id"]
            for r in await ingest.fetch(
                "SELECT session_id FROM sessions WHERE installation_id = $1", device
            )
        }
        assert theirs
        stop = asyncio.Event()

        async def race(device: str = device, stop: asyncio.Event = stop) -> None:
            while not stop.is_set():
                event = custom_event(device, name="racing", time=NOW)
                event.session_rule = pb.SESSION_RULE_OPEN_SESSION
                await ingest.track(event)

        racers = [asyncio.create_task(race()) for _ in range(3)]
        await asyncio.sleep(0.3)
        await identity.delete(profile)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*racers)
        left = await ingest.fetch(
            "SELECT session_id, profile_id::text FROM sessions WHERE installation_id = $1", device
        )
        assert not [r for r in left if r["session_id"] in theirs], (trial, left)
