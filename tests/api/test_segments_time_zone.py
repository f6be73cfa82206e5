"""The time zone segments counts calendar days in follows the profile's timezone attribute as
ingest's replay leaves it: a set-once counts only where it applied (it once moved segments'
zone even when ingest ignored it), and segments agrees with GetProfile. Operations arrive in
event-time order: a set-once that an operation arriving later but timed earlier undoes is the
limit docs/segments.md states."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import pytest

from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from tests.support.identity import new_id
from tests.support.ingest import attribute_event, op
from tests.support.query import NOW, Suite, start_suite

ZONES = ("Asia/Tokyo", "America/Los_Angeles", "Europe/Paris")
KINDS = ("set", "set_once", "set_once", "unset")


@pytest.fixture
async def stack(start_services, settings_for_test, project, database_url) -> Any:  # type: ignore[no-untyped-def]
    suite = await start_suite(start_services, settings_for_test, project, database_url)
    handles = await start_services("segments", clock=suite.clock)
    return suite, segments_grpc.SegmentsServiceStub(handles["segments"].channel)


def replayed(operations: list[tuple[int, str, str]]) -> str:
    """The attribute after its operations in event-time order (the model of ingest's replay)."""
    value = ""
    for _, kind, zone in sorted(operations):
        if kind == "set" or (kind == "set_once" and not value):
            value = zone
        elif kind == "unset":
            value = ""
    return value


@pytest.mark.parametrize("seed", range(6))
async def test_segments_zone_is_the_replayed_attribute_in_any_arrival_order(
    stack: Any, seed: int
) -> None:
    suite: Suite
    suite, segments = stack
    rng = random.Random(seed)
    inst = new_id()
    operations = [
        (minutes, rng.choice(KINDS), rng.choice(ZONES))
        for minutes in rng.sample(range(1, 600), rng.randint(2, 6))
    ]
    if seed == 0:  # the case found: a set, then a later set-once that must not apply
        operations = [(10, "set", "Asia/Tokyo"), (300, "set_once", "America/Los_Angeles")]
    arrival = sorted(operations)  # in event-time order: see the module's docstring
    for minutes, kind, zone in arrival:
        value = None if kind == "unset" else zone
        event = attribute_event(
            inst, [op(kind, "TIMEZONE", value)], time=NOW - timedelta(hours=12, minutes=-minutes)
        )
        await suite.track(event)
    profile_id = await suite.identity.profile_of(inst)
    expected = replayed(operations) or "UTC"
    read = suite.project.metadata("read")

    # Every event handled by segments (and query) before the one read: an intermediate zone
    # must not pass for the final one.
    await suite.settle(groups=("query", "segments"))
    engagement = await segments.GetEngagement(
        segments_pb.GetEngagementRequest(profile_id=profile_id), metadata=read, timeout=10
    )
    assert engagement.time_zone == expected, operations
    profile = await suite.query.GetProfile(
        query_pb.GetProfileRequest(profile_id=profile_id), metadata=read, timeout=10
    )
    assert (profile.profile.summary.timezone or "UTC") == expected, operations
