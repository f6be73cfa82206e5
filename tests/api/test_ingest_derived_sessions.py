"""Sessions ingest derives for events sent without a session ID (Event.session_rule), through
gRPC: the 30-minute inactivity rule across batches, late events, retries (also concurrent) and
the open-session rule Countly's heartbeats and ends use."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from services.ingest.derived_sessions import derived_session_id
from services.ingest.session_derivation import start_event_id
from shared.clock import FrozenClock
from tests.api.test_ingest_sessions import _tables_mentioning
from tests.conftest import eventually
from tests.support.ingest import NOW, Ingest, custom_event
from tests.support.ingest_running import running_ingest, session_event, stream_events

if TYPE_CHECKING:
    from shared.settings import Settings
    from tests.conftest import TestProject

MINUTE = timedelta(minutes=1)
T0 = NOW - timedelta(hours=3)


@pytest.fixture
async def ingest(
    start_services: Any,
    settings_for_test: Settings,
    project: TestProject,
    database_url: str,
) -> AsyncIterator[Ingest]:
    handles = await start_services("identity")
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": handles["identity"].address}
    )
    async with running_ingest(settings, FrozenClock(NOW)) as channel:
        yield Ingest(
            pb_grpc.IngestServiceStub(channel),
            project.metadata("sdk"),
            project.metadata("admin"),
            database_url,
        )


def inactive(event_id: str, minutes: float, installation_id: str = "i1") -> pb.Event:
    event = custom_event(installation_id, event_id=event_id, time=T0 + minutes * MINUTE)
    event.session_rule = pb.SESSION_RULE_INACTIVITY
    return event


def open_session(event: pb.Event) -> pb.Event:
    event.session_id = ""
    event.session_rule = pb.SESSION_RULE_OPEN_SESSION
    return event


async def sessions(ingest: Ingest) -> list[dict[str, Any]]:
    rows = await ingest.fetch(
        "SELECT session_id, start_time, last_activity_time, duration, event_count, derived, ended"
        " FROM sessions ORDER BY start_time"
    )
    return [dict(r) for r in rows]


async def session_of(ingest: Ingest) -> dict[str, str | None]:
    rows = await ingest.fetch("SELECT event_id, session_id FROM events")
    return {r["event_id"]: r["session_id"] for r in rows}


async def test_thirty_minutes_without_events_start_a_new_derived_session(ingest: Ingest) -> None:
    first = await ingest.track(inactive("a", 0), inactive("b", 20))
    assert first.accepted_count == 2
    await ingest.track(inactive("c", 45))  # 25 minutes after b: the same session
    await ingest.track(inactive("d", 75), inactive("e", 80))  # 30 after c: a new one
    again = await ingest.track(inactive("d", 75), inactive("c", 45))  # a retry changes nothing
    assert again.duplicate_count == 2
    found = await session_of(ingest)
    assert found["a"] == found["b"] == found["c"] == derived_session_id("i1", "a")
    assert found["d"] == found["e"] == derived_session_id("i1", "d")
    assert [(s["duration"], s["event_count"], s["derived"]) for s in await sessions(ingest)] == [
        (45 * MINUTE, 3, True),
        (5 * MINUTE, 2, True),
    ]


async def test_late_events_extend_a_session_backwards_and_never_merge_two(
    ingest: Ingest,
) -> None:
    await ingest.track(inactive("b", 40))
    await ingest.track(inactive("a", 15))  # 25 minutes before b: b's session starts earlier
    await ingest.track(inactive("z", 95))
    await ingest.track(inactive("m", 68))  # under 30 from b and from z: joins b's
    found = await session_of(ingest)
    assert found["a"] == found["b"] == found["m"] != found["z"]
    stored = await sessions(ingest)
    assert [(s["start_time"], s["last_activity_time"]) for s in stored] == [
        (T0 + 15 * MINUTE, T0 + 68 * MINUTE),
        (T0 + 95 * MINUTE, T0 + 95 * MINUTE),
    ]


async def test_concurrent_batches_of_one_installation_share_its_session(ingest: Ingest) -> None:
    """Without the installation's lock each batch would see no session and start its own."""
    batches = [[inactive(f"e{n}", n * 5, "i2")] for n in range(6)]
    retries = [[inactive("e0", 0, "i2")] for _ in range(3)]
    replies = await asyncio.gather(*(ingest.track(*batch) for batch in [*batches, *retries]))
    assert sum(r.accepted_count for r in replies) == 6
    assert sum(r.duplicate_count for r in replies) == 3
    assert len(set((await session_of(ingest)).values())) == 1
    (session,) = await sessions(ingest)
    assert (session["duration"], session["event_count"]) == (25 * MINUTE, 6)


async def test_an_event_stored_again_after_its_key_was_pruned_gets_its_session(
    ingest: Ingest,
) -> None:
    """Dedupe keys are kept 35 days (event_keys), and a resend after that is stored again, as
    docs/partitions.md says; derivation judges what is stored already by the same rule, so the
    event stored again gets its session like any new event (not a session-less copy)."""
    assert (await ingest.track(inactive("a", 0))).accepted_count == 1
    await ingest.fetch("DELETE FROM event_keys")  # what the maintenance round does after 35 days
    assert (await ingest.track(inactive("a", 0))).accepted_count == 1
    rows = await ingest.fetch("SELECT session_id FROM events WHERE event_id = 'a'")
    assert len(rows) == 2
    assert rows[0]["session_id"] is not None
    assert rows[0]["session_id"] == rows[1]["session_id"]


async def test_heartbeats_and_ends_without_session_id_join_the_open_session(
    ingest: Ingest,
) -> None:
    start = T0 + 10 * MINUTE
    await ingest.track(session_event("start", "i3", "s1", start))
    beat = open_session(session_event("heartbeat", "i3", "", start + 2 * MINUTE, duration=MINUTE))
    inside = open_session(custom_event("i3", event_id="x", time=start + 3 * MINUTE))
    end = open_session(session_event("end", "i3", "", start + 5 * MINUTE, duration=MINUTE))
    reply = await ingest.track(beat, inside, end)
    assert reply.accepted_count == 3
    after = open_session(custom_event("i3", event_id="y", time=start + 6 * MINUTE))
    await ingest.track(after)  # the session ended: no session
    found = await session_of(ingest)
    assert found[beat.event_id] == found["x"] == found[end.event_id] == "s1"
    assert found["y"] is None
    (session,) = await sessions(ingest)
    # The end's duration is the time since the start, not the minute Countly sent.
    assert (session["duration"], session["ended"], session["derived"]) == (5 * MINUTE, True, False)


async def test_a_heartbeat_with_no_open_session_starts_one(ingest: Ingest) -> None:
    moment: datetime = T0 + 50 * MINUTE
    beat = open_session(session_event("heartbeat", "i4", "", moment, duration=MINUTE))
    later = open_session(session_event("heartbeat", "i4", "", moment + MINUTE, duration=MINUTE))
    await ingest.track(beat)
    await ingest.track(later)
    found = await session_of(ingest)
    assert found[beat.event_id] == found[later.event_id] == derived_session_id("i4", beat.event_id)
    (session,) = await sessions(ingest)
    assert session["duration"] == 2 * MINUTE  # the minute before the first heartbeat counts


async def test_a_session_start_still_needs_its_session_id(ingest: Ingest) -> None:
    start = open_session(session_event("start", "i5", "", T0))
    reply = await ingest.track(start)
    assert reply.results[0].reason == "SESSION_ID_INVALID"


async def test_a_derived_session_is_published_with_its_start_and_its_ip_country(
    ingest: Ingest, redis_url: str, redis_prefix: str
) -> None:
    first = inactive("a", 0, "geo")
    first.session_client_ip = "193.51.0.1"
    bad = inactive("b", 1, "geo")
    bad.session_client_ip = "300.1.2.3"
    reply = await ingest.track(first, bad, inactive("c", 2, "geo"))
    assert [r.reason for r in reply.results] == ["", "VALUE_INVALID", ""]
    assert reply.results[1].field_path == "session_client_ip"
    session_id = derived_session_id("geo", "a")
    rows = await ingest.fetch("SELECT country FROM sessions WHERE session_id = $1", session_id)
    assert rows[0]["country"] == "FR"

    async def published() -> list[Any]:
        return await stream_events(redis_url, redis_prefix)

    await eventually(lambda: _length_is(published(), 3))
    # Then the sweeper's end (the events are hours older than the clock): not checked here.
    start, *events = (await published())[:3]
    assert (start.event_id, start.kind, start.session_id) == (
        start_event_id(session_id),
        types_pb2.EVENT_KIND_SESSION_START,
        session_id,
    )
    assert start.session.country == "FR"
    assert start.event_time == first.event_time
    assert [e.session_id for e in events] == [session_id, session_id]
    ips = ["193.51.0.1", "300.1.2.3"]
    assert await _tables_mentioning(ingest.database_url, ips) == []


async def test_a_derived_session_is_published_on_its_device_platform(
    ingest: Ingest, redis_url: str, redis_prefix: str
) -> None:
    """Countly's events come without metrics, so the edge sends them on API; the session's
    device platform comes with a later request. The start published for the derived session
    follows the sessions table's rule (0056): a device platform wins over API."""
    first = inactive("a", 0, "phone")
    first.platform = types_pb2.PLATFORM_API
    second = inactive("b", 1, "phone")
    second.platform = types_pb2.PLATFORM_ANDROID
    third = inactive("c", 2, "phone")
    third.platform = types_pb2.PLATFORM_API
    api_only = inactive("d", 0, "server")
    api_only.platform = types_pb2.PLATFORM_API
    reply = await ingest.track(first, second, third, api_only)
    assert [r.reason for r in reply.results] == ["", "", "", ""]
    rows = await ingest.fetch("SELECT session_id, platform FROM sessions ORDER BY session_id")
    stored = {r["session_id"]: r["platform"] for r in rows}
    phone, server = derived_session_id("phone", "a"), derived_session_id("server", "d")
    assert stored == {phone: types_pb2.PLATFORM_ANDROID, server: types_pb2.PLATFORM_API}

    async def published() -> list[Any]:
        return await stream_events(redis_url, redis_prefix)

    await eventually(lambda: _length_is(published(), 6))
    starts = {
        e.session_id: e.platform
        for e in await published()
        if e.kind == types_pb2.EVENT_KIND_SESSION_START
    }
    assert starts == stored


async def _length_is(items: Any, length: int) -> bool:
    return len(await items) >= length


def runs_under_thirty_minutes(times: dict[str, datetime]) -> list[set[str]]:
    """The rule's model for an installation whose events arrive in time order (or in reverse):
    sessions are the maximal runs of its events with gaps under 30 minutes."""
    runs: list[set[str]] = []
    last: datetime | None = None
    for event_id, moment in sorted(times.items(), key=lambda item: item[1]):
        if last is None or moment - last >= 30 * MINUTE:
            runs.append(set())
        runs[-1].add(event_id)
        last = moment
    return runs


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_sessions_found_across_activity_buckets_follow_the_model(
    ingest: Ingest, seed: int
) -> None:
    """Each event in its own batch, so every one of them is judged against the sessions stored
    so far, found through their 10-minute activity buckets (0032): random gaps, many close
    to 30 minutes and to a bucket's edge, in time order for one installation and in reverse
    for another."""
    rng = random.Random(seed)
    start = NOW - timedelta(hours=30)
    times: dict[str, datetime] = {}
    moment = start
    for n in range(40):
        gap = rng.choice(
            [
                timedelta(seconds=rng.randint(1, 29 * 60)),
                timedelta(minutes=30) - timedelta(seconds=rng.randint(0, 90)),
                timedelta(minutes=30),
                timedelta(seconds=rng.randint(30 * 60, 45 * 60)),
            ]
        )
        moment += gap
        times[f"e{n}"] = moment
    forward = {f"f-{k}": v for k, v in times.items()}
    backward = {f"b-{k}": v for k, v in times.items()}
    for event_id, at in forward.items():
        event = inactive(event_id, 0, installation_id="forward")
        event.event_time.FromDatetime(at)
        await ingest.track(event)
    for event_id, at in sorted(backward.items(), key=lambda item: item[1], reverse=True):
        event = inactive(event_id, 0, installation_id="backward")
        event.event_time.FromDatetime(at)
        await ingest.track(event)
    found = await session_of(ingest)
    for stored in (forward, backward):
        by_session: dict[str | None, set[str]] = {}
        for event_id in stored:
            by_session.setdefault(found[event_id], set()).add(event_id)
        expected = runs_under_thirty_minutes(stored)
        assert sorted(map(sorted, by_session.values())) == sorted(map(sorted, expected)), seed
