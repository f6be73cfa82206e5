"""ListEventNames: a project's custom event names in name order, with their stored events' count
and latest event time, paged, filtered by prefix, never another project's; bad requests refused
with the field they name."""

from __future__ import annotations

from datetime import datetime, timedelta

import grpc
import pytest

from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.query.v1 import query_service_pb2 as pb
from tests.conftest import create_test_project
from tests.support.identity import new_id, violations
from tests.support.query import NOW, Suite, custom_event, pages, session_start, start_suite


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


def minutes_ago(n: int) -> datetime:
    return NOW - timedelta(minutes=n)


async def track_names(suite: Suite) -> None:
    """purchase x3, Signup x2 (stored signup), app_open, level_2, levelup; a session start
    (not a custom event); and another project's names."""
    inst, other_inst = new_id(), new_id()
    reply = await suite.track(
        custom_event(inst, name="purchase", time=minutes_ago(30)),
        custom_event(inst, name="purchase", time=minutes_ago(5)),
        custom_event(other_inst, name="purchase", time=minutes_ago(50)),
        custom_event(inst, name="Signup", time=minutes_ago(40)),
        custom_event(other_inst, name="signup", time=minutes_ago(20)),
        custom_event(inst, name="app_open", time=minutes_ago(60)),
        custom_event(inst, name="level_2", time=minutes_ago(10)),
        custom_event(other_inst, name="levelup", time=minutes_ago(15)),
        session_start(inst, "s1", minutes_ago(61)),
    )
    assert [r.status.code for r in reply.results] == [0] * 9
    other = await create_test_project(suite.database_url)
    await suite.ingest.TrackEvents(
        ingest_pb.TrackEventsRequest(
            events=[
                custom_event(new_id(), name="secret_event", time=minutes_ago(1)),
                custom_event(new_id(), name="purchase", time=minutes_ago(1)),
            ]
        ),
        metadata=other.metadata("sdk"),
        timeout=20,
    )
    # The counts are query's rollup, kept from the events stream: they lag by the bus lag.
    await suite.settle()


def summary(names: list[pb.EventName]) -> list[tuple[str, int, datetime]]:
    return [(n.name, n.event_count, n.last_seen_time.ToDatetime(NOW.tzinfo)) for n in names]


EXPECTED = [
    ("app_open", 1, minutes_ago(60)),
    ("level_2", 1, minutes_ago(10)),
    ("levelup", 1, minutes_ago(15)),
    ("purchase", 3, minutes_ago(5)),
    ("signup", 2, minutes_ago(20)),
]


async def test_event_names_listed_in_order_with_counts_and_last_seen_over_pages(
    suite: Suite,
) -> None:
    await track_names(suite)
    whole = await suite.call("ListEventNames", pb.ListEventNamesRequest())
    assert summary(list(whole.event_names)) == EXPECTED
    assert whole.next_page_token == ""

    first = await suite.call("ListEventNames", pb.ListEventNamesRequest(page_size=2))
    assert [n.name for n in first.event_names] == ["app_open", "level_2"]
    assert first.next_page_token
    walked = await pages(
        suite, "ListEventNames", pb.ListEventNamesRequest(page_size=2), "event_names"
    )
    assert summary(walked) == EXPECTED
    # The admin role reads them too.
    admin = await suite.call("ListEventNames", pb.ListEventNamesRequest(), role="admin")
    assert summary(list(admin.event_names)) == EXPECTED


async def test_event_names_prefix_in_any_case_and_underscore_literal(suite: Suite) -> None:
    await track_names(suite)

    async def named(prefix: str) -> list[str]:
        reply = await suite.call("ListEventNames", pb.ListEventNamesRequest(name_prefix=prefix))
        return [n.name for n in reply.event_names]

    assert await named("PUR") == ["purchase"]
    assert await named("level") == ["level_2", "levelup"]
    # "_" is a name character, not a wildcard.
    assert await named("level_") == ["level_2"]
    assert await named("secret") == []
    walked = await pages(
        suite,
        "ListEventNames",
        pb.ListEventNamesRequest(name_prefix="l", page_size=1),
        "event_names",
    )
    assert [n.name for n in walked] == ["level_2", "levelup"]


async def test_bad_event_name_requests_name_their_field(suite: Suite) -> None:
    await track_names(suite)
    listed = await suite.call("ListEventNames", pb.ListEventNamesRequest(page_size=1))
    assert listed.next_page_token
    cases = [
        (pb.ListEventNamesRequest(page_size=-1), "page_size"),
        (pb.ListEventNamesRequest(page_token="not-a-token"), "page_token"),
        # A token holds only for the prefix it was issued with.
        (
            pb.ListEventNamesRequest(page_token=listed.next_page_token, name_prefix="p"),
            "page_token",
        ),
        (pb.ListEventNamesRequest(name_prefix="add-to-cart"), "name_prefix"),
        (pb.ListEventNamesRequest(name_prefix="a" * 31), "name_prefix"),
        (pb.ListEventNamesRequest(name_prefix="é"), "name_prefix"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await suite.call("ListEventNames", request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert violations(caught.value) == [field], request
    # Above the maximum is coerced, not refused.
    coerced = await suite.call("ListEventNames", pb.ListEventNamesRequest(page_size=100_000))
    assert len(coerced.event_names) == len(EXPECTED)
