"""ExportProfile: everything stored about one profile, in the documented JSON shape and chunks,
checked against what was ingested."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from profiles.identity.v1 import identity_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2 as ipb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ipb_grpc
from services.identity.export import rfc3339
from shared.clock import FrozenClock
from tests.support.identity import (
    Identity,
    error_info,
    export_document,
    person_events,
    start_identity_and_ingest,
)
from tests.support.ingest import NOW, Ingest, custom_event
from tests.support.query import crash
from tests.support.retention import RETENTION_MODES, apply_retention, make_months, stored_events

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
    services: tuple[Identity, Ingest],
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
    assert installations[phone]["platform"] is not None
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


async def test_an_empty_profile_exports_every_section(services: tuple[Identity, Ingest]) -> None:
    identity, _ = services
    profile = await identity.profile_of_custom_id(f"frank-{uuid.uuid4().hex[:8]}")
    chunks = await identity.export(profile)
    document = export_document(chunks)
    assert len(chunks) == 8
    assert document["attributes"] == {"native": {}, "custom": {}}
    for section in ("subscriptions", "installations", "identityHistory", "sessions", "events"):
        assert document[section] == []


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
