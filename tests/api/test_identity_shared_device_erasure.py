"""Erasure and export on a shared device.

A Countly device's ID is its user's custom ID once they log in. When that device then moves to
another person (a logout, then someone else's login under the same device ID; or a device ID
change with merge to the other person's ID, Identify's rule 4), the installation named by the
first person's custom ID belongs to the second. Erasing the first person renames that
installation to a random ID everywhere it is named, so nothing names the erased custom ID and
the second person keeps their history whole; a request under the old ID is then refused as the
quarantine refuses any installation named by an erased custom ID.

An export of one person must not name another: a split on a shared device shows the other side
as "another profile"."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from profiles.identity.v1 import identity_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2 as ipb
from shared.clock import FrozenClock
from tests.conftest import eventually
from tests.support.cells import cells_naming
from tests.support.identity import (
    Identity,
    bus_pb2,
    count,
    error_info,
    export_document,
    identity_messages,
    of_type,
    person_events,
    start_identity_and_ingest,
)
from tests.support.ingest import NOW, Ingest, custom_event, ingest_client
from tests.support.query import crash

if TYPE_CHECKING:
    from tests.conftest import TestProject

ACCEPTED = ipb.EVENT_OUTCOME_ACCEPTED
REJECTED = ipb.EVENT_OUTCOME_REJECTED
DUPLICATE = ipb.EVENT_OUTCOME_DUPLICATE


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(NOW)


@pytest.fixture
async def services(
    start_services: Any,
    settings_for_test: Any,
    project: TestProject,
    database_url: str,
    clock: FrozenClock,
) -> tuple[Identity, Ingest]:
    identity_channel, ingest_channel = await start_identity_and_ingest(
        start_services, settings_for_test, clock
    )
    return Identity(identity_channel, project), ingest_client(ingest_channel, project, database_url)


async def _outbox_empty(db: asyncpg.Pool) -> bool:
    return await count(db, "SELECT count(*) FROM outbox") == 0


def _tag() -> str:
    return uuid.uuid4().hex[:8]


async def _rows_of(db: asyncpg.Pool, profile_id: str) -> dict[str, list[tuple[Any, ...]]]:
    """What ingest keeps of a profile by installation: events, sessions, attribute and consent
    origins, last crash."""
    profile = uuid.UUID(profile_id)
    queries = {
        "events": "SELECT event_id, installation_id FROM events WHERE profile_id = $1",
        "sessions": "SELECT session_id, installation_id FROM sessions WHERE profile_id = $1",
        "attribute_operations": (
            "SELECT event_id, name, origin FROM attribute_operations WHERE profile_id = $1"
        ),
        "profile_subscriptions": (
            "SELECT channel, change_event_id, change_origin FROM profile_subscriptions"
            " WHERE profile_id = $1"
        ),
        "profile_last_crashes": (
            "SELECT event_id, installation_id FROM profile_last_crashes WHERE profile_id = $1"
        ),
    }
    return {
        name: sorted(tuple(r) for r in await db.fetch(sql, profile))
        for name, sql in queries.items()
    }


def _renamed(value: Any, old: str, new: str) -> Any:
    """`value` (JSON) with every occurrence of `old` in its strings replaced by `new`."""
    return json.loads(json.dumps(value).replace(old, new))


def _renamed_rows(
    rows: dict[str, list[tuple[Any, ...]]], old: str, new: str
) -> dict[str, list[tuple[Any, ...]]]:
    return {
        name: sorted(tuple(str(v).replace(old, new) for v in row) for row in found)
        for name, found in rows.items()
    }


def _stringified(rows: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    return _renamed_rows(rows, "", "")


def _by_installation(document: dict[str, Any]) -> dict[str, Any]:
    """The export with its installations in ID order (a renamed one sorts elsewhere)."""
    ordered = sorted(document["installations"], key=lambda i: i["installationId"])
    return {**document, "installations": ordered}


async def test_another_persons_installation_named_by_the_erased_custom_id_is_renamed(
    services: tuple[Identity, Ingest],
    db: asyncpg.Pool,
    project: TestProject,
    redis_url: str,
    redis_prefix: str,
) -> None:
    identity, ingest = services
    alice, bob = f"alice-cid-{_tag()}", f"bob-cid-{_tag()}"
    alice_phone, bob_phone = f"inst-a-{_tag()}", f"inst-b-{_tag()}"
    # Alice logs in on her phone as Countly does: the phone's anonymous ID, then her ID, the
    # SDK's device ID from now on, as an installation of her profile too.
    await ingest.track(custom_event(alice_phone, event_id="a-before-login"))
    alice_profile = (await identity.identify(alice_phone, alice)).profile_id
    assert (await identity.identify(alice, alice)).profile_id == alice_profile
    await person_events(ingest, alice, "ann")
    await ingest.track(custom_event(bob_phone, event_id="b-own"))
    bob_profile = (await identity.identify(bob_phone, bob)).profile_id
    # Alice logs out of the device, which keeps her ID as its device ID; Bob logs in on it
    # (its anonymous period merges into him) and goes on using it under that ID.
    assert (await identity.logout(alice)).previous_profile_id == alice_profile
    await person_events(ingest, alice, "between")
    assert (await identity.identify(alice, bob)).profile_id == bob_profile
    await person_events(ingest, alice, "ben")
    late = await ingest.track(
        crash(alice, NOW - timedelta(seconds=30)),
        custom_event(alice, event_id="b-refused", name="bad name!", note="bob-note"),
    )
    assert [r.outcome for r in late.results] == [ACCEPTED, REJECTED]
    await eventually(lambda: _outbox_empty(db))
    bob_rows = await _rows_of(db, bob_profile)
    assert any(alice in str(row) for rows in bob_rows.values() for row in rows)
    bob_export = export_document(await identity.export(bob_profile))
    assert alice in json.dumps(bob_export)
    refused_before = await count(db, "SELECT count(*) FROM rejected_events")

    reply = await identity.delete(alice_profile)
    assert reply.custom_id_quarantined
    assert reply.unlinked_installation_count == 1  # her phone; the shared device is Bob's

    # Nothing names her custom ID any more: not Bob's installation, its history, details,
    # events, sessions, origins, crash, refused event or dedupe keys.
    await eventually(lambda: _outbox_empty(db))
    assert await cells_naming(db, alice) == {}
    installations = await db.fetch(
        "SELECT installation_id FROM installations WHERE profile_id = $1 ORDER BY installation_id",
        uuid.UUID(bob_profile),
    )
    (renamed,) = [r["installation_id"] for r in installations if r["installation_id"] != bob_phone]
    assert renamed.startswith("renamed:")
    assert len(renamed) <= 128
    # Bob's history is whole, the device under its new ID: the same rows and export (but for
    # the logout by Alice, which names nobody now), events and dedupe keys included.
    assert _stringified(await _rows_of(db, bob_profile)) == _renamed_rows(bob_rows, alice, renamed)
    after = _by_installation(export_document(await identity.export(bob_profile)))
    expected = _by_installation(_renamed(bob_export, alice, renamed))
    logout = next(
        h for h in expected["identityHistory"] if h["cause"] == "IDENTITY_CHANGE_CAUSE_LOGOUT"
    )
    # Alice's logout: named "another profile" in Bob's export before, it names no installation
    # now (proto3 JSON leaves an empty list out).
    assert logout["sourceProfileId"] == "another profile"
    assert logout.pop("installationIds") == [renamed]
    assert after == expected
    assert any(renamed in h.get("installationIds", []) for h in after["identityHistory"])
    refused_row = await db.fetchrow(
        "SELECT installation_id, payload::text FROM rejected_events WHERE event_id = 'b-refused'"
    )
    assert refused_row is not None
    assert refused_row["installation_id"] == renamed
    assert json.loads(refused_row["payload"])["installation_id"] == renamed
    assert any(r["eventId"] == "b-refused" for r in after["rejectedEvents"])
    again = await ingest.track(custom_event(renamed, event_id="ben-buy"))
    assert again.results[0].outcome == DUPLICATE
    # Query and other consumers recount both IDs: the announcement names the old and new one.
    redis = Redis.from_url(redis_url)
    try:
        found = await identity_messages(db, redis, redis_prefix, identity.project)
    finally:
        await redis.aclose()
    (deleted,) = of_type(found, bus_pb2.ProfileDeleted)
    assert list(deleted.installation_ids) == [alice_phone, alice, renamed]

    # The device's next request under the old ID is a new installation named by an erased
    # custom ID: refused during the quarantine, kept as a bare ERASED row, nothing created.
    refused = await ingest.track(custom_event(alice, event_id="b-after", note="bob-after"))
    assert [(r.outcome, r.reason) for r in refused.results] == [(REJECTED, "ERASED")]
    (resolved,) = await identity.resolve(pb.ProfileKey(installation_id=alice))
    assert (resolved.erased, resolved.profile_id) == (True, "")
    with pytest.raises(grpc.aio.AioRpcError) as login:
        await identity.identify(alice, bob)
    assert error_info(login.value).reason == "CUSTOM_ID_ERASED"
    assert await count(db, "SELECT count(*) FROM rejected_events") == refused_before + 1
    await eventually(lambda: _outbox_empty(db))
    assert await cells_naming(db, alice) == {}
    assert _stringified(await _rows_of(db, bob_profile)) == _renamed_rows(bob_rows, alice, renamed)


async def test_every_later_holder_of_the_device_keeps_its_rows_under_the_new_id(
    services: tuple[Identity, Ingest], db: asyncpg.Pool
) -> None:
    # The device under Alice's ID goes from her to Dave (a logout, then his login on it) and
    # from Dave to Bob (a login without logout: Identify's rule 4 moves it, and Dave keeps his
    # events of it and a copy of its details). Both keep what they had under her ID.
    identity, ingest = services
    alice, dave, bob = (f"{name}-cid-{_tag()}" for name in ("alice", "dave", "bob"))
    await ingest.track(custom_event(f"inst-a-{_tag()}", event_id="a-0"))
    alice_profile = (await identity.identify(alice, alice)).profile_id
    await person_events(ingest, alice, "ann")
    await identity.logout(alice)
    dave_profile = (await identity.identify(alice, dave)).profile_id
    await person_events(ingest, alice, "dan")
    moved = await identity.identify(alice, bob)
    assert moved.outcome == pb.IDENTIFY_OUTCOME_MOVED
    assert moved.previous_profile_id == dave_profile
    bob_profile = moved.profile_id
    await person_events(ingest, alice, "ben")
    await eventually(lambda: _outbox_empty(db))
    before = {p: await _rows_of(db, p) for p in (dave_profile, bob_profile)}
    former = await db.fetch(
        "SELECT installation_id FROM profile_former_installations WHERE profile_id = $1",
        uuid.UUID(dave_profile),
    )
    assert [r["installation_id"] for r in former] == [alice]

    await identity.delete(alice_profile)

    await eventually(lambda: _outbox_empty(db))
    assert await cells_naming(db, alice) == {}
    (renamed,) = [
        r["installation_id"]
        for r in await db.fetch(
            "SELECT installation_id FROM installations WHERE profile_id = $1",
            uuid.UUID(bob_profile),
        )
    ]
    for profile, rows in before.items():
        assert _stringified(await _rows_of(db, profile)) == _renamed_rows(rows, alice, renamed)
    former = await db.fetch(
        "SELECT installation_id FROM profile_former_installations WHERE profile_id = $1",
        uuid.UUID(dave_profile),
    )
    assert [r["installation_id"] for r in former] == [renamed]
    # The move from Dave to Bob stays in both histories, naming the device by its new ID.
    for profile in (dave_profile, bob_profile):
        history = export_document(await identity.export(profile))["identityHistory"]
        switch = [h for h in history if h["cause"] == "IDENTITY_CHANGE_CAUSE_IDENTIFY_SWITCH"]
        assert [h["installationIds"] for h in switch] == [[renamed]]


@pytest.fixture
async def services_with_segments(
    start_services: Any,
    settings_for_test: Any,
    project: TestProject,
    database_url: str,
    clock: FrozenClock,
) -> tuple[Identity, Ingest]:
    """Identity and ingest as above, and segments reading their bus (its session copy)."""
    identity_channel, ingest_channel = await start_identity_and_ingest(
        start_services, settings_for_test, clock
    )
    await start_services("segments", clock=clock)
    return Identity(identity_channel, project), ingest_client(ingest_channel, project, database_url)


async def _segment_sessions(db: asyncpg.Pool, profile_id: str) -> list[tuple[Any, ...]]:
    return sorted(
        tuple(r)
        for r in await db.fetch(
            "SELECT session_key, platform, start_time, start_known, duration_ms, ended"
            " FROM segment_sessions WHERE profile_id = $1",
            uuid.UUID(profile_id),
        )
    )


async def test_segments_session_keys_of_the_renamed_installation_are_renamed(
    services_with_segments: tuple[Identity, Ingest], db: asyncpg.Pool
) -> None:
    # Segments keys a session by its installation and session ID: Bob's sessions on the device
    # under Alice's ID are keyed by her custom ID until the erasure renames them.
    identity, ingest = services_with_segments
    alice, bob = f"alice-cid-{_tag()}", f"bob-cid-{_tag()}"
    bob_phone = f"inst-b-{_tag()}"
    await ingest.track(custom_event(f"inst-a-{_tag()}", event_id="a-0"))
    alice_profile = (await identity.identify(alice, alice)).profile_id
    await person_events(ingest, alice, "ann")
    await ingest.track(custom_event(bob_phone, event_id="b-0"))
    bob_profile = (await identity.identify(bob_phone, bob)).profile_id
    # Alice logs out (the device's anonymous profile has a session of its own, merged into Bob
    # by his login on it), then Bob uses it under her ID.
    await identity.logout(alice)
    await person_events(ingest, alice, "between")
    assert (await identity.identify(alice, bob)).profile_id == bob_profile
    await person_events(ingest, alice, "ben")
    keys = {f"i:{alice}:between-session", f"i:{alice}:ben-session"}

    async def segments_has_bobs_sessions() -> bool:
        return {r[0] for r in await _segment_sessions(db, bob_profile)} == keys

    await eventually(segments_has_bobs_sessions)
    await eventually(lambda: _outbox_empty(db))
    before = await _segment_sessions(db, bob_profile)

    await identity.delete(alice_profile)

    await eventually(lambda: _outbox_empty(db))
    assert await cells_naming(db, alice) == {}
    (renamed,) = [
        r["installation_id"]
        for r in await db.fetch(
            "SELECT installation_id FROM installations WHERE profile_id = $1",
            uuid.UUID(bob_profile),
        )
        if r["installation_id"].startswith("renamed:")
    ]
    # Bob's session history in segments is whole: the same sessions under the new ID.
    expected = sorted(
        (f"i:{renamed}:{key.removeprefix(f'i:{alice}:')}", *rest) for key, *rest in before
    )
    assert await _segment_sessions(db, bob_profile) == expected


async def test_an_export_names_no_other_person_on_a_shared_device(
    services: tuple[Identity, Ingest], clock: FrozenClock
) -> None:
    identity, ingest = services
    ann, ben = f"ann-{_tag()}", f"ben-{_tag()}"
    phone, tablet = f"inst-p-{_tag()}", f"inst-t-{_tag()}"
    await ingest.track(custom_event(tablet, event_id="t-1"))
    ann_profile = (await identity.identify(tablet, ann)).profile_id
    # Her phone's anonymous profile merges into hers: her own, shown with its ID.
    await ingest.track(custom_event(phone, event_id="p-1"))
    phone_anonymous = await identity.profile_of(phone)
    assert (await identity.identify(phone, ann)).profile_id == ann_profile
    # Ann logs out of the tablet; Ben logs in on it (the tablet's new anonymous profile becomes
    # his); later Ann logs in on it while Ben is logged in (the tablet moves from him to her).
    # A second between changes: the history is in time order.
    clock.advance(timedelta(seconds=1))
    left = await identity.logout(tablet)
    ben_profile = (await identity.identify(tablet, ben)).profile_id
    assert ben_profile == left.profile_id
    clock.advance(timedelta(seconds=1))
    switched = await identity.identify(tablet, ann)
    assert switched.previous_profile_id == ben_profile

    document = export_document(await identity.export(ann_profile))
    assert ben_profile not in json.dumps(document)
    entries = [
        (h["kind"], h["cause"], h["sourceProfileId"], h["targetProfileId"], h["installationIds"])
        for h in document["identityHistory"]
    ]
    assert entries == [
        (
            "IDENTITY_CHANGE_KIND_MERGE",
            "IDENTITY_CHANGE_CAUSE_IDENTIFY",
            phone_anonymous,
            ann_profile,
            [phone],
        ),
        (
            "IDENTITY_CHANGE_KIND_SPLIT",
            "IDENTITY_CHANGE_CAUSE_LOGOUT",
            ann_profile,
            "another profile",
            [tablet],
        ),
        (
            "IDENTITY_CHANGE_KIND_SPLIT",
            "IDENTITY_CHANGE_CAUSE_IDENTIFY_SWITCH",
            "another profile",
            ann_profile,
            [tablet],
        ),
    ]

    # Once Ben is erased, his side is still "another profile": the export does not tell Ann
    # that the other person was erased either.
    await identity.delete(ben_profile)
    document = export_document(await identity.export(ann_profile))
    assert [(h["sourceProfileId"], h["targetProfileId"]) for h in document["identityHistory"]] == [
        (phone_anonymous, ann_profile),
        (ann_profile, "another profile"),
        ("another profile", ann_profile),
    ]
    assert "00000000-0000-0000-0000-000000000000" not in json.dumps(document)
