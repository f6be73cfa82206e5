"""ListEvents, ListSessions, GetActivity, ListRejectedEvents and ListProfiles: paging with no gaps
and no repeats, filters and sort orders."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.query.v1 import query_service_pb2 as pb
from profiles.query.v1 import timeline_pb2
from services.query import convert
from shared.convert import timestamp_of
from tests.conftest import create_test_project
from tests.support.identity import new_id, violations
from tests.support.query import (
    NOW,
    Suite,
    attribute_event,
    base_event,
    crash,
    custom_event,
    installation_update,
    op,
    pages,
    session_end,
    session_start,
    start_suite,
    subscription,
)
from tests.support.retention import RETENTION_MODES, apply_retention, make_months, stored_events


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


async def test_events_page_newest_first_without_gaps_or_repeats_while_events_arrive(
    suite: Suite,
) -> None:
    inst = new_id()
    times = [NOW - timedelta(minutes=200 - i) for i in range(60)]
    # Same-instant events too: ties are ordered by arrival.
    await suite.track(*[custom_event(inst, time=t) for t in times])
    await suite.track(*[custom_event(inst, time=times[10]) for _ in range(5)])
    profile_id = await suite.identity.profile_of(inst)
    stored = await suite.fetch(
        "SELECT event_id FROM events WHERE profile_id = $1"
        " ORDER BY event_time DESC, event_seq DESC",
        uuid.UUID(profile_id),
    )
    arrivals = 0

    async def more() -> None:
        nonlocal arrivals
        arrivals += 1
        # New events, newer and older than the position reached: none may show up.
        await suite.track(
            custom_event(inst, time=NOW - timedelta(seconds=arrivals)),
            custom_event(inst, time=NOW - timedelta(minutes=500 + arrivals)),
        )

    seen = await pages(
        suite,
        "ListEvents",
        pb.ListEventsRequest(profile_id=profile_id, page_size=7),
        "events",
        more,
    )
    assert [e.event_id for e in seen] == [r["event_id"] for r in stored]
    assert arrivals == 10
    fresh = await suite.call(
        "ListEvents", pb.ListEventsRequest(profile_id=profile_id, page_size=500)
    )
    assert len(fresh.events) == 65 + 2 * arrivals
    assert fresh.next_page_token == ""


async def test_a_timeline_holding_a_split_an_erasure_redacted_is_read(suite: Suite) -> None:
    """Quinn logs out of a shared device, Pat logs in on it, Pat is erased: the erasure keeps
    Quinn's logout in Quinn's history without its installation, which ListEvents read as its
    first installation (INTERNAL for Quinn's whole timeline)."""
    device, pat_phone = new_id(), new_id()
    await suite.track(custom_event(device, name="quinn_event"))
    quinn = (await suite.identity.identify(device, f"quinn-{new_id()}")).profile_id
    logout = await suite.identity.logout(device)
    await suite.track(custom_event(pat_phone))
    pat_id = f"pat-{new_id()}"
    pat = (await suite.identity.identify(pat_phone, pat_id)).profile_id
    await suite.identity.identify(device, pat_id)
    await suite.identity.delete(pat)

    reply = await suite.call("ListEvents", pb.ListEventsRequest(profile_id=quinn, page_size=50))
    (split,) = [e for e in reply.events if e.kind == timeline_pb2.TIMELINE_EVENT_KIND_SPLIT]
    assert split.event_id == logout.change_id
    assert split.installation_id == ""
    assert list(split.identity_change.installation_ids) == []
    assert [e.custom.name for e in reply.events if e.HasField("custom")] == ["quinn_event"]


async def test_events_filters_by_kind_name_session_and_time(suite: Suite) -> None:
    inst = new_id()
    t = NOW - timedelta(hours=2)
    await suite.track(
        session_start(inst, "s1", t),
        custom_event(inst, name="view", time=t + timedelta(minutes=1)),
        custom_event(inst, name="buy", time=t + timedelta(minutes=2)),
        session_end(inst, "s1", t + timedelta(minutes=3), 180),
        crash(inst, t + timedelta(minutes=4)),
        attribute_event(inst, [op("set", "plan", "pro")], time=t + timedelta(minutes=5)),
    )
    profile_id = await suite.identity.profile_of(inst)

    async def kinds_of(**fields: Any) -> list[int]:
        reply = await suite.call(
            "ListEvents", pb.ListEventsRequest(profile_id=profile_id, **fields)
        )
        return [e.kind for e in reply.events]

    k = timeline_pb2
    assert await kinds_of() == [
        k.TIMELINE_EVENT_KIND_ATTRIBUTE_CHANGE,
        k.TIMELINE_EVENT_KIND_CRASH,
        k.TIMELINE_EVENT_KIND_SESSION,
        k.TIMELINE_EVENT_KIND_CUSTOM,
        k.TIMELINE_EVENT_KIND_CUSTOM,
        k.TIMELINE_EVENT_KIND_SESSION,
    ]
    assert await kinds_of(kinds=[k.TIMELINE_EVENT_KIND_SESSION]) == [2, 2]
    assert await kinds_of(event_names=["BUY"]) == [k.TIMELINE_EVENT_KIND_CUSTOM]
    assert await kinds_of(session_id="s1") == [2, 2]
    start, end = (t + timedelta(minutes=1)), (t + timedelta(minutes=3))
    from tests.support.query import stamp

    assert await kinds_of(start_time=stamp(start), end_time=stamp(end)) == [1, 1]
    reply = await suite.call("ListEvents", pb.ListEventsRequest(profile_id=profile_id))
    by_kind = {e.kind: e for e in reply.events}
    assert by_kind[k.TIMELINE_EVENT_KIND_CRASH].crash.stack_trace == "at main()"
    session = [e for e in reply.events if e.kind == k.TIMELINE_EVENT_KIND_SESSION]
    assert session[0].session.type == k.SESSION_EVENT_TYPE_END
    assert session[0].session.duration.seconds == 180
    assert session[1].session.type == k.SESSION_EVENT_TYPE_START
    operation = by_kind[k.TIMELINE_EVENT_KIND_ATTRIBUTE_CHANGE].attribute_change.operations[0]
    assert (operation.type, operation.name, operation.native) == (
        k.ATTRIBUTE_OPERATION_TYPE_SET,
        "plan",
        False,
    )
    assert operation.value.string_value == "pro"


async def test_merges_and_splits_are_in_the_timeline(suite: Suite) -> None:
    a, b = new_id(), new_id()
    await suite.track(custom_event(a, time=NOW - timedelta(hours=1)))
    await suite.identity.identify(a, "frank")
    await suite.track(custom_event(b, time=NOW - timedelta(hours=1)))
    anonymous = await suite.identity.profile_of(b)
    survivor = (await suite.identity.identify(b, "frank")).profile_id
    await suite.identity.logout(a)
    reply = await suite.call(
        "ListEvents",
        pb.ListEventsRequest(
            profile_id=anonymous,
            kinds=[timeline_pb2.TIMELINE_EVENT_KIND_MERGE, timeline_pb2.TIMELINE_EVENT_KIND_SPLIT],
        ),
    )
    assert reply.profile_id == survivor
    assert [e.kind for e in reply.events] == [
        timeline_pb2.TIMELINE_EVENT_KIND_SPLIT,
        timeline_pb2.TIMELINE_EVENT_KIND_MERGE,
    ]
    assert reply.events[1].identity_change.source_profile_id == anonymous
    everything = await pages(
        suite, "ListEvents", pb.ListEventsRequest(profile_id=survivor, page_size=1), "events"
    )
    assert len(everything) == 4  # two custom events, the merge, the split


async def test_a_merge_while_paging_marks_the_events_it_brings_in(suite: Suite) -> None:
    # A profile with no merge yet when its first page is read: a merge before the next page
    # brings the merged profile's earlier events into the pages to come, each marked with the
    # profile it came from, as a fresh walk marks them.
    # Ingest's clock before identity's (which is the real one): an event is attached to a
    # profile before a merge moves it.
    now = datetime.now(UTC) - timedelta(minutes=5)
    suite.clock.set(now)
    a, b = new_id(), new_id()
    await suite.track(*(custom_event(a, time=now - timedelta(minutes=m)) for m in (1, 2, 3)))
    await suite.identity.identify(a, "paging-frank")
    await suite.track(custom_event(b, time=now - timedelta(hours=2)))
    anonymous = await suite.identity.profile_of(b)
    survivor = await suite.identity.profile_of(a)
    first = await suite.call("ListEvents", pb.ListEventsRequest(profile_id=survivor, page_size=2))
    assert len(first.events) == 2
    assert first.next_page_token
    await suite.identity.identify(b, "paging-frank")
    rest = await pages(
        suite,
        "ListEvents",
        pb.ListEventsRequest(profile_id=survivor, page_size=2, page_token=first.next_page_token),
        "events",
    )
    brought = [
        e
        for e in rest
        if e.kind == timeline_pb2.TIMELINE_EVENT_KIND_CUSTOM
        and e.event_time.ToDatetime(tzinfo=UTC) < now - timedelta(hours=1)
    ]
    assert len(brought) == 1
    assert brought[0].merged_from_profile_id == anonymous
    fresh = await pages(
        suite, "ListEvents", pb.ListEventsRequest(profile_id=survivor, page_size=2), "events"
    )
    assert [e.merged_from_profile_id for e in fresh if e.event_id == brought[0].event_id] == [
        anonymous
    ]


@pytest.mark.parametrize(
    ("fields", "paths"),
    [
        ({"page_size": -1}, ["page_size"]),
        ({"kinds": [0]}, ["kinds[0]"]),
        ({"event_names": ["bad name"]}, ["event_names[0]"]),
        ({"page_token": "garbage!"}, ["page_token"]),
    ],
)
async def test_bad_event_requests_name_their_fields(
    suite: Suite, fields: dict[str, Any], paths: list[str]
) -> None:
    inst = new_id()
    await suite.track(custom_event(inst))
    profile_id = await suite.identity.profile_of(inst)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.call("ListEvents", pb.ListEventsRequest(profile_id=profile_id, **fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == paths


async def test_a_page_token_is_only_valid_with_the_same_filters(suite: Suite) -> None:
    inst = new_id()
    await suite.track(*[custom_event(inst, time=NOW - timedelta(minutes=i)) for i in range(3)])
    profile_id = await suite.identity.profile_of(inst)
    first = await suite.call("ListEvents", pb.ListEventsRequest(profile_id=profile_id, page_size=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.call(
            "ListEvents",
            pb.ListEventsRequest(
                profile_id=profile_id, page_size=1, page_token=first.next_page_token, kinds=[1]
            ),
        )
    assert violations(caught.value) == ["page_token"]


async def test_sessions_and_daily_activity(suite: Suite) -> None:
    inst = new_id()
    day = NOW.replace(hour=1, minute=0) - timedelta(days=2)
    batch: list[ingest_pb.Event] = []
    for i in range(5):
        start = day + timedelta(days=i // 2, hours=i)
        batch += [
            session_start(inst, f"s{i}", start, country="FR" if i < 4 else "DE"),
            custom_event(inst, time=start + timedelta(minutes=1)),
            session_end(inst, f"s{i}", start + timedelta(minutes=2), 60 * (i + 1)),
        ]
    await suite.track(*batch)
    profile_id = await suite.identity.profile_of(inst)
    sessions = await pages(
        suite,
        "ListSessions",
        pb.ListSessionsRequest(profile_id=profile_id, page_size=2),
        "sessions",
    )
    assert [s.session_id for s in sessions] == ["s4", "s3", "s2", "s1", "s0"]
    assert sessions[0].country == "DE"
    assert sessions[0].duration.seconds == 300
    assert sessions[0].HasField("end_time")
    assert not sessions[0].timed_out
    assert sessions[0].platform == types_pb2.PLATFORM_IOS
    view = (await suite.get(profile_id=profile_id)).profile
    assert view.counters.session_count == 5
    assert view.counters.total_time_spent.seconds == 60 * 15
    assert view.summary.last_session_country == "DE"
    activity = await suite.call(
        "GetActivity",
        pb.GetActivityRequest(
            profile_id=profile_id,
            start_date=(day.date() - timedelta(days=1)).isoformat(),
            end_date=(day.date() + timedelta(days=3)).isoformat(),
            time_zone="UTC",
        ),
    )
    assert [(d.session_count, d.event_count) for d in activity.days] == [
        (0, 0),
        (2, 6),
        (2, 6),
        (1, 3),
        (0, 0),
    ]
    assert activity.days[1].time_spent.seconds == 60 + 120
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.call(
            "GetActivity",
            pb.GetActivityRequest(
                profile_id=profile_id, start_date="2030-01-02", end_date="2030-01-01"
            ),
        )
    assert violations(caught.value) == ["end_date"]


async def test_rejected_events_page_and_filter(suite: Suite) -> None:
    inst = new_id()
    no_payload = base_event(inst, NOW)
    no_platform = custom_event(inst)
    no_platform.platform = types_pb2.PLATFORM_UNSPECIFIED
    # Two events refused alike: distinct IDs (one event sent twice is one rejected row).
    reply = await suite.track(no_payload, no_platform, base_event(inst, NOW), custom_event(inst))
    assert reply.rejected_count == 3
    everything = await pages(
        suite, "ListRejectedEvents", pb.ListRejectedEventsRequest(page_size=2), "rejected_events"
    )
    assert [r.reason for r in everything] == [
        "PAYLOAD_MISSING",
        "PLATFORM_MISSING",
        "PAYLOAD_MISSING",
    ]
    assert everything[0].installation_id == inst
    # The platform is read back from the stored payload (proto JSON: the enum's name).
    assert [r.platform for r in everything] == [
        types_pb2.PLATFORM_IOS,
        types_pb2.PLATFORM_UNSPECIFIED,
        types_pb2.PLATFORM_IOS,
    ]
    assert '"installation_id"' in everything[0].raw_payload_json
    only = await suite.call(
        "ListRejectedEvents", pb.ListRejectedEventsRequest(reasons=["PLATFORM_MISSING"])
    )
    assert [r.reason for r in only.rejected_events] == ["PLATFORM_MISSING"]
    other = await create_test_project(suite.database_url)
    theirs = await suite.query.ListRejectedEvents(
        pb.ListRejectedEventsRequest(), metadata=other.metadata("read"), timeout=10
    )
    assert list(theirs.rejected_events) == []


async def test_the_users_table_filters_sorts_and_never_repeats(suite: Suite) -> None:
    installs = [new_id() for _ in range(6)]
    for n, inst in enumerate(installs):
        batch = []
        for s in range(n):
            start = NOW - timedelta(hours=10 * (n + 1) - s)
            batch += [
                session_start(inst, f"s{s}", start, country="FR" if n % 2 else "US"),
                session_end(inst, f"s{s}", start + timedelta(minutes=5), 60 * n),
            ]
        batch.append(custom_event(inst, time=NOW - timedelta(hours=n)))
        await suite.track(*batch)
    await suite.identity.identify(installs[1], "user-1")
    await suite.track(
        attribute_event(
            installs[2], [op("set", "LAST_NAME", "Smith")], time=NOW - timedelta(hours=2.5)
        )
    )
    ids = [await suite.identity.profile_of(i) for i in installs]
    await suite.settle()  # the users table reads query's projection, fed by the bus

    async def rows(**fields: Any) -> list[pb.ProfileRow]:
        return await pages(
            suite, "ListProfiles", pb.ListProfilesRequest(page_size=2, **fields), "profiles"
        )

    by_last_seen = await rows()
    assert [r.profile_id for r in by_last_seen] == ids  # most recently seen first
    by_sessions = await rows(order_by=pb.PROFILE_ORDER_BY_SESSION_COUNT)
    assert [r.session_count for r in by_sessions] == [5, 4, 3, 2, 1, 0]
    ascending = await rows(
        order_by=pb.PROFILE_ORDER_BY_TIME_SPENT, sort_order=pb.SORT_ORDER_ASCENDING
    )
    assert [r.total_time_spent.seconds for r in ascending] == [0, 60, 240, 540, 960, 1500]
    assert [
        r.profile_id for r in await rows(identity_filter=pb.PROFILE_IDENTITY_FILTER_IDENTIFIED)
    ] == [ids[1]]
    assert len(await rows(identity_filter=pb.PROFILE_IDENTITY_FILTER_ANONYMOUS)) == 5
    details = await rows(identity_filter=pb.PROFILE_IDENTITY_FILTER_HAS_USER_DETAILS)
    assert [(r.profile_id, r.last_name) for r in details] == [(ids[2], "Smith")]
    french = await rows(country="fr")
    assert [r.profile_id for r in french] == [ids[1], ids[3], ids[5]]
    assert french[0].platform == types_pb2.PLATFORM_IOS
    assert await rows(platform=types_pb2.PLATFORM_WEB) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.call("ListProfiles", pb.ListProfilesRequest(segment_id="x"))
    assert violations(caught.value) == ["segment_id"]


async def test_the_default_order_repeats_no_profile_seen_again_while_paging(
    suite: Suite,
) -> None:
    # The contract: in the default order (last seen, newest first) a profile seen again while
    # you page moves to the top, behind your position: never listed twice.
    installs = [new_id() for _ in range(6)]
    for n, inst in enumerate(installs):
        await suite.track(custom_event(inst, time=NOW - timedelta(hours=n + 1)))
    await suite.settle()
    request = pb.ListProfilesRequest(page_size=2)
    first = await suite.call("ListProfiles", request)
    listed = [r.profile_id for r in first.profiles]
    seen_again = installs[0]  # the first page's first profile, and one not listed yet
    not_yet = installs[4]
    await suite.track(
        custom_event(seen_again, time=NOW - timedelta(minutes=5)),
        custom_event(not_yet, time=NOW - timedelta(minutes=4)),
    )
    await suite.settle()
    token = first.next_page_token
    while token:
        request.page_token = token
        page = await suite.call("ListProfiles", request)
        listed += [r.profile_id for r in page.profiles]
        token = page.next_page_token
    assert len(listed) == len(set(listed))
    # The one not listed yet moved behind the position too: missed, as the contract says.
    assert await suite.identity.profile_of(not_yet) not in listed
    assert len(listed) == 5


async def test_a_users_table_row_tells_whether_the_profile_has_user_details(suite: Suite) -> None:
    # Countly's users table marks a person known by their details (a name, an email, a phone)
    # though not by a custom ID: the row carries that fact, the same one the filter selects.
    installs = [new_id() for _ in range(6)]
    details = {
        0: [op("set", "EMAIL", "ana@example.com")],  # an email only: no name to show
        1: [op("set", "PHONE", "+33612345678")],
        2: [op("set", "FIRST_NAME", "Bo")],
        3: [op("set", "EMAIL", "gone@example.com")],  # then unset: no details left
        4: [op("set", "LANGUAGE", "fr")],  # a native attribute that is not a user detail
    }
    for n, inst in enumerate(installs):
        at = NOW - timedelta(hours=n + 1)
        operations = details.get(n)
        await suite.track(
            attribute_event(inst, operations, time=at)
            if operations
            else custom_event(inst, time=at)
        )
    await suite.track(
        attribute_event(installs[3], [op("unset", "EMAIL")], time=NOW - timedelta(minutes=30))
    )
    await suite.identity.identify(installs[0], "ana-1")  # details and a custom ID
    ids = [await suite.identity.profile_of(i) for i in installs]
    await suite.settle()

    rows = await pages(suite, "ListProfiles", pb.ListProfilesRequest(page_size=4), "profiles")
    flags = {r.profile_id: (r.has_user_details, r.anonymous) for r in rows}
    assert flags == {
        ids[0]: (True, False),
        ids[1]: (True, True),
        ids[2]: (True, True),
        ids[3]: (False, True),
        ids[4]: (False, True),
        ids[5]: (False, True),
    }
    selected = await pages(
        suite,
        "ListProfiles",
        pb.ListProfilesRequest(identity_filter=pb.PROFILE_IDENTITY_FILTER_HAS_USER_DETAILS),
        "profiles",
    )
    assert {r.profile_id for r in selected} == {p for p, (has, _) in flags.items() if has}
    assert all(r.has_user_details for r in selected)


async def test_the_users_table_shows_profiles_never_seen_last_in_both_orders(suite: Suite) -> None:
    seen = [new_id() for _ in range(2)]
    for n, inst in enumerate(seen):
        await suite.track(custom_event(inst, time=NOW - timedelta(hours=n + 1)))
    unseen = [new_id() for _ in range(3)]
    for n, inst in enumerate(unseen):
        await suite.identity.identify(inst, f"never-seen-{n}")  # a profile, no event
    seen_ids = [await suite.identity.profile_of(i) for i in seen]
    unseen_ids = sorted([await suite.identity.profile_of(i) for i in unseen], key=uuid.UUID)
    await suite.settle()

    async def order(**fields: Any) -> list[str]:
        rows = await pages(
            suite, "ListProfiles", pb.ListProfilesRequest(page_size=1, **fields), "profiles"
        )
        return [r.profile_id for r in rows]

    assert await order() == [*seen_ids, *unseen_ids]
    assert await order(sort_order=pb.SORT_ORDER_ASCENDING) == [*seen_ids[::-1], *unseen_ids]


async def test_the_users_table_sorts_by_name_and_pages_it_with_nameless_profiles_last(
    suite: Suite,
) -> None:
    installs = [new_id() for _ in range(5)]
    named = {0: ("zoé", "Adams"), 1: ("Ana", "Lopez"), 2: ("", "Brown")}
    for n, inst in enumerate(installs):
        operations = []
        if n in named:
            first, last = named[n]
            if first:
                operations.append(op("set", "FIRST_NAME", first))
            operations.append(op("set", "LAST_NAME", last))
            await suite.track(attribute_event(inst, operations, time=NOW - timedelta(hours=n)))
        else:
            await suite.track(custom_event(inst, time=NOW - timedelta(hours=n)))
    await suite.identity.identify(installs[3], "carol-77")  # no name: sorted by custom ID
    ids = [await suite.identity.profile_of(i) for i in installs]
    await suite.settle()

    async def order(**fields: Any) -> list[str]:
        rows = await pages(
            suite,
            "ListProfiles",
            pb.ListProfilesRequest(page_size=2, order_by=pb.PROFILE_ORDER_BY_NAME, **fields),
            "profiles",
        )
        return [r.profile_id for r in rows]

    # "ana lopez" < "brown" < "carol-77" < "zoé adams"; the anonymous profile without a name last.
    assert await order(sort_order=pb.SORT_ORDER_ASCENDING) == [
        ids[1],
        ids[2],
        ids[3],
        ids[0],
        ids[4],
    ]
    assert await order() == [ids[0], ids[3], ids[2], ids[1], ids[4]]


# Stored payloads (ingest's proto JSON, field names kept) and shapes only json_format reads
# (JSON names, unknown fields): the timeline's direct reading must agree with json_format's.
STORED_PAYLOADS = [
    (
        types_pb2.EVENT_KIND_CUSTOM,
        {
            "name": "view_item",
            "label": "x",
            "attributes": {
                "a": {"string_value": "s"},
                "b": {"number_value": 2.5},
                "c": {"bool_value": True},
                "d": {"timestamp_value": "2024-01-02T03:04:05.123Z"},
                "e": {"url_value": "https://example.com/a"},
                "f": {"string_list_value": {"values": ["p", "q"]}},
                "g": {"string_list_value": {}},
            },
        },
    ),
    (types_pb2.EVENT_KIND_CUSTOM, {"name": "n", "attributes": {"a": {"stringValue": "camel"}}}),
    (types_pb2.EVENT_KIND_CUSTOM, {"name": "n", "unknown": 3}),
    (types_pb2.EVENT_KIND_SESSION_START, {"country": "FR"}),
    (types_pb2.EVENT_KIND_SESSION_HEARTBEAT, {"duration": "30s"}),
    (types_pb2.EVENT_KIND_SESSION_END, {"duration": "300.500s"}),
    (
        types_pb2.EVENT_KIND_SUBSCRIPTION_CHANGE,
        {"channel": "CHANNEL_EMAIL", "kind": "SUBSCRIPTION_KIND_MARKETING", "subscribed": True},
    ),
    (types_pb2.EVENT_KIND_SUBSCRIPTION_CHANGE, {"channel": 2, "kind": 1}),
    (
        types_pb2.EVENT_KIND_INSTALLATION_UPDATE,
        {"app_version": "1.2", "push_token_present": True, "push_opt_in": False, "language": "fr"},
    ),
    (types_pb2.EVENT_KIND_INSTALLATION_UPDATE, {"appVersion": "1.2", "uninstalled": True}),
    (types_pb2.EVENT_KIND_CRASH, {"name": "Boom", "reason": "r", "fatal": True}),
]


@pytest.mark.parametrize(("kind", "payload"), STORED_PAYLOADS)
def test_timeline_details_read_directly_equal_json_format(kind: int, payload: Any) -> None:
    direct = timeline_pb2.TimelineEvent()
    convert.timeline_details(kind, payload, direct)
    parsed = timeline_pb2.TimelineEvent()
    convert._parsed_details(kind, payload, parsed)
    if kind in convert.SESSION_TYPES:
        parsed.session.type = convert.SESSION_TYPES[kind]  # type: ignore[index]
        if kind == types_pb2.EVENT_KIND_SESSION_START:
            parsed.session.ClearField("duration")
    assert direct == parsed


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        (types_pb2.EVENT_KIND_CUSTOM, "custom"),
        (types_pb2.EVENT_KIND_SESSION_HEARTBEAT, "session"),
        (types_pb2.EVENT_KIND_ATTRIBUTE_CHANGE, "attribute_change"),
        (types_pb2.EVENT_KIND_SUBSCRIPTION_CHANGE, "consent_change"),
        (types_pb2.EVENT_KIND_INSTALLATION_UPDATE, "installation_update"),
        (types_pb2.EVENT_KIND_CRASH, "crash"),
    ],
)
def test_an_event_whose_payload_sets_nothing_still_has_its_kind_s_details(
    kind: int, field: str
) -> None:
    """The edge's "platform API" installation update after a login stores an empty payload; a
    client reading the details by kind found none."""
    event = timeline_pb2.TimelineEvent()
    convert.timeline_details(kind, {}, event)
    assert event.WhichOneof("details") == field


@pytest.mark.parametrize("mode", RETENTION_MODES)
async def test_the_users_tables_last_seen_is_recounted_the_same_after_retention(
    suite: Suite, mode: str
) -> None:
    """A row's last seen is ingest's kept last event time: when retention removed every event
    of a profile and the row is recounted (here every row, by replaying the streams), the
    users table still shows when the profile was last seen."""
    old_inst, recent_inst = new_id(), new_id()
    old = NOW - timedelta(days=200)
    await make_months(suite.database_url, old)  # its own month: dropped whole (global)
    imported = await suite.ingest.ImportEvents(
        ingest_pb.ImportEventsRequest(events=[custom_event(old_inst, time=old)]),
        metadata=suite.project.metadata("admin"),
        timeout=20,
    )
    assert imported.results[0].outcome == ingest_pb.EVENT_OUTCOME_ACCEPTED
    await suite.track(custom_event(recent_inst, time=NOW - timedelta(hours=1)))
    old_id = await suite.identity.profile_of(old_inst)
    await suite.settle()
    before = await pages(suite, "ListProfiles", pb.ListProfilesRequest(page_size=10), "profiles")
    assert {r.profile_id: r.last_seen_time.ToDatetime(tzinfo=old.tzinfo) for r in before}[
        old_id
    ] == old

    await apply_retention(suite.database_url, suite.project.project_id, mode, NOW)
    assert await stored_events(suite.database_url, suite.project.project_id) == 1
    await suite.replay_rollups()

    after = await pages(suite, "ListProfiles", pb.ListProfilesRequest(page_size=10), "profiles")
    assert after == before


@pytest.mark.parametrize("seed", [1, 2])
async def test_the_language_and_reach_filters_list_what_the_overview_counts(
    suite: Suite, seed: int
) -> None:
    """Random people (a language or none, an email, a phone, marketing consent on each channel,
    a push token with or without opt-in): the language and channel-reach filters list exactly
    the profiles a model of the rule picks, and as many as the overview counts."""
    rng = random.Random(seed)
    expected: dict[str, set[str]] = {"fr": set(), "de": set(), "email": set(), "sms": set()}
    expected["push"] = set()
    for n in range(24):
        inst = new_id()
        time = NOW - timedelta(hours=3, minutes=n)
        operations = []
        language = rng.choice(["fr", "de", ""])
        if language:
            operations.append(op("set", "LANGUAGE", language.upper() if n % 3 else language))
        has_email, has_phone = rng.random() < 0.6, rng.random() < 0.5
        if has_email:
            operations.append(op("set", "EMAIL", f"p{n}@example.com"))
        if has_phone:
            operations.append(op("set", "PHONE", f"+3361234{n:04d}"))
        batch = [custom_event(inst, time=time)]
        if operations:
            batch.append(attribute_event(inst, operations, time=time))
        email_consent, sms_consent = rng.choice([True, False, None]), rng.choice([True, False])
        if email_consent is not None:
            batch.append(
                subscription(
                    inst,
                    types_pb2.CHANNEL_EMAIL,
                    types_pb2.SUBSCRIPTION_KIND_MARKETING,
                    email_consent,
                    time,
                )
            )
        batch.append(
            subscription(
                inst,
                types_pb2.CHANNEL_SMS,
                types_pb2.SUBSCRIPTION_KIND_MARKETING,
                sms_consent,
                time,
            )
        )
        token, opt_in = rng.random() < 0.6, rng.random() < 0.5
        if token:
            batch.append(
                installation_update(inst, time, push_token=f"{n:02d}" * 32, push_opt_in=opt_in)
            )
        await suite.track(*batch)
        profile_id = await suite.identity.profile_of(inst)
        if language:
            expected[language].add(profile_id)
        if has_email and email_consent:
            expected["email"].add(profile_id)
        if has_phone and sms_consent:
            expected["sms"].add(profile_id)
        if token and opt_in:
            expected["push"].add(profile_id)
    await suite.settle()

    async def listed(**fields: Any) -> set[str]:
        rows = await pages(
            suite, "ListProfiles", pb.ListProfilesRequest(page_size=5, **fields), "profiles"
        )
        counted = await suite.call(
            "ListProfiles", pb.ListProfilesRequest(include_total_size=True, **fields)
        )
        assert counted.total_size == len(rows)
        return {r.profile_id for r in rows}

    overview = (await suite.call("GetOverview", pb.GetOverviewRequest())).overview
    languages = {v.value: v.count for v in overview.languages.top_values}
    reaches = {r.channel: r.reachable_profile_count for r in overview.channel_reaches}
    for language in ("fr", "de"):
        for spelled in (language, language.upper()):
            assert await listed(language=spelled) == expected[language]
        assert languages.get(language, 0) == len(expected[language])
    for name, channel in (
        ("email", types_pb2.CHANNEL_EMAIL),
        ("sms", types_pb2.CHANNEL_SMS),
        ("push", types_pb2.CHANNEL_PUSH),
    ):
        assert await listed(reachable_channel=channel) == expected[name], name
        assert reaches[channel] == len(expected[name]), name
    both = await listed(language="fr", reachable_channel=types_pb2.CHANNEL_EMAIL)
    assert both == expected["fr"] & expected["email"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.call("ListProfiles", pb.ListProfilesRequest(language="french"))
    assert violations(caught.value) == ["language"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.call("ListProfiles", pb.ListProfilesRequest(reachable_channel=9))  # type: ignore[arg-type]
    assert violations(caught.value) == ["reachable_channel"]


async def test_rejected_events_are_counted_by_reason_in_the_time_range(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    inst = new_id()
    no_platform = custom_event(inst)
    no_platform.platform = types_pb2.PLATFORM_UNSPECIFIED
    # Distinct events (one event sent twice is one rejected row).
    no_platform_again = custom_event(inst)
    no_platform_again.platform = types_pb2.PLATFORM_UNSPECIFIED
    sent = [base_event(inst, NOW) for _ in range(3)] + [no_platform, no_platform_again]
    rng = random.Random(7)
    rng.shuffle(sent)
    await suite.track(*sent)
    after_first = NOW + timedelta(seconds=1)
    suite.clock.advance(timedelta(seconds=5))
    await suite.track(base_event(inst, NOW), custom_event(inst))

    async def counts(**fields: Any) -> tuple[list[tuple[str, int]], bool]:
        reply = await suite.call(
            "ListRejectedEvents",
            pb.ListRejectedEventsRequest(page_size=1, include_reason_counts=True, **fields),
        )
        assert len(reply.rejected_events) == 1  # the page itself is unchanged
        found = [(c.reason, c.count) for c in reply.reason_counts]
        return found, reply.reason_counts_are_lower_bounds

    everything = [("PAYLOAD_MISSING", 4), ("PLATFORM_MISSING", 2)]
    assert await counts() == (everything, False)
    # Every reason, whatever `reasons` lists; only the time range narrows the counts.
    assert await counts(reasons=["PLATFORM_MISSING"]) == (everything, False)
    later = timestamp_of(after_first)
    assert await counts(start_time=later) == ([("PAYLOAD_MISSING", 1)], False)
    assert await counts(end_time=later) == (
        [("PAYLOAD_MISSING", 3), ("PLATFORM_MISSING", 2)],
        False,
    )
    plain = await suite.call("ListRejectedEvents", pb.ListRejectedEventsRequest())
    assert list(plain.reason_counts) == []
    monkeypatch.setattr("services.query.service.REASON_COUNT_LIMIT", 3)
    found, lower_bounds = await counts()
    assert lower_bounds
    assert sum(count for _, count in found) == 3


async def test_get_profile_rows_answers_the_users_tables_rows_of_the_ids_asked_for(
    suite: Suite,
) -> None:
    # A client that learns profile IDs elsewhere (the segments' change stream) shows their rows
    # in one call: ListProfiles' rows, in the order asked, each once; merged-away, unknown and
    # other projects' IDs listed as missing.
    installs = [new_id() for _ in range(4)]
    for n, inst in enumerate(installs):
        await suite.track(
            attribute_event(inst, [op("set", "FIRST_NAME", f"N{n}")], time=NOW - timedelta(hours=n))
        )
    await suite.identity.identify(installs[0], "rows-1")
    await suite.identity.identify(installs[1], "rows-2")
    ids = [await suite.identity.profile_of(i) for i in installs]
    merged_away = ids[3]
    await suite.identity.identify(installs[3], "rows-1")  # merges installs[3] into rows-1
    await suite.settle()
    listed = {
        r.profile_id: r
        for r in await pages(suite, "ListProfiles", pb.ListProfilesRequest(), "profiles")
    }
    assert merged_away not in listed
    other = await create_test_project(suite.database_url)
    unknown = str(uuid.uuid4())
    asked = [ids[2], unknown, ids[0], ids[2], merged_away, ids[1]]
    reply = await suite.call("GetProfileRows", pb.GetProfileRowsRequest(profile_ids=asked))
    assert [r.profile_id for r in reply.profiles] == [ids[2], ids[0], ids[1]]
    assert list(reply.profiles) == [listed[ids[2]], listed[ids[0]], listed[ids[1]]]
    assert [r.first_name for r in reply.profiles] == ["N2", "N0", "N1"]
    assert list(reply.missing_profile_ids) == [unknown, merged_away]
    # Another project's key finds none of them.
    other_reply = await suite.query.GetProfileRows(
        pb.GetProfileRowsRequest(profile_ids=[ids[0]]), metadata=other.metadata("read")
    )
    assert list(other_reply.profiles) == []
    assert list(other_reply.missing_profile_ids) == [ids[0]]

    for request, fields in (
        (pb.GetProfileRowsRequest(), ["profile_ids"]),
        (pb.GetProfileRowsRequest(profile_ids=[ids[0]] * 501), ["profile_ids"]),
        (
            pb.GetProfileRowsRequest(profile_ids=["x", ids[0], "{" + ids[1] + "}"]),
            ["profile_ids[0]", "profile_ids[2]"],
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await suite.call("GetProfileRows", request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(caught.value) == fields
