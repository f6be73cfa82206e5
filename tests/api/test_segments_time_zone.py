"""The time zone segments counts calendar days in is the profile's time zone by one rule, the one
GetProfile shows (ingest_read_profile_time_zone): the `timezone` attribute as ingest's replay
leaves it, else the zone of the most recently seen installation that reported one. Checked on
random operations in random arrival orders, against a model of the rule written here.

Segments once kept a rule of its own (the latest zone signal by event time, attribute or
installation), so an installation reporting a zone after the attribute was set moved the days
engagement counted in while GetProfile still showed the attribute; and a set-once undone by an
operation that arrived later but was timed earlier kept its zone."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from tests.support.identity import new_id
from tests.support.ingest import attribute_event, custom_event, op, stamp
from tests.support.query import NOW, Suite, start_suite

ZONES = ("Asia/Tokyo", "America/Los_Angeles", "Europe/Paris", "Australia/Sydney")
ATTRIBUTE_KINDS = ("set", "set_once", "set_once", "unset")
START = NOW - timedelta(hours=12)


@pytest.fixture
async def stack(start_services, settings_for_test, project, database_url) -> Any:  # type: ignore[no-untyped-def]
    suite = await start_suite(start_services, settings_for_test, project, database_url)
    handles = await start_services("segments", clock=suite.clock)
    return suite, segments_grpc.SegmentsServiceStub(handles["segments"].channel)


@dataclass(frozen=True, slots=True)
class Step:
    """One event of a scenario: at `minute` after START, from installation `device` (0 or 1),
    an attribute operation on the timezone (`kind`), a zone the installation reports
    (`kind` "reported"), or a plain custom event (`kind` "seen")."""

    minute: int
    device: int
    kind: str
    zone: str | None = None


def replayed(steps: list[Step]) -> str:
    """The attribute after its operations in event-time order (the model of ingest's replay)."""
    value = ""
    for step in sorted(steps, key=lambda s: s.minute):
        if step.kind == "set" or (step.kind == "set_once" and not value):
            value = step.zone or ""
        elif step.kind == "unset":
            value = ""
    return value


def profile_time_zone(steps: list[Step]) -> str:
    """The rule's model: the attribute, else the zone of the most recently seen installation
    that reported one (each installation's zone is its latest report by event time)."""
    attribute = replayed([s for s in steps if s.kind in ATTRIBUTE_KINDS])
    if attribute:
        return attribute
    reporting = []
    for device in (0, 1):
        mine = [s for s in steps if s.device == device]
        reports = [s for s in mine if s.kind == "reported"]
        if reports:
            latest = max(reports, key=lambda s: s.minute)
            reporting.append((max(s.minute for s in mine), latest.zone or ""))
    return max(reporting)[1] if reporting else ""


def event_of(step: Step, installation_id: str) -> ingest_pb.Event:
    time = START + timedelta(minutes=step.minute)
    if step.kind == "seen":
        return custom_event(installation_id, name="viewed", time=time)
    if step.kind == "reported":
        event = ingest_pb.Event(
            event_id=new_id(), installation_id=installation_id, event_time=stamp(time)
        )
        event.platform = types_pb2.PLATFORM_IOS
        event.installation_update.timezone = step.zone or ""
        return event
    return attribute_event(installation_id, [op(step.kind, "TIMEZONE", step.zone)], time=time)


def scenario(rng: random.Random) -> list[Step]:
    minutes = rng.sample(range(1, 600), rng.randint(3, 9))
    steps = []
    for minute in minutes:
        kind = rng.choice((*ATTRIBUTE_KINDS, "reported", "reported", "seen", "seen"))
        zone = None if kind in ("unset", "seen") else rng.choice(ZONES)
        steps.append(Step(minute, rng.randrange(2), kind, zone))
    return steps


FOUND = [
    # An installation reporting a zone after the attribute was set: the attribute wins.
    [Step(10, 0, "set", "Asia/Tokyo"), Step(300, 1, "reported", "America/Los_Angeles")],
    # A set-once undone by a set timed before it that arrives after it.
    [Step(300, 0, "set_once", "Asia/Tokyo"), Step(10, 0, "set", "Europe/Paris")],
    # No attribute: the most recently seen installation's zone, not the latest report.
    [
        Step(10, 0, "reported", "Asia/Tokyo"),
        Step(20, 1, "reported", "Europe/Paris"),
        Step(400, 0, "seen"),
    ],
]


@pytest.mark.parametrize("seed", range(9))
async def test_segments_counts_days_in_the_zone_the_profile_shows_in_any_arrival_order(
    stack: Any, seed: int
) -> None:
    suite: Suite
    suite, segments = stack
    rng = random.Random(seed)
    steps = FOUND[seed] if seed < len(FOUND) else scenario(rng)
    devices = [new_id(), new_id()]
    custom_id = f"tz-{new_id()}"
    # Both installations seen first (minute 0, no zone) and logged in to one profile, so every
    # step lands on it; the steps then arrive in an order of their own (the found cases in the
    # order written).
    for device in devices:
        await suite.track(custom_event(device, name="opened", time=START))
        await suite.identity.identify(device, custom_id)
    arrival = list(steps) if seed < len(FOUND) else rng.sample(steps, len(steps))
    for step in arrival:
        reply = await suite.track(event_of(step, devices[step.device]))
        assert reply.accepted_count == 1, reply
    profile_id = await suite.identity.profile_of_custom_id(custom_id)
    expected = profile_time_zone([*steps, Step(0, 0, "seen"), Step(0, 1, "seen")]) or "UTC"
    read = suite.project.metadata("read")

    # Every event handled by segments (and query) before the zone is read: an intermediate
    # zone must not pass for the final one.
    await suite.settle(groups=("query", "segments"))
    engagement = await segments.GetEngagement(
        segments_pb.GetEngagementRequest(profile_id=profile_id), metadata=read, timeout=10
    )
    profile = await suite.query.GetProfile(
        query_pb.GetProfileRequest(profile_id=profile_id), metadata=read, timeout=10
    )
    shown = profile.profile.summary.timezone or "UTC"
    assert (engagement.time_zone, shown) == (expected, expected), arrival


async def test_a_logout_moves_the_zone_to_the_installation_that_stays(stack: Any) -> None:
    # A split reaches segments without an event: it reads the zone again (it kept the phone's
    # until the profile's next event).
    suite: Suite
    suite, segments = stack
    phone, tablet = new_id(), new_id()
    custom_id = f"tz-{new_id()}"
    for device in (phone, tablet):
        await suite.track(custom_event(device, name="opened", time=START))
        await suite.identity.identify(device, custom_id)
    await suite.track(event_of(Step(10, 1, "reported", "Europe/Paris"), tablet))
    await suite.track(event_of(Step(20, 0, "reported", "Asia/Tokyo"), phone))
    profile_id = await suite.identity.profile_of_custom_id(custom_id)
    read = suite.project.metadata("read")

    async def zones(profile: str) -> tuple[str, str]:
        await suite.settle(groups=("query", "segments"))
        engagement = await segments.GetEngagement(
            segments_pb.GetEngagementRequest(profile_id=profile), metadata=read, timeout=10
        )
        view = await suite.query.GetProfile(
            query_pb.GetProfileRequest(profile_id=profile), metadata=read, timeout=10
        )
        return engagement.time_zone, view.profile.summary.timezone

    assert await zones(profile_id) == ("Asia/Tokyo", "Asia/Tokyo")  # the phone, seen last
    anonymous = (await suite.identity.logout(phone)).profile_id
    assert await zones(profile_id) == ("Europe/Paris", "Europe/Paris")
    assert await zones(anonymous) == ("Asia/Tokyo", "Asia/Tokyo")
