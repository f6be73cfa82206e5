"""ListProfiles' profile_id_prefix: the profiles whose ID starts with 1 to 32 hex digits (any
case, dashes ignored), read as one range of the users table's primary key; checked against the
IDs' own text, with the other filters, every sort order and small pages."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import grpc
import pytest

from profiles.query.v1 import query_service_pb2 as pb
from profiles.segments.v1 import filters_pb2 as f
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from services.query.list_reads import ID_RANGE, SELECT_PROFILE_ROWS_PAGE, id_range
from tests.support.identity import new_id, violations
from tests.support.query import NOW, Suite, attribute_event, op, pages, start_suite
from tests.support.segments_custom import attribute, set_attributes

SORTS = [
    (order_by, sort_order)
    for order_by in (
        pb.PROFILE_ORDER_BY_LAST_SEEN,
        pb.PROFILE_ORDER_BY_SESSION_COUNT,
        pb.PROFILE_ORDER_BY_TIME_SPENT,
        pb.PROFILE_ORDER_BY_NAME,
    )
    for sort_order in (pb.SORT_ORDER_ASCENDING, pb.SORT_ORDER_DESCENDING)
]


@pytest.fixture
async def stack(start_services, settings_for_test, project, database_url) -> Any:  # type: ignore[no-untyped-def]
    suite = await start_suite(start_services, settings_for_test, project, database_url)
    handles = await start_services("segments", clock=suite.clock)
    return suite, segments_grpc.SegmentsServiceStub(handles["segments"].channel)


async def listed(suite: Suite, page_size: int = 2, **fields: Any) -> list[str]:
    """The profile IDs of every page of the users table with these fields."""
    request = pb.ListProfilesRequest(page_size=page_size, **fields)
    return [r.profile_id for r in await pages(suite, "ListProfiles", request, "profiles")]


async def counted(suite: Suite, **fields: Any) -> int:
    reply = await suite.call(
        "ListProfiles", pb.ListProfilesRequest(page_size=1, include_total_size=True, **fields)
    )
    assert not reply.total_size_is_lower_bound
    return int(reply.total_size)


def starting_with(ids: list[str], digits: str) -> list[str]:
    """The model: `ids` (in their order) whose hex text starts with `digits`."""
    return [i for i in ids if uuid.UUID(i).hex.startswith(digits)]


async def test_a_profile_id_prefix_lists_the_profiles_whose_id_starts_with_it(
    stack: Any,
) -> None:
    suite: Suite
    suite, segments = stack
    pro = await segments.CreateSegment(
        segments_pb.CreateSegmentRequest(
            display_name="Pro plan", filter=attribute("plan", f.OPERATOR_EQUALS, "pro")
        ),
        metadata=suite.project.metadata("admin"),
    )
    segment_id = pro.segment.segment_id
    installs = [new_id() for _ in range(48)]
    for n, inst in enumerate(installs):
        time = NOW - timedelta(minutes=n)
        # Half of them named Ana (a name filter to combine), every third one in the segment.
        await suite.track(
            set_attributes(inst, time, plan="pro" if n % 3 == 0 else "free"),
            attribute_event(inst, [op("set", "FIRST_NAME", "Ana" if n % 2 else "Bo")], time=time),
        )
    ids = [await suite.identity.profile_of(i) for i in installs]  # newest last seen first
    anas = {ids[n] for n in range(len(ids)) if n % 2}
    members = {ids[n] for n in range(len(ids)) if n % 3 == 0}
    await suite.settle(groups=("query", "segments"))
    assert await listed(suite, page_size=50) == ids

    # The first digit shared by the most profiles: a prefix of one digit that lists several,
    # over several pages.
    first_digits = [uuid.UUID(i).hex[0] for i in ids]
    digit = max(set(first_digits), key=first_digits.count)
    assert first_digits.count(digit) >= 3
    full = uuid.UUID(ids[5]).hex
    nobody = uuid.UUID(int=uuid.UUID(ids[6]).int ^ 1).hex
    for typed, digits in (
        (digit, digit),
        (digit.upper(), digit),
        (uuid.UUID(ids[1]).hex[:8], uuid.UUID(ids[1]).hex[:8]),  # what the console shows
        (uuid.UUID(ids[2]).hex[:8].upper(), uuid.UUID(ids[2]).hex[:8]),
        (ids[3][:13], uuid.UUID(ids[3]).hex[:12]),  # with the UUID's dash
        ("-".join(uuid.UUID(ids[4]).hex[:6]), uuid.UUID(ids[4]).hex[:6]),  # dashes anywhere
        (full, full),  # 32 digits: one ID exactly
        (ids[5].upper(), full),
        ("f" * 32, "f" * 32),  # the last UUID: the range's inclusive end
        (nobody, nobody),  # an ID one bit away from one
    ):
        expected = starting_with(ids, digits)
        assert await listed(suite, profile_id_prefix=typed) == expected, typed
        assert await counted(suite, profile_id_prefix=typed) == len(expected), typed
    assert len(starting_with(ids, digit)) >= 3  # the one-digit prefix paged
    assert starting_with(ids, full) == [ids[5]]
    assert starting_with(ids, nobody) == []

    # With the other filters and in every order: the same rows as the whole table's in that
    # order, restricted to the prefix.
    prefix = digit
    for order_by, sort_order in SORTS:
        order = {"order_by": order_by, "sort_order": sort_order}
        everyone = await listed(suite, page_size=50, **order)
        assert await listed(suite, profile_id_prefix=prefix, **order) == starting_with(
            everyone, prefix
        ), order
        named = await listed(suite, page_size=50, name_prefix="ana", **order)
        assert [p for p in named if p in anas] == named
        assert await listed(
            suite, profile_id_prefix=prefix, name_prefix="ana", **order
        ) == starting_with(named, prefix), order
        in_segment = await listed(suite, page_size=50, segment_id=segment_id, **order)
        assert set(in_segment) == members
        assert await listed(
            suite, profile_id_prefix=prefix, segment_id=segment_id, **order
        ) == starting_with(in_segment, prefix), order
    every_filter = {"name_prefix": "ana", "segment_id": segment_id, "profile_id_prefix": prefix}
    assert await counted(suite, **every_filter) == len(
        [i for i in starting_with(ids, prefix) if i in anas and i in members]
    )

    # A page token belongs to its prefix.
    first = await suite.call(
        "ListProfiles", pb.ListProfilesRequest(page_size=1, profile_id_prefix=digit)
    )
    assert first.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.call(
            "ListProfiles",
            pb.ListProfilesRequest(page_size=1, page_token=first.next_page_token),
        )
    assert violations(caught.value) == ["page_token"]
    # The same digits spelled otherwise are the same filter.
    again = await suite.call(
        "ListProfiles",
        pb.ListProfilesRequest(
            page_size=1, profile_id_prefix=digit.upper(), page_token=first.next_page_token
        ),
    )
    assert [r.profile_id for r in again.profiles] == starting_with(ids, digit)[1:2]


async def test_a_profile_id_prefix_that_is_no_hex_digits_is_refused_by_name(
    start_services: Any, settings_for_test: Any, project: Any, database_url: str
) -> None:
    suite = await start_suite(start_services, settings_for_test, project, database_url)
    for typed in ("g", "dcae577b 1", "dcae577b_", "-", "--", "0" * 33, "é", "0x1f", " ab",
                  "ab\n", "\u0663", "a" * 32 + "-" + "b"):  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await suite.call("ListProfiles", pb.ListProfilesRequest(profile_id_prefix=typed))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, typed
        assert violations(caught.value) == ["profile_id_prefix"], typed
    # 32 digits with every dash of a UUID, and more dashes: accepted.
    for typed in (str(uuid.uuid4()), "-a-" + "0" * 31 + "-"):
        await suite.call("ListProfiles", pb.ListProfilesRequest(profile_id_prefix=typed))


def test_a_prefix_is_the_range_of_ids_from_its_zeros_to_its_fs() -> None:
    assert id_range("dcae577b") == (
        uuid.UUID("dcae577b-0000-0000-0000-000000000000"),
        uuid.UUID("dcae577b-ffff-ffff-ffff-ffffffffffff"),
    )
    assert id_range("f") == (uuid.UUID(int=15 << 124), uuid.UUID(int=(1 << 128) - 1))
    # Only the prefixed statements hold the range: the others' plans never weigh it.
    for (*_, prefixed), statement in SELECT_PROFILE_ROWS_PAGE.items():
        assert ("BETWEEN" in statement) == prefixed
    assert "profile_id BETWEEN" in ID_RANGE
