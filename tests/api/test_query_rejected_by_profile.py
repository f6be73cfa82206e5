"""ListRejectedEvents' profile filter: only the rejected events of one profile (those that
arrived while its installation was theirs), a merged profile's with its survivor, and precise
refusals of an ID that is malformed or names no profile."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import grpc
import pytest

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.query.v1 import query_service_pb2 as pb
from shared.convert import timestamp_of
from tests.conftest import create_test_project
from tests.support.identity import error_info, new_id, violations
from tests.support.query import NOW, Suite, base_event, custom_event, pages, start_suite


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


def no_platform(installation_id: str) -> ingest_pb.Event:
    event = custom_event(installation_id)
    event.platform = types_pb2.PLATFORM_UNSPECIFIED
    return event


async def known_installation(suite: Suite) -> tuple[str, str]:
    """A new installation with one accepted event (identity links it to a profile, which its
    rejected events then name), and its profile."""
    installation = new_id()
    reply = await suite.track(custom_event(installation))
    assert reply.rejected_count == 0
    return installation, await suite.identity.profile_of(installation)


async def rejected_of(suite: Suite, **fields: Any) -> list[Any]:
    return await pages(
        suite,
        "ListRejectedEvents",
        pb.ListRejectedEventsRequest(page_size=2, **fields),
        "rejected_events",
    )


async def test_the_filter_lists_only_the_profiles_rejected_events(suite: Suite) -> None:
    mine, my_profile = await known_installation(suite)
    theirs, their_profile = await known_installation(suite)
    await suite.track(base_event(mine, NOW), no_platform(mine), base_event(mine, NOW))
    suite.clock.advance(timedelta(seconds=5))
    await suite.track(base_event(theirs, NOW), no_platform(theirs))
    suite.clock.advance(timedelta(seconds=5))
    await suite.track(no_platform(mine))

    found = await rejected_of(suite, profile_id=my_profile)
    assert [(r.installation_id, r.reason) for r in found] == [
        (mine, "PLATFORM_MISSING"),
        (mine, "PAYLOAD_MISSING"),
        (mine, "PLATFORM_MISSING"),
        (mine, "PAYLOAD_MISSING"),
    ]
    assert {r.installation_id for r in await rejected_of(suite, profile_id=their_profile)} == {
        theirs
    }
    assert len(await rejected_of(suite)) == 6  # without the filter: everyone's

    # Reasons, the time range and the counts combine with it.
    only = await rejected_of(suite, profile_id=my_profile, reasons=["PLATFORM_MISSING"])
    assert [(r.installation_id, r.reason) for r in only] == [(mine, "PLATFORM_MISSING")] * 2
    later = await rejected_of(
        suite, profile_id=my_profile, start_time=timestamp_of(NOW + timedelta(seconds=6))
    )
    assert [(r.installation_id, r.reason) for r in later] == [(mine, "PLATFORM_MISSING")]
    counted = await suite.call(
        "ListRejectedEvents",
        pb.ListRejectedEventsRequest(
            profile_id=my_profile, page_size=1, include_reason_counts=True
        ),
    )
    assert [(c.reason, c.count) for c in counted.reason_counts] == [
        ("PAYLOAD_MISSING", 2),
        ("PLATFORM_MISSING", 2),
    ]
    # A profile with nothing rejected lists nothing, and counts nothing.
    _, clean_profile = await known_installation(suite)
    clean = await suite.call(
        "ListRejectedEvents",
        pb.ListRejectedEventsRequest(profile_id=clean_profile, include_reason_counts=True),
    )
    assert list(clean.rejected_events) == []
    assert list(clean.reason_counts) == []


async def test_a_page_token_holds_only_for_the_profile_it_was_issued_for(suite: Suite) -> None:
    mine, my_profile = await known_installation(suite)
    _, their_profile = await known_installation(suite)
    await suite.track(no_platform(mine), no_platform(mine))
    first = await suite.call(
        "ListRejectedEvents", pb.ListRejectedEventsRequest(profile_id=my_profile, page_size=1)
    )
    assert first.next_page_token
    for other in ({"profile_id": their_profile}, {}):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await suite.call(
                "ListRejectedEvents",
                pb.ListRejectedEventsRequest(page_token=first.next_page_token, **other),
            )
        assert error_info(caught.value).reason == "PAGE_TOKEN_INVALID"


async def test_a_merge_brings_the_merged_profiles_rejected_events_along(suite: Suite) -> None:
    source_installation, source = await known_installation(suite)
    target_installation, target = await known_installation(suite)
    await suite.track(no_platform(source_installation))
    suite.clock.advance(timedelta(seconds=5))
    await suite.track(base_event(target_installation, NOW))
    await suite.identity.merge(source, target)

    expected = [
        (target_installation, "PAYLOAD_MISSING"),
        (source_installation, "PLATFORM_MISSING"),
    ]
    survivor = await rejected_of(suite, profile_id=target)
    assert [(r.installation_id, r.reason) for r in survivor] == expected
    # The merged-away ID resolves to its survivor, as GetProfile does.
    by_merged_id = await rejected_of(suite, profile_id=source)
    assert [(r.installation_id, r.reason) for r in by_merged_id] == expected


@pytest.mark.parametrize(
    "profile_id",
    ["not-a-uuid", "{" + str(uuid.uuid4()) + "}", uuid.uuid4().hex, "x" * 40],
    # Named, not shown: test IDs must be the same in every collecting process (pytest-xdist).
    ids=["not-a-uuid", "braced-uuid", "bare-hex-uuid", "forty-x"],
)
async def test_a_malformed_profile_id_is_refused_with_its_field(
    suite: Suite, profile_id: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.call("ListRejectedEvents", pb.ListRejectedEventsRequest(profile_id=profile_id))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == ["profile_id"]


async def test_a_malformed_profile_id_is_refused_beside_the_other_bad_fields(
    suite: Suite,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.call(
            "ListRejectedEvents",
            pb.ListRejectedEventsRequest(page_size=-1, profile_id="nope"),
        )
    assert violations(caught.value) == ["page_size", "profile_id"]


async def test_an_unknown_or_other_projects_profile_is_not_found(suite: Suite) -> None:
    mine, my_profile = await known_installation(suite)
    await suite.track(no_platform(mine))
    other = await create_test_project(suite.database_url)
    for profile_id, metadata in (
        (str(uuid.uuid4()), suite.project.metadata("read")),
        (my_profile, other.metadata("read")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await suite.query.ListRejectedEvents(
                pb.ListRejectedEventsRequest(profile_id=profile_id),
                metadata=metadata,
                timeout=10,
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(caught.value).reason == "PROFILE_NOT_FOUND"
