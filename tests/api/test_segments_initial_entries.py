"""A new custom segment's first members on the change stream, over real gRPC, PostgreSQL and
Redis, fed through identity and ingest: CreateSegment announces each member it stores as
entering (cause DEFINITION, at the creation), once, so that an automation streaming entries
gets them as it gets every later one; a retry, a preview and a segment nobody matches announce
nothing; with events handled during the creation, replaying the segment's changes gives exactly
its stored members, none entering twice in a row."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, timedelta

from profiles.segments.v1 import filters_pb2 as f
from profiles.segments.v1 import segments_pb2
from profiles.segments.v1 import segments_service_pb2 as pb
from tests.support.ingest import NOW, stamp
from tests.support.segments_custom import (
    Stack,
    attribute,
    segments_build,
    set_attributes,
    stack,
)

__all__ = ["segments_build", "stack"]

EQ, EXISTS = f.OPERATOR_EQUALS, f.OPERATOR_EXISTS
ENTERED, LEFT = segments_pb2.SEGMENT_TRANSITION_ENTERED, segments_pb2.SEGMENT_TRANSITION_LEFT
DEFINITION = segments_pb2.SEGMENT_CHANGE_CAUSE_DEFINITION
EVENT = segments_pb2.SEGMENT_CHANGE_CAUSE_EVENT


async def create(stack: Stack, name: str, node: f.FilterNode, **fields: object) -> pb.Segment:
    reply = await stack.segments.CreateSegment(
        pb.CreateSegmentRequest(display_name=name, filter=node, **fields),  # type: ignore[arg-type]
        metadata=stack.admin,
    )
    return reply.segment


async def stored_members(stack: Stack, segment_id: str) -> set[str]:
    rows = await stack.pool.fetch(
        "SELECT profile_id FROM custom_segment_members WHERE segment_id = $1",
        uuid.UUID(segment_id),
    )
    return {str(r["profile_id"]) for r in rows}


async def changes_of(stack: Stack, segment_id: str) -> list[segments_pb2.SegmentChange]:
    """Every change of the segment the stream holds up to now, in order. "Now" is a sentinel:
    a new profile entering a segment of its own by an event after everything the test did, so
    the stream holds its change after every change appended before it."""
    mark = f"sentinel_{uuid.uuid4().hex[:8]}"
    sentinel_segment = await create(stack, mark, attribute(mark, EXISTS))
    (sentinel,) = await stack.track(set_attributes(f"inst-{mark}", NOW, **{mark: 1}))
    changes: list[segments_pb2.SegmentChange] = []
    request = pb.WatchSegmentChangesRequest(start_time=stamp(NOW - timedelta(days=3650)))
    call = stack.segments.WatchSegmentChanges(request, metadata=stack.read)
    try:
        async with asyncio.timeout(20):
            async for response in call:
                changes.extend(response.changes)
                if any(
                    (c.profile_id, c.custom_segment_id, c.transition)
                    == (sentinel, sentinel_segment.segment_id, ENTERED)
                    for c in response.changes
                ):
                    break
    finally:
        call.cancel()
    return [c for c in changes if c.custom_segment_id == segment_id]


def moves(changes: Sequence[segments_pb2.SegmentChange]) -> list[tuple[str, int, int]]:
    return [(c.profile_id, c.transition, c.cause) for c in changes]


def replayed(changes: Sequence[segments_pb2.SegmentChange]) -> set[str]:
    """The members a consumer that applies the changes in order ends with; asserts that each
    profile's changes alternate, starting with ENTERED (nothing announced twice in a row)."""
    last: dict[str, int] = defaultdict(lambda: LEFT)
    for change in changes:
        assert change.transition != last[change.profile_id], moves(changes)
        last[change.profile_id] = change.transition
    return {p for p, transition in last.items() if transition == ENTERED}


async def test_a_new_segments_members_enter_it_on_the_stream(stack: Stack) -> None:
    ann, bob, _ = await stack.track(
        set_attributes("i-1", plan="pro"),
        set_attributes("i-2", plan="pro"),
        set_attributes("i-3", plan="free"),
    )
    request_id = str(uuid.uuid4())
    node = attribute("plan", EQ, "pro")
    segment = await create(stack, "French buyers", node, request_id=request_id)
    assert segment.size == 2
    assert await stored_members(stack, segment.segment_id) == {ann, bob}

    # A retry of the creation, a preview and a creation nobody matches announce nothing more.
    again = await create(stack, "French buyers", node, request_id=request_id)
    assert again.segment_id == segment.segment_id
    preview = await create(stack, "Preview", node, validate_only=True)
    assert preview.size == 2
    nobody = await create(stack, "Nobody", attribute("plan", EQ, "gold"))
    assert nobody.size == 0
    # The sweep finds nothing the creation did not announce itself.
    assert await stack.definitions.evaluate_all() == 0

    # Later moves are announced as ever, after the creation's.
    await stack.track(set_attributes("i-2", plan="free"), set_attributes("i-3", plan="pro"))
    changes = await changes_of(stack, segment.segment_id)
    carol = next(c.profile_id for c in changes if c.cause == EVENT and c.transition == ENTERED)
    assert sorted(moves(changes[:2])) == sorted(
        [(ann, ENTERED, DEFINITION), (bob, ENTERED, DEFINITION)]
    )
    assert sorted(moves(changes[2:])) == sorted([(bob, LEFT, EVENT), (carol, ENTERED, EVENT)])
    # Entered at the creation (the clock is frozen: its time), into this custom segment.
    for change in changes[:2]:
        assert change.change_time.ToDatetime(tzinfo=UTC) == NOW
        assert change.WhichOneof("segment") == "custom_segment_id"
    assert replayed(changes) == await stored_members(stack, segment.segment_id) == {ann, carol}
    assert await changes_of(stack, nobody.segment_id) == []


async def test_events_during_the_creation_leave_the_stream_the_members_exact_history(
    stack: Stack,
) -> None:
    # Profiles moving in and out of the filter while segments are created over it: whatever
    # each creation stored, its changes replayed give its members, none entering twice.
    profiles = await stack.track(
        *[set_attributes(f"i-{n}", plan="pro" if n % 2 else "free") for n in range(30)]
    )
    node = attribute("plan", EQ, "pro")

    async def flip(round_: int) -> None:
        await stack.track(
            *[
                set_attributes(f"i-{n}", plan="free" if (n + round_) % 2 else "pro")
                for n in range(30)
            ]
        )

    created = await asyncio.gather(
        create(stack, "Racing 1", node), flip(1), create(stack, "Racing 2", node), flip(2)
    )
    segments = [created[0], created[2]]
    assert all(s.size > 0 for s in segments)
    # The sweep settles what an event handled during a creation could not see (TIME).
    await stack.definitions.evaluate_all()
    for segment in segments:
        changes = await changes_of(stack, segment.segment_id)
        stored = await stored_members(stack, segment.segment_id)
        assert replayed(changes) == stored
        first_entries = [c for c in changes if c.cause == DEFINITION]
        assert len(first_entries) == segment.size
        assert {c.transition for c in first_entries} == {ENTERED}
        assert stored <= set(profiles)
