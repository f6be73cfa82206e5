"""Custom segments over real gRPC, PostgreSQL and Redis, fed through identity and ingest: each
kind of condition, exact sizes, hostile names and values, validation, idempotency, and the
ENTERED/LEFT changes of the evaluation."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from profiles.common.v1 import types_pb2
from profiles.segments.v1 import filters_pb2 as f
from profiles.segments.v1 import segments_pb2
from profiles.segments.v1 import segments_service_pb2 as pb
from tests.support.ingest import NOW
from tests.support.retention import RETENTION_MODES, apply_retention, make_months, stored_events
from tests.support.segments_custom import (
    ANDROID,
    WEB,
    Stack,
    all_of,
    attribute,
    condition,
    custom_event,
    days_ago,
    error_details,
    group,
    not_,
    segments_build,
    session,
    set_attributes,
    stack,
    subscription,
)

__all__ = ["segments_build", "stack"]

EQ, NE, IN = f.OPERATOR_EQUALS, f.OPERATOR_NOT_EQUALS, f.OPERATOR_IN
LT, GE = f.OPERATOR_LESS_THAN, f.OPERATOR_GREATER_THAN_OR_EQUAL
CONTAINS, STARTS, EXISTS = f.OPERATOR_CONTAINS, f.OPERATOR_STARTS_WITH, f.OPERATOR_EXISTS
HOSTILE = "x'); DROP TABLE profiles; --"


async def test_attribute_conditions_compare_by_type(stack: Stack) -> None:
    a, b, c = await stack.track(
        set_attributes(
            "inst-a",
            plan="Pro",
            age=30,
            vip=True,
            tags=["red", "Blue"],
            signup=days_ago(3),
            native={types_pb2.NATIVE_ATTRIBUTE_EMAIL: "Ann@Example.com"},
        ),
        set_attributes("inst-b", plan="free", age=17.5, vip=False, tags=["green"]),
        set_attributes("inst-c", plan=42, native={types_pb2.NATIVE_ATTRIBUTE_FIRST_NAME: "Bob"}),
    )
    cases = [
        (attribute("plan", EQ, "Pro"), {a}),
        (attribute("plan", EQ, "pro"), set()),
        (attribute("PLAN", EQ, "pro", ignore_case=True), {a}),
        # NOT_EQUALS needs a value of the operand's type: c's plan is a number.
        (attribute("plan", NE, "Pro"), {b}),
        (not_(attribute("plan", EQ, "Pro")), {b, c}),
        (attribute("plan", IN, values=["free", "gold"]), {b}),
        (attribute("plan", IN, values=[42, 7]), {c}),
        (attribute("plan", CONTAINS, "r"), {a, b}),
        (attribute("plan", STARTS, "fr"), {b}),
        (attribute("plan", EXISTS), {a, b, c}),
        (attribute("age", GE, 18), {a}),
        (attribute("age", LT, 18), {b}),
        (attribute("vip", EQ, True), {a}),
        (attribute("vip", NE, True), {b}),
        (attribute("tags", CONTAINS, "red"), {a}),
        (attribute("tags", CONTAINS, "blue", ignore_case=True), {a}),
        (attribute("tags", EQ, ["red", "Blue"]), {a}),
        (attribute("tags", EQ, ["Blue", "red"]), set()),
        (attribute("signup", f.OPERATOR_GREATER_THAN, days_ago(4)), {a}),
        (attribute("signup", LT, days_ago(4)), set()),
        # Email is always case-insensitive (and stored lower-case).
        (attribute(types_pb2.NATIVE_ATTRIBUTE_EMAIL, EQ, "ANN@example.COM"), {a}),
        (attribute(types_pb2.NATIVE_ATTRIBUTE_FIRST_NAME, STARTS, "Bo"), {c}),
        (not_(attribute(types_pb2.NATIVE_ATTRIBUTE_FIRST_NAME, EXISTS)), {a, b}),
    ]
    for filter_node, expected in cases:
        assert await stack.members(filter_node) == expected, filter_node


async def test_ignore_case_folds_letters_beyond_ascii_and_keeps_accents(stack: Stack) -> None:
    # The embedded server's "C" locale lower-cases ASCII only: ignore_case folded "É" to
    # nothing, so these matched nobody and NOT_EQUALS matched a value differing in case only.
    a, b = await stack.track(
        set_attributes(
            "inst-a",
            city="ÉCOLE",
            tags=["Ünal"],
            native={types_pb2.NATIVE_ATTRIBUTE_FIRST_NAME: "Éric"},
        ),
        set_attributes("inst-b", city="Straße Ωmega"),
    )
    cases = [
        (attribute("city", EQ, "école", ignore_case=True), {a}),
        (attribute("city", NE, "école", ignore_case=True), {b}),
        (attribute("city", IN, values=["école", "x"], ignore_case=True), {a}),
        (attribute("city", STARTS, "éc", ignore_case=True), {a}),
        (attribute("city", CONTAINS, "ωMEGA", ignore_case=True), {b}),
        (attribute("tags", CONTAINS, "ünal", ignore_case=True), {a}),
        (attribute("tags", EQ, ["ÜNAL"], ignore_case=True), {a}),
        (attribute(types_pb2.NATIVE_ATTRIBUTE_FIRST_NAME, EQ, "ÉRIC", ignore_case=True), {a}),
        # Case only: accents stay, and without ignore_case the case counts.
        (attribute("city", EQ, "ecole", ignore_case=True), set()),
        (attribute("city", EQ, "école"), set()),
    ]
    for filter_node, expected in cases:
        assert await stack.members(filter_node) == expected, filter_node


async def test_seen_and_event_counts_take_times_a_little_ahead_of_the_clock(stack: Stack) -> None:
    # A device clock a few minutes ahead (ingest accepts up to 10): the profile is active now,
    # so "within the last 7 days" holds at once, not once the clock has caught up.
    (ahead,) = await stack.track(
        custom_event("inst-ahead", "purchase", stack.clock.now() + timedelta(minutes=5))
    )
    assert await stack.members(condition(last_seen=f.TimeWindow(within_last_days=7))) == {ahead}
    bought = f.EventCountCondition(event_name="purchase", operator=GE, count=1, within_last_days=7)
    assert await stack.members(condition(event_count=bought)) == {ahead}


async def test_timestamp_operands_at_both_ends_of_the_range_match(stack: Stack) -> None:
    # The first and last microsecond a timestamp holds: asyncpg sent them as -infinity and
    # infinity, so EQUALS matched nothing.
    first, last = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)
    a, b = await stack.track(
        set_attributes("inst-first", when=first), set_attributes("inst-last", when=last)
    )
    assert await stack.members(attribute("when", EQ, first)) == {a}
    assert await stack.members(attribute("when", EQ, last)) == {b}
    assert await stack.members(attribute("when", LT, last)) == {a}
    assert await stack.members(attribute("when", GE, first)) == {a, b}


async def test_platform_country_subscription_and_engagement_conditions(stack: Stack) -> None:
    ios_user, *_ = await stack.track(
        *session("inst-ios", NOW - timedelta(hours=5), 2.0, country="FR"),
        *session("inst-ios", NOW - timedelta(days=1, hours=5), 2.0, country="DE"),
    )
    (web_user,) = await stack.track(custom_event("inst-web", "visit", NOW, platform=WEB))
    (android_user,) = await stack.track(
        subscription(
            "inst-and", types_pb2.CHANNEL_EMAIL, types_pb2.SUBSCRIPTION_KIND_MARKETING, True
        )
    )
    everyone = {ios_user, web_user, android_user}
    platforms = condition(platform=f.PlatformCondition(platforms=[WEB, ANDROID]))
    assert await stack.members(platforms) == {web_user}
    ios = condition(platform=f.PlatformCondition(platforms=[types_pb2.PLATFORM_IOS]))
    assert await stack.members(ios) == {ios_user, android_user}
    assert await stack.members(condition(country=f.CountryCondition(countries=["fr"]))) == {
        ios_user
    }
    assert await stack.members(condition(country=f.CountryCondition(countries=["DE"]))) == set()
    subscribed = f.SubscriptionCondition(
        channel=types_pb2.CHANNEL_EMAIL,
        kind=types_pb2.SUBSCRIPTION_KIND_MARKETING,
        subscribed=True,
    )
    assert await stack.members(condition(subscription=subscribed)) == {android_user}
    subscribed.subscribed = False
    assert await stack.members(condition(subscription=subscribed)) == everyone - {android_user}
    # 2 sessions of 2 minutes on 2 days: 2 x 2 x 2 = 8 points.
    engagement = f.EngagementCondition(operator=EQ, score=8)
    assert await stack.members(condition(engagement=engagement)) == {ios_user}
    engagement.operator, engagement.score = LT, 1
    assert await stack.members(condition(engagement=engagement)) == everyone - {ios_user}
    new = f.SmartSegmentCondition(segments=[types_pb2.SMART_SEGMENT_NEW])
    assert await stack.members(condition(smart_segment=new)) == {ios_user}
    none = f.SmartSegmentCondition(segments=[types_pb2.SMART_SEGMENT_UNSPECIFIED])
    assert await stack.members(condition(smart_segment=none)) == everyone - {ios_user}
    promising = f.SmartSegmentCondition(flags=[types_pb2.SMART_SEGMENT_FLAG_PROMISING_NEW])
    assert await stack.members(condition(smart_segment=promising)) == {ios_user}


async def test_seen_and_event_count_conditions_follow_the_clock(stack: Stack) -> None:
    buyer, *_ = await stack.track(
        custom_event("inst-1", "purchase", days_ago(20)),
        custom_event("inst-1", "purchase", days_ago(10)),
        custom_event("inst-1", "Purchase", days_ago(2)),
        custom_event("inst-1", "view", days_ago(1)),
    )
    (viewer,) = await stack.import_events(custom_event("inst-2", "view", days_ago(40)))
    at_least_3 = condition(
        event_count=f.EventCountCondition(
            event_name="PURCHASE", operator=GE, count=3, within_last_days=30
        )
    )
    assert await stack.size(at_least_3) == 1
    fewer_than_1 = condition(
        event_count=f.EventCountCondition(
            event_name="purchase", operator=LT, count=1, within_last_days=30
        )
    )
    assert await stack.members(fewer_than_1) == {viewer}
    last_week = condition(last_seen=f.TimeWindow(within_last_days=7))
    assert await stack.members(last_week) == {buyer}
    first_in_range = condition(
        first_seen=f.TimeWindow(
            range=f.TimeRange(start_time=_stamp(days_ago(45)), end_time=_stamp(days_ago(30)))
        )
    )
    assert await stack.members(first_in_range) == {viewer}
    # Eleven days later, the 20-day-old purchase is outside the 30 days and nobody was seen
    # in the last week: time alone changed both answers.
    stack.clock.advance(timedelta(days=11))
    assert await stack.size(at_least_3) == 0
    assert await stack.size(last_week) == 0


def _stamp(moment: object) -> object:
    from tests.support.ingest import stamp

    return stamp(moment)  # type: ignore[arg-type]


async def test_hostile_names_and_values_are_stored_and_matched_literally(stack: Stack) -> None:
    (target,) = await stack.track(set_attributes("inst-h", plan=HOSTILE, note="%_\\"))
    await stack.track(set_attributes("inst-o", plan="x", note="abc"))
    created = await stack.segments.CreateSegment(
        pb.CreateSegmentRequest(
            display_name=HOSTILE,
            description="'; SELECT pg_sleep(10); --",
            filter=attribute("plan", EQ, HOSTILE),
        ),
        metadata=stack.admin,
    )
    assert created.segment.display_name == HOSTILE
    assert created.segment.size == 1
    # LIKE wildcards are characters like any other.
    assert await stack.members(attribute("note", CONTAINS, "%_")) == {target}
    assert await stack.members(attribute("note", STARTS, "_")) == set()
    got = await stack.segments.GetSegment(
        pb.GetSegmentRequest(segment_id=created.segment.segment_id), metadata=stack.read
    )
    assert got.segment.filter == created.segment.filter
    assert await stack.pool.fetchval("SELECT count(*) FROM profiles") == 2


async def test_malformed_filters_are_refused_with_each_path(stack: Stack) -> None:
    tree = all_of(
        attribute("plan", EQ, "pro"),
        attribute("bad name", EQ, "x"),
        attribute("age", CONTAINS, 3),
        condition(event_count=f.EventCountCondition(event_name="buy", operator=CONTAINS)),
        group(f.GROUP_OPERATOR_NOT),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.segments.CreateSegment(
            pb.CreateSegmentRequest(display_name="", filter=tree), metadata=stack.admin
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, fields = error_details(caught.value)
    assert reason == "DEFINITION_INVALID"
    assert fields == [
        "display_name",
        "filter.group.children[1].condition.attribute.custom_attribute",
        "filter.group.children[2].condition.attribute.value",
        "filter.group.children[3].condition.event_count.operator",
        "filter.group.children[3].condition.event_count.within_last_days",
        "filter.group.children[4].group.children",
    ]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.segments.CreateSegment(
            pb.CreateSegmentRequest(
                display_name="s", filter=all_of(*[attribute("a", EXISTS)] * 32)
            ),
            metadata=stack.admin,
        )
    assert error_details(caught.value)[1] == ["filter.group.children", "filter"]


async def test_create_is_idempotent_names_are_unique_and_delete_allows_missing(
    stack: Stack,
) -> None:
    request_id = str(uuid.uuid4())
    request = pb.CreateSegmentRequest(
        display_name="Pros", filter=attribute("plan", EQ, "pro"), request_id=request_id
    )
    first = await stack.segments.CreateSegment(request, metadata=stack.admin)
    again = await stack.segments.CreateSegment(request, metadata=stack.admin)
    assert again.segment.segment_id == first.segment.segment_id
    request.description = "changed"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.segments.CreateSegment(request, metadata=stack.admin)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(caught.value)[0] == "REQUEST_ID_REUSED"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.segments.CreateSegment(
            pb.CreateSegmentRequest(display_name="PROS", filter=attribute("a", EXISTS)),
            metadata=stack.admin,
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # Unique by Unicode case, not only ASCII's: "ÉLITE" is the name "élite" holds.
    await stack.segments.CreateSegment(
        pb.CreateSegmentRequest(display_name="élite", filter=attribute("a", EXISTS)),
        metadata=stack.admin,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.segments.CreateSegment(
            pb.CreateSegmentRequest(display_name="ÉLITE", filter=attribute("a", EXISTS)),
            metadata=stack.admin,
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.segments.CreateSegment(request, metadata=stack.read)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    segment_id = first.segment.segment_id
    await stack.segments.DeleteSegment(
        pb.DeleteSegmentRequest(segment_id=segment_id), metadata=stack.admin
    )
    await stack.segments.DeleteSegment(
        pb.DeleteSegmentRequest(segment_id=segment_id, allow_missing=True), metadata=stack.admin
    )
    for call in (
        stack.segments.DeleteSegment(
            pb.DeleteSegmentRequest(segment_id=segment_id), metadata=stack.admin
        ),
        stack.segments.GetSegment(pb.GetSegmentRequest(segment_id=segment_id), metadata=stack.read),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_segments_pages_oldest_first_and_the_limit_is_100(stack: Stack) -> None:
    for i in range(100):
        await stack.segments.CreateSegment(
            pb.CreateSegmentRequest(display_name=f"seg {i:03}", filter=attribute("a", EXISTS)),
            metadata=stack.admin,
        )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.segments.CreateSegment(
            pb.CreateSegmentRequest(display_name="one more", filter=attribute("a", EXISTS)),
            metadata=stack.admin,
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    names: list[str] = []
    token = ""
    while True:
        page = await stack.segments.ListSegments(
            pb.ListSegmentsRequest(page_size=40, page_token=token), metadata=stack.read
        )
        names.extend(s.display_name for s in page.segments)
        token = page.next_page_token
        if not token:
            break
    assert names == [f"seg {i:03}" for i in range(100)]
    for bad in (pb.ListSegmentsRequest(page_size=-1), pb.ListSegmentsRequest(page_token="x")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.segments.ListSegments(bad, metadata=stack.read)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def read_changes(
    stack: Stack, request: pb.WatchSegmentChangesRequest, count: int
) -> list[segments_pb2.SegmentChange]:
    changes: list[segments_pb2.SegmentChange] = []
    call = stack.segments.WatchSegmentChanges(request, metadata=stack.read)
    try:
        async with asyncio.timeout(10):
            async for response in call:
                changes.extend(response.changes)
                if len(changes) >= count:
                    break
    finally:
        call.cancel()
    return changes


async def test_profiles_entering_and_leaving_are_announced_the_first_members_at_creation(
    stack: Stack,
) -> None:
    (existing,) = await stack.track(set_attributes("inst-1", plan="pro"))
    created = await stack.segments.CreateSegment(
        pb.CreateSegmentRequest(display_name="Pros", filter=attribute("plan", EQ, "pro")),
        metadata=stack.admin,
    )
    segment_id = created.segment.segment_id
    assert created.segment.size == 1
    # The creation announced its member itself: the sweep finds nothing to announce.
    assert await stack.definitions.evaluate_all() == 0
    (newcomer,) = await stack.track(set_attributes("inst-2", plan="pro"))
    await stack.track(set_attributes("inst-1", plan="free"))
    # The events' own transactions announced both; the sweep finds nothing left to announce.
    assert await stack.definitions.evaluate_all() == 0
    watch = pb.WatchSegmentChangesRequest(
        custom_segment_id=segment_id, start_time=_stamp(NOW - timedelta(days=3650))
    )
    changes = await read_changes(stack, watch, 3)
    seen = {
        (c.profile_id, segments_pb2.SegmentTransition.Name(c.transition), c.custom_segment_id)
        for c in changes
    }
    assert seen == {
        (existing, "SEGMENT_TRANSITION_ENTERED", segment_id),
        (existing, "SEGMENT_TRANSITION_LEFT", segment_id),
        (newcomer, "SEGMENT_TRANSITION_ENTERED", segment_id),
    }
    assert changes[0].cause == segments_pb2.SEGMENT_CHANGE_CAUSE_DEFINITION
    got = await stack.segments.GetSegment(
        pb.GetSegmentRequest(segment_id=segment_id), metadata=stack.read
    )
    assert got.segment.size == 1
    # A deleted segment can no longer be watched.
    await stack.segments.DeleteSegment(
        pb.DeleteSegmentRequest(segment_id=segment_id), metadata=stack.admin
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_changes(stack, pb.WatchSegmentChangesRequest(custom_segment_id=segment_id), 1)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_event_announces_its_custom_segment_changes_without_the_sweep(
    stack: Stack,
) -> None:
    # The fixture's sweep runs once at start, then every hour: far beyond read_changes' 10 s
    # deadline, so whatever arrives here was announced by the event transactions themselves.
    created = await stack.segments.CreateSegment(
        pb.CreateSegmentRequest(
            display_name="Buyers",
            filter=all_of(
                attribute("plan", EQ, "pro"),
                condition(
                    event_count=f.EventCountCondition(
                        event_name="purchase", operator=GE, count=1, within_last_days=30
                    )
                ),
            ),
        ),
        metadata=stack.admin,
    )
    segment_id = created.segment.segment_id
    assert created.segment.size == 0
    # Each kind of event moves the profile: an attribute change alone is not enough, the
    # custom event completes it, and a later attribute change takes it out again.
    (profile,) = await stack.track(set_attributes("inst-1", plan="pro"))
    await stack.track(custom_event("inst-1", "purchase", NOW - timedelta(hours=1)))
    await stack.track(set_attributes("inst-1", plan="free"))
    watch = pb.WatchSegmentChangesRequest(
        custom_segment_id=segment_id, start_time=_stamp(NOW - timedelta(days=3650))
    )
    changes = await read_changes(stack, watch, 2)
    assert [(c.profile_id, segments_pb2.SegmentTransition.Name(c.transition)) for c in changes] == [
        (profile, "SEGMENT_TRANSITION_ENTERED"),
        (profile, "SEGMENT_TRANSITION_LEFT"),
    ]
    assert {c.cause for c in changes} == {segments_pb2.SEGMENT_CHANGE_CAUSE_EVENT}
    rows = await stack.pool.fetch(
        "SELECT profile_id FROM custom_segment_members WHERE segment_id = $1",
        uuid.UUID(segment_id),
    )
    assert rows == []


async def test_a_subscription_change_alone_moves_a_profile_at_once(stack: Stack) -> None:
    created = await stack.segments.CreateSegment(
        pb.CreateSegmentRequest(
            display_name="Email marketing",
            filter=condition(
                subscription=f.SubscriptionCondition(
                    channel=types_pb2.CHANNEL_EMAIL,
                    kind=types_pb2.SUBSCRIPTION_KIND_MARKETING,
                    subscribed=True,
                )
            ),
        ),
        metadata=stack.admin,
    )
    (profile,) = await stack.track(
        subscription("inst-9", types_pb2.CHANNEL_EMAIL, types_pb2.SUBSCRIPTION_KIND_MARKETING, True)
    )
    rows = await stack.pool.fetch(
        "SELECT profile_id, enter_time FROM custom_segment_members WHERE segment_id = $1",
        uuid.UUID(created.segment.segment_id),
    )
    assert [(str(r["profile_id"]), r["enter_time"]) for r in rows] == [(profile, NOW)]


@pytest.mark.parametrize("mode", RETENTION_MODES)
async def test_first_and_last_seen_conditions_are_unchanged_by_retention(
    stack: Stack, database_url: str, mode: str
) -> None:
    """First and last seen are the times ingest keeps beside the profile's totals, not min/max
    over the events left: a profile whose old events retention removed (their months dropped,
    or the project's sweep) still matches the same conditions, one with no event left too."""
    await make_months(database_url, days_ago(300), days_ago(200))  # dropped whole (global)
    (veteran,) = await stack.import_events(custom_event("inst-1", "view", days_ago(200)))
    await stack.track(custom_event("inst-1", "purchase", days_ago(2)))
    (gone,) = await stack.import_events(custom_event("inst-2", "view", days_ago(300)))
    conditions = {
        "first seen 190 to 210 days ago": condition(
            first_seen=f.TimeWindow(
                range=f.TimeRange(start_time=_stamp(days_ago(210)), end_time=_stamp(days_ago(190)))
            )
        ),
        "last seen in the last week": condition(last_seen=f.TimeWindow(within_last_days=7)),
        "last seen 290 to 310 days ago": condition(
            last_seen=f.TimeWindow(
                range=f.TimeRange(start_time=_stamp(days_ago(310)), end_time=_stamp(days_ago(290)))
            )
        ),
        "first seen in the last 100 days": condition(first_seen=f.TimeWindow(within_last_days=100)),
    }
    before = {name: await stack.members(node) for name, node in conditions.items()}
    assert before == {
        "first seen 190 to 210 days ago": {veteran},
        "last seen in the last week": {veteran},
        "last seen 290 to 310 days ago": {gone},
        "first seen in the last 100 days": set(),
    }

    dropped = await apply_retention(database_url, stack.project.project_id, mode, NOW)

    if mode == "global":
        assert {"events_2029_08", "events_2029_11"} <= set(dropped)
    assert await stored_events(database_url, stack.project.project_id) == 1  # the purchase
    after = {name: await stack.members(node) for name, node in conditions.items()}
    assert after == before
