"""Ingest adds its batches' event totals and last crashes under the profile locks, not in the
insert (migrations 0027 and 0029). Checked against a model on random inputs: random concurrent
batches over a few devices and custom IDs, with crashes, retried batches, repeated events,
attribute events past the limit of 50 (stored, then deleted in the same transaction), logins
between rounds; afterwards every profile's totals, first/last event times and last crash equal
a direct reading of its stored events, and the accepted events are exactly the model's."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from typing import Any

import pytest

from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from tests.support.identity import new_id
from tests.support.query import NOW, Suite, attribute_event, crash, custom_event, op, start_suite

STORED = """
    SELECT profile_id, event_count, crash_count, first_event_time, last_event_time
    FROM profile_event_counts WHERE project_id = $1"""
DIRECT = """
    SELECT profile_id, count(*) AS event_count, count(*) FILTER (WHERE kind = 8) AS crash_count,
           min(event_time) AS first_event_time, max(event_time) AS last_event_time
    FROM events WHERE project_id = $1 AND profile_id IS NOT NULL
    GROUP BY profile_id"""
LAST_CRASHES = """
    SELECT profile_id, event_id FROM profile_last_crashes WHERE project_id = $1"""
DIRECT_LAST_CRASHES = """
    SELECT DISTINCT ON (profile_id) profile_id, event_id FROM events
    WHERE project_id = $1 AND profile_id IS NOT NULL AND kind = 8
    ORDER BY profile_id, event_time DESC, event_seq DESC"""
STORED_EVENT_IDS = "SELECT event_id FROM events WHERE project_id = $1 AND profile_id IS NOT NULL"


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


def random_event(rng: random.Random, devices: list[str], serial: int) -> ingest_pb.Event:
    device = rng.choice(devices)
    time = NOW - timedelta(hours=rng.uniform(0, 48))
    roll = rng.random()
    if roll < 0.15:
        return crash(device, time)
    if roll < 0.30:
        # Up to 12 new custom attributes an event: profiles reach the limit of 50 and some
        # events are refused (stored, then deleted in the transaction that stored them).
        names = [f"attr_{rng.randrange(80)}" for _ in range(rng.randrange(1, 12))]
        return attribute_event(device, [op("set", name, "v") for name in names], time=time)
    if roll < 0.40:
        return custom_event(None, custom_id=f"user-{rng.randrange(3)}", time=time)
    return custom_event(device, time=time, event_id=f"e-{serial}")


async def test_totals_equal_a_direct_count_after_random_concurrent_batches(suite: Suite) -> None:
    rng = random.Random(20261203)
    devices = [new_id() for _ in range(6)]
    accepted: set[str] = set()
    limit_refusals = 0
    serial = 0
    for round_ in range(4):
        batches: list[list[ingest_pb.Event]] = []
        for _ in range(6):
            batch = []
            for _ in range(rng.randrange(5, 40)):
                serial += 1
                batch.append(random_event(rng, devices, serial))
            if batch and rng.random() < 0.3:
                batch.append(batch[rng.randrange(len(batch))])  # a repeat within the batch
            batches.append(batch)
        # Some batches are sent twice at once (a client's retry racing the original).
        sends = [*batches, *(b for b in batches if rng.random() < 0.3)]
        replies = await asyncio.gather(*(suite.track(*batch) for batch in sends))
        for batch, reply in zip(sends, replies, strict=True):
            for event, result in zip(batch, reply.results, strict=True):
                if result.outcome == ingest_pb.EVENT_OUTCOME_ACCEPTED:
                    assert event.event_id not in accepted, "an event accepted twice"
                    accepted.add(event.event_id)
                limit_refusals += result.reason == "PROFILE_ATTRIBUTE_LIMIT"
        # Logins between rounds merge devices' histories into identified profiles.
        if round_ % 2 == 0:
            await suite.identity.identify(devices[round_], f"user-{round_ % 3}")

    rows: dict[str, Any] = {
        "stored": {
            str(r["profile_id"]): tuple(r.values())[1:]
            for r in await suite.fetch(STORED, suite.project.project_id)
        },
        "direct": {
            str(r["profile_id"]): tuple(r.values())[1:]
            for r in await suite.fetch(DIRECT, suite.project.project_id)
        },
    }
    assert rows["stored"] == rows["direct"]
    # The last crash ingest keeps with the totals (0029) is the latest crash stored.
    project_id = suite.project.project_id
    last_crashes = {(r[0], r[1]) for r in await suite.fetch(LAST_CRASHES, project_id)}
    assert last_crashes == {
        (r[0], r[1]) for r in await suite.fetch(DIRECT_LAST_CRASHES, project_id)
    }
    stored_ids = {
        r["event_id"] for r in await suite.fetch(STORED_EVENT_IDS, suite.project.project_id)
    }
    assert stored_ids == accepted
    # The inputs reached the cases this test is about: refusals deleted in their transaction,
    # crashes, several profiles.
    assert limit_refusals > 0
    assert sum(v[1] for v in rows["direct"].values()) > 0
    assert len(rows["direct"]) > 3
