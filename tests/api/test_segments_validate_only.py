"""CreateSegment and CreateFunnel with validate_only (AIP-163) over real gRPC, PostgreSQL and
Redis, fed through identity and ingest: the answer is the size (the per-step counts) a real
creation then gives; nothing is stored and no change is announced; a request is refused exactly
as a creation refuses it (compared on several bad requests, the name taken and the limits); and
request_id is neither looked up nor remembered."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from datetime import UTC, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from profiles.segments.v1 import filters_pb2 as f
from profiles.segments.v1 import funnels_pb2
from profiles.segments.v1 import segments_service_pb2 as pb
from tests.support.ingest import NOW, stamp
from tests.support.segments_custom import (
    Stack,
    all_of,
    attribute,
    condition,
    custom_event,
    days_ago,
    group,
    not_,
    operand,
    segments_build,
    session,
    set_attributes,
    stack,
)

__all__ = ["segments_build", "stack"]

EQ, EXISTS, CONTAINS = f.OPERATOR_EQUALS, f.OPERATOR_EXISTS, f.OPERATOR_CONTAINS
LAST_WEEK = condition(last_seen=f.TimeWindow(within_last_days=7))

Refusal = tuple[grpc.StatusCode, str, str, dict[str, str], list[tuple[str, str]]]


async def refusal(call: Awaitable[Any]) -> Refusal:
    """Everything a client sees of a refused call: status, message, ErrorInfo's reason and
    metadata, and each field violation with its description."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    reason, metadata, fields = "", {}, []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Unpack(bad):
            fields.extend((v.field, v.description) for v in bad.field_violations)
    metadata.pop("request_id", None)  # the call's own ID, never the same twice
    return caught.value.code(), caught.value.details() or "", reason, metadata, fields


def preview_of(request: Any) -> Any:
    checked = type(request)()
    checked.CopyFrom(request)
    checked.validate_only = True
    return checked


async def stored_segments(stack: Stack) -> tuple[list[str], int]:
    """The project's segments as ListSegments lists them, and the stored member rows."""
    listed = await stack.segments.ListSegments(
        pb.ListSegmentsRequest(page_size=200), metadata=stack.read
    )
    members = await stack.pool.fetchval(
        "SELECT count(*) FROM custom_segment_members WHERE project_id = $1",
        stack.project.project_id,
    )
    return [s.segment_id for s in listed.segments], members


async def custom_changes_until(
    stack: Stack, profile_id: str, segment_ids: set[str]
) -> list[tuple[str, str]]:
    """Every custom segment change of the stream up to the ENTERED changes of `profile_id` in
    each of `segment_ids`, as (profile, segment)."""
    seen: list[tuple[str, str]] = []
    request = pb.WatchSegmentChangesRequest(start_time=stamp(NOW - timedelta(days=3650)))
    call = stack.segments.WatchSegmentChanges(request, metadata=stack.read)
    try:
        async with asyncio.timeout(10):
            async for response in call:
                for change in response.changes:
                    if change.WhichOneof("segment") == "custom_segment_id":
                        seen.append((change.profile_id, change.custom_segment_id))
                if {(profile_id, s) for s in segment_ids} <= set(seen):
                    break
    finally:
        call.cancel()
    return seen


async def test_a_segment_preview_stores_nothing_and_gives_the_size_a_creation_then_gives(
    stack: Stack,
) -> None:
    (pro_recent, *_) = await stack.track(
        set_attributes("i-1", days_ago(2), plan="pro"), *session("i-1", days_ago(2))
    )
    await stack.track(
        set_attributes("i-2", days_ago(10), plan="free"), *session("i-2", days_ago(10))
    )
    await stack.track(
        set_attributes("i-3", days_ago(1), plan="pro"),
        custom_event("i-3", "purchase", days_ago(1)),
    )
    watched = await stack.segments.CreateSegment(
        pb.CreateSegmentRequest(display_name="Watched", filter=attribute("plan", EQ, "pro")),
        metadata=stack.admin,
    )
    filters = {
        "pros": attribute("plan", EQ, "pro"),
        "last week": LAST_WEEK,
        "a plan, not seen this week": all_of(attribute("plan", EXISTS), not_(LAST_WEEK)),
        "nobody": attribute("plan", EQ, "gold"),
    }
    before = await stored_segments(stack)
    previews = {}
    for name, node in filters.items():
        request = pb.CreateSegmentRequest(display_name=name, description="d", filter=node)
        reply = await stack.segments.CreateSegment(preview_of(request), metadata=stack.admin)
        previews[name] = reply.segment
        # What would be created, without an ID or a creation time: nothing was.
        assert reply.segment.segment_id == ""
        assert not reply.segment.HasField("create_time")
        assert reply.segment.size_time.ToDatetime(tzinfo=UTC) == NOW
        assert (reply.segment.display_name, reply.segment.description) == (name, "d")
        assert reply.segment.filter == node
    assert await stored_segments(stack) == before
    assert await stack.definitions.evaluate_all() == 0
    assert {name: s.size for name, s in previews.items()} == {
        "pros": 2,
        "last week": 2,
        "a plan, not seen this week": 1,
        "nobody": 0,
    }

    # The same requests really created: the same sizes, now stored.
    created = {}
    for name, node in filters.items():
        request = pb.CreateSegmentRequest(display_name=name, description="d", filter=node)
        reply = await stack.segments.CreateSegment(request, metadata=stack.admin)
        assert reply.segment.size == previews[name].size, name
        created[name] = reply.segment.segment_id

    # A profile entering announces its changes for the real segments only: the previews left
    # nothing behind to be evaluated or announced.
    (newcomer,) = await stack.track(set_attributes("i-4", NOW, plan="pro"))
    # (The attribute change is its latest event: seen this week.)
    expected = {watched.segment.segment_id, created["pros"], created["last week"]}
    changes = await custom_changes_until(stack, newcomer, expected)
    known = {watched.segment.segment_id, *created.values()}
    assert {segment for _, segment in changes} <= known
    assert {(p, s) for p, s in changes if p == newcomer} == {(newcomer, s) for s in expected}
    # A creation announces its first members; a preview, nothing.
    assert {s for p, s in changes if p == pro_recent} == expected


async def test_a_segment_preview_is_refused_exactly_as_a_creation(stack: Stack) -> None:
    await stack.segments.CreateSegment(
        pb.CreateSegmentRequest(display_name="Taken", filter=attribute("a", EXISTS)),
        metadata=stack.admin,
    )
    bad_tree = all_of(
        attribute("plan", EQ, "pro"),
        attribute("bad name", EQ, "x"),
        attribute("age", CONTAINS, 3),
        condition(event_count=f.EventCountCondition(event_name="buy", operator=CONTAINS)),
        group(f.GROUP_OPERATOR_NOT),
    )
    bad_requests = {
        "every bad node": pb.CreateSegmentRequest(display_name="", filter=bad_tree),
        "too many conditions": pb.CreateSegmentRequest(
            display_name="s", filter=all_of(*[attribute("a", EXISTS)] * 32)
        ),
        "no filter, a bad request_id": pb.CreateSegmentRequest(
            display_name=" ", description="x" * 1001, request_id="not-a-uuid"
        ),
        "name taken, another case": pb.CreateSegmentRequest(
            display_name="TAKEN", filter=attribute("a", EXISTS)
        ),
    }
    before = await stored_segments(stack)
    codes = []
    for why, request in bad_requests.items():
        previewed = await refusal(
            stack.segments.CreateSegment(preview_of(request), metadata=stack.admin)
        )
        created = await refusal(stack.segments.CreateSegment(request, metadata=stack.admin))
        assert previewed == created, why
        codes.append((previewed[0], previewed[2], len(previewed[4])))
    assert codes == [
        (grpc.StatusCode.INVALID_ARGUMENT, "DEFINITION_INVALID", 6),
        (grpc.StatusCode.INVALID_ARGUMENT, "DEFINITION_INVALID", 2),
        (grpc.StatusCode.INVALID_ARGUMENT, "DEFINITION_INVALID", 4),
        (grpc.StatusCode.ALREADY_EXISTS, "DISPLAY_NAME_TAKEN", 0),
    ]
    # An admin's call: a read key is refused before anything else, as for a creation.
    request = preview_of(pb.CreateSegmentRequest(display_name="r", filter=attribute("a", EXISTS)))
    denied = await refusal(stack.segments.CreateSegment(request, metadata=stack.read))
    assert denied[0] == grpc.StatusCode.PERMISSION_DENIED
    assert await stored_segments(stack) == before

    # The project's limit.
    for i in range(99):
        await stack.segments.CreateSegment(
            pb.CreateSegmentRequest(display_name=f"seg {i:03}", filter=attribute("a", EXISTS)),
            metadata=stack.admin,
        )
    full = pb.CreateSegmentRequest(display_name="one more", filter=attribute("a", EXISTS))
    previewed = await refusal(stack.segments.CreateSegment(preview_of(full), metadata=stack.admin))
    assert previewed == await refusal(stack.segments.CreateSegment(full, metadata=stack.admin))
    assert previewed[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_segment_preview_neither_uses_nor_remembers_its_request_id(stack: Stack) -> None:
    key = str(uuid.uuid4())
    first = pb.CreateSegmentRequest(
        display_name="First", filter=attribute("a", EXISTS), request_id=key
    )
    previewed = await stack.segments.CreateSegment(preview_of(first), metadata=stack.admin)
    assert previewed.segment.segment_id == ""
    # The key was not remembered: another definition under it is created, not REQUEST_ID_REUSED.
    other = pb.CreateSegmentRequest(
        display_name="Other", filter=attribute("b", EXISTS), request_id=key
    )
    created = await stack.segments.CreateSegment(other, metadata=stack.admin)
    assert created.segment.display_name == "Other"
    # And a preview under the used key answers as a first call would, not with its segment.
    again = await stack.segments.CreateSegment(preview_of(first), metadata=stack.admin)
    assert again.segment.segment_id == ""
    assert again.segment.display_name == "First"
    # Under the key of "Other" and with its definition, a creation returns "Other" again; a
    # preview is checked as a new segment, whose name is taken.
    assert (await stack.segments.CreateSegment(other, metadata=stack.admin)) == created
    taken = await refusal(stack.segments.CreateSegment(preview_of(other), metadata=stack.admin))
    assert taken[:3] == (
        grpc.StatusCode.ALREADY_EXISTS,
        "another segment has this display_name",
        "DISPLAY_NAME_TAKEN",
    )
    listed = await stack.segments.ListSegments(pb.ListSegmentsRequest(), metadata=stack.read)
    assert [s.display_name for s in listed.segments] == ["Other"]


# -- funnels ----------------------------------------------------------------------------------


def window(hours: float) -> Duration:
    duration = Duration()
    duration.FromTimedelta(timedelta(hours=hours))
    return duration


def checkout(
    name: str = "Checkout", hours: float = 2, request_id: str = ""
) -> pb.CreateFunnelRequest:
    paid = funnels_pb2.EventAttributeCondition(
        attribute_name="amount", operator=f.OPERATOR_GREATER_THAN, value=operand(10)
    )
    return pb.CreateFunnelRequest(
        display_name=name,
        description="d",
        steps=[
            funnels_pb2.FunnelStep(event_name="view"),
            funnels_pb2.FunnelStep(event_name="cart"),
            funnels_pb2.FunnelStep(event_name="purchase", attribute_condition=paid),
        ],
        conversion_window=window(hours),
        request_id=request_id,
    )


def ago(hours: float) -> Any:
    return NOW - timedelta(hours=hours)


async def stored_funnels(stack: Stack) -> list[str]:
    reply = await stack.segments.ListFunnels(
        pb.ListFunnelsRequest(page_size=200), metadata=stack.read
    )
    return [x.funnel_id for x in reply.funnels]


async def test_a_funnel_preview_stores_nothing_and_gives_the_counts_a_creation_then_gives(
    stack: Stack,
) -> None:
    await stack.track(
        custom_event("i-a", "view", ago(10)),
        custom_event("i-a", "cart", ago(9.5)),
        custom_event("i-a", "purchase", ago(9), amount=20),
    )
    await stack.track(custom_event("i-b", "view", ago(5)), custom_event("i-b", "cart", ago(4)))
    await stack.track(custom_event("i-c", "view", ago(3)))
    # A 2-hour window and a 45-minute one: the counts follow the definition previewed.
    requests = [checkout("Two hours", 2), checkout("Three quarters", 0.75)]
    previews = []
    for request in requests:
        reply = await stack.segments.CreateFunnel(preview_of(request), metadata=stack.admin)
        assert reply.funnel.funnel_id == ""
        assert not reply.funnel.HasField("create_time")
        assert reply.funnel.display_name == request.display_name
        assert list(reply.funnel.steps) == list(requests[0].steps)
        assert reply.funnel.conversion_window == request.conversion_window
        previews.append(list(reply.funnel.reached_profile_counts))
    assert previews == [[3, 2, 1], [3, 1, 0]]
    assert await stored_funnels(stack) == []
    for request, counts in zip(requests, previews, strict=True):
        created = await stack.segments.CreateFunnel(request, metadata=stack.admin)
        assert list(created.funnel.reached_profile_counts) == counts
        got = await stack.segments.GetFunnel(
            pb.GetFunnelRequest(funnel_id=created.funnel.funnel_id), metadata=stack.read
        )
        assert list(got.funnel.reached_profile_counts) == counts
    assert len(await stored_funnels(stack)) == 2


async def test_a_funnel_preview_is_refused_exactly_as_a_creation(stack: Stack) -> None:
    await stack.segments.CreateFunnel(checkout("Taken"), metadata=stack.admin)
    bad_steps = pb.CreateFunnelRequest(
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
    one_step = pb.CreateFunnelRequest(
        display_name="", steps=[funnels_pb2.FunnelStep(event_name="a")], request_id="nope"
    )
    bad_requests = {
        "bad steps and window": bad_steps,
        "one step, no name, no window, a bad request_id": one_step,
        "name taken, another case": checkout("TAKEN"),
    }
    before = await stored_funnels(stack)
    codes = []
    for why, request in bad_requests.items():
        previewed = await refusal(
            stack.segments.CreateFunnel(preview_of(request), metadata=stack.admin)
        )
        created = await refusal(stack.segments.CreateFunnel(request, metadata=stack.admin))
        assert previewed == created, why
        codes.append((previewed[0], previewed[2]))
    assert codes == [
        (grpc.StatusCode.INVALID_ARGUMENT, "DEFINITION_INVALID"),
        (grpc.StatusCode.INVALID_ARGUMENT, "DEFINITION_INVALID"),
        (grpc.StatusCode.ALREADY_EXISTS, "DISPLAY_NAME_TAKEN"),
    ]
    assert await stored_funnels(stack) == before
    denied = await refusal(
        stack.segments.CreateFunnel(preview_of(checkout("r")), metadata=stack.read)
    )
    assert denied[0] == grpc.StatusCode.PERMISSION_DENIED

    for i in range(49):
        await stack.segments.CreateFunnel(checkout(f"funnel {i:02}"), metadata=stack.admin)
    full = checkout("one more")
    previewed = await refusal(stack.segments.CreateFunnel(preview_of(full), metadata=stack.admin))
    assert previewed == await refusal(stack.segments.CreateFunnel(full, metadata=stack.admin))
    assert previewed[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_funnel_preview_neither_uses_nor_remembers_its_request_id(stack: Stack) -> None:
    key = str(uuid.uuid4())
    previewed = await stack.segments.CreateFunnel(
        preview_of(checkout("First", request_id=key)), metadata=stack.admin
    )
    assert previewed.funnel.funnel_id == ""
    created = await stack.segments.CreateFunnel(
        checkout("Other", hours=3, request_id=key), metadata=stack.admin
    )
    assert created.funnel.display_name == "Other"
    listed = await stack.segments.ListFunnels(pb.ListFunnelsRequest(), metadata=stack.read)
    assert [x.display_name for x in listed.funnels] == ["Other"]
