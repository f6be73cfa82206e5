"""ExportProfile: everything stored about one profile, in the documented JSON shape and chunks,
checked against what was ingested."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from profiles.common.v1 import types_pb2
from profiles.identity.v1 import identity_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2 as ipb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ipb_grpc
from profiles.segments.v1 import filters_pb2, funnels_pb2
from profiles.segments.v1 import segments_service_pb2 as spb
from profiles.segments.v1 import segments_service_pb2_grpc as spb_grpc
from services.identity.export import rfc3339
from shared.clock import FrozenClock
from tests.conftest import eventually
from tests.support.identity import (
    Identity,
    error_info,
    export_document,
    person_events,
    start_identity_and_ingest,
)
from tests.support.ingest import NOW, Ingest, custom_event
from tests.support.query import crash, session_end, session_start
from tests.support.retention import RETENTION_MODES, apply_retention, make_months, stored_events
from tests.support.segments_custom import attribute, set_attributes
from tests.support.segments_custom import custom_event as named_event

if TYPE_CHECKING:
    from tests.conftest import TestProject

ACCEPTED = ipb.EVENT_OUTCOME_ACCEPTED


@pytest.fixture
async def services(
    start_services: Any, settings_for_test: Any, project: TestProject, database_url: str
) -> tuple[Identity, Ingest]:
    identity_channel, ingest_channel = await start_identity_and_ingest(
        start_services, settings_for_test, FrozenClock(NOW)
    )
    ingest = Ingest(
        ipb_grpc.IngestServiceStub(ingest_channel),
        project.metadata("sdk"),
        project.metadata("admin"),
        database_url,
    )
    return Identity(identity_channel, project), ingest


async def test_an_export_holds_everything_ingested_for_the_profile(
    services: tuple[Identity, Ingest], db: asyncpg.Pool
) -> None:
    identity, ingest = services
    phone, tablet = (f"inst-{tag}-{uuid.uuid4().hex[:8]}" for tag in "pt")
    custom_id = f"erin-{uuid.uuid4().hex[:8]}"
    phone_batch = await person_events(ingest, phone, "erin")
    # Enough custom events for several chunks of the events section (at most 500 each).
    many = [
        custom_event(phone, event_id=f"bulk-{i}", time=NOW - timedelta(hours=2, seconds=i))
        for i in range(1100)
    ]
    for start in range(0, len(many), 550):
        reply = await ingest.track(*many[start : start + 550])
        assert reply.accepted_count == 550
    identified = await identity.identify(phone, custom_id)
    tablet_batch = await person_events(ingest, tablet, "erin2")
    tablet_anonymous = await identity.profile_of(tablet)
    merged = await identity.identify(tablet, custom_id)
    server_side = custom_event(None, custom_id=custom_id, event_id="srv-1")
    assert (await ingest.track(server_side)).results[0].outcome == ACCEPTED
    bad = custom_event(phone, event_id="bad-1", name="Not Valid!")
    assert (await ingest.track(bad)).results[0].outcome == ipb.EVENT_OUTCOME_REJECTED
    other = f"inst-o-{uuid.uuid4().hex[:8]}"
    await ingest.track(custom_event(other, event_id="not-erin"))  # someone else's

    # A merged-away ID resolves to the survivor.
    chunks = await identity.export(tablet_anonymous)
    document = export_document(chunks)

    profile = document["profile"]
    assert profile["profileId"] == identified.profile_id == merged.profile_id
    assert profile["customId"] == custom_id
    assert profile["mergedProfileIds"] == [tablet_anonymous]
    assert profile["formatVersion"] == 1
    assert profile["aliasCustomIds"] == []
    assert profile["firstSeenTime"] <= profile["lastSeenTime"]
    expected_events = len(phone_batch) + len(many) + len(tablet_batch) + 1
    events = document["events"]
    assert len(events) == expected_events
    assert len({(e["installationId"], e["customId"], e["eventId"]) for e in events}) == len(events)
    assert [e["eventTime"] for e in events] == sorted(e["eventTime"] for e in events)
    events_chunks = [c for c in chunks if c.section == pb.EXPORT_SECTION_EVENTS]
    assert len(events_chunks) >= 3
    assert all(c.record_count <= 500 for c in events_chunks)
    buy = next(e for e in events if e["eventId"] == "erin-buy")
    assert buy["kind"] == "EVENT_KIND_CUSTOM"
    assert buy["installationId"] == phone
    assert buy["payload"]["custom"]["attributes"]["sku"] == {"string_value": "sku-erin-991"}
    assert next(e for e in events if e["eventId"] == "srv-1")["customId"] == custom_id
    attributes = document["attributes"]
    assert attributes["native"]["email"] in ("erin@example.com", "erin2@example.com")
    assert attributes["custom"]["tier"]["value"] in ("tier-erin-gold", "tier-erin2-gold")
    assert attributes["custom"]["tier"]["type"] == "string"
    assert document["subscriptions"] == [
        {
            "channel": "email",
            "kind": "marketing",
            "subscribed": True,
            "changeTime": document["subscriptions"][0]["changeTime"],
        }
    ]
    installations = {i["installationId"]: i for i in document["installations"]}
    assert set(installations) == {phone, tablet}
    assert installations[phone]["pushToken"] == "push-token-erin"
    assert installations[tablet]["appVersion"] == "9.9.9"
    # The latest event's platform (the session's end, iOS), not the earlier Android update's.
    assert installations[phone]["platform"] == "PLATFORM_IOS"
    history = document["identityHistory"]
    assert [(h["kind"], h["cause"]) for h in history] == [
        ("IDENTITY_CHANGE_KIND_MERGE", "IDENTITY_CHANGE_CAUSE_IDENTIFY")
    ]
    assert history[0]["sourceProfileId"] == tablet_anonymous
    assert history[0]["installationIds"] == [tablet]
    sessions = document["sessions"]
    assert sorted(s["sessionId"] for s in sessions) == ["erin-session", "erin2-session"]
    assert all(s["durationSeconds"] == 120 for s in sessions)
    assert [r["eventId"] for r in document["rejectedEvents"]] == ["bad-1"]
    # The refusal's message as ingest keeps it: it may quote what was sent.
    stored = await db.fetchval("SELECT message FROM rejected_events WHERE event_id = 'bad-1'")
    assert "custom.name" in stored
    assert document["rejectedEvents"][0]["message"] == stored


async def test_an_empty_profile_exports_every_section(services: tuple[Identity, Ingest]) -> None:
    identity, _ = services
    profile = await identity.profile_of_custom_id(f"frank-{uuid.uuid4().hex[:8]}")
    chunks = await identity.export(profile)
    document = export_document(chunks)
    assert len(chunks) == 11
    assert document["attributes"] == {"native": {}, "custom": {}}
    for section in ("subscriptions", "installations", "identityHistory", "sessions", "events"):
        assert document[section] == []
    assert document["segments"] == {"custom": [], "smart": []}
    assert document["funnelProgress"] == []
    assert document["engagement"]["sessionCount"] == 0


async def test_an_erased_or_unknown_profile_cannot_be_exported(
    services: tuple[Identity, Ingest],
) -> None:
    identity, _ = services
    profile = await identity.profile_of(f"inst-{uuid.uuid4().hex[:8]}")
    await identity.delete(profile)
    for missing in (profile, str(uuid.uuid4())):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await identity.export(missing)
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND
        assert error_info(raised.value).reason == "PROFILE_NOT_FOUND"


@pytest.mark.parametrize("mode", RETENTION_MODES)
async def test_first_and_last_seen_stay_exact_after_retention_and_a_merge(
    services: tuple[Identity, Ingest], project: TestProject, database_url: str, mode: str
) -> None:
    """The export's first and last seen are what ingest keeps beside the profile's totals, and
    its last crash what ingest keeps of it: unchanged once retention removed the events they
    came from (by dropping their months, or by the project's sweep), and carried to the
    survivor of a later merge."""
    identity, ingest = services
    phone, tablet = (f"inst-{tag}-{uuid.uuid4().hex[:8]}" for tag in "pt")
    oldest, old = NOW - timedelta(days=400), NOW - timedelta(days=300)
    await make_months(database_url, oldest, old)  # their own months: dropped whole (global)
    imported = await ingest.stub.ImportEvents(
        ipb.ImportEventsRequest(
            events=[crash(tablet, old, name="Overflow"), custom_event(tablet, time=oldest)]
        ),
        metadata=ingest.admin,
        timeout=20,
    )
    assert [r.outcome for r in imported.results] == [ACCEPTED, ACCEPTED]
    recent = [NOW - timedelta(hours=2), NOW - timedelta(hours=1)]
    reply = await ingest.track(*(custom_event(phone, time=t) for t in recent))
    assert reply.accepted_count == 2
    custom_id = f"old-{uuid.uuid4().hex[:8]}"
    identified = await identity.identify(phone, custom_id)
    tablet_profile = await identity.profile_of(tablet)

    async def seen(profile_id: str) -> tuple[str, str, Any]:
        profile = export_document(await identity.export(profile_id))["profile"]
        return profile["firstSeenTime"], profile["lastSeenTime"], profile["lastCrash"]

    before = await seen(tablet_profile)
    assert before[:2] == (rfc3339(oldest), rfc3339(old))
    assert before[2]["name"] == "Overflow"
    assert before[2]["crashTime"] == rfc3339(old)
    assert before[2]["installationId"] == tablet

    dropped = await apply_retention(database_url, project.project_id, mode, NOW)

    if mode == "global":
        assert {"events_2029_04", "events_2029_08"} <= set(dropped)
    assert await stored_events(database_url, project.project_id) == 2  # the phone's
    assert await seen(tablet_profile) == before
    # The tablet joins the identified profile: its survivor was first seen when the tablet was.
    merged = await identity.identify(tablet, custom_id)
    assert merged.profile_id == identified.profile_id
    assert await seen(identified.profile_id) == (rfc3339(oldest), rfc3339(recent[-1]), before[2])


# -- what segments keeps about the profile ------------------------------------------------------


Stack = tuple[Identity, Ingest, spb_grpc.SegmentsServiceStub, FrozenClock]


@pytest.fixture
async def with_segments(
    start_services: Any, settings_for_test: Any, project: TestProject, database_url: str
) -> Stack:
    """Identity, ingest and segments on one frozen clock: segments fills its tables from the
    events and identity changes the others publish."""
    clock = FrozenClock(NOW)
    identity_channel, ingest_channel = await start_identity_and_ingest(
        start_services, settings_for_test, clock
    )
    segments = await start_services("segments", clock=clock)
    ingest = Ingest(
        ipb_grpc.IngestServiceStub(ingest_channel),
        project.metadata("sdk"),
        project.metadata("admin"),
        database_url,
    )
    return (
        Identity(identity_channel, project),
        ingest,
        spb_grpc.SegmentsServiceStub(segments["segments"].channel),
        clock,
    )


async def define_segments_and_funnels(
    segments: spb_grpc.SegmentsServiceStub, project: TestProject
) -> tuple[str, str]:
    """A "Pro plan" segment (plan = pro), an "Unused" one nobody is in, a "Checkout" funnel
    (view, then pay within a day) and an "Onboarding" one nobody starts; returns the IDs of
    Pro plan and Checkout."""
    admin = project.metadata("admin")
    pro = await segments.CreateSegment(
        spb.CreateSegmentRequest(
            display_name="Pro plan", filter=attribute("plan", filters_pb2.OPERATOR_EQUALS, "pro")
        ),
        metadata=admin,
    )
    await segments.CreateSegment(
        spb.CreateSegmentRequest(
            display_name="Unused", filter=attribute("plan", filters_pb2.OPERATOR_EQUALS, "none")
        ),
        metadata=admin,
    )
    day = Duration()
    day.FromTimedelta(timedelta(hours=24))
    checkout = await segments.CreateFunnel(
        spb.CreateFunnelRequest(
            display_name="Checkout",
            steps=[
                funnels_pb2.FunnelStep(event_name="view"),
                funnels_pb2.FunnelStep(event_name="pay"),
            ],
            conversion_window=day,
        ),
        metadata=admin,
    )
    await segments.CreateFunnel(
        spb.CreateFunnelRequest(
            display_name="Onboarding",
            steps=[
                funnels_pb2.FunnelStep(event_name="signup"),
                funnels_pb2.FunnelStep(event_name="tutorial"),
            ],
            conversion_window=day,
        ),
        metadata=admin,
    )
    return pro.segment.segment_id, checkout.funnel.funnel_id


def visit(installation_id: str, start: timedelta, seconds: int, platform: int) -> list[ipb.Event]:
    """A session of `seconds` that started `start` before NOW, its start and end."""
    session_id = f"s-{uuid.uuid4().hex[:8]}"
    return [
        session_start(installation_id, session_id, NOW - start, platform=platform),
        session_end(
            installation_id,
            session_id,
            NOW - start + timedelta(seconds=seconds),
            seconds,
            platform=platform,
        ),
    ]


async def accepted(ingest: Ingest, *events: ipb.Event) -> str:
    """Tracks the events (all accepted); returns the profile of the first."""
    reply = await ingest.track(*events)
    assert [r.outcome for r in reply.results] == [ACCEPTED] * len(events), reply
    return reply.results[0].profile_id


async def assert_smart_segments_as_segments_answers(
    segments: spb_grpc.SegmentsServiceStub,
    project: TestProject,
    profile: str,
    smart: list[dict[str, Any]],
) -> None:
    """The export's smart segments are GetSmartSegment's on each platform, as of now."""
    platform_numbers = [
        0 if s["platform"] is None else types_pb2.Platform.Value(s["platform"]) for s in smart
    ]
    for record, platform in zip(smart, platform_numbers, strict=True):
        own = await segments.GetSmartSegment(
            spb.GetSmartSegmentRequest(profile_id=profile, platform=platform),  # type: ignore[arg-type]
            metadata=project.metadata("read"),
        )
        assert record["segment"] == types_pb2.SmartSegment.Name(own.segment)
        assert record["segment"] != "SMART_SEGMENT_UNSPECIFIED"
        flag = None if own.flag == 0 else types_pb2.SmartSegmentFlag.Name(own.flag)
        assert record["flag"] == flag
        expected_next = (
            rfc3339(own.next_transition_time.ToDatetime(tzinfo=NOW.tzinfo))
            if own.HasField("next_transition_time")
            else None
        )
        assert record["nextTransitionTime"] == expected_next


async def export_when(
    identity: Identity, profile_id: str, ready: Any, within: float = 30.0
) -> dict[str, Any]:
    """The export once `ready(document)` holds: segments fills its tables from the bus."""
    document: dict[str, Any] = {}

    async def check() -> bool:
        nonlocal document
        document = export_document(await identity.export(profile_id))
        return bool(ready(document))

    await eventually(check, within=within)
    return document


async def test_an_export_holds_the_profiles_segments_engagement_and_funnel_progress(
    with_segments: Stack, project: TestProject
) -> None:
    identity, ingest, segments, clock = with_segments
    pro, checkout = await define_segments_and_funnels(segments, project)
    phone, tablet = (f"inst-{tag}-{uuid.uuid4().hex[:8]}" for tag in "pt")
    profile = await accepted(
        ingest,
        set_attributes(
            phone,
            NOW - timedelta(hours=6),
            native={types_pb2.NATIVE_ATTRIBUTE_TIMEZONE: "Europe/Paris"},
            plan="pro",
        ),
        *visit(phone, timedelta(hours=5), 600, types_pb2.PLATFORM_IOS),
        named_event(phone, "view", NOW - timedelta(hours=5)),
        named_event(phone, "pay", NOW - timedelta(hours=4)),
        named_event(phone, "tutorial", NOW - timedelta(hours=4)),  # Onboarding's step 2 only
    )
    # The tablet logs in before its first event: its session is the same person's.
    custom_id = f"gina-{uuid.uuid4().hex[:8]}"
    assert (await identity.identify(phone, custom_id)).profile_id == profile
    assert (await identity.identify(tablet, custom_id)).profile_id == profile
    await accepted(ingest, *visit(tablet, timedelta(days=2), 300, types_pb2.PLATFORM_ANDROID))
    document = await export_when(
        identity,
        profile,
        lambda d: d["segments"]["custom"] and d["engagement"]["sessionCount"] == 2,
    )

    assert document["segments"]["custom"] == [
        {"segmentId": pro, "displayName": "Pro plan", "enterTime": rfc3339(NOW)}
    ]
    # The smart segment over all platforms and on each, as segments' own reads answer.
    smart = document["segments"]["smart"]
    assert [s["platform"] for s in smart] == [None, "PLATFORM_IOS", "PLATFORM_ANDROID"]
    await assert_smart_segments_as_segments_answers(segments, project, profile, smart)
    assert smart[0]["segment"] == "SMART_SEGMENT_NEW"  # first session two days ago

    own = await segments.GetEngagement(
        spb.GetEngagementRequest(profile_id=profile), metadata=project.metadata("read")
    )
    assert document["engagement"] == {
        "score": own.score,
        "score1": own.score1,
        "score2": own.score2,
        "score3": own.score3,
        "sessionCount": own.session_count,
        "averageSessionDurationSeconds": own.average_session_duration.ToTimedelta().total_seconds(),
        "activeDays": 2,
        "timeZone": "Europe/Paris",
        "windowStartTime": rfc3339(NOW - timedelta(hours=168)),
        "windowEndTime": rfc3339(NOW),
    }
    assert (own.score1, own.score2, own.score3) == (2, 2, 2)  # 7.5 minutes on average

    # Checkout is started (and converted); Onboarding's step 1 never happened: left out.
    assert document["funnelProgress"] == [
        {
            "funnelId": checkout,
            "displayName": "Checkout",
            "steps": [
                {
                    "stepNumber": 1,
                    "eventName": "view",
                    "completeTime": rfc3339(NOW - timedelta(hours=5)),
                },
                {
                    "stepNumber": 2,
                    "eventName": "pay",
                    "completeTime": rfc3339(NOW - timedelta(hours=4)),
                },
            ],
            "completedStepCount": 2,
            "converted": True,
        }
    ]

    # Ten days on, with no new session: the smart segments follow their schedule as of the
    # export (as segments' own reads do), and the engagement window holds no session.
    clock.advance(timedelta(days=10))
    later = export_document(await identity.export(profile))
    await assert_smart_segments_as_segments_answers(
        segments, project, profile, later["segments"]["smart"]
    )
    assert later["segments"]["smart"][0]["segment"] == "SMART_SEGMENT_ENGAGED"
    assert later["segments"]["smart"][0]["flag"] == "SMART_SEGMENT_FLAG_RISKY_ENGAGED"
    assert later["engagement"]["sessionCount"] == 0
    assert later["segments"]["custom"] == document["segments"]["custom"]


async def test_a_profile_segments_knows_nothing_of_exports_empty_segment_sections(
    with_segments: Stack, project: TestProject
) -> None:
    """Segments, funnels and another profile in them exist; this profile's events match none
    of them (a custom event that is no funnel's first step, an attribute no segment tests) and
    it has no session."""
    identity, ingest, segments, _ = with_segments
    await define_segments_and_funnels(segments, project)
    quiet, busy = (f"inst-{tag}-{uuid.uuid4().hex[:8]}" for tag in "qb")
    # One batch, so segments has handled the quiet profile's events once the busy one shows.
    reply = await ingest.track(
        set_attributes(quiet, NOW - timedelta(hours=3), plan="free"),
        named_event(quiet, "pay", NOW - timedelta(hours=2)),
        set_attributes(busy, NOW - timedelta(hours=3), plan="pro"),
        *visit(busy, timedelta(hours=2), 60, types_pb2.PLATFORM_IOS),
        named_event(busy, "view", NOW - timedelta(hours=2)),
    )
    assert reply.accepted_count == 6
    quiet_profile, busy_profile = reply.results[0].profile_id, reply.results[2].profile_id
    await export_when(
        identity,
        busy_profile,
        lambda d: d["segments"]["custom"] and d["segments"]["smart"] and d["funnelProgress"],
    )

    chunks = await identity.export(quiet_profile)
    document = export_document(chunks)
    assert document["segments"] == {"custom": [], "smart": []}
    assert document["funnelProgress"] == []
    assert document["engagement"] == {
        "score": 0,
        "score1": 0,
        "score2": 0,
        "score3": 0,
        "sessionCount": 0,
        "averageSessionDurationSeconds": 0,
        "activeDays": 0,
        "timeZone": "UTC",
        "windowStartTime": rfc3339(NOW - timedelta(hours=168)),
        "windowEndTime": rfc3339(NOW),
    }
    segment_chunks = [c for c in chunks if c.section >= pb.EXPORT_SECTION_SEGMENTS]
    assert [(c.section, c.record_count, c.section_end) for c in segment_chunks] == [
        (pb.EXPORT_SECTION_SEGMENTS, 1, True),
        (pb.EXPORT_SECTION_ENGAGEMENT, 1, True),
        (pb.EXPORT_SECTION_FUNNEL_PROGRESS, 0, True),
    ]


async def test_a_merged_profiles_export_holds_what_segments_keeps_for_the_survivor(
    with_segments: Stack, project: TestProject
) -> None:
    """The anonymous phone viewed and is on the pro plan; the identified laptop paid. Once the
    phone logs in, the survivor is in the segment, converted in the funnel, and its engagement
    counts both sessions; the merged-away ID exports the survivor."""
    identity, ingest, segments, _ = with_segments
    pro, checkout = await define_segments_and_funnels(segments, project)
    phone, laptop = (f"inst-{tag}-{uuid.uuid4().hex[:8]}" for tag in "pl")
    anonymous = await accepted(
        ingest,
        set_attributes(phone, NOW - timedelta(hours=6), plan="pro"),
        *visit(phone, timedelta(hours=5), 120, types_pb2.PLATFORM_IOS),
        named_event(phone, "view", NOW - timedelta(hours=5)),
    )
    custom_id = f"hugo-{uuid.uuid4().hex[:8]}"
    await identity.identify(laptop, custom_id)
    survivor = await accepted(
        ingest,
        *visit(laptop, timedelta(hours=3), 240, types_pb2.PLATFORM_WEB),
        named_event(laptop, "pay", NOW - timedelta(hours=3), platform=types_pb2.PLATFORM_WEB),
    )
    assert survivor != anonymous
    before = await export_when(identity, survivor, lambda d: d["engagement"]["sessionCount"] == 1)
    assert before["segments"]["custom"] == []
    assert before["funnelProgress"] == []  # paid, never viewed
    assert (await export_when(identity, anonymous, lambda d: d["segments"]["custom"]))["segments"][
        "custom"
    ][0]["segmentId"] == pro

    merged = await identity.identify(phone, custom_id)
    assert merged.profile_id == survivor
    document = await export_when(
        identity, anonymous, lambda d: d["engagement"]["sessionCount"] == 2
    )
    assert document["profile"]["profileId"] == survivor
    assert document["profile"]["mergedProfileIds"] == [anonymous]
    assert [(m["segmentId"], m["displayName"]) for m in document["segments"]["custom"]] == [
        (pro, "Pro plan")
    ]
    assert [s["platform"] for s in document["segments"]["smart"]] == [
        None,
        "PLATFORM_IOS",
        "PLATFORM_WEB",
    ]
    (progress,) = document["funnelProgress"]
    assert (progress["funnelId"], progress["completedStepCount"], progress["converted"]) == (
        checkout,
        2,
        True,
    )
    assert document["engagement"]["averageSessionDurationSeconds"] == 180
    assert document == export_document(await identity.export(survivor)) | {
        "profile": document["profile"]
    }


async def test_an_erased_profile_with_segments_data_cannot_be_exported(
    with_segments: Stack, project: TestProject
) -> None:
    identity, ingest, segments, _ = with_segments
    await define_segments_and_funnels(segments, project)
    phone = f"inst-{uuid.uuid4().hex[:8]}"
    profile = await accepted(
        ingest,
        set_attributes(phone, NOW - timedelta(hours=6), plan="pro"),
        *visit(phone, timedelta(hours=5), 120, types_pb2.PLATFORM_IOS),
        named_event(phone, "view", NOW - timedelta(hours=5)),
    )
    await export_when(
        identity,
        profile,
        lambda d: d["segments"]["custom"] and d["segments"]["smart"] and d["funnelProgress"],
    )
    await identity.delete(profile)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.export(profile)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    assert error_info(raised.value).reason == "PROFILE_NOT_FOUND"
