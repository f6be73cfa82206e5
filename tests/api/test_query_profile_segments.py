"""GetProfile's custom segment memberships and funnel progress, and the users table of one custom
segment, read from segments' read contracts (custom_segment_members, profile_funnel_progress())
with identity, ingest, segments and query running."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from profiles.query.v1 import profile_pb2
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.segments.v1 import filters_pb2 as f
from profiles.segments.v1 import funnels_pb2
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from tests.conftest import create_test_project, eventually
from tests.support.identity import new_id
from tests.support.query import NOW, Suite, pages, session_end, session_start, start_suite
from tests.support.segments_custom import (
    attribute,
    custom_event,
    error_details,
    operand,
    set_attributes,
)

COMPLETED = profile_pb2.FUNNEL_STEP_STATUS_COMPLETED
NOT_COMPLETED = profile_pb2.FUNNEL_STEP_STATUS_NOT_COMPLETED
NOT_REACHED = profile_pb2.FUNNEL_STEP_STATUS_NOT_REACHED


@pytest.fixture
async def stack(start_services, settings_for_test, project, database_url) -> Any:  # type: ignore[no-untyped-def]
    suite = await start_suite(start_services, settings_for_test, project, database_url)
    handles = await start_services("segments", clock=suite.clock)
    return suite, segments_grpc.SegmentsServiceStub(handles["segments"].channel)


def window(hours: float) -> Duration:
    duration = Duration()
    duration.FromTimedelta(timedelta(hours=hours))
    return duration


async def test_the_view_shows_custom_segments_and_every_funnels_progress(stack: Any) -> None:
    suite: Suite
    suite, segments = stack
    admin = suite.project.metadata("admin")
    pro = await segments.CreateSegment(
        segments_pb.CreateSegmentRequest(
            display_name="Pro plan", filter=attribute("plan", f.OPERATOR_EQUALS, "pro")
        ),
        metadata=admin,
    )
    gold = (
        await segments.CreateSegment(
            segments_pb.CreateSegmentRequest(
                display_name="Gold plan", filter=attribute("plan", f.OPERATOR_EQUALS, "gold")
            ),
            metadata=admin,
        )
    ).segment.segment_id
    big_cart = funnels_pb2.EventAttributeCondition(
        attribute_name="price", operator=f.OPERATOR_GREATER_THAN_OR_EQUAL, value=operand(10)
    )
    checkout = await segments.CreateFunnel(
        segments_pb.CreateFunnelRequest(
            display_name="Checkout",
            steps=[
                funnels_pb2.FunnelStep(event_name="view"),
                funnels_pb2.FunnelStep(event_name="cart", attribute_condition=big_cart),
                funnels_pb2.FunnelStep(event_name="pay"),
            ],
            conversion_window=window(24),
        ),
        metadata=admin,
    )
    onboarding = await segments.CreateFunnel(
        segments_pb.CreateFunnelRequest(
            display_name="Onboarding",
            steps=[
                funnels_pb2.FunnelStep(event_name="signup"),
                funnels_pb2.FunnelStep(event_name="tutorial"),
            ],
            conversion_window=window(24),
        ),
        metadata=admin,
    )
    inst = new_id()
    reply = await suite.track(
        custom_event(inst, "view", NOW - timedelta(hours=5)),
        custom_event(inst, "cart", NOW - timedelta(hours=4), price=5),
        custom_event(inst, "cart", NOW - timedelta(hours=3), price=20),
        set_attributes(inst, NOW - timedelta(hours=2), plan="pro"),
    )
    profile_id = reply.results[0].profile_id

    async def in_segment() -> bool:
        view = (await suite.get(profile_id=profile_id)).profile
        return len(view.segment_memberships) == 1

    # Memberships follow segments' handling of the events (the bus lag).
    await eventually(in_segment)
    view = (await suite.get(profile_id=profile_id)).profile
    (membership,) = view.segment_memberships
    assert membership.segment_id == pro.segment.segment_id
    assert membership.display_name == "Pro plan"
    assert membership.enter_time.ToDatetime(tzinfo=NOW.tzinfo) == NOW
    # The overview lists every custom segment, oldest first, sized as ListSegments sizes it.
    assert await segment_sizes(suite) == [
        (pro.segment.segment_id, "Pro plan", 1),
        (gold, "Gold plan", 0),
    ]
    listed = await segments.ListSegments(
        segments_pb.ListSegmentsRequest(), metadata=suite.project.metadata("read")
    )
    assert [(g.segment_id, g.display_name, g.size) for g in listed.segments] == (
        await segment_sizes(suite)
    )
    first, second = view.funnels
    assert first.funnel_id == checkout.funnel.funnel_id
    assert first.display_name == "Checkout"
    assert [(s.step_number, s.event_name, s.status) for s in first.steps] == [
        (1, "view", COMPLETED),
        (2, "cart", COMPLETED),
        (3, "pay", NOT_COMPLETED),
    ]
    assert [s.complete_time.ToDatetime(tzinfo=NOW.tzinfo) for s in first.steps[:2]] == [
        NOW - timedelta(hours=5),
        NOW - timedelta(hours=3),  # the cart of 5 does not pass the step's condition
    ]
    assert not first.steps[2].HasField("complete_time")
    assert (first.completed_step_count, first.converted) == (2, False)
    assert second.funnel_id == onboarding.funnel.funnel_id
    assert [s.status for s in second.steps] == [NOT_COMPLETED, NOT_REACHED]
    assert (second.completed_step_count, second.converted) == (0, False)
    # The view agrees with segments' own GetFunnelProgress.
    own = await segments.GetFunnelProgress(
        segments_pb.GetFunnelProgressRequest(profile_id=profile_id),
        metadata=suite.project.metadata("read"),
    )
    assert [[(s.status, s.complete_time) for s in p.steps] for p in own.funnels] == [
        [(s.status, s.complete_time) for s in p.steps] for p in view.funnels
    ]

    # Reads see their own writes: the pay event converts at once (computed at read time), and
    # leaving the segment shows once segments has handled the attribute change.
    await suite.track(
        custom_event(inst, "pay", NOW - timedelta(hours=1)),
        set_attributes(inst, NOW - timedelta(minutes=30), plan="free"),
    )
    view = (await suite.get(profile_id=profile_id)).profile
    assert view.funnels[0].converted

    async def left() -> bool:
        return not (await suite.get(profile_id=profile_id)).profile.segment_memberships

    await eventually(left)
    assert [size for _, _, size in await segment_sizes(suite)] == [0, 0]


async def segment_sizes(suite: Suite) -> list[tuple[str, str, int]]:
    overview = (await suite.call("GetOverview", query_pb.GetOverviewRequest())).overview
    return [(z.segment_id, z.display_name, z.profile_count) for z in overview.segment_sizes]


SORTS = [
    (order_by, sort_order)
    for order_by in (
        query_pb.PROFILE_ORDER_BY_LAST_SEEN,
        query_pb.PROFILE_ORDER_BY_SESSION_COUNT,
        query_pb.PROFILE_ORDER_BY_TIME_SPENT,
    )
    for sort_order in (query_pb.SORT_ORDER_DESCENDING, query_pb.SORT_ORDER_ASCENDING)
]


async def users_table(suite: Suite, **fields: Any) -> list[str]:
    """Every row's profile ID over every page of ListProfiles, one row a page."""
    request = query_pb.ListProfilesRequest(page_size=1, **fields)
    return [r.profile_id for r in await pages(suite, "ListProfiles", request, "profiles")]


async def test_the_users_table_of_a_custom_segment_lists_its_members_in_every_order(
    stack: Any,
) -> None:
    suite: Suite
    suite, segments = stack
    admin = suite.project.metadata("admin")
    pro = await segments.CreateSegment(
        segments_pb.CreateSegmentRequest(
            display_name="Pro plan", filter=attribute("plan", f.OPERATOR_EQUALS, "pro")
        ),
        metadata=admin,
    )
    segment_id = pro.segment.segment_id
    installs = [new_id() for _ in range(7)]
    for n, inst in enumerate(installs):
        batch = []
        for s in range(n % 4):  # session counts and times spent that differ, some equal
            start = NOW - timedelta(hours=10 * (n + 1) - s)
            batch += [
                session_start(inst, f"s{s}", start, country="FR" if n % 2 else "US"),
                session_end(inst, f"s{s}", start + timedelta(minutes=5), 60 * (n + 1)),
            ]
        batch.append(
            set_attributes(inst, NOW - timedelta(hours=n), plan="pro" if n != 1 else "free")
        )
        await suite.track(*batch)
    ids = [await suite.identity.profile_of(i) for i in installs]

    async def direct_members() -> set[str]:
        """The segment's stored members that are live profiles, read directly."""
        rows = await suite.fetch(
            "SELECT m.profile_id::text FROM custom_segment_members m JOIN profiles p"
            " ON p.project_id = m.project_id AND p.profile_id = m.profile_id"
            " WHERE m.project_id = $1 AND m.segment_id = $2 AND p.merged_into IS NULL",
            suite.project.project_id,
            uuid.UUID(segment_id),
        )
        return {r["profile_id"] for r in rows}

    async def check(expected: set[str]) -> None:
        await suite.settle(groups=("query", "segments"))
        assert await direct_members() == expected
        for order_by, sort_order in SORTS:
            everyone = await users_table(suite, order_by=order_by, sort_order=sort_order)
            members = await users_table(
                suite, segment_id=segment_id, order_by=order_by, sort_order=sort_order
            )
            # The same rows in the same order as the whole table, restricted to the members.
            assert members == [p for p in everyone if p in expected], (order_by, sort_order)
        french = await users_table(suite, segment_id=segment_id, country="FR")
        assert french == [p for p in await users_table(suite, country="FR") if p in expected]
        # The count of a segment's users table is its rows'.
        for fields, rows in (({}, expected), ({"country": "FR"}, french)):
            counted = await suite.call(
                "ListProfiles",
                query_pb.ListProfilesRequest(
                    segment_id=segment_id, include_total_size=True, page_size=1, **fields
                ),
            )
            assert (counted.total_size, counted.total_size_is_lower_bound) == (len(rows), False)

    await check({ids[n] for n in (0, 2, 3, 4, 5, 6)})
    # Members leave: two change plan, one is erased, one is merged into a non-member that
    # keeps its own plan.
    await suite.track(
        set_attributes(installs[2], NOW - timedelta(minutes=1), plan="free"),
        set_attributes(installs[5], NOW - timedelta(minutes=1), plan="gold"),
    )
    await suite.identity.delete(ids[3])
    await suite.track(set_attributes(installs[1], NOW, plan="free"))
    await suite.identity.merge(ids[6], ids[1])
    await check({ids[0], ids[4]})

    # A page token belongs to its segment.
    first = await suite.call(
        "ListProfiles", query_pb.ListProfilesRequest(page_size=1, segment_id=segment_id)
    )
    assert first.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await suite.call(
            "ListProfiles", query_pb.ListProfilesRequest(page_token=first.next_page_token)
        )
    assert reused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Unknown, deleted and other projects' segments are NOT_FOUND.
    other = await create_test_project(suite.database_url)
    with pytest.raises(grpc.aio.AioRpcError) as foreign:
        await suite.query.ListProfiles(
            query_pb.ListProfilesRequest(segment_id=segment_id),
            metadata=other.metadata("read"),
            timeout=10,
        )
    assert foreign.value.code() == grpc.StatusCode.NOT_FOUND
    await segments.DeleteSegment(
        segments_pb.DeleteSegmentRequest(segment_id=segment_id), metadata=admin
    )
    for unknown in (segment_id, str(uuid.uuid4())):
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await suite.call("ListProfiles", query_pb.ListProfilesRequest(segment_id=unknown))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_details(missing.value)[0] == "SEGMENT_NOT_FOUND"
