"""Ingest's merge rules (profiles_merge_* in 0004 and 0010), through the real flow: events on two
installations, then Identify of the second into the first's custom ID merges their profiles."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from shared.clock import FrozenClock
from tests.support.identity import Identity
from tests.support.ingest import NOW, Ingest, attribute_event, op, stamp

if TYPE_CHECKING:
    from tests.conftest import TestProject

T = [NOW - timedelta(hours=10 - i) for i in range(10)]


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


def subscription(
    installation_id: str, channel: str, subscribed: bool, time: Any, event_id: str
) -> pb.Event:
    event = pb.Event(
        event_id=event_id,
        installation_id=installation_id,
        platform=types_pb2.PLATFORM_WEB,
        event_time=stamp(time),
    )
    event.subscription_change.channel = getattr(types_pb2, f"CHANNEL_{channel.upper()}")
    event.subscription_change.kind = types_pb2.SUBSCRIPTION_KIND_MARKETING
    event.subscription_change.subscribed = subscribed
    return event


async def attributes_of(ingest: Ingest, profile_id: str) -> dict[str, Any]:
    rows = await ingest.fetch(
        "SELECT name, value FROM profile_attributes WHERE profile_id = $1::uuid", profile_id
    )
    return {r["name"]: None if r["value"] is None else r["value"]["value"] for r in rows}


async def merge_b_into_a(identity: Identity) -> tuple[str, str]:
    """Identify a, then b, with one custom ID: b's anonymous profile merges into a's."""
    target = (await identity.identify("inst-a", "user-1")).profile_id
    source = await identity.profile_of("inst-b")
    reply = await identity.identify("inst-b", "user-1")
    assert reply.profile_id == target
    assert reply.merged_profile_id == source
    return source, target


async def test_a_merge_combines_attributes_by_event_time(
    suite: tuple[Ingest, Identity],
) -> None:
    ingest, identity = suite
    await ingest.track(
        attribute_event("inst-a", [op("set", "plan", "pro")], time=T[5]),
        attribute_event("inst-a", [op("set_once", "source", "ad")], time=T[3]),
        attribute_event("inst-a", [op("increment", "visits", 2)], time=T[1]),
        attribute_event("inst-a", [op("append", "tags", ["a"])], time=T[1]),
        attribute_event("inst-a", [op("set", "FIRST_NAME", "Ann")], time=T[6]),
        attribute_event("inst-a", [op("set", "city", "Paris")], time=T[6]),
        attribute_event("inst-b", [op("set", "plan", "free")], time=T[7]),
        attribute_event("inst-b", [op("set_once", "source", "seo")], time=T[1]),
        attribute_event("inst-b", [op("increment", "visits", 3)], time=T[2]),
        attribute_event("inst-b", [op("append", "tags", ["b"])], time=T[2]),
        attribute_event("inst-b", [op("set", "FIRST_NAME", "Bob")], time=T[4]),
        attribute_event("inst-b", [op("unset", "city")], time=T[8]),
        attribute_event("inst-b", [op("set", "only_b", "yes")], time=T[2]),
    )
    source, target = await merge_b_into_a(identity)
    assert await attributes_of(ingest, target) == {
        "plan": "free",  # the later set wins
        "source": "seo",  # the earliest set-once wins
        "visits": 5,  # counters add up
        "tags": ["a", "b"],  # appends replay in event-time order
        "first_name": "Ann",  # native: the later set wins
        "city": None,  # a later unset wins over an older set
        "only_b": "yes",  # an attribute of one side only moves
    }
    assert await attributes_of(ingest, source) == {}
    # The merged state keeps following event time: a late older set changes nothing.
    await ingest.track(attribute_event("inst-b", [op("set", "plan", "old")], time=T[6]))
    await ingest.track(attribute_event("inst-a", [op("increment", "visits", 1)], time=T[0]))
    state = await attributes_of(ingest, target)
    assert (state["plan"], state["visits"]) == ("free", 6)


async def test_a_merge_keeps_the_latest_explicit_subscription_change(
    suite: tuple[Ingest, Identity],
) -> None:
    ingest, identity = suite
    await ingest.track(
        subscription("inst-a", "email", True, T[5], "a1"),
        subscription("inst-a", "push", False, T[2], "a2"),
        subscription("inst-b", "email", False, T[3], "b1"),  # older: loses
        subscription("inst-b", "push", True, T[4], "b2"),  # newer: wins
        subscription("inst-b", "sms", True, T[1], "b3"),  # only side: kept
    )
    _, target = await merge_b_into_a(identity)
    rows = await ingest.fetch(
        "SELECT profile_id::text, channel, subscribed, change_time FROM profile_subscriptions"
        " ORDER BY channel"
    )
    assert [tuple(r) for r in rows] == [
        (target, "email", True, T[5]),
        (target, "push", True, T[4]),
        (target, "sms", True, T[1]),
    ]


async def test_a_merge_over_the_attribute_limit_drops_nothing_and_refuses_new_ones(
    suite: tuple[Ingest, Identity],
) -> None:
    ingest, identity = suite
    await ingest.track(
        *[
            attribute_event("inst-a", [op("set", f"a{i}_{j}", "v") for j in range(10)], time=T[1])
            for i in range(4)
        ],
        *[
            attribute_event("inst-b", [op("set", f"b{i}_{j}", "v") for j in range(10)], time=T[1])
            for i in range(2)
        ],
    )
    _, target = await merge_b_into_a(identity)
    assert len(await attributes_of(ingest, target)) == 60  # nothing dropped
    reply = await ingest.track(
        attribute_event("inst-a", [op("set", "a0_0", "changed")], time=T[2]),
        attribute_event("inst-a", [op("set", "brand_new", "v")], time=T[2]),
        attribute_event("inst-a", [op("unset", f"a1_{j}") for j in range(10)], time=T[3]),
    )
    assert [r.outcome for r in reply.results] == [
        pb.EVENT_OUTCOME_ACCEPTED,
        pb.EVENT_OUTCOME_REJECTED,
        pb.EVENT_OUTCOME_ACCEPTED,
    ]
    assert reply.results[1].reason == "PROFILE_ATTRIBUTE_LIMIT"
    # 50 held now: still no room for a new one, until one more goes.
    refused = await ingest.track(attribute_event("inst-a", [op("set", "new1", "v")], time=T[4]))
    assert refused.results[0].reason == "PROFILE_ATTRIBUTE_LIMIT"
    swap = await ingest.track(
        attribute_event("inst-a", [op("unset", "a0_1"), op("set", "new1", "v")], time=T[4])
    )
    assert swap.results[0].outcome == pb.EVENT_OUTCOME_ACCEPTED
    state = await attributes_of(ingest, target)
    assert sum(1 for v in state.values() if v is not None) == 50
    assert state["new1"] == "v"


async def test_a_merge_keeps_long_operation_histories_without_losing_counts(
    suite: tuple[Ingest, Identity],
) -> None:
    ingest, identity = suite
    step = timedelta(minutes=1)
    await ingest.track(
        *[
            attribute_event(
                installation,
                [op("increment", "clicks", 1), op("append", "seen", [f"{installation}-{i}"])],
                time=T[1] + step * (2 * i + offset),
            )
            for offset, installation in enumerate(("inst-a", "inst-b"))
            for i in range(30)
        ]
    )
    _, target = await merge_b_into_a(identity)
    state = await attributes_of(ingest, target)
    assert state["clicks"] == 60
    # A list keeps its latest 25 items, in event-time order.
    expected = [f"inst-{'ab'[k % 2]}-{k // 2}" for k in range(60)][-25:]
    assert state["seen"] == expected
    # Every operation is kept, on the survivor: a late one still replays in place.
    rows = await ingest.fetch(
        "SELECT profile_id::text AS p, count(*) AS n FROM attribute_operations"
        " WHERE name = 'clicks' GROUP BY profile_id"
    )
    assert [(r["p"], r["n"]) for r in rows] == [(target, 60)]
