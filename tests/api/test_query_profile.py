"""GetProfile: every lookup kind, merged IDs, ambiguity, errors, read-your-writes, isolation."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.query.v1 import profile_pb2
from profiles.query.v1 import query_service_pb2 as pb
from shared.embedded import EmbeddedRedis
from shared.settings import Settings
from tests.conftest import create_test_project
from tests.support.identity import error_info, new_id, violations
from tests.support.query import (
    NOW,
    Suite,
    attribute_event,
    crash,
    custom_event,
    installation_update,
    op,
    session_end,
    session_start,
    start_suite,
    subscription,
)
from tests.support.retention import RETENTION_MODES, apply_retention, make_months, stored_events

if TYPE_CHECKING:
    from tests.conftest import TestProject


@pytest.fixture
async def suite(start_services, settings_for_test, project, database_url) -> Suite:  # type: ignore[no-untyped-def]
    return await start_suite(start_services, settings_for_test, project, database_url)


async def test_every_lookup_kind_finds_the_same_profile(suite: Suite) -> None:
    inst = new_id()
    await suite.track(
        attribute_event(
            inst,
            [op("set", "EMAIL", "Ann@Example.com"), op("set", "PHONE", "+33612345678")],
            time=NOW - timedelta(hours=1),
        )
    )
    await suite.identity.identify(inst, "ann")
    profile_id = await suite.identity.profile_of(inst)
    lookups = [
        {"profile_id": profile_id},
        {"custom_id": "ann"},
        {"email": "ANN@example.com"},
        {"phone": "+33612345678"},
        {"installation_id": inst},
    ]
    for lookup in lookups:
        reply = await suite.get(**lookup)
        assert reply.profile.summary.profile_id == profile_id, lookup
        assert reply.resolved_from_profile_id == ""
    view = reply.profile
    assert view.summary.custom_id == "ann"
    assert not view.summary.anonymous
    assert view.native_attributes.email == "ann@example.com"
    assert view.native_attributes.phone == "+33612345678"


async def test_a_merged_away_id_resolves_to_its_survivor_and_says_so(suite: Suite) -> None:
    known, fresh = new_id(), new_id()
    await suite.track(custom_event(known, time=NOW - timedelta(hours=3)))
    await suite.identity.identify(known, "bob")
    await suite.track(custom_event(fresh, time=NOW - timedelta(hours=2)))
    anonymous = await suite.identity.profile_of(fresh)
    merged = await suite.identity.identify(fresh, "bob")
    survivor = merged.profile_id
    assert survivor != anonymous
    reply = await suite.get(profile_id=anonymous)
    assert reply.profile.summary.profile_id == survivor
    assert reply.resolved_from_profile_id == anonymous
    assert reply.profile.counters.event_count == 2
    assert {i.installation_id for i in reply.profile.installations} == {known, fresh}
    (change,) = reply.profile.identity_changes
    assert change.kind == profile_pb2.IDENTITY_CHANGE_KIND_MERGE
    assert change.cause == profile_pb2.IDENTITY_CHANGE_CAUSE_IDENTIFY
    assert change.source_profile_id == anonymous
    assert change.target_profile_id == survivor
    assert list(change.installation_ids) == [fresh]


async def test_an_alias_custom_id_resolves_to_the_merge_target(suite: Suite) -> None:
    a, b = new_id(), new_id()
    await suite.identity.identify(a, "carol")
    await suite.identity.identify(b, "dave")
    source = await suite.identity.profile_of(a)
    target = await suite.identity.profile_of(b)
    await suite.identity.merge(source, target, allow_conflict=True)
    reply = await suite.get(custom_id="carol")
    assert reply.profile.summary.profile_id == target
    assert reply.profile.identity_changes[0].alias_custom_id == "carol"


async def test_an_email_shared_by_two_profiles_is_ambiguous_and_names_them(suite: Suite) -> None:
    first, second = new_id(), new_id()
    for inst in (first, second):
        await suite.track(attribute_event(inst, [op("set", "EMAIL", "same@example.com")]))
    ids = sorted([await suite.identity.profile_of(first), await suite.identity.profile_of(second)])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.get(email="same@example.com")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value)
    assert info.reason == "AMBIGUOUS_LOOKUP"
    assert sorted(info.metadata["profile_ids"].split(",")) == ids


@pytest.mark.parametrize(
    ("lookup", "field"),
    [
        ({}, "lookup"),
        ({"profile_id": "not-a-uuid"}, "profile_id"),
        ({"email": "nope"}, "email"),
        ({"phone": "0612345678"}, "phone"),
        ({"custom_id": ""}, "custom_id"),
        ({"installation_id": "x" * 129}, "installation_id"),
    ],
)
async def test_a_malformed_lookup_is_invalid_with_its_field_path(
    suite: Suite, lookup: dict[str, str], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.get(**lookup)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == [field]


@pytest.mark.parametrize(
    "lookup",
    [
        {"profile_id": "5f0c1c1e-0000-4000-8000-000000000000"},
        {"custom_id": "nobody"},
        {"email": "nobody@example.com"},
        {"phone": "+15550000000"},
        {"installation_id": "never-seen"},
    ],
)
async def test_an_unknown_profile_is_not_found(suite: Suite, lookup: dict[str, str]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.get(**lookup)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "PROFILE_NOT_FOUND"


async def test_the_view_shows_everything_stored(suite: Suite) -> None:
    inst = new_id()
    t = NOW - timedelta(hours=5)
    await suite.track(
        installation_update(
            inst,
            t,
            app_version="5.2.1",
            os_version="17.1",
            device_model="iPhone15,2",
            push_token="secret-token",
            push_opt_in=True,
            language="fr",
            timezone="Europe/Paris",
        ),
        session_start(inst, "s1", t + timedelta(minutes=1), country="FR"),
        custom_event(inst, time=t + timedelta(minutes=2), price=3.5),
        session_end(inst, "s1", t + timedelta(minutes=11), 600),
        attribute_event(
            inst,
            [
                op("set", "FIRST_NAME", "Ann"),
                op("set", "plan", "pro"),
                op("increment", "visits", 2),
                op("append", "tags", ["a", "b"]),
            ],
            time=t + timedelta(minutes=3),
        ),
        subscription(
            inst,
            types_pb2.CHANNEL_EMAIL,
            types_pb2.SUBSCRIPTION_KIND_MARKETING,
            True,
            t + timedelta(minutes=4),
        ),
        crash(inst, t + timedelta(minutes=5)),
    )
    view = (await suite.get(installation_id=inst)).profile
    summary = view.summary
    assert summary.anonymous
    assert summary.language == "fr"
    assert summary.timezone == "Europe/Paris"
    assert summary.last_session_country == "FR"
    assert summary.first_name == "Ann"
    assert summary.first_seen_time.ToDatetime().replace(tzinfo=t.tzinfo) == t
    assert summary.last_seen_time.ToDatetime().replace(tzinfo=t.tzinfo) == t + timedelta(minutes=11)
    (installation,) = view.installations
    assert installation.platform == types_pb2.PLATFORM_IOS
    assert installation.app_version == "5.2.1"
    assert installation.device_model == "iPhone15,2"
    assert installation.push_token_present
    assert installation.push_opt_in
    assert "secret-token" not in str(view)
    assert [(s.channel, s.kind, s.subscribed) for s in view.subscriptions] == [
        (types_pb2.CHANNEL_EMAIL, types_pb2.SUBSCRIPTION_KIND_MARKETING, True),
        (types_pb2.CHANNEL_EMAIL, types_pb2.SUBSCRIPTION_KIND_TRANSACTIONAL, False),
        (types_pb2.CHANNEL_SMS, types_pb2.SUBSCRIPTION_KIND_MARKETING, False),
        (types_pb2.CHANNEL_SMS, types_pb2.SUBSCRIPTION_KIND_TRANSACTIONAL, False),
        (types_pb2.CHANNEL_PUSH, types_pb2.SUBSCRIPTION_KIND_MARKETING, False),
        (types_pb2.CHANNEL_PUSH, types_pb2.SUBSCRIPTION_KIND_TRANSACTIONAL, False),
    ]
    custom = {a.name: a for a in view.custom_attributes}
    assert [a.name for a in view.custom_attributes] == ["plan", "tags", "visits"]
    assert custom["plan"].type == profile_pb2.ATTRIBUTE_TYPE_STRING
    assert custom["plan"].value.string_value == "pro"
    assert custom["visits"].type == profile_pb2.ATTRIBUTE_TYPE_NUMBER
    assert custom["visits"].value.number_value == 2.0
    assert list(custom["tags"].value.string_list_value.values) == ["a", "b"]
    counters = view.counters
    assert counters.event_count == 7
    assert counters.session_count == 1
    assert counters.total_time_spent.seconds == 600
    assert counters.average_session_duration.seconds == 600
    assert counters.crash_count == 1
    assert counters.last_crash.name == "NullPointer"
    assert counters.last_crash.fatal
    assert counters.last_crash.installation_id == inst
    assert view.version >= 2


async def test_each_write_is_visible_to_the_next_read(suite: Suite) -> None:
    inst = new_id()
    await suite.track(custom_event(inst))
    first = (await suite.get(installation_id=inst)).profile
    assert first.counters.event_count == 1

    await suite.track(custom_event(inst, time=NOW - timedelta(minutes=1)))
    after_track = (await suite.get(installation_id=inst)).profile
    assert after_track.counters.event_count == 2
    assert after_track.version > first.version

    await suite.identity.identify(inst, "erin")
    after_identify = (await suite.get(installation_id=inst)).profile
    assert after_identify.summary.custom_id == "erin"
    assert after_identify.version > after_track.version

    await suite.identity.logout(inst)
    after_logout = (await suite.get(installation_id=inst)).profile
    assert after_logout.summary.anonymous
    assert after_logout.summary.profile_id != after_identify.summary.profile_id
    left = (await suite.get(custom_id="erin")).profile
    assert left.installations == []
    assert left.identity_changes[0].cause == profile_pb2.IDENTITY_CHANGE_CAUSE_LOGOUT


async def test_a_read_key_of_another_project_sees_nothing(suite: Suite, database_url: str) -> None:
    inst = new_id()
    await suite.track(attribute_event(inst, [op("set", "EMAIL", "p@example.com")]))
    await suite.identity.identify(inst, "shared-name")
    profile_id = await suite.identity.profile_of(inst)
    other = await create_test_project(database_url)
    lookups = [
        {"profile_id": profile_id},
        {"custom_id": "shared-name"},
        {"email": "p@example.com"},
        {"installation_id": inst},
    ]
    for lookup in lookups:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await suite.query.GetProfile(
                pb.GetProfileRequest(**lookup), metadata=other.metadata("read"), timeout=10
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND, lookup


async def test_an_sdk_key_may_not_read(suite: Suite) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.get(role="sdk", custom_id="x")
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    """A Redis only this test uses, so it may stop it."""
    server = EmbeddedRedis(tmp_path / "redis", persist=False)
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def test_reads_stay_correct_while_redis_is_down(
    start_services: Any,
    settings_for_test: Settings,
    project: TestProject,
    database_url: str,
    private_redis: EmbeddedRedis,
) -> None:
    settings = settings_for_test.with_changes(
        redis_url=private_redis.url, redis_prefix=f"test-{uuid.uuid4().hex[:12]}"
    )
    suite = await start_suite(start_services, settings, project, database_url)
    inst = new_id()
    await suite.track(custom_event(inst, time=NOW - timedelta(minutes=5)))
    # The overview's counters are fed by the bus: let the first event reach them while Redis is
    # up (what lags the bus is not what this test is about).
    await suite.settle()
    await asyncio.to_thread(private_redis.stop)
    # Writes commit to PostgreSQL without Redis (the outbox waits); reads never need it.
    await suite.track(custom_event(inst))
    view = (await suite.get(installation_id=inst)).profile
    assert view.counters.event_count == 2
    events = await suite.call(
        "ListEvents", pb.ListEventsRequest(profile_id=view.summary.profile_id)
    )
    assert len(events.events) == 2
    overview = await suite.call("GetOverview", pb.GetOverviewRequest())
    assert overview.overview.install_count == 1
    # Redis back before the services stop: each of their workers would otherwise spend its
    # whole grace period on it (seconds of teardown, nothing this test is about).
    await asyncio.to_thread(private_redis.start)


@pytest.mark.parametrize("mode", RETENTION_MODES)
async def test_the_view_is_unchanged_by_retention_last_crash_included(
    suite: Suite, mode: str
) -> None:
    """Once retention removed a profile's old events (its months dropped, or the project's
    sweep), the view still shows the same totals, first and last seen, sessions and last
    crash: all of them are kept by ingest, none recounted from the events left."""
    inst = new_id()
    oldest, old = NOW - timedelta(days=300), NOW - timedelta(days=200)
    await make_months(suite.database_url, oldest, old)  # their own months: dropped whole (global)
    # The last crash is the later of two imported ones, sent first.
    imported = await suite.ingest.ImportEvents(
        ingest_pb.ImportEventsRequest(
            events=[
                crash(inst, old, name="IllegalState"),
                crash(inst, oldest, name="NullPointer"),
                session_start(inst, "s0", oldest - timedelta(minutes=1), country="FR"),
                session_end(inst, "s0", oldest + timedelta(minutes=9), 600),
            ]
        ),
        metadata=suite.project.metadata("admin"),
        timeout=20,
    )
    assert all(r.outcome == ingest_pb.EVENT_OUTCOME_ACCEPTED for r in imported.results)
    reply = await suite.track(custom_event(inst, time=NOW - timedelta(hours=1)))
    assert reply.accepted_count == 1
    before = (await suite.get(installation_id=inst)).profile
    assert before.counters.crash_count == 2
    assert before.counters.last_crash.name == "IllegalState"
    assert before.counters.last_crash.crash_time.ToDatetime().replace(tzinfo=old.tzinfo) == old
    assert before.summary.first_seen_time.ToDatetime().replace(tzinfo=old.tzinfo) == (
        oldest - timedelta(minutes=1)
    )

    dropped = await apply_retention(suite.database_url, suite.project.project_id, mode, NOW)

    if mode == "global":
        assert {"events_2029_08", "events_2029_11"} <= set(dropped)
    assert await stored_events(suite.database_url, suite.project.project_id) == 1
    after = (await suite.get(installation_id=inst)).profile
    assert after == before


@pytest.mark.parametrize(
    ("reason", "fatal"), [("", False), ("disk full", False), ("", True), ("out of memory", True)]
)
async def test_the_last_crash_shows_its_reason_and_fatal_as_sent(
    suite: Suite, reason: str, fatal: bool
) -> None:
    """Through TrackEvents' locked part (not the insert trigger): an unset reason or fatal is
    stored as validation leaves it, absent from the payload, and shown empty and false."""
    inst = new_id()
    event = crash(inst, NOW - timedelta(minutes=5), name="Boom")
    event.crash.reason = reason
    event.crash.fatal = fatal
    await suite.track(event)
    last = (await suite.get(installation_id=inst)).profile.counters.last_crash
    assert (last.name, last.reason, last.fatal) == ("Boom", reason, fatal)
