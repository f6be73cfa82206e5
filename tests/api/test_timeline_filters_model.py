"""ListEvents against a model of its filters and paging, on random requests: whatever the request
combines (kinds, custom event names, session, time range, page size), paging through it lists
exactly the profile's stored events the model keeps, newest first (ties by arrival), once each.
The query service leaves every condition a request does not use out of the statement
(timeline_page_sql), so each combination is a statement of its own: this checks them all against
one rule."""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest

from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.query.v1 import query_service_pb2 as pb
from profiles.query.v1 import timeline_pb2 as k
from tests.support.identity import new_id
from tests.support.ingest import stamp
from tests.support.query import (
    NOW,
    Suite,
    attribute_event,
    crash,
    custom_event,
    installation_update,
    op,
    session_end,
    session_start,
    start_suite,
    subscription,
)

# The model's reading of each timeline kind: the stored event kinds it lists (merges and splits
# are identity changes, not events).
EVENT_KINDS_OF_TIMELINE_KIND = {
    k.TIMELINE_EVENT_KIND_CUSTOM: {1},
    k.TIMELINE_EVENT_KIND_SESSION: {2, 3, 4},
    k.TIMELINE_EVENT_KIND_ATTRIBUTE_CHANGE: {5},
    k.TIMELINE_EVENT_KIND_CONSENT_CHANGE: {6},
    k.TIMELINE_EVENT_KIND_INSTALLATION_UPDATE: {7},
    k.TIMELINE_EVENT_KIND_CRASH: {8},
    k.TIMELINE_EVENT_KIND_MERGE: set(),
    k.TIMELINE_EVENT_KIND_SPLIT: set(),
}
NAMES = ("view", "Buy", "share")
SESSIONS = ("s1", "s2")
SPAN = timedelta(hours=3)
START = NOW - SPAN - timedelta(minutes=5)

STORED = """
    SELECT event_id, kind, name, session_id, event_time, event_seq FROM events
    WHERE project_id = $1 AND profile_id = $2 AND payload IS NOT NULL"""


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


def random_event(rng: random.Random, inst: str, t: datetime) -> ingest_pb.Event:
    """An event of a random kind at t, in a random session when its kind has one."""
    session = rng.choice(SESSIONS)
    kind = rng.choice(
        ["custom", "session_start", "session_end", "attribute", "consent", "install", "crash"]
    )
    if kind == "custom":
        event = custom_event(inst, name=rng.choice(NAMES), time=t)
        if rng.random() < 0.5:
            event.session_id = session
        return event
    if kind == "session_start":
        return session_start(inst, session, t)
    if kind == "session_end":
        return session_end(inst, session, t, rng.randint(1, 600))
    if kind == "attribute":
        return attribute_event(inst, [op("set", "plan", rng.choice("ab"))], time=t)
    if kind == "consent":
        return subscription(inst, 1, 1, rng.random() < 0.5, t)
    if kind == "install":
        return installation_update(inst, t, app_version=f"1.{rng.randint(0, 9)}")
    return crash(inst, t)


def random_events(rng: random.Random, inst: str, count: int) -> list[ingest_pb.Event]:
    """Events of every kind at random times, some at the same instant (ordered by arrival)."""
    times = [START + SPAN * rng.random() for _ in range(count - 5)]
    times += rng.sample(times, 5)
    return [random_event(rng, inst, t) for t in times]


def random_request(rng: random.Random, profile_id: str) -> pb.ListEventsRequest:
    request = pb.ListEventsRequest(profile_id=profile_id, page_size=rng.randint(1, 12))
    if rng.random() < 0.5:
        request.kinds.extend(
            rng.sample(sorted(EVENT_KINDS_OF_TIMELINE_KIND), rng.randint(1, 8))  # type: ignore[arg-type]
        )
    if rng.random() < 0.3:
        request.event_names.extend(rng.sample([*NAMES, "nothing"], rng.randint(1, 3)))
    if rng.random() < 0.3:
        request.session_id = rng.choice([*SESSIONS, "s9"])
    start = end = None
    if rng.random() < 0.35:
        start = START + SPAN * rng.random()
        request.start_time.CopyFrom(stamp(start))
    if rng.random() < 0.35:
        end = (start or START) + SPAN * rng.random() + timedelta(microseconds=1)
        request.end_time.CopyFrom(stamp(end))
    return request


def model(stored: list[Any], request: pb.ListEventsRequest) -> list[str]:
    """The events the request lists, in the timeline's order."""
    kinds = set().union(
        *(EVENT_KINDS_OF_TIMELINE_KIND[t] for t in request.kinds or EVENT_KINDS_OF_TIMELINE_KIND)
    )
    names = {n.lower() for n in request.event_names}
    start = request.start_time.ToDatetime() if request.HasField("start_time") else None
    end = request.end_time.ToDatetime() if request.HasField("end_time") else None

    def kept(row: Any) -> bool:
        t: datetime = row["event_time"].replace(tzinfo=None)
        return (
            row["kind"] in kinds
            and (not names or row["name"] in names)
            and (not request.session_id or row["session_id"] == request.session_id)
            and (start is None or t >= start)
            and (end is None or t < end)
        )

    rows = sorted(
        (r for r in stored if kept(r)),
        key=lambda r: (r["event_time"], r["event_seq"]),
        reverse=True,
    )
    return [r["event_id"] for r in rows]


async def listed(suite: Suite, request: pb.ListEventsRequest, stored: int) -> list[str]:
    """Every page's events; more pages than `stored` events could fill is a failure (a page
    that does not move on would never end)."""
    ids: list[str] = []
    for _ in range(stored + 1):
        reply = await suite.call("ListEvents", request)
        assert len(reply.events) <= request.page_size
        ids.extend(e.event_id for e in reply.events)
        if not reply.next_page_token:
            return ids
        request.page_token = reply.next_page_token
    raise AssertionError(f"more than {stored + 1} pages: {ids}")


async def test_every_combination_of_filters_lists_what_the_model_keeps(suite: Suite) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    inst = new_id()
    reply = await suite.track(*random_events(rng, inst, 60))
    assert reply.rejected_count == 0
    profile_id = await suite.identity.profile_of(inst)
    stored = await suite.fetch(STORED, suite.project.project_id, uuid.UUID(profile_id))
    assert len(stored) == 60
    nonempty = 0
    for _ in range(60):
        request = random_request(rng, profile_id)
        expected = model(stored, request)
        nonempty += bool(expected)
        described = f"seed {seed}: {request}"
        assert await listed(suite, request, len(stored)) == expected, described
    assert nonempty >= 20, f"seed {seed}: too few requests listed anything to tell"
