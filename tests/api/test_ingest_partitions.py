"""TrackEvents on partitioned events (0024): the service makes its partitions on start, events
land in their month, and a retry stays a duplicate when skew correction moves it to another
month (the dedupe key does not depend on the time)."""

from __future__ import annotations

from datetime import timedelta

from profiles.ingest.v1 import ingest_service_pb2 as pb
from tests.conftest import eventually
from tests.support.ingest import NOW, Ingest, custom_event

ACCEPTED, DUPLICATE = pb.EVENT_OUTCOME_ACCEPTED, pb.EVENT_OUTCOME_DUPLICATE
PARTITIONS = """
    SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = $1::regclass"""


async def partitions(ingest: Ingest, parent: str) -> set[str]:
    return {r["relname"] for r in await ingest.fetch(PARTITIONS, parent)}


async def test_the_service_makes_this_month_and_two_ahead_on_start(ingest: Ingest) -> None:
    due = {"2030_06", "2030_07", "2030_08"}

    async def made() -> bool:
        for parent in ("events", "rejected_events"):
            if not {f"{parent}_{m}" for m in due} <= await partitions(ingest, parent):
                return False
        return True

    await eventually(made)
    reply = await ingest.track(custom_event("inst-1", event_id="now", time=NOW))
    assert reply.results[0].outcome == ACCEPTED
    stored = await ingest.fetch("SELECT tableoid::regclass::text AS part FROM events")
    assert [r["part"] for r in stored] == ["events_2030_06"]


async def test_a_retry_moved_to_another_month_by_skew_correction_is_a_duplicate(
    ingest: Ingest,
) -> None:
    # The device's clock is a day behind. First sent at once: stored at NOW - 13 h, in May.
    device_now = NOW - timedelta(days=1)
    event = custom_event("inst-1", event_id="late", time=device_now - timedelta(hours=13))
    first = await ingest.track(event, send_time=device_now)
    # The retry's send time says the device waited 2 more hours: corrected to NOW - 11 h, which
    # is 01:00 on June 1st, the next month's partition.
    retry = await ingest.track(event, send_time=device_now + timedelta(hours=2))

    assert [first.results[0].outcome, retry.results[0].outcome] == [ACCEPTED, DUPLICATE]
    rows = await ingest.fetch("SELECT event_time FROM events WHERE event_id = 'late'")
    assert [r["event_time"] for r in rows] == [NOW - timedelta(hours=13)]
