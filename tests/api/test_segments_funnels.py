"""Funnels and RecomputeAll over real gRPC, PostgreSQL and Redis, fed through identity and
ingest: per-step counts, per-profile progress (completed, incomplete, out of order, outside the
window, several attempts, attribute conditions, merged profiles), and a recomputation after a
settings change."""

from __future__ import annotations

import uuid
from datetime import UTC, timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from profiles.common.v1 import types_pb2
from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.identity.v1 import identity_service_pb2_grpc as identity_grpc
from profiles.segments.v1 import filters_pb2 as f
from profiles.segments.v1 import funnels_pb2
from profiles.segments.v1 import segments_service_pb2 as pb
from tests.conftest import create_test_project
from tests.support.ingest import NOW
from tests.support.segments_custom import (
    Stack,
    condition,
    custom_event,
    error_details,
    operand,
    segments_build,
    session,
    stack,
)

__all__ = ["segments_build", "stack"]

HOUR = timedelta(hours=1)
COMPLETED = funnels_pb2.FUNNEL_STEP_STATUS_COMPLETED
NOT_COMPLETED = funnels_pb2.FUNNEL_STEP_STATUS_NOT_COMPLETED
NOT_REACHED = funnels_pb2.FUNNEL_STEP_STATUS_NOT_REACHED


def ago(hours: float) -> object:
    return NOW - timedelta(hours=hours)


def window(hours: float) -> Duration:
    duration = Duration()
    duration.FromTimedelta(timedelta(hours=hours))
    return duration


def checkout_funnel(name: str = "Checkout", hours: float = 2) -> pb.CreateFunnelRequest:
    paid = funnels_pb2.EventAttributeCondition(
        attribute_name="Amount", operator=f.OPERATOR_GREATER_THAN, value=operand(10)
    )
    return pb.CreateFunnelRequest(
        display_name=name,
        steps=[
            funnels_pb2.FunnelStep(event_name="View"),
            funnels_pb2.FunnelStep(event_name="cart"),
            funnels_pb2.FunnelStep(event_name="purchase", attribute_condition=paid),
        ],
        conversion_window=window(hours),
    )


async def progress(
    stack: Stack, profile_id: str, funnel_id: str = ""
) -> funnels_pb2.FunnelProgress:
    response = await stack.segments.GetFunnelProgress(
        pb.GetFunnelProgressRequest(profile_id=profile_id, funnel_id=funnel_id),
        metadata=stack.read,
    )
    assert response.profile_id == profile_id or funnel_id == ""
    (item,) = response.funnels
    return item


def statuses(item: funnels_pb2.FunnelProgress) -> list[int]:
    return [s.status for s in item.steps]


async def test_funnel_progress_and_counts_follow_the_best_attempt(stack: Stack) -> None:
    def buy(inst: str, hours: float, amount: float = 20) -> object:
        return custom_event(inst, "purchase", ago(hours), amount=amount)

    converted, *_ = await stack.track(
        custom_event("i-conv", "view", ago(10)),
        custom_event("i-conv", "cart", ago(9.5)),
        buy("i-conv", 9),
    )
    incomplete, *_ = await stack.track(
        custom_event("i-inc", "view", ago(10)), custom_event("i-inc", "cart", ago(9.5))
    )
    # Cart before view, and a purchase of 5 (fails the amount condition).
    out_of_order, *_ = await stack.track(
        custom_event("i-ooo", "cart", ago(10)),
        custom_event("i-ooo", "view", ago(9)),
        buy("i-ooo", 8.5, amount=5),
    )
    # The purchase comes 3 hours after the view: outside the 2-hour window.
    too_slow, *_ = await stack.track(
        custom_event("i-slow", "view", ago(10)),
        custom_event("i-slow", "cart", ago(9)),
        buy("i-slow", 7),
    )
    # A first attempt reaches the cart; the second one converts.
    retried, *_ = await stack.track(
        custom_event("i-retry", "view", ago(20)),
        custom_event("i-retry", "cart", ago(19)),
        custom_event("i-retry", "view", ago(5)),
        custom_event("i-retry", "cart", ago(4.5)),
        buy("i-retry", 4),
    )
    (bystander,) = await stack.track(custom_event("i-none", "other", ago(1)))
    created = await stack.segments.CreateFunnel(checkout_funnel(), metadata=stack.admin)
    funnel = created.funnel
    assert [s.event_name for s in funnel.steps] == ["view", "cart", "purchase"]
    assert list(funnel.reached_profile_counts) == [5, 4, 2]

    item = await progress(stack, converted, funnel.funnel_id)
    assert item.converted
    assert item.completed_step_count == 3
    assert [s.complete_time.ToDatetime(tzinfo=UTC) for s in item.steps] == [
        ago(10),
        ago(9.5),
        ago(9),
    ]
    assert item.attempt_deadline_time.ToDatetime(tzinfo=UTC) == ago(8)
    item = await progress(stack, incomplete, funnel.funnel_id)
    assert statuses(item) == [COMPLETED, COMPLETED, NOT_COMPLETED]
    assert not item.steps[2].HasField("complete_time")
    item = await progress(stack, out_of_order, funnel.funnel_id)
    assert statuses(item) == [COMPLETED, NOT_COMPLETED, NOT_REACHED]
    assert (await progress(stack, too_slow, funnel.funnel_id)).completed_step_count == 2
    item = await progress(stack, retried, funnel.funnel_id)
    assert item.converted
    assert item.attempt_start_time.ToDatetime(tzinfo=UTC) == ago(5)
    item = await progress(stack, bystander, funnel.funnel_id)
    assert item.completed_step_count == 0
    assert statuses(item) == [NOT_COMPLETED, NOT_REACHED, NOT_REACHED]
    assert not item.HasField("attempt_start_time")

    listed = await stack.segments.ListFunnels(pb.ListFunnelsRequest(), metadata=stack.read)
    assert [list(x.reached_profile_counts) for x in listed.funnels] == [[5, 4, 2]]
    # The incomplete profile completes its funnel: counts are exact as of now.
    await stack.track(buy("i-inc", 9.2))
    listed = await stack.segments.ListFunnels(pb.ListFunnelsRequest(), metadata=stack.read)
    assert list(listed.funnels[0].reached_profile_counts) == [5, 4, 3]


async def test_events_of_a_merged_profile_count_for_the_survivor(stack: Stack) -> None:
    source, *_ = await stack.track(
        custom_event("i-a", "view", ago(3)), custom_event("i-a", "cart", ago(2.5))
    )
    target, *_ = await stack.track(custom_event("i-b", "purchase", ago(2), amount=50))
    created = await stack.segments.CreateFunnel(checkout_funnel(hours=4), metadata=stack.admin)
    assert list(created.funnel.reached_profile_counts) == [1, 1, 0]
    identity = identity_grpc.IdentityServiceStub(stack.identity_channel)
    await identity.MergeProfiles(
        identity_pb.MergeProfilesRequest(
            source_profile_id=source, target_profile_id=target, request_id=str(uuid.uuid4())
        ),
        metadata=stack.admin,
    )
    response = await stack.segments.GetFunnelProgress(
        pb.GetFunnelProgressRequest(profile_id=source), metadata=stack.read
    )
    assert response.profile_id == target
    assert response.funnels[0].converted
    listed = await stack.segments.ListFunnels(pb.ListFunnelsRequest(), metadata=stack.read)
    assert list(listed.funnels[0].reached_profile_counts) == [1, 1, 1]


async def test_funnel_definitions_are_validated_idempotent_and_deletable(stack: Stack) -> None:
    bad = pb.CreateFunnelRequest(
        display_name="x",
        steps=[
            funnels_pb2.FunnelStep(event_name="ok"),
            funnels_pb2.FunnelStep(event_name="not ok!"),
            funnels_pb2.FunnelStep(
                event_name="buy",
                attribute_condition=funnels_pb2.EventAttributeCondition(
                    attribute_name="price", operator=f.OPERATOR_LESS_THAN, value=operand("cheap")
                ),
            ),
        ],
        conversion_window=window(24 * 91),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.segments.CreateFunnel(bad, metadata=stack.admin)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(caught.value)[1] == [
        "steps[1].event_name",
        "steps[2].attribute_condition.value",
        "conversion_window",
    ]
    request = checkout_funnel()
    request.request_id = str(uuid.uuid4())
    first = await stack.segments.CreateFunnel(request, metadata=stack.admin)
    again = await stack.segments.CreateFunnel(request, metadata=stack.admin)
    assert again.funnel.funnel_id == first.funnel.funnel_id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.segments.CreateFunnel(checkout_funnel("CHECKOUT"), metadata=stack.admin)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # Unique by Unicode case, not only ASCII's.
    await stack.segments.CreateFunnel(checkout_funnel("époque"), metadata=stack.admin)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.segments.CreateFunnel(checkout_funnel("ÉPOQUE"), metadata=stack.admin)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    funnel_id = first.funnel.funnel_id
    await stack.segments.DeleteFunnel(
        pb.DeleteFunnelRequest(funnel_id=funnel_id), metadata=stack.admin
    )
    await stack.segments.DeleteFunnel(
        pb.DeleteFunnelRequest(funnel_id=funnel_id, allow_missing=True), metadata=stack.admin
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.segments.DeleteFunnel(
            pb.DeleteFunnelRequest(funnel_id=funnel_id), metadata=stack.admin
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.segments.GetFunnelProgress(
            pb.GetFunnelProgressRequest(profile_id=str(uuid.uuid4())), metadata=stack.read
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_recompute_all_applies_changed_settings_and_streams_progress(stack: Stack) -> None:
    profiles = []
    for i in range(3):
        (profile, *_) = await stack.track(*session(f"i-{i}", NOW - timedelta(days=3)))
        profiles.append(profile)
    new = f.SmartSegmentCondition(segments=[types_pb2.SMART_SEGMENT_NEW])
    created = await stack.segments.CreateSegment(
        pb.CreateSegmentRequest(display_name="New", filter=condition(smart_segment=new)),
        metadata=stack.admin,
    )
    assert created.segment.size == 3
    # New now lasts 2 days: the 3-day-old profiles are One-time, though nothing happened.
    await stack.tenancy.set_setting(stack.project.project_id, "segments.new_days", 2)
    responses = [
        r async for r in stack.segments.RecomputeAll(pb.RecomputeAllRequest(), metadata=stack.admin)
    ]
    phases = [pb.RecomputePhase.Name(r.phase) for r in responses]
    assert phases[0] == "RECOMPUTE_PHASE_AGGREGATES"
    assert phases[-1] == "RECOMPUTE_PHASE_DONE"
    for phase in ("SMART_SEGMENTS", "CUSTOM_SEGMENTS", "FUNNELS"):
        assert f"RECOMPUTE_PHASE_{phase}" in phases
    smart = [r for r in responses if r.phase == pb.RECOMPUTE_PHASE_SMART_SEGMENTS]
    assert smart[-1].profiles_done == smart[-1].profiles_total == 3
    assert responses[-1].changed_profile_count == 3
    assert len({r.recompute_id for r in responses}) == 1
    for profile in profiles:
        got = await stack.segments.GetSmartSegment(
            pb.GetSmartSegmentRequest(profile_id=profile), metadata=stack.read
        )
        assert got.segment == types_pb2.SMART_SEGMENT_ONE_TIME
    rows = await stack.pool.fetch(
        "SELECT segment FROM segment_states WHERE project_id = $1 AND platform = 0",
        stack.project.project_id,
    )
    assert [r["segment"] for r in rows] == [types_pb2.SMART_SEGMENT_ONE_TIME] * 3
    # The custom segment's members left, announced with cause RECOMPUTE.
    assert await stack.pool.fetchval("SELECT count(*) FROM custom_segment_members") == 0


async def test_a_timestamp_condition_matches_the_time_it_names_below_the_microsecond(
    stack: Stack,
) -> None:
    """Times are kept to the microsecond, truncated, on both sides of a condition: `when EQUALS
    T` matches the event whose `when` is T, nanoseconds and all (it once missed it when T's
    nanoseconds were 500 or more: the operand was truncated, the stored value rounded)."""
    base = int((NOW - timedelta(days=1)).timestamp())

    def moment(nanos: int) -> types_pb2.AttributeValue:
        value = types_pb2.AttributeValue()
        value.timestamp_value.seconds = base
        value.timestamp_value.nanos = nanos
        return value

    late, early = moment(1_900), moment(400)  # microseconds 1 and 0
    profiles = {}
    for name, when in (("late", late), ("early", early)):
        profile_id, *_ = await stack.track(
            custom_event(f"i-{name}", "a", ago(3)),
            custom_event(f"i-{name}", "b", ago(2), when=when),
        )
        profiles[name] = profile_id

    async def completed(operator: int, value: types_pb2.AttributeValue) -> dict[str, int]:
        condition_on_when = funnels_pb2.EventAttributeCondition(
            attribute_name="when", operator=operator, value=value
        )
        created = await stack.segments.CreateFunnel(
            pb.CreateFunnelRequest(
                display_name=f"when {operator} {value.timestamp_value.nanos}",
                steps=[
                    funnels_pb2.FunnelStep(event_name="a"),
                    funnels_pb2.FunnelStep(event_name="b", attribute_condition=condition_on_when),
                ],
                conversion_window=window(24),
            ),
            metadata=stack.admin,
        )
        funnel_id = created.funnel.funnel_id
        return {
            name: (await progress(stack, profile_id, funnel_id)).completed_step_count
            for name, profile_id in profiles.items()
        }

    assert await completed(f.OPERATOR_EQUALS, late) == {"late": 2, "early": 1}
    assert await completed(f.OPERATOR_EQUALS, early) == {"late": 1, "early": 2}
    assert await completed(f.OPERATOR_EQUALS, moment(1_100)) == {"late": 2, "early": 1}
    assert await completed(f.OPERATOR_LESS_THAN_OR_EQUAL, late) == {"late": 2, "early": 2}
    assert await completed(f.OPERATOR_LESS_THAN_OR_EQUAL, early) == {"late": 1, "early": 2}


async def test_get_funnel_returns_one_funnel_with_the_counts_list_funnels_gives(
    stack: Stack,
) -> None:
    await stack.track(
        custom_event("i-get", "view", ago(3)),
        custom_event("i-get", "cart", ago(2.5)),
        custom_event("i-get", "purchase", ago(2), amount=50),
    )
    await stack.track(custom_event("i-half", "view", ago(3)))
    await stack.segments.CreateFunnel(checkout_funnel("Other"), metadata=stack.admin)
    created = await stack.segments.CreateFunnel(checkout_funnel(hours=4), metadata=stack.admin)
    funnel_id = created.funnel.funnel_id
    got = await stack.segments.GetFunnel(
        pb.GetFunnelRequest(funnel_id=funnel_id), metadata=stack.read
    )
    assert got.funnel == created.funnel
    assert list(got.funnel.reached_profile_counts) == [2, 1, 1]
    # Exact as of the call, as ListFunnels' counts are.
    await stack.track(custom_event("i-half", "cart", ago(1)))
    got = await stack.segments.GetFunnel(
        pb.GetFunnelRequest(funnel_id=funnel_id.upper()), metadata=stack.admin
    )
    listed = await stack.segments.ListFunnels(pb.ListFunnelsRequest(), metadata=stack.read)
    assert got.funnel == next(x for x in listed.funnels if x.funnel_id == funnel_id)
    assert list(got.funnel.reached_profile_counts) == [2, 2, 1]


async def test_get_funnel_of_an_unknown_or_malformed_id_is_not_found_or_invalid(
    stack: Stack, database_url: str
) -> None:
    created = await stack.segments.CreateFunnel(checkout_funnel(), metadata=stack.admin)
    funnel_id = created.funnel.funnel_id
    # Another project's key does not reach it.
    other = await create_test_project(database_url)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.segments.GetFunnel(
            pb.GetFunnelRequest(funnel_id=funnel_id), metadata=other.metadata("read")
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    await stack.segments.DeleteFunnel(
        pb.DeleteFunnelRequest(funnel_id=funnel_id), metadata=stack.admin
    )
    for unknown in (funnel_id, str(uuid.uuid4())):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.segments.GetFunnel(
                pb.GetFunnelRequest(funnel_id=unknown), metadata=stack.read
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_details(caught.value)[0] == "FUNNEL_NOT_FOUND"
    for malformed in ("", "not-a-uuid", "123"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.segments.GetFunnel(
                pb.GetFunnelRequest(funnel_id=malformed), metadata=stack.read
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(caught.value) == ("FUNNEL_ID_INVALID", ["funnel_id"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.segments.GetFunnel(
            pb.GetFunnelRequest(funnel_id=str(uuid.uuid4())), metadata=stack.project.metadata("sdk")
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
