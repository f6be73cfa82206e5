"""The profile view's event totals (profile_event_counts, kept by triggers on events): after
every kind of write they equal a direct count of the stored events, and the view reads a
bounded number of event rows however many the profile holds."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest

from services.query.profile_reads import PROFILE_VIEW_BY_LOOKUP
from tests.support.identity import new_id
from tests.support.query import (
    NOW,
    Suite,
    attribute_event,
    crash,
    custom_event,
    op,
    session_end,
    session_start,
    start_suite,
)

STORED = """
    SELECT profile_id, event_count, crash_count FROM profile_event_counts
    WHERE project_id = $1"""
# The reference: every event of the project that belongs to a profile, counted directly.
DIRECT = """
    SELECT profile_id, count(*) AS event_count, count(*) FILTER (WHERE kind = 8) AS crash_count
    FROM events WHERE project_id = $1 AND profile_id IS NOT NULL
    GROUP BY profile_id"""
# The events of one profile as SQL inserts them in bulk (the triggers count those too).
BULK_EVENTS = """
    INSERT INTO events (project_id, installation_id, event_id, profile_id, kind, name,
                        event_time, receive_time, platform, payload)
    SELECT $1, $2, 'bulk-' || k, $3, CASE WHEN k % 500 = 0 THEN 8 ELSE 1 END, 'view',
           $4::timestamptz - make_interval(secs => k), $4::timestamptz, 1,
           CASE WHEN k % 500 = 0 THEN '{"name": "Bulk", "reason": "r"}'::jsonb
                ELSE '{"name": "view"}'::jsonb END
    FROM generate_series(1, $5::int) AS k"""


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


async def stored_and_direct(suite: Suite) -> tuple[dict[str, tuple[int, int]], ...]:
    project_id = suite.project.project_id
    stored = {
        str(r["profile_id"]): (r["event_count"], r["crash_count"])
        for r in await suite.fetch(STORED, project_id)
    }
    direct = {
        str(r["profile_id"]): (r["event_count"], r["crash_count"])
        for r in await suite.fetch(DIRECT, project_id)
    }
    return stored, direct


async def test_totals_equal_a_direct_count_after_events_merges_splits_refusals_and_erasure(
    suite: Suite,
) -> None:
    phone, tablet, laptop, stranger = new_id(), new_id(), new_id(), new_id()
    t = NOW - timedelta(hours=5)
    await suite.track(
        session_start(phone, "s1", t),
        custom_event(phone, time=t + timedelta(minutes=1)),
        crash(phone, t + timedelta(minutes=2)),
        session_end(phone, "s1", t + timedelta(minutes=3), 180),
    )
    await suite.identity.identify(phone, "ann")
    ann = await suite.identity.profile_of(phone)
    # A second device's anonymous history, merged in by logging in.
    await suite.track(
        custom_event(tablet, time=t + timedelta(minutes=10)),
        crash(tablet, t + timedelta(minutes=11)),
    )
    await suite.identity.identify(tablet, "ann")
    # Logging out starts a new anonymous profile whose events stay apart until the next login.
    await suite.identity.logout(phone)
    await suite.track(custom_event(phone, time=t + timedelta(minutes=20)))
    assert await suite.identity.profile_of(phone) != ann
    await suite.identity.identify(phone, "ann")
    # Server-side events by custom ID, and concurrent batches on one profile.
    await asyncio.gather(
        *(
            suite.track(
                custom_event(None, custom_id="ann", time=t + timedelta(minutes=30 + i)),
                custom_event(tablet, time=t + timedelta(minutes=30 + i)),
            )
            for i in range(6)
        )
    )
    # An admin merge of another person's history, crash included.
    await suite.track(crash(laptop, t + timedelta(minutes=40)), custom_event(laptop, time=t))
    await suite.identity.merge(await suite.identity.profile_of(laptop), ann)
    # A batch whose last event ingest refuses (attribute limit): inserted, then deleted in the
    # same transaction.
    await suite.track(
        *(
            attribute_event(phone, [op("set", f"a{i}_{j}", "v") for j in range(10)], time=t)
            for i in range(5)
        )
    )
    reply = await suite.track(
        custom_event(phone, time=t + timedelta(minutes=50)),
        attribute_event(phone, [op("set", "one_more", "v")], time=t + timedelta(minutes=50)),
    )
    assert reply.rejected_count == 1
    # An erased profile keeps no totals.
    await suite.track(crash(stranger, t), custom_event(stranger, time=t))
    erased = await suite.identity.profile_of(stranger)
    await suite.identity.delete(erased)

    stored, direct = await stored_and_direct(suite)
    assert stored == direct
    assert erased not in stored
    events, crashes = stored[ann]
    assert crashes == 3
    view = (await suite.get(profile_id=ann)).profile
    assert (view.counters.event_count, view.counters.crash_count) == (events, crashes)
    assert view.counters.last_crash.crash_time.ToDatetime().timestamp() == pytest.approx(
        (t + timedelta(minutes=40)).timestamp()
    )


def _event_rows_read(plan: dict[str, Any]) -> int:
    """The rows every node of an EXPLAIN ANALYZE plan read from the events table (its own or
    an index of it), over all its loops."""
    rows = 0
    # events is partitioned (0024): its partitions are named events_YYYY_MM and events_default.
    if plan.get("Relation Name", "").startswith("events"):
        rows += int(plan["Actual Rows"]) * int(plan["Actual Loops"])
        rows += int(plan.get("Rows Removed by Filter", 0)) * int(plan["Actual Loops"])
    for child in plan.get("Plans", []):
        rows += _event_rows_read(child)
    return rows


async def test_the_view_reads_a_bounded_number_of_events_however_many_the_profile_holds(
    suite: Suite,
) -> None:
    inst = new_id()
    await suite.track(custom_event(inst, time=NOW - timedelta(days=2)))
    profile_id = await suite.identity.profile_of(inst)
    project_id = suite.project.project_id
    await suite.fetch(BULK_EVENTS, project_id, inst, profile_id, NOW, 5_000)

    view = (await suite.get(profile_id=profile_id)).profile
    assert view.counters.event_count == 5_001
    assert view.counters.crash_count == 10
    assert view.counters.last_crash.name == "Bulk"
    first_seen, last_seen = (
        await suite.fetch(
            "SELECT min(event_time) AS a, max(event_time) AS b FROM events WHERE profile_id = $1",
            profile_id,
        )
    )[0]
    assert view.summary.first_seen_time.ToDatetime().timestamp() == pytest.approx(
        first_seen.timestamp()
    )
    assert view.summary.last_seen_time.ToDatetime().timestamp() == pytest.approx(
        last_seen.timestamp()
    )

    explain = "EXPLAIN (ANALYZE, FORMAT JSON) " + PROFILE_VIEW_BY_LOOKUP["profile_id"]
    plan = await suite.fetch(explain, project_id, profile_id, NOW, 100)
    document = plan[0][0]
    root = (json.loads(document) if isinstance(document, str) else document)[0]["Plan"]
    # first seen, last seen, last crash: one row each; the funnels read none without funnels.
    assert _event_rows_read(root) <= 3
