"""GetProfile's custom segment memberships and funnel progress, read from segments' read
contracts (custom_segment_members, profile_funnel_progress()) with identity, ingest, segments
and query running."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration

from profiles.query.v1 import profile_pb2
from profiles.segments.v1 import filters_pb2 as f
from profiles.segments.v1 import funnels_pb2
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from tests.api.test_identity_helpers import new_id
from tests.api.test_query_helpers import NOW, Suite, start_suite
from tests.api.test_segments_custom_helpers import (
    attribute,
    custom_event,
    operand,
    set_attributes,
)
from tests.conftest import eventually

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
    await segments.CreateSegment(
        segments_pb.CreateSegmentRequest(
            display_name="Gold plan", filter=attribute("plan", f.OPERATOR_EQUALS, "gold")
        ),
        metadata=admin,
    )
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
