"""UpdateSegment and UpdateFunnel (AIP-134) over real gRPC, PostgreSQL and Redis, fed through
identity and ingest: a rename touches no member and announces nothing; a filter change moves
exactly the profiles a segment created afresh with the new filter holds, each announced once
(cause DEFINITION), also beside concurrent events, evaluations and updates; validate_only
answers what an update would do and changes nothing; masks, names, etags and IDs are refused
as the contract says; a funnel's new steps and window are what GetFunnel, the counts and the
progress read at once."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Awaitable, Sequence
from datetime import UTC, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from profiles.segments.v1 import filters_pb2 as f
from profiles.segments.v1 import funnels_pb2, segments_pb2
from profiles.segments.v1 import segments_service_pb2 as pb
from services.segments.convert import segment_definition_from_proto
from services.segments.filters import filter_to_json
from tests.conftest import eventually
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
    segments_build,
    set_attributes,
    stack,
)

__all__ = ["segments_build", "stack"]

EQ, IN, GE, LT = (
    f.OPERATOR_EQUALS,
    f.OPERATOR_IN,
    f.OPERATOR_GREATER_THAN_OR_EQUAL,
    f.OPERATOR_LESS_THAN,
)
EXISTS = f.OPERATOR_EXISTS
ENTERED, LEFT = segments_pb2.SEGMENT_TRANSITION_ENTERED, segments_pb2.SEGMENT_TRANSITION_LEFT
DEFINITION = segments_pb2.SEGMENT_CHANGE_CAUSE_DEFINITION
EVENT = segments_pb2.SEGMENT_CHANGE_CAUSE_EVENT

Refusal = tuple[grpc.StatusCode, str, list[tuple[str, str]]]


async def refusal(call: Awaitable[Any]) -> Refusal:
    """A refused call's status, ErrorInfo reason and (field, description) violations."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    reason, fields = "", []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(bad):
            fields.extend((v.field, v.description) for v in bad.field_violations)
    return caught.value.code(), reason, fields


def mask(*paths: str) -> FieldMask:
    return FieldMask(paths=list(paths))


async def create_segment(stack: Stack, name: str, node: f.FilterNode) -> segments_pb2.Segment:
    reply = await stack.segments.CreateSegment(
        pb.CreateSegmentRequest(display_name=name, filter=node), metadata=stack.admin
    )
    return reply.segment


async def update_segment(
    stack: Stack,
    segment: segments_pb2.Segment,
    *paths: str,
    validate_only: bool = False,
    metadata: Any = None,
) -> pb.UpdateSegmentResponse:
    request = pb.UpdateSegmentRequest(
        segment=segment, update_mask=mask(*paths), validate_only=validate_only
    )
    reply: pb.UpdateSegmentResponse = await stack.segments.UpdateSegment(
        request, metadata=metadata or stack.admin
    )
    return reply


async def get_segment(stack: Stack, segment_id: str) -> segments_pb2.Segment:
    reply = await stack.segments.GetSegment(
        pb.GetSegmentRequest(segment_id=segment_id), metadata=stack.read
    )
    return reply.segment


async def stored_members(stack: Stack, segment_id: str) -> dict[str, object]:
    """The segment's member rows: profile -> enter_time."""
    rows = await stack.pool.fetch(
        "SELECT profile_id, enter_time FROM custom_segment_members WHERE segment_id = $1",
        uuid.UUID(segment_id),
    )
    return {str(r["profile_id"]): r["enter_time"] for r in rows}


async def changes_until_sentinel(
    stack: Stack, segment: segments_pb2.Segment
) -> tuple[str, list[segments_pb2.SegmentChange]]:
    """Every change of the segment on the stream up to now after those of its creation (its
    first members entering, cause DEFINITION), in order, and the sentinel profile that marks
    "now": a new profile entering a segment of its own by an event after everything the test
    did, whose change the stream holds after every change appended before it."""
    segment_id = segment.segment_id
    mark = f"sentinel_{uuid.uuid4().hex[:8]}"
    sentinel_segment = await create_segment(stack, mark, attribute(mark, EXISTS))
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
    changes = [c for c in changes if c.custom_segment_id == segment_id]
    created = changes[: segment.size]
    assert [(c.transition, c.cause) for c in created] == [(ENTERED, DEFINITION)] * segment.size
    return sentinel, changes[segment.size :]


def moves(changes: Sequence[segments_pb2.SegmentChange]) -> list[tuple[str, int, int]]:
    return [(c.profile_id, c.transition, c.cause) for c in changes]


# -- a small random population and random filters over it ----------------------------------

PLANS = ["free", "pro", "team", None]


async def population(stack: Stack, rng: random.Random, count: int) -> list[str]:
    """`count` profiles with a random plan (or none), age, VIP flag and last-seen day."""
    events = []
    for n in range(count):
        traits: dict[str, Any] = {"age": rng.randint(16, 70), "vip": rng.random() < 0.3}
        plan = rng.choice(PLANS)
        if plan is not None:
            traits["plan"] = plan
        events.append(set_attributes(f"inst-{n}", days_ago(rng.randint(0, 20)), **traits))
    return await stack.track(*events)


CONDITIONS = [
    attribute("plan", EQ, "pro"),
    attribute("plan", IN, values=["pro", "team"]),
    attribute("plan", EXISTS),
    attribute("age", GE, 40),
    attribute("age", LT, 30),
    attribute("vip", EQ, True),
    condition(last_seen=f.TimeWindow(within_last_days=7)),
]


def random_filter(rng: random.Random) -> f.FilterNode:
    """One to three conditions joined by AND or OR, each maybe negated."""
    children = [
        not_(c) if rng.random() < 0.25 else c for c in rng.sample(CONDITIONS, rng.randint(1, 3))
    ]
    operator = rng.choice([f.GROUP_OPERATOR_AND, f.GROUP_OPERATOR_OR])
    return group(operator, *children)


# -- segments ------------------------------------------------------------------------------


async def test_a_rename_touches_no_member_and_announces_nothing(stack: Stack) -> None:
    pro, _, team = await stack.track(
        set_attributes("i-1", plan="pro"),
        set_attributes("i-2", plan="free"),
        set_attributes("i-3", plan="team"),
    )
    pros = attribute("plan", IN, values=["pro", "team"])
    segment = await create_segment(stack, "Paying", pros)
    before = await stored_members(stack, segment.segment_id)
    assert set(before) == {pro, team}

    renamed = segments_pb2.Segment(
        segment_id=segment.segment_id, display_name="Paying customers", description="pro or team"
    )
    reply = await update_segment(stack, renamed, "display_name", "description")
    assert (reply.segment.display_name, reply.segment.description) == (
        "Paying customers",
        "pro or team",
    )
    assert reply.segment.filter == pros
    assert reply.segment.size == 2
    assert reply.segment.create_time == segment.create_time
    assert reply.segment.etag != segment.etag
    assert (reply.entered_profile_count, reply.left_profile_count) == (0, 0)
    # The whole definition sent again (an empty mask: every field) with the filter unchanged
    # and only the name's case changed: its own name in another case is no collision.
    full = segments_pb2.Segment(
        segment_id=segment.segment_id, display_name="PAYING customers", filter=pros
    )
    reply = await update_segment(stack, full)
    assert (reply.segment.display_name, reply.segment.description) == ("PAYING customers", "")
    assert (reply.entered_profile_count, reply.left_profile_count) == (0, 0)
    got = await get_segment(stack, segment.segment_id)
    assert (got.display_name, got.etag, got.size) == ("PAYING customers", reply.segment.etag, 2)

    # Not a row touched (the enter times are the creation's), nothing left for the sweep, and
    # the stream holds nothing for the segment before the change a new member causes.
    assert await stored_members(stack, segment.segment_id) == before
    assert await stack.definitions.evaluate_all() == 0
    (newcomer,) = await stack.track(set_attributes("i-4", plan="pro"))
    _, changes = await changes_until_sentinel(stack, segment)
    assert moves(changes) == [(newcomer, ENTERED, EVENT)]


async def test_a_filter_change_moves_exactly_the_profiles_a_new_segment_would_hold(
    stack: Stack,
) -> None:
    rng = random.Random(20240611)
    profiles = await population(stack, rng, 40)
    first = random_filter(rng)
    segment = await create_segment(stack, "Moving", first)
    members = set(await stored_members(stack, segment.segment_id))
    assert members == await stack.members(first)
    expected: list[list[tuple[str, int, int]]] = []  # per update
    for _ in range(4):
        node = random_filter(rng)
        fresh = await stack.members(node)  # a segment created afresh with the new filter
        entering, leaving = fresh - members, members - fresh
        edited = segments_pb2.Segment(segment_id=segment.segment_id, filter=node)

        preview = await update_segment(stack, edited, "filter", validate_only=True)
        assert preview.segment.size == len(fresh)
        assert preview.segment.filter == node
        assert preview.segment.size_time.ToDatetime(tzinfo=UTC) == NOW
        assert (preview.entered_profile_count, preview.left_profile_count) == (
            len(entering),
            len(leaving),
        )
        assert set(await stored_members(stack, segment.segment_id)) == members  # unchanged

        reply = await update_segment(stack, edited, "filter")
        assert reply.segment.filter == node
        assert reply.segment.size == len(fresh)
        assert reply.segment.display_name == "Moving"  # not in the mask: kept
        assert (reply.entered_profile_count, reply.left_profile_count) == (
            len(entering),
            len(leaving),
        )
        assert set(await stored_members(stack, segment.segment_id)) == fresh
        # Each leaver and each newcomer once; no change for who matches both filters.
        expected.append(
            [(p, LEFT, DEFINITION) for p in leaving] + [(p, ENTERED, DEFINITION) for p in entering]
        )
        members = fresh
    assert await stack.definitions.evaluate_all() == 0  # nothing left to move

    sentinel, changes = await changes_until_sentinel(stack, segment)
    got = [move for move in moves(changes) if move[0] != sentinel]
    # The updates' changes in the updates' order, each update's exactly those expected (in
    # the order of its batches).
    assert len(got) == sum(len(moved) for moved in expected)
    start = 0
    for moved in expected:
        assert sorted(got[start : start + len(moved)]) == sorted(moved)
        start += len(moved)
    assert len(profiles) == 40


async def test_validate_only_changes_nothing(stack: Stack) -> None:
    _, b = await stack.track(set_attributes("i-1", plan="pro"), set_attributes("i-2", plan="free"))
    segment = await create_segment(stack, "Pros", attribute("plan", EQ, "pro"))
    members = await stored_members(stack, segment.segment_id)
    stored = await stack.pool.fetchrow(
        "SELECT display_name, description, filter, evaluate_time FROM custom_segments"
        " WHERE segment_id = $1",
        uuid.UUID(segment.segment_id),
    )
    frees = segments_pb2.Segment(
        segment_id=segment.segment_id,
        display_name="Free",
        description="moved",
        filter=attribute("plan", EQ, "free"),
        etag=segment.etag,
    )
    preview = await update_segment(stack, frees, validate_only=True)
    assert (preview.segment.display_name, preview.segment.size) == ("Free", 1)
    assert (preview.entered_profile_count, preview.left_profile_count) == (1, 1)
    assert preview.segment.etag not in ("", segment.etag)  # the etag it would have
    # A name-only preview: the stored size, nothing moving.
    renamed = segments_pb2.Segment(segment_id=segment.segment_id, display_name="Pro plan")
    preview = await update_segment(stack, renamed, "display_name", validate_only=True)
    assert (preview.segment.display_name, preview.segment.size) == ("Pro plan", 1)
    assert (preview.entered_profile_count, preview.left_profile_count) == (0, 0)

    assert await stored_members(stack, segment.segment_id) == members
    assert (
        await stack.pool.fetchrow(
            "SELECT display_name, description, filter, evaluate_time FROM custom_segments"
            " WHERE segment_id = $1",
            uuid.UUID(segment.segment_id),
        )
        == stored
    )
    assert (await get_segment(stack, segment.segment_id)).etag == segment.etag
    # Nothing announced: the first change on the stream is the one an event causes after.
    await stack.track(set_attributes("i-2", plan="pro"))
    _, changes = await changes_until_sentinel(stack, segment)
    assert moves(changes) == [(b, ENTERED, EVENT)]
    # The real update, the preview's etag refused and the read one accepted.
    real = segments_pb2.Segment()
    real.CopyFrom(frees)
    assert await update_segment(stack, real)  # etag of the read segment: accepted
    assert set(await stored_members(stack, segment.segment_id)) == set()  # nobody is free now


async def test_refusals_of_masks_names_etags_ids_and_roles(stack: Stack) -> None:
    taken = await create_segment(stack, "élite", attribute("a", EXISTS))
    segment = await create_segment(stack, "Mine", attribute("plan", EQ, "pro"))
    sid = segment.segment_id

    def named(**fields: Any) -> segments_pb2.Segment:
        return segments_pb2.Segment(segment_id=sid, **fields)

    mask_cases = {
        ("name",): "name is not a field of Segment",
        ("filter.group",): "filter.group is a sub-path",
        ("size",): "size cannot be updated",
        ("segment_id",): "segment_id cannot be updated",
        ("etag",): "etag cannot be updated",
        ("display_name", "*"): "“*” must be the only path",
    }
    for paths, why in mask_cases.items():
        code, reason, fields = await refusal(update_segment(stack, named(display_name="x"), *paths))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UPDATE_MASK_INVALID"), paths
        assert [field for field, _ in fields] == ["update_mask"], paths
        assert why in fields[0][1], (paths, fields)

    # Each field the mask names is checked as CreateSegment checks it, with its request path.
    bad_tree = all_of(attribute("plan", EQ, "pro"), attribute("bad name", EQ, "x"))
    code, reason, fields = await refusal(
        update_segment(stack, named(display_name=" ", filter=bad_tree), "display_name", "filter")
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "DEFINITION_INVALID")
    assert [field for field, _ in fields] == [
        "segment.display_name",
        "segment.filter.group.children[1].condition.attribute.custom_attribute",
    ]
    code, _, fields = await refusal(
        update_segment(stack, named(filter=all_of(*[attribute("a", EXISTS)] * 32)), "filter")
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert ("segment.filter", "has 32 conditions; at most 31 allowed") in fields
    # An empty mask is every field: without a filter, the filter is missing.
    code, _, fields = await refusal(update_segment(stack, named(display_name="Mine")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in fields] == ["segment.filter"]
    # Not in the mask, not checked: a bad filter beside a rename is ignored.
    reply = await update_segment(
        stack, named(display_name="Mine!", filter=bad_tree), "display_name"
    )
    assert reply.segment.filter == attribute("plan", EQ, "pro")

    # Names by the creation's rule: Unicode case folding (not only ASCII's, which the unique
    # index folds), another segment's name refused.
    code, reason, _ = await refusal(
        update_segment(stack, named(display_name="ÉLITE"), "display_name")
    )
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "DISPLAY_NAME_TAKEN")
    assert (await get_segment(stack, sid)).display_name == "Mine!"
    assert taken.display_name == "élite"

    # Etags: a stale one is ABORTED; the current one is accepted.
    stale = segment.etag
    current = (await get_segment(stack, sid)).etag
    assert stale != current
    code, reason, _ = await refusal(
        update_segment(stack, named(display_name="Other", etag=stale), "display_name")
    )
    assert (code, reason) == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    reply = await update_segment(stack, named(display_name="Other", etag=current), "display_name")
    assert reply.segment.display_name == "Other"

    # IDs: unknown is NOT_FOUND, malformed INVALID_ARGUMENT on its path.
    code, reason, _ = await refusal(
        update_segment(
            stack,
            segments_pb2.Segment(segment_id=str(uuid.uuid4()), display_name="x"),
            "display_name",
        )
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "SEGMENT_NOT_FOUND")
    code, reason, _ = await refusal(
        update_segment(
            stack,
            segments_pb2.Segment(segment_id=str(uuid.uuid4()), display_name="x"),
            "display_name",
            validate_only=True,
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND
    code, reason, fields = await refusal(
        update_segment(stack, segments_pb2.Segment(segment_id="nope"), "display_name")
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "SEGMENT_ID_INVALID")
    assert [field for field, _ in fields] == ["segment.segment_id"]

    # Roles: only admin keys update, checked before anything else.
    for role in ("sdk", "read"):
        for validate_only in (False, True):
            code, _, _ = await refusal(
                update_segment(
                    stack,
                    named(display_name="By " + role),
                    "display_name",
                    validate_only=validate_only,
                    metadata=stack.project.metadata(role),
                )
            )
            assert code == grpc.StatusCode.PERMISSION_DENIED, role
        code, _, _ = await refusal(
            stack.segments.UpdateFunnel(
                pb.UpdateFunnelRequest(funnel=funnels_pb2.Funnel(funnel_id="nope")),
                metadata=stack.project.metadata(role),
            )
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED, role
    assert (await get_segment(stack, sid)).display_name == "Other"


async def test_concurrent_events_evaluations_and_updates_announce_each_move_once(
    stack: Stack,
) -> None:
    rng = random.Random(7)
    await population(stack, rng, 30)
    segment = await create_segment(stack, "Busy", random_filter(rng))
    initial = set(await stored_members(stack, segment.segment_id))
    filters = [random_filter(rng) for _ in range(3)]

    async def edit(node: f.FilterNode) -> None:
        await update_segment(
            stack, segments_pb2.Segment(segment_id=segment.segment_id, filter=node), "filter"
        )

    async def churn() -> None:
        # Events moving the same profiles while the filter changes under them.
        events = [
            set_attributes(
                f"inst-{n}",
                NOW,
                plan=rng.choice(PLANS),
                age=rng.randint(16, 70),
                vip=rng.random() < 0.5,
            )
            for n in rng.sample(range(30), 10)
        ]
        await stack.track(*events)

    for node in filters:
        await asyncio.gather(edit(node), churn(), stack.definitions.evaluate_all())
    # Two updates at once: applied one after the other, the last one wins, never a mix.
    a, b = random_filter(rng), random_filter(rng)
    await asyncio.gather(edit(a), edit(b))
    final = (await get_segment(stack, segment.segment_id)).filter
    assert final in (a, b)
    assert await stack.definitions.evaluate_all() == 0
    members = set(await stored_members(stack, segment.segment_id))
    assert members == await stack.members(final)

    sentinel, changes = await changes_until_sentinel(stack, segment)
    # Each profile's changes alternate from where it started and end where it is: none was
    # announced twice nor missed, whatever ran beside the updates.
    state = {p: p in initial for p in {c.profile_id for c in changes} | initial | members}
    for change in changes:
        entering = change.transition == ENTERED
        assert state[change.profile_id] != entering, change
        state[change.profile_id] = entering
    now_in = {p for p, inside in state.items() if inside}
    assert now_in == set(await stored_members(stack, segment.segment_id))
    assert now_in - {sentinel} == members - {sentinel}


async def test_an_update_waits_for_an_event_transaction_that_read_the_old_filter(
    stack: Stack, database_url: str
) -> None:
    kept, _ = await stack.track(
        set_attributes("i-1", plan="pro", vip=True), set_attributes("i-2", plan="free")
    )
    segment = await create_segment(stack, "Pros", attribute("plan", EQ, "pro"))
    assert set(await stored_members(stack, segment.segment_id)) == {kept}
    project_id = stack.project.project_id
    # An event transaction of `kept` under way, as segments runs one: the profile locked, the
    # project's segments read (old filter) FOR KEY SHARE, and its evaluation written: here it
    # found `kept` leaving (its event, say, ended its plan under the old rule).
    event = await asyncpg.connect(database_url)
    try:
        transaction = event.transaction()
        await transaction.start()
        await event.execute(
            "SELECT 1 FROM segment_profiles WHERE project_id = $1 AND profile_id = $2 FOR UPDATE",
            project_id,
            uuid.UUID(kept),
        )
        await event.execute(
            "SELECT segment_id FROM custom_segments WHERE project_id = $1 FOR KEY SHARE",
            project_id,
        )
        await event.execute(
            "DELETE FROM custom_segment_members WHERE segment_id = $1 AND profile_id = $2",
            uuid.UUID(segment.segment_id),
            uuid.UUID(kept),
        )
        vips = attribute("vip", EQ, True)  # `kept` matches the new filter
        edited = segments_pb2.Segment(segment_id=segment.segment_id, filter=vips)
        update = asyncio.create_task(update_segment(stack, edited, "filter"))

        async def update_waits() -> bool:
            assert not update.done(), "the update did not wait for the event transaction"
            return bool(
                await stack.pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND query LIKE '%custom_segments%'"
                )
            )

        await eventually(update_waits)
        await transaction.commit()
    finally:
        await event.close()
    reply = await update
    # The change committed after the event's, so the recomputation saw `kept` out and matching
    # the new filter: it entered again. Had the update not waited, the event's write would
    # have landed after the recomputation, leaving `kept` out of a segment it matches.
    assert (reply.entered_profile_count, reply.left_profile_count) == (1, 0)
    assert set(await stored_members(stack, segment.segment_id)) == {kept}
    assert set(await stored_members(stack, segment.segment_id)) == await stack.members(vips)


async def test_the_sweep_finishes_a_recomputation_its_update_did_not(stack: Stack) -> None:
    pro, free = await stack.track(
        set_attributes("i-1", plan="pro"), set_attributes("i-2", plan="free")
    )
    segment = await create_segment(stack, "Pros", attribute("plan", EQ, "pro"))
    # What an UpdateSegment leaves when its caller goes away once the change committed, before
    # the recomputation: the new filter stored and evaluate_time cleared, the old members.
    frees = attribute("plan", EQ, "free")
    definition = segment_definition_from_proto(
        pb.CreateSegmentRequest(display_name="Pros", filter=frees)
    )
    await stack.pool.execute(
        "UPDATE custom_segments SET filter = $2::jsonb, evaluate_time = NULL WHERE segment_id = $1",
        uuid.UUID(segment.segment_id),
        json.dumps(filter_to_json(definition.filter)),
    )
    assert set(await stored_members(stack, segment.segment_id)) == {pro}
    # Due at once, whatever its last evaluation: the sweep moves the members, cause DEFINITION.
    assert await stack.definitions.evaluate_all(due_only=True) == 2
    assert set(await stored_members(stack, segment.segment_id)) == {free}
    assert set(await stored_members(stack, segment.segment_id)) == await stack.members(frees)
    _, changes = await changes_until_sentinel(stack, segment)
    assert moves(changes) == [(pro, LEFT, DEFINITION), (free, ENTERED, DEFINITION)]
    assert (await get_segment(stack, segment.segment_id)).size == 1


# -- funnels -------------------------------------------------------------------------------


def duration(value: timedelta) -> Duration:
    message = Duration()
    message.FromTimedelta(value)
    return message


def funnel_of(*names: str, window: timedelta, name: str = "Checkout") -> pb.CreateFunnelRequest:
    return pb.CreateFunnelRequest(
        display_name=name,
        steps=[funnels_pb2.FunnelStep(event_name=n) for n in names],
        conversion_window=duration(window),
    )


async def test_a_funnel_s_new_steps_and_window_are_what_every_read_counts(stack: Stack) -> None:
    hours = [
        # (view, cart, purchase) hours ago; None: not done
        (10, 9.5, 9),  # converts within 2 h; its purchase is an hour after the view
        (10, 9.8, None),  # view and cart within minutes, no purchase
        (10, None, 9.9),  # view, then purchase 6 minutes later, no cart
        (5, 4, 1),  # view and cart; the purchase 4 hours after the view
        (None, 3, 2),  # never viewed
    ]
    events = []
    for n, times in enumerate(hours):
        for name, ago in zip(("view", "cart", "purchase"), times, strict=True):
            if ago is not None:
                events.append(custom_event(f"i-{n}", name, NOW - timedelta(hours=ago)))
    profiles = list(dict.fromkeys(await stack.track(*events)))
    created = await stack.segments.CreateFunnel(
        funnel_of("view", "cart", "purchase", window=timedelta(hours=2)), metadata=stack.admin
    )
    funnel = created.funnel
    assert list(funnel.reached_profile_counts) == [4, 3, 1]
    before = await stack.segments.GetFunnelProgress(
        pb.GetFunnelProgressRequest(profile_id=profiles[2], funnel_id=funnel.funnel_id),
        metadata=stack.read,
    )
    assert before.funnels[0].completed_step_count == 1  # under way: viewed, no cart

    # Steps view -> purchase and a window of 45 minutes and a few nanoseconds (kept to the ms).
    window = timedelta(minutes=45)
    edited = funnels_pb2.Funnel(
        funnel_id=funnel.funnel_id,
        steps=[
            funnels_pb2.FunnelStep(event_name="View"),
            funnels_pb2.FunnelStep(event_name="purchase"),
        ],
        conversion_window=Duration(seconds=45 * 60, nanos=1_500),
        etag=funnel.etag,
    )
    # What a funnel created afresh with this definition counts now (a creation's preview).
    fresh = await stack.segments.CreateFunnel(
        pb.CreateFunnelRequest(
            display_name="fresh",
            steps=edited.steps,
            conversion_window=edited.conversion_window,
            validate_only=True,
        ),
        metadata=stack.admin,
    )
    preview = await stack.segments.UpdateFunnel(
        pb.UpdateFunnelRequest(
            funnel=edited, update_mask=mask("steps", "conversion_window"), validate_only=True
        ),
        metadata=stack.admin,
    )
    assert list(preview.funnel.reached_profile_counts) == list(fresh.funnel.reached_profile_counts)
    got = await stack.segments.GetFunnel(
        pb.GetFunnelRequest(funnel_id=funnel.funnel_id), metadata=stack.read
    )
    assert got.funnel == funnel  # validate_only stored nothing

    reply = await stack.segments.UpdateFunnel(
        pb.UpdateFunnelRequest(funnel=edited, update_mask=mask("steps", "conversion_window")),
        metadata=stack.admin,
    )
    assert [s.event_name for s in reply.funnel.steps] == ["view", "purchase"]
    assert reply.funnel.conversion_window.ToTimedelta() == window
    assert reply.funnel.display_name == "Checkout"
    assert list(reply.funnel.reached_profile_counts) == list(fresh.funnel.reached_profile_counts)
    assert list(reply.funnel.reached_profile_counts) == [4, 1]
    got = await stack.segments.GetFunnel(
        pb.GetFunnelRequest(funnel_id=funnel.funnel_id), metadata=stack.read
    )
    assert got.funnel == reply.funnel
    assert got.funnel.create_time == funnel.create_time
    listed = await stack.segments.ListFunnels(pb.ListFunnelsRequest(), metadata=stack.read)
    assert [list(x.reached_profile_counts) for x in listed.funnels] == [[4, 1]]
    # The attempt under way is read by the new steps: its purchase 6 minutes after the view
    # completes it now, with the new window's deadline.
    after = await stack.segments.GetFunnelProgress(
        pb.GetFunnelProgressRequest(profile_id=profiles[2], funnel_id=funnel.funnel_id),
        metadata=stack.read,
    )
    item = after.funnels[0]
    assert item.converted
    assert [s.event_name for s in item.steps] == ["view", "purchase"]
    assert item.attempt_deadline_time.ToDatetime(tzinfo=UTC) == NOW - timedelta(hours=10) + window

    # A rename alone keeps the definition and its counts; the stale etag is refused.
    code, reason, _ = await refusal(
        stack.segments.UpdateFunnel(
            pb.UpdateFunnelRequest(
                funnel=funnels_pb2.Funnel(
                    funnel_id=funnel.funnel_id, display_name="Buyers", etag=funnel.etag
                ),
                update_mask=mask("display_name"),
            ),
            metadata=stack.admin,
        )
    )
    assert (code, reason) == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    renamed = await stack.segments.UpdateFunnel(
        pb.UpdateFunnelRequest(
            funnel=funnels_pb2.Funnel(funnel_id=funnel.funnel_id, display_name="Buyers"),
            update_mask=mask("display_name"),
        ),
        metadata=stack.admin,
    )
    assert renamed.funnel.display_name == "Buyers"
    assert list(renamed.funnel.reached_profile_counts) == [4, 1]
    assert renamed.funnel.steps == reply.funnel.steps


async def test_funnel_update_refusals(stack: Stack) -> None:
    await stack.segments.CreateFunnel(
        funnel_of("a", "b", window=timedelta(hours=1), name="Taken"), metadata=stack.admin
    )
    created = await stack.segments.CreateFunnel(
        funnel_of("a", "b", window=timedelta(hours=1), name="Mine"), metadata=stack.admin
    )
    fid = created.funnel.funnel_id

    async def update(funnel: funnels_pb2.Funnel, *paths: str) -> Refusal:
        return await refusal(
            stack.segments.UpdateFunnel(
                pb.UpdateFunnelRequest(funnel=funnel, update_mask=mask(*paths)),
                metadata=stack.admin,
            )
        )

    code, reason, fields = await update(funnels_pb2.Funnel(funnel_id=fid), "steps.event_name")
    assert (code, reason, [x for x, _ in fields]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "UPDATE_MASK_INVALID",
        ["update_mask"],
    )
    for path in ("reached_profile_counts", "create_time", "window"):
        code, reason, _ = await update(funnels_pb2.Funnel(funnel_id=fid), path)
        assert reason == "UPDATE_MASK_INVALID", path
    one_step = funnels_pb2.Funnel(
        funnel_id=fid,
        steps=[funnels_pb2.FunnelStep(event_name="a")],
        conversion_window=Duration(seconds=30),
    )
    code, reason, fields = await update(one_step, "steps", "conversion_window")
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "DEFINITION_INVALID")
    assert [x for x, _ in fields] == ["funnel.steps", "funnel.conversion_window"]
    eleven = funnels_pb2.Funnel(
        funnel_id=fid,
        steps=[funnels_pb2.FunnelStep(event_name=n) for n in ["ok"] * 10 + ["not ok!"]],
    )
    code, _, fields = await update(eleven, "steps")
    assert ("funnel.steps", "must hold 2 to 10 steps, not 11") in fields
    bad_name = funnels_pb2.Funnel(
        funnel_id=fid, steps=[funnels_pb2.FunnelStep(event_name=n) for n in ("a", "b c")]
    )
    code, _, fields = await update(bad_name, "steps")
    assert [x for x, _ in fields] == ["funnel.steps[1].event_name"]
    code, reason, _ = await update(
        funnels_pb2.Funnel(funnel_id=fid, conversion_window=Duration(seconds=91 * 86400)),
        "conversion_window",
    )
    assert reason == "DEFINITION_INVALID"
    code, reason, _ = await update(
        funnels_pb2.Funnel(funnel_id=fid, display_name="TAKEN"), "display_name"
    )
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "DISPLAY_NAME_TAKEN")
    code, reason, _ = await update(
        funnels_pb2.Funnel(funnel_id=str(uuid.uuid4()), display_name="x"), "display_name"
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "FUNNEL_NOT_FOUND")
    code, reason, fields = await update(funnels_pb2.Funnel(funnel_id="x"), "display_name")
    assert (code, reason, [x for x, _ in fields]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "FUNNEL_ID_INVALID",
        ["funnel.funnel_id"],
    )
    got = await stack.segments.GetFunnel(pb.GetFunnelRequest(funnel_id=fid), metadata=stack.read)
    assert got.funnel == created.funnel  # every refusal left it as it was
