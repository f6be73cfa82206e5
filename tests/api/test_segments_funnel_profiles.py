"""ListFunnelProfiles over real gRPC, PostgreSQL and Redis: the profiles behind a funnel step's
count (reached it, or dropped off after it), paged by profile ID.

On random histories (the funnel model test's: TrackEvents, ImportEvents, Identify, Logout,
MergeProfiles, DeleteProfile, skew, retries), every page size lists, over all its pages, exactly
the profiles the model says reached each step (or dropped off after it), each once, in
ascending ID order, with the time the best attempt completed the step: as many as GetFunnel
counts there. Then the listing's own promises: one moment for all pages, a token bound to its
listing and to the funnel's rule, and every refusal with its field.
"""

from __future__ import annotations

import base64
import random
import struct
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from profiles.segments.v1 import funnels_pb2
from profiles.segments.v1 import segments_service_pb2 as pb
from tests.api.test_segments_funnels_model import (
    Mapping,
    Step,
    World,
    best_attempt,
    funnel_request,
    random_funnel,
    random_history,
    run_history,
)
from tests.support.identity import Identity
from tests.support.ingest import NOW
from tests.support.segments_custom import (
    Stack,
    custom_event,
    error_details,
    segments_build,
    stack,
)

__all__ = ["segments_build", "stack"]

SEEDS = range(24)
REACHED = funnels_pb2.FUNNEL_PROFILE_SELECTION_REACHED
DROPPED = funnels_pb2.FUNNEL_PROFILE_SELECTION_DROPPED
HOUR = timedelta(hours=1)


async def listed(
    stack: Stack, funnel_id: str, step: int, selection: int, page_size: int
) -> list[funnels_pb2.FunnelStepProfile]:
    """Every page of one listing, in order; each page but the last is full, the last one says
    so with an empty token, and all of them are as of the first page's moment."""
    found: list[funnels_pb2.FunnelStepProfile] = []
    token, as_of = "", None
    for _ in range(10_000):
        page = await stack.segments.ListFunnelProfiles(
            pb.ListFunnelProfilesRequest(
                funnel_id=funnel_id,
                step_number=step,
                selection=selection,  # type: ignore[arg-type]
                page_size=page_size,
                page_token=token,
            ),
            metadata=stack.read,
        )
        as_of = as_of or page.as_of_time
        assert page.as_of_time == as_of
        found.extend(page.profiles)
        token = page.next_page_token
        if not token:
            return found
        assert len(page.profiles) == page_size
    raise AssertionError("the listing never ended")


async def check_listings(
    stack: Stack, world: World, mapping: Mapping, seed: int, funnel: tuple, rng: random.Random
) -> None:
    display_name, steps, requested = funnel
    created = await stack.segments.CreateFunnel(
        funnel_request(display_name, steps, requested), metadata=stack.admin
    )
    funnel_id = created.funnel.funnel_id
    got = await stack.segments.GetFunnel(
        pb.GetFunnelRequest(funnel_id=funnel_id), metadata=stack.read
    )
    counts = list(got.funnel.reached_profile_counts)
    window = got.funnel.conversion_window.ToTimedelta()
    best = {mapping.real[p]: best_attempt(world, p, steps, window) for p in world.live()}
    best = {profile_id: times for profile_id, times in best.items() if times}
    for step in range(1, len(steps) + 1):
        for selection in (REACHED, DROPPED) if step < len(steps) else (REACHED,):
            size = rng.choice([1, 2, 3, 500])
            case = (seed, display_name, steps, window, step, selection, size)
            profiles = await listed(stack, funnel_id, step, selection, size)
            ids = [p.profile_id for p in profiles]
            # Ascending, each once: what keyset paging on the ID promises.
            assert ids == sorted(set(ids), key=uuid.UUID), case
            if selection == REACHED:
                expected = {p for p, times in best.items() if len(times) >= step}
                assert len(ids) == counts[step - 1], case
            else:
                expected = {p for p, times in best.items() if len(times) == step}
                assert len(ids) == counts[step - 1] - counts[step], case
            assert set(ids) == expected, case
            for profile in profiles:
                times = best[profile.profile_id]
                assert profile.complete_time.ToDatetime(tzinfo=UTC) == times[step - 1], case
                deadline = profile.attempt_deadline_time.ToDatetime(tzinfo=UTC)
                assert deadline == times[0] + window, case
    await stack.segments.DeleteFunnel(
        pb.DeleteFunnelRequest(funnel_id=funnel_id), metadata=stack.admin
    )


async def test_the_pages_list_exactly_the_profiles_each_step_counts_on_random_histories(
    stack: Stack,
) -> None:
    identity = Identity(stack.identity_channel, stack.project)
    for seed in SEEDS:
        rng = random.Random(seed)
        names = [f"s{seed}_{x}" for x in ("view", "cart", "pay")]
        world, mapping = World(), Mapping()
        await run_history(stack, identity, world, mapping, random_history(rng, seed, names))
        for index in range(2):
            funnel = random_funnel(rng, seed, index, names)
            await check_listings(stack, world, mapping, seed, funnel, rng)


def ago(hours: float) -> datetime:
    return NOW - timedelta(hours=hours)


async def two_step_funnel(stack: Stack, name: str = "Signup", hours: float = 2) -> str:
    request = funnel_request(name, [Step("open", None), Step("signup", None)], hours * HOUR)
    created = await stack.segments.CreateFunnel(request, metadata=stack.admin)
    return created.funnel.funnel_id


async def list_page(stack: Stack, metadata: Any = None, **fields: Any) -> Any:
    return await stack.segments.ListFunnelProfiles(
        pb.ListFunnelProfilesRequest(**fields), metadata=metadata or stack.read
    )


async def test_a_profile_is_listed_with_its_best_attempt_under_its_survivor_id(
    stack: Stack,
) -> None:
    # A first attempt that stops at step 1, a later one that converts: the step times are the
    # converting attempt's. Two attempts that both stop at step 1: the earliest one's.
    converted, *_ = await stack.track(
        custom_event("i-two", "open", ago(10)),
        custom_event("i-two", "open", ago(5)),
        custom_event("i-two", "signup", ago(4)),
    )
    tied, *_ = await stack.track(
        custom_event("i-tie", "open", ago(9)), custom_event("i-tie", "open", ago(3))
    )
    stalled, *_ = await stack.track(
        custom_event("i-stall", "open", ago(12)), custom_event("i-stall", "open", ago(3))
    )
    # An anonymous profile merged into `stalled` after its own attempt converted: it counts
    # for the survivor, whose best attempt is now that one.
    merged_away, *_ = await stack.track(
        custom_event("i-merged", "open", ago(8)), custom_event("i-merged", "signup", ago(7.5))
    )
    identity = Identity(stack.identity_channel, stack.project)
    await identity.merge(merged_away, stalled)
    await stack.consumed()
    (lonely,) = await stack.track(custom_event("i-lonely", "open", ago(1)))
    funnel_id = await two_step_funnel(stack)

    reached = await list_page(stack, funnel_id=funnel_id, step_number=2, selection=REACHED)
    got = {p.profile_id: p for p in reached.profiles}
    assert set(got) == {converted, stalled}
    assert got[converted].complete_time.ToDatetime(tzinfo=UTC) == ago(4)
    assert got[converted].attempt_deadline_time.ToDatetime(tzinfo=UTC) == ago(5) + 2 * HOUR
    assert got[stalled].complete_time.ToDatetime(tzinfo=UTC) == ago(7.5)
    assert reached.as_of_time.ToDatetime(tzinfo=UTC) == NOW
    assert reached.next_page_token == ""

    dropped = await list_page(stack, funnel_id=funnel_id, step_number=1, selection=DROPPED)
    assert [p.profile_id for p in dropped.profiles] == sorted([tied, lonely], key=uuid.UUID)
    got = {p.profile_id: p for p in dropped.profiles}
    # As GetFunnelProgress: the earliest start wins when no attempt goes further.
    assert got[tied].complete_time.ToDatetime(tzinfo=UTC) == ago(9)
    assert got[lonely].complete_time.ToDatetime(tzinfo=UTC) == ago(1)
    # Still within its window: the deadline says it may yet sign up.
    assert got[lonely].attempt_deadline_time.ToDatetime(tzinfo=UTC) == ago(1) + 2 * HOUR

    first = await list_page(stack, funnel_id=funnel_id, step_number=1, selection=REACHED)
    assert {p.profile_id: p.complete_time.ToDatetime(tzinfo=UTC) for p in first.profiles} == {
        converted: ago(5),
        tied: ago(9),
        stalled: ago(8),
        lonely: ago(1),
    }
    progress = await stack.segments.GetFunnelProgress(
        pb.GetFunnelProgressRequest(profile_id=merged_away, funnel_id=funnel_id),
        metadata=stack.read,
    )
    assert progress.profile_id == stalled
    assert progress.funnels[0].steps[0].complete_time.ToDatetime(tzinfo=UTC) == ago(8)


async def test_later_pages_read_as_of_the_first_page(stack: Stack) -> None:
    """Events timed after the first page's moment (up to 10 minutes ahead is accepted) never
    join a listing under way, even once the clock has passed them."""
    originals = [(await stack.track(custom_event(f"i-o{k}", "open", ago(1))))[0] for k in range(2)]
    funnel_id = await two_step_funnel(stack)
    first = await list_page(
        stack, funnel_id=funnel_id, step_number=1, selection=REACHED, page_size=1
    )
    (head,) = first.profiles
    assert head.profile_id == min(originals, key=uuid.UUID)
    # Later profiles until one sorts after the first page's: page 2 would list it if it read
    # as of its own moment.
    late: list[str] = []
    for k in range(64):
        (profile_id,) = await stack.track(
            custom_event(f"i-late{k}", "open", NOW + timedelta(minutes=5))
        )
        late.append(profile_id)
        if uuid.UUID(profile_id) > uuid.UUID(head.profile_id):
            break
    stack.clock.advance(timedelta(minutes=6))
    now = await stack.segments.GetFunnel(
        pb.GetFunnelRequest(funnel_id=funnel_id), metadata=stack.read
    )
    assert now.funnel.reached_profile_counts[0] == 2 + len(late)
    second = await list_page(
        stack,
        funnel_id=funnel_id,
        step_number=1,
        selection=REACHED,
        page_size=10,
        page_token=first.next_page_token,
    )
    assert [p.profile_id for p in second.profiles] == [max(originals, key=uuid.UUID)]
    assert second.as_of_time == first.as_of_time
    assert second.next_page_token == ""


async def test_a_token_continues_its_own_listing_and_rule_only(stack: Stack) -> None:
    for k in range(3):
        await stack.track(
            custom_event(f"i-t{k}", "open", ago(1)), custom_event(f"i-t{k}", "signup", ago(0.5))
        )
    funnel_id = await two_step_funnel(stack)
    other_id = await two_step_funnel(stack, "Other")
    query = {"funnel_id": funnel_id, "step_number": 1, "selection": REACHED, "page_size": 1}
    first = await list_page(stack, **query)
    token = first.next_page_token
    assert token
    for changed in (
        {"funnel_id": other_id},
        {"step_number": 2},
        {"selection": DROPPED},
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_page(stack, **{**query, **changed, "page_token": token})
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, changed
        assert error_details(caught.value) == ("PAGE_INVALID", ["page_token"]), changed
    # Another page size is the same listing.
    second = await list_page(stack, **{**query, "page_size": 5, "page_token": token})
    assert len(second.profiles) == 2
    # A rename leaves the rule alone: the listing goes on.
    await stack.segments.UpdateFunnel(
        pb.UpdateFunnelRequest(
            funnel=funnels_pb2.Funnel(funnel_id=funnel_id, display_name="Renamed"),
            update_mask={"paths": ["display_name"]},
        ),
        metadata=stack.admin,
    )
    assert len((await list_page(stack, **{**query, "page_token": token})).profiles) == 1
    # A new window changes who is where: the listing cannot go on.
    request = funnel_request("Renamed", [Step("open", None), Step("signup", None)], 3 * HOUR)
    await stack.segments.UpdateFunnel(
        pb.UpdateFunnelRequest(
            funnel=funnels_pb2.Funnel(
                funnel_id=funnel_id, conversion_window=request.conversion_window
            ),
            update_mask={"paths": ["conversion_window"]},
        ),
        metadata=stack.admin,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await list_page(stack, **{**query, "page_token": token})
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert error_details(caught.value) == ("FUNNEL_CHANGED", [])


async def refusal(stack: Stack, **fields: Any) -> tuple[grpc.StatusCode, str, list[str]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await list_page(stack, **fields)
    reason, paths = error_details(caught.value)
    return caught.value.code(), reason, paths


async def test_bad_requests_are_refused_naming_each_field(stack: Stack) -> None:
    funnel_id = await two_step_funnel(stack)
    ok = {"funnel_id": funnel_id, "step_number": 1, "selection": REACHED}
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases: list[tuple[dict[str, Any], str, list[str]]] = [
        ({"funnel_id": "not-a-uuid"}, "FUNNEL_ID_INVALID", ["funnel_id"]),
        ({"funnel_id": ""}, "FUNNEL_ID_INVALID", ["funnel_id"]),
        ({"step_number": 0}, "STEP_INVALID", ["step_number"]),
        ({"step_number": -3}, "STEP_INVALID", ["step_number"]),
        ({"step_number": 3}, "STEP_INVALID", ["step_number"]),
        ({"step_number": 2**31 - 1}, "STEP_INVALID", ["step_number"]),
        # Nobody drops off after the last step.
        ({"step_number": 2, "selection": DROPPED}, "STEP_INVALID", ["step_number"]),
        ({"selection": 0}, "SELECTION_INVALID", ["selection"]),
        ({"selection": 7}, "SELECTION_INVALID", ["selection"]),
        ({"page_size": -1}, "PAGE_INVALID", ["page_size"]),
        ({"page_token": "garbage"}, "PAGE_INVALID", ["page_token"]),
        ({"page_token": "e30"}, "PAGE_INVALID", ["page_token"]),  # "{}"
        ({"page_token": "x" * 5000}, "PAGE_INVALID", ["page_token"]),
        # Every bad field at once, the first one's reason.
        (
            {
                "funnel_id": "nope",
                "step_number": 0,
                "selection": 0,
                "page_size": -5,
                "page_token": "%%",
            },
            "FUNNEL_ID_INVALID",
            ["funnel_id", "step_number", "selection", "page_size", "page_token"],
        ),
    ]
    for changes, reason, paths in cases:
        assert await refusal(stack, **{**ok, **changes}) == (invalid, reason, paths), changes
    missing = {**ok, "funnel_id": str(uuid.uuid4())}
    assert await refusal(stack, **missing) == (grpc.StatusCode.NOT_FOUND, "FUNNEL_NOT_FOUND", [])
    # A read key may list, an SDK key may not (before anything else is looked at).
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await list_page(stack, metadata=stack.project.metadata("sdk"), **missing)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    admin = await list_page(stack, metadata=stack.admin, **ok)
    assert list(admin.profiles) == []
    assert admin.next_page_token == ""


async def test_a_forged_token_of_the_right_shape_is_refused_not_failed(stack: Stack) -> None:
    """Tokens are checked value by value: a token of the right length whose values are out of
    range is INVALID_ARGUMENT, never INTERNAL."""
    funnel_id = await two_step_funnel(stack)
    good = {
        "version": 1,
        "funnel": uuid.UUID(funnel_id).bytes,
        "step": 1,
        "selection": 1,
        "rule": bytes(8),
        "moment": 0,
        "after": uuid.uuid4().bytes,
    }
    layout = struct.Struct(">B16sBB8sq16s")

    def token(**changes: Any) -> str:
        raw = layout.pack(*{**good, **changes}.values())
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    fields = {"funnel_id": funnel_id, "step_number": 1, "selection": REACHED}
    # The right shape, another rule: the funnel "changed".
    code, reason, _ = await refusal(stack, **fields, page_token=token())
    assert (code, reason) == (grpc.StatusCode.ABORTED, "FUNNEL_CHANGED")
    forged = [
        token(version=2),
        token(step=0),
        token(step=11),
        token(selection=0),
        token(selection=3),
        token(moment=-1),
        token(moment=2**63 - 1),
        token()[:-1],
        token() + "A",
        "!" * len(token()),
    ]
    for bad in forged:
        assert await refusal(stack, **fields, page_token=bad) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "PAGE_INVALID",
            ["page_token"],
        ), bad
