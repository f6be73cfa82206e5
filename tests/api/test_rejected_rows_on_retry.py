"""A retried batch stores its rejected events once, as it stores its good events once: SDKs
retry whole batches (a lost answer, a timeout, an UNAVAILABLE), and each attempt used to add a
rejected row per refused event, inflating ListRejectedEvents and its reason counts (0064)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.query.v1 import query_service_pb2 as pb
from tests.support.identity import new_id
from tests.support.query import NOW, Suite, custom_event, pages, stamp, start_suite


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


def bad_events(installation_id: str) -> list[ingest_pb.Event]:
    """Three events refused for three different rules, each with its own event ID."""
    no_platform = custom_event(installation_id)
    no_platform.platform = types_pb2.PLATFORM_UNSPECIFIED
    no_name = custom_event(installation_id, name="")
    future = custom_event(installation_id)
    future.event_time.CopyFrom(stamp(NOW + timedelta(days=30)))
    return [no_platform, no_name, future]


def answers(reply: ingest_pb.TrackEventsResponse) -> list[tuple[str, int, str, str, int]]:
    return [(r.event_id, r.outcome, r.reason, r.field_path, r.status.code) for r in reply.results]


async def rejected_rows(suite: Suite, **fields: str) -> list[pb.RejectedEvent]:
    return await pages(
        suite,
        "ListRejectedEvents",
        pb.ListRejectedEventsRequest(page_size=50, **fields),
        "rejected_events",
    )


async def reason_counts(suite: Suite) -> dict[str, int]:
    reply = await suite.call(
        "ListRejectedEvents", pb.ListRejectedEventsRequest(include_reason_counts=True)
    )
    return {c.reason: c.count for c in reply.reason_counts}


async def test_a_batch_sent_three_times_keeps_its_three_rejected_rows_once(suite: Suite) -> None:
    installation = new_id()
    batch = [custom_event(installation), *bad_events(installation), custom_event(installation)]
    first = await suite.track(*batch)
    assert (first.accepted_count, first.rejected_count) == (2, 3)
    reasons = {r.event_id: r.reason for r in first.results if r.reason}
    assert len(set(reasons.values())) == 3, reasons

    for _ in range(2):
        suite.clock.advance(timedelta(seconds=30))  # a retry arrives later, as an SDK's does
        again = await suite.track(*batch)
        assert (again.duplicate_count, again.rejected_count) == (2, 3)
        # The rejected events are answered as the first time: REJECTED, same reason and path.
        rejected_answers = [a for a in answers(again) if a[1] == ingest_pb.EVENT_OUTCOME_REJECTED]
        assert rejected_answers == [
            a for a in answers(first) if a[1] == ingest_pb.EVENT_OUTCOME_REJECTED
        ]

    rows = await rejected_rows(suite)
    assert sorted((r.event_id, r.reason) for r in rows) == sorted(reasons.items())
    assert sum((await reason_counts(suite)).values()) == 3


async def test_five_concurrent_copies_of_a_batch_keep_three_rejected_rows(suite: Suite) -> None:
    installation = new_id()
    batch = [custom_event(installation), *bad_events(installation), custom_event(installation)]
    replies = await asyncio.gather(*(suite.track(*batch) for _ in range(5)))

    assert all(r.rejected_count == 3 for r in replies)
    assert sum(r.accepted_count for r in replies) == 2
    rejected_answers = {
        tuple(a for a in answers(r) if a[1] == ingest_pb.EVENT_OUTCOME_REJECTED) for r in replies
    }
    assert len(rejected_answers) == 1
    rows = await rejected_rows(suite)
    assert len(rows) == 3
    assert len({r.event_id for r in rows}) == 3


async def test_a_refused_event_without_an_event_id_is_kept_per_attempt(suite: Suite) -> None:
    """An event without an event ID has nothing to know a retry by: each attempt keeps it, as
    before (its siblings with event IDs are kept once)."""
    installation = new_id()
    nameless = custom_event(installation)
    nameless.event_id = ""
    batch = [nameless, *bad_events(installation)[:1]]
    for _ in range(3):
        reply = await suite.track(*batch)
        assert reply.rejected_count == 2
        suite.clock.advance(timedelta(seconds=30))

    rows = await rejected_rows(suite)
    assert sorted(r.event_id for r in rows) == ["", "", "", batch[1].event_id]


# The dedupe keys the erased person's rejected rows were kept under.
REJECTED_KEYS = """
    SELECT count(*) FROM event_keys k
    JOIN rejected_events r
        ON k.event_key = profiles_ingest_rejected_key(r.installation_id, r.custom_id, r.event_id,
                                                      r.reason, r.field_path)
    WHERE r.project_id = $1 AND k.project_id = $1 AND r.installation_id = $2"""
# Any key computed from the installation ID and one of the event IDs, whatever its reason.
KEYS_OF = """
    SELECT count(*) FROM event_keys k
    JOIN unnest($3::text[], $4::text[], $5::text[]) AS x(event_id, reason, field_path)
        ON k.event_key = profiles_ingest_rejected_key($2, NULL, x.event_id, x.reason,
                                                      x.field_path)
    WHERE k.project_id = $1"""


async def test_erasing_a_profile_removes_its_rejected_rows_and_their_keys(suite: Suite) -> None:
    installation = new_id()
    batch = [custom_event(installation), *bad_events(installation)]
    await suite.track(*batch)
    suite.clock.advance(timedelta(seconds=30))
    await suite.track(*batch)
    profile = await suite.identity.profile_of(installation)
    rows = await rejected_rows(suite, profile_id=profile)
    assert len(rows) == 3
    project_id = suite.project.project_id
    assert await suite.fetchval(REJECTED_KEYS, project_id, installation) == 3
    refusals = [[r.event_id for r in rows], [r.reason for r in rows], [r.field_path for r in rows]]

    await suite.identity.delete(profile)

    assert await rejected_rows(suite) == []
    assert await suite.fetchval(KEYS_OF, project_id, installation, *refusals) == 0
    # No key names the erased installation or its event IDs in clear.
    for text in [installation, *refusals[0]]:
        found = await suite.fetchval(
            "SELECT count(*) FROM event_keys k WHERE strpos(k::text, $1) > 0", text
        )
        assert found == 0
