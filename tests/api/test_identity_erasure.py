"""DeleteProfile: erasure for a privacy request leaves no row of the person behind in any table
(found from the schema, so tables added later are checked too), only the HMAC quarantine and
bare event-ID markers; the quarantine refuses the custom ID until it ends."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from profiles.identity.v1 import identity_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2 as ipb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ipb_grpc
from services.identity.service import IdentityService
from shared.clock import FrozenClock
from tests.conftest import create_test_project, eventually
from tests.support.identity import (
    Identity,
    bus_pb2,
    count,
    error_info,
    export_document,
    identity_messages,
    installation_row,
    of_type,
    person_events,
    start_identity_and_ingest,
)
from tests.support.ingest import NOW, Ingest, custom_event
from tests.support.retention import RETENTION_DAYS, apply_retention

if TYPE_CHECKING:
    from tests.conftest import TestProject

ACCEPTED = ipb.EVENT_OUTCOME_ACCEPTED
DUPLICATE = ipb.EVENT_OUTCOME_DUPLICATE
REJECTED = ipb.EVENT_OUTCOME_REJECTED
# What an erased installation event keeps as its origin (0060): nothing of the installation.
ERASED_ORIGIN = "erased:"
MARKERS_0060 = (
    Path(__file__).resolve().parents[2]
    / "services/ingest/schema/0060_erasure_markers_name_and_date_nobody.sql"
)

# Text, JSON, array and byte columns can hold an ID or a value; bytea is read with its printable
# bytes as they are (encode 'escape'), so an ID inside a serialized message is found too.
SCANNED_TYPES = ("text", "character varying", "uuid", "jsonb", "json", "ARRAY", "bytea")
COLUMNS = """
    SELECT c.table_name, c.column_name, c.data_type
    FROM information_schema.columns c
    JOIN information_schema.tables t
        ON t.table_schema = c.table_schema AND t.table_name = c.table_name
    WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE'
        -- A partition's rows are read through its partitioned table (events, rejected_events).
        AND NOT EXISTS (
            SELECT 1 FROM pg_class pc
            WHERE pc.oid = to_regclass(quote_ident(c.table_name)) AND pc.relispartition
        )
    ORDER BY c.table_name, c.column_name"""


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(NOW)


@pytest.fixture
async def services(
    start_services: Any, settings_for_test: Any, project: TestProject, database_url: str, clock: Any
) -> tuple[Identity, Ingest]:
    identity_channel, ingest_channel = await start_identity_and_ingest(
        start_services, settings_for_test, clock
    )
    ingest = Ingest(
        ipb_grpc.IngestServiceStub(ingest_channel),
        project.metadata("sdk"),
        project.metadata("admin"),
        database_url,
    )
    return Identity(identity_channel, project), ingest


async def leftovers(
    db: asyncpg.Pool, project: TestProject, values: set[str]
) -> list[tuple[str, str, str]]:
    """(table, column, value) for every cell of the project that still contains one of
    `values`, except the documented remains: the event ID of a bare event marker (a row without
    profile, payload or name; its origin names nobody: 0060), the DeleteProfile answer kept for
    retries, the ProfileDeleted message on its way to the bus, and the erased profile IDs in
    identity's record of erasures (erased_profiles, 0061)."""
    found = []
    columns = await db.fetch(COLUMNS)
    by_table: dict[str, dict[str, str]] = {}
    for row in columns:
        by_table.setdefault(row["table_name"], {})[row["column_name"]] = row["data_type"]
    for table, types in by_table.items():
        tenant = "project_id" in types
        for column, data_type in types.items():
            if data_type not in SCANNED_TYPES or column == "project_id":
                continue
            cell = (
                f"encode(\"{column}\", 'escape')" if data_type == "bytea" else f'"{column}"::text'
            )
            allowed = "true"
            if table == "events" and column == "event_id":
                allowed = "NOT (profile_id IS NULL AND payload IS NULL AND name IS NULL)"
            elif table == "identity_requests":
                allowed = "rpc <> 'DeleteProfile'"
            elif table == "outbox":
                allowed = "kind <> 'profiles.common.v1.ProfileDeleted'"
            elif table == "erased_profiles":
                allowed = "false"  # identity's record of erased profile IDs (0061)
            where = "project_id = $1 AND " if tenant else ""
            args: list[Any] = [project.project_id] if tenant else []
            for value in sorted(values):
                hits = await db.fetchval(
                    f'SELECT count(*) FROM "{table}" WHERE {where}'
                    f" strpos({cell}, ${len(args) + 1}) > 0 AND ({allowed})",
                    *args,
                    value,
                )
                if hits:
                    found.append((table, column, value))
    return found


async def test_erasure_leaves_nothing_of_the_person_in_any_table(
    services: tuple[Identity, Ingest], db: asyncpg.Pool, project: TestProject
) -> None:
    identity, ingest = services
    phone, tablet, bob_phone = (f"inst-{tag}-{uuid.uuid4().hex[:8]}" for tag in "ptb")
    alice = f"alice-{uuid.uuid4().hex[:8]}"
    alice_alt = f"alice-alt-{uuid.uuid4().hex[:8]}"
    phone_batch = await person_events(ingest, phone, "alice")
    anonymous_phone = await identity.profile_of(phone)
    await identity.identify(phone, alice)
    await person_events(ingest, tablet, "alice2")
    tablet_anonymous = await identity.profile_of(tablet)
    merged = await identity.identify(tablet, alice)
    assert merged.outcome == pb.IDENTIFY_OUTCOME_MERGED
    survivor = merged.profile_id
    # Server-side data, a second account merged by an operator (its custom ID an alias), and a
    # rejected event of the phone.
    server_side = custom_event(None, custom_id=alice, event_id="srv-1", note="server-alice")
    assert (await ingest.track(server_side)).results[0].outcome == ACCEPTED
    alt_profile = await identity.profile_of_custom_id(alice_alt)
    alt_event = custom_event(None, custom_id=alice_alt, event_id="srv-2", note="alt-alice")
    assert (await ingest.track(alt_event)).results[0].outcome == ACCEPTED
    merge = await identity.merge(alt_profile, survivor, allow_conflict=True)
    assert merge.alias_custom_id == alice_alt
    bad = custom_event(phone, event_id="bad-1", name="Not A Valid Name!", sku="sku-rejected")
    assert (await ingest.track(bad)).results[0].outcome == REJECTED
    # Someone else, who must keep everything.
    await person_events(ingest, bob_phone, "bob")
    bob = await identity.profile_of(bob_phone)
    bob_events = await count(
        db, "SELECT count(*) FROM events WHERE profile_id = $1", uuid.UUID(bob)
    )
    # Published messages leave the outbox; what is still queued must go with the erasure.
    await eventually(lambda: _outbox_empty(db))
    stored_events = await count(
        db, "SELECT count(*) FROM events WHERE profile_id = $1", uuid.UUID(survivor)
    )
    assert stored_events == 2 * len(phone_batch) + 2
    survivor_rows = "SELECT count(*) FROM {} WHERE profile_id = $1"
    for table, expected in (("sessions", 2), ("profile_subscriptions", 1)):
        assert await count(db, survivor_rows.format(table), uuid.UUID(survivor)) == expected

    # A merged-away ID resolves to its survivor, which is erased with its tombstones.
    reply = await identity.delete(tablet_anonymous, request_id="erase-1")

    assert reply.profile_id == survivor
    assert reply.custom_id_quarantined
    assert reply.quarantine_expire_time.ToDatetime().date() == (NOW + timedelta(days=30)).date()
    assert reply.deleted_event_count == stored_events
    assert reply.unlinked_installation_count == 2
    secrets = {
        survivor,
        anonymous_phone,
        tablet_anonymous,
        alt_profile,
        alice,
        alice_alt,
        phone,
        tablet,
        "alice@example.com",
        "alice2@example.com",
        "tier-alice-gold",
        "sku-alice-991",
        "push-token-alice",
        "push-token-alice2",
        "server-alice",
        "alt-alice",
        "sku-rejected",
        "alice-session",
    }
    assert await leftovers(db, project, secrets) == []
    # What remains: two quarantine hashes and the bare markers.
    assert await count(db, "SELECT count(*) FROM quarantined_custom_ids") == 2
    markers = await db.fetch("SELECT * FROM events WHERE profile_id IS NULL ORDER BY event_seq")
    assert len(markers) == stored_events
    assert {m["installation_id"] for m in markers} == {ERASED_ORIGIN, None}
    assert all(m["custom_id"].startswith("erased:") for m in markers if m["custom_id"])
    assert all(m["payload"] is None and m["session_id"] is None for m in markers)
    # Bob keeps everything.
    assert (
        await count(db, "SELECT count(*) FROM events WHERE profile_id = $1", uuid.UUID(bob))
        == bob_events
    )
    assert await identity.profile_of(bob_phone) == bob
    assert await leftovers(db, project, {bob, "bob@example.com", "push-token-bob"}) != []

    # A retried DeleteProfile returns its first answer; without request_id it is NOT_FOUND.
    assert await identity.delete(tablet_anonymous, request_id="erase-1") == reply
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await identity.delete(survivor)
    assert gone.value.code() is grpc.StatusCode.NOT_FOUND
    assert error_info(gone.value).reason == "PROFILE_NOT_FOUND"

    # An SDK retrying the old batch stores nothing and brings nothing back...
    retried = await ingest.track(*phone_batch)
    assert [r.outcome for r in retried.results] == [DUPLICATE] * len(phone_batch)
    # ...and the phone's next event starts a fresh anonymous profile.
    later = await ingest.track(custom_event(phone, event_id="after-erasure"))
    fresh = later.results[0].profile_id
    assert later.results[0].outcome == ACCEPTED
    assert fresh not in secrets
    assert (
        await count(db, "SELECT count(*) FROM events WHERE profile_id = $1", uuid.UUID(fresh)) == 1
    )
    for table in ("profile_attributes", "profile_subscriptions", "sessions"):
        assert (
            await count(db, f"SELECT count(*) FROM {table} WHERE profile_id = $1", uuid.UUID(fresh))
            == 0
        )
    details = await db.fetchrow(
        "SELECT * FROM installation_details WHERE installation_id = $1", phone
    )
    assert details is None or details["push_token"] is None
    row = await installation_row(db, project, phone)
    assert row is not None
    assert str(row["profile_id"]) == fresh


async def _outbox_empty(db: asyncpg.Pool) -> bool:
    return await count(db, "SELECT count(*) FROM outbox") == 0


# The erased events' dedupe keys, by the origins and event IDs a retry would bring.
KEY_TIMES = """
    SELECT k.receive_time FROM event_keys k
    JOIN unnest($2::text[], $3::text[], $4::text[]) AS o(installation_id, custom_id, event_id)
        ON k.event_key = profiles_ingest_event_key(o.installation_id, o.custom_id, o.event_id)
    WHERE k.project_id = $1"""


async def key_times(
    db: asyncpg.Pool, project: TestProject, origins: list[tuple[str | None, str | None, str]]
) -> list[datetime]:
    installations, custom_ids, event_ids = (list(column) for column in zip(*origins, strict=True))
    rows = await db.fetch(KEY_TIMES, project.project_id, installations, custom_ids, event_ids)
    return [r["receive_time"] for r in rows]


async def test_markers_name_no_installation_and_date_nothing_but_the_erasure(
    services: tuple[Identity, Ingest],
    db: asyncpg.Pool,
    project: TestProject,
    clock: FrozenClock,
    database_url: str,
) -> None:
    # The audit's case: markers kept every installation ID in clear, among them a Countly
    # device's, whose ID is the person's custom ID (Countly's SDK makes the user ID the device
    # ID after login), and their receive time, which told when the person used each device.
    identity, ingest = services
    alice = f"alice-{uuid.uuid4().hex[:8]}"
    phone = f"alice-iphone-{uuid.uuid4().hex[:4]}"
    countly_device = alice
    phone_batch = [
        custom_event(phone, event_id=f"p-{i}", time=NOW - timedelta(minutes=30 - i))
        for i in range(3)
    ]
    countly_batch = [
        custom_event(countly_device, event_id=f"c-{i}", time=NOW - timedelta(minutes=20 - i))
        for i in range(3)
    ]
    server_side = custom_event(None, custom_id=alice, event_id="srv-1")
    for batch in (phone_batch, countly_batch):
        assert [r.outcome for r in (await ingest.track(*batch)).results] == [ACCEPTED] * 3
    await identity.identify(phone, alice)
    profile = (await identity.identify(countly_device, alice)).profile_id
    assert (await ingest.track(server_side)).results[0].outcome == ACCEPTED
    clock.advance(timedelta(days=1))  # erased a day after the person used the devices

    reply = await identity.delete(profile)

    assert reply.deleted_event_count == 7
    erased_at = reply.delete_time.ToDatetime(tzinfo=UTC)
    assert erased_at == NOW + timedelta(days=1)
    assert await leftovers(db, project, {alice, phone}) == []
    markers = await db.fetch(
        "SELECT * FROM events WHERE project_id = $1 AND profile_id IS NULL", project.project_id
    )
    assert sorted(m["event_id"] for m in markers) == sorted(
        [*(e.event_id for e in phone_batch + countly_batch), "srv-1"]
    )
    assert {m["installation_id"] for m in markers} == {ERASED_ORIGIN, None}
    (server_marker,) = [m["custom_id"] for m in markers if m["custom_id"] is not None]
    assert server_marker.startswith("erased:")
    # No time of the person's: each marker's times, and its dedupe key's, are the erasure's.
    assert {(m["event_time"], m["receive_time"]) for m in markers} == {(erased_at, erased_at)}
    origins = [
        *((phone, None, e.event_id) for e in phone_batch),
        *((countly_device, None, e.event_id) for e in countly_batch),
        (None, server_marker, "srv-1"),
    ]
    assert await key_times(db, project, origins) == [erased_at] * 7

    # Retried after the erasure, the events are refused as before and store nothing: the
    # phone's are duplicates; the Countly device's too (or ERASED, its ID being a quarantined
    # custom ID); the server-side one names the quarantined custom ID.
    retried = await ingest.track(*phone_batch)
    assert [r.outcome for r in retried.results] == [DUPLICATE] * 3
    retried = await ingest.track(*countly_batch)
    assert all(
        r.outcome == DUPLICATE or (r.outcome == REJECTED and r.reason == "ERASED")
        for r in retried.results
    ), retried
    retried = await ingest.track(server_side)
    assert [(r.outcome, r.reason) for r in retried.results] == [(REJECTED, "ERASED")]
    assert (
        await count(db, "SELECT count(*) FROM events WHERE project_id = $1", project.project_id)
        == 7
    )

    # Retention counts from the erasure: a project's sweep keeps the markers until its period
    # after the erasure has passed, then removes them.
    marker_count = "SELECT count(*) FROM events WHERE project_id = $1 AND profile_id IS NULL"
    period = timedelta(days=RETENTION_DAYS)
    await apply_retention(
        database_url, project.project_id, "project", erased_at + period - timedelta(seconds=1)
    )
    assert await count(db, marker_count, project.project_id) == 7
    await apply_retention(
        database_url, project.project_id, "project", erased_at + period + timedelta(seconds=1)
    )
    assert await count(db, marker_count, project.project_id) == 0


# Markers as erasures left them before 0060: the origin in clear (or a custom ID's keyed
# marker), event and receive time the receipt's; each with its dedupe key.
OLD_MARKERS = """
    INSERT INTO events (project_id, installation_id, custom_id, event_id, profile_id, kind,
                        event_time, receive_time, platform)
    SELECT $1, m.installation_id, m.custom_id, m.event_id, NULL, 0, m.received, m.received, 0
    FROM unnest($2::text[], $3::text[], $4::text[], $5::timestamptz[])
         AS m(installation_id, custom_id, event_id, received)"""
LIVE_EVENT = """
    INSERT INTO events (project_id, installation_id, event_id, profile_id, kind, name,
                        event_time, receive_time, platform, payload)
    VALUES ($1, $2, 'live-1', $3, 1, 'purchase', $4, $4, 1, '{"name": "purchase"}')"""
KEYS_OF_EVENTS = """
    INSERT INTO event_keys (project_id, event_key, receive_time)
    SELECT project_id, profiles_ingest_event_key(installation_id, custom_id, event_id),
           receive_time
    FROM events WHERE project_id = $1"""


async def test_0060_rewrites_the_markers_erasures_left_before(
    db: asyncpg.Pool, project: TestProject, database_url: str
) -> None:
    alice = f"alice-{uuid.uuid4().hex[:8]}"
    phone, tablet, bob_phone = (
        f"{who}-{uuid.uuid4().hex[:4]}" for who in ("alice-iphone-7731", "alice-ipad", "bob")
    )
    old_marker = "erased:" + "ab" * 32
    origins: list[tuple[str | None, str | None, str]] = [
        (phone, None, "p-1"),
        (phone, None, "p-2"),
        (tablet, None, "t-1"),
        (alice, None, "c-1"),  # a Countly device: its ID is the custom ID
        (None, old_marker, "srv-1"),
    ]
    received = [
        NOW - timedelta(days=d, minutes=m) for d, m in ((3, 1), (3, 2), (2, 0), (1, 0), (1, 5))
    ]
    installations, custom_ids, event_ids = (list(column) for column in zip(*origins, strict=True))
    await db.execute(
        OLD_MARKERS, project.project_id, installations, custom_ids, event_ids, received
    )
    await db.execute(LIVE_EVENT, project.project_id, bob_phone, uuid.uuid4(), NOW)
    await db.execute(KEYS_OF_EVENTS, project.project_id)
    live_before = await db.fetchrow(
        "SELECT * FROM events WHERE project_id = $1 AND profile_id IS NOT NULL",
        project.project_id,
    )
    assert await leftovers(db, project, {alice, phone, tablet}) != []  # the audit's finding

    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute(MARKERS_0060.read_text())
            migrated_at = await conn.fetchval("SELECT now()")
    finally:
        await conn.close()

    assert await leftovers(db, project, {alice, phone, tablet}) == []
    markers = await db.fetch(
        "SELECT * FROM events WHERE project_id = $1 AND profile_id IS NULL ORDER BY event_seq",
        project.project_id,
    )
    assert [(m["installation_id"], m["custom_id"], m["event_id"]) for m in markers] == [
        (ERASED_ORIGIN, None, "p-1"),
        (ERASED_ORIGIN, None, "p-2"),
        (ERASED_ORIGIN, None, "t-1"),
        (ERASED_ORIGIN, None, "c-1"),
        (None, old_marker, "srv-1"),
    ]
    assert {(m["event_time"], m["receive_time"]) for m in markers} == {(migrated_at, migrated_at)}
    # Their keys stay (a retry still finds them), dated like the markers.
    assert await key_times(db, project, origins) == [migrated_at] * len(origins)
    # Someone else's event, and its key, are untouched.
    live_after = await db.fetchrow(
        "SELECT * FROM events WHERE project_id = $1 AND profile_id IS NOT NULL",
        project.project_id,
    )
    assert dict(live_after) == dict(live_before)
    assert await key_times(db, project, [(bob_phone, None, "live-1")]) == [NOW]


async def test_rejected_events_go_with_the_profile_they_arrived_for_after_a_logout(
    services: tuple[Identity, Ingest], db: asyncpg.Pool, project: TestProject
) -> None:
    # A rejected event went by its installation's current profile: after a logout it was
    # exported with the anonymous profile the phone moved to, and outlived the erasure of the
    # person it arrived for. It now goes with that person, also through a merge.
    identity, ingest = services
    phone, tablet = (f"inst-{tag}-{uuid.uuid4().hex[:8]}" for tag in "pt")
    alice = f"alice-{uuid.uuid4().hex[:8]}"
    await ingest.track(custom_event(phone, event_id="first"))
    await ingest.track(custom_event(tablet, event_id="tablet-first"))
    alice_profile = (await identity.identify(phone, alice)).profile_id
    hers = custom_event(phone, event_id="bad-alice", name="Bad Name!", note="alice-private-note")
    assert (await ingest.track(hers)).results[0].outcome == REJECTED
    # The tablet's rejected event arrives on its anonymous profile, merged into hers later.
    merged_in = custom_event(tablet, event_id="bad-tablet", name="Bad Too!", note="alice-tablet")
    assert (await ingest.track(merged_in)).results[0].outcome == REJECTED
    assert (await identity.identify(tablet, alice)).outcome == pb.IDENTIFY_OUTCOME_MERGED
    anonymous = (await identity.logout(phone)).profile_id
    after = custom_event(phone, event_id="bad-anonymous", name="Bad Again!", note="someone")
    assert (await ingest.track(after)).results[0].outcome == REJECTED

    alice_export = export_document(await identity.export(alice_profile))
    anonymous_export = export_document(await identity.export(anonymous))
    assert sorted(r["eventId"] for r in alice_export["rejectedEvents"]) == [
        "bad-alice",
        "bad-tablet",
    ]
    assert [r["eventId"] for r in anonymous_export["rejectedEvents"]] == ["bad-anonymous"]

    await identity.delete(alice_profile)
    assert await leftovers(db, project, {"alice-private-note", "alice-tablet"}) == []
    left = await db.fetch(
        "SELECT event_id FROM rejected_events WHERE project_id = $1", project.project_id
    )
    assert [r["event_id"] for r in left] == ["bad-anonymous"]


async def test_an_erased_custom_id_is_quarantined_until_the_period_ends(
    services: tuple[Identity, Ingest], db: asyncpg.Pool, project: TestProject, clock: FrozenClock
) -> None:
    identity, ingest = services
    installation = f"inst-{uuid.uuid4().hex[:8]}"
    custom_id = f"carol-{uuid.uuid4().hex[:8]}"
    profile = (await identity.identify(installation, custom_id)).profile_id
    await identity.delete(profile)

    (resolved,) = await identity.resolve(pb.ProfileKey(custom_id=custom_id))
    assert resolved.status.code == 0
    assert resolved.erased
    assert not resolved.profile_id
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await identity.identify(f"inst-{uuid.uuid4().hex[:8]}", custom_id)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(refused.value).reason == "CUSTOM_ID_ERASED"
    server_side = await ingest.track(custom_event(None, custom_id=custom_id, event_id="s1"))
    assert server_side.results[0].outcome == REJECTED
    rejected = await db.fetch("SELECT * FROM rejected_events WHERE event_id = 's1'")
    assert [(r["reason"], r["custom_id"], r["payload"]) for r in rejected] == [
        ("ERASED", None, None)
    ]
    assert await count(db, "SELECT count(*) FROM profiles WHERE custom_id = $1", custom_id) == 0

    clock.advance(timedelta(days=30, seconds=1))  # the project's default period is over

    again = await identity.identify(installation, custom_id)
    assert again.outcome == pb.IDENTIFY_OUTCOME_IDENTIFIED
    assert again.profile_id != profile
    (resolved,) = await identity.resolve(pb.ProfileKey(custom_id=custom_id))
    assert not resolved.erased
    assert resolved.profile_id == again.profile_id


async def test_an_anonymous_profile_is_erased_without_quarantine_and_announced(
    services: tuple[Identity, Ingest], db: asyncpg.Pool, redis_url: str, redis_prefix: str
) -> None:
    identity, ingest = services
    installation = f"inst-{uuid.uuid4().hex[:8]}"
    await ingest.track(custom_event(installation, event_id="a1"))
    profile = await identity.profile_of(installation)
    reply = await identity.delete(profile)
    assert not reply.custom_id_quarantined
    assert not reply.HasField("quarantine_expire_time")
    assert reply.deleted_event_count == 1
    assert reply.unlinked_installation_count == 1
    assert await count(db, "SELECT count(*) FROM quarantined_custom_ids") == 0
    (resolved,) = await identity.resolve(pb.ProfileKey(installation_id=installation))
    assert resolved.created
    assert resolved.profile_id != profile
    redis = Redis.from_url(redis_url)
    try:
        found = await identity_messages(db, redis, redis_prefix, identity.project)
    finally:
        await redis.aclose()
    (deleted,) = of_type(found, bus_pb2.ProfileDeleted)
    assert deleted.profile_id == profile
    assert list(deleted.installation_ids) == [installation]
    assert not deleted.custom_id_quarantined
    assert deleted.delete_time == reply.delete_time


async def test_a_split_with_someone_erased_stays_in_the_others_history_without_them(
    services: tuple[Identity, Ingest], db: asyncpg.Pool, project: TestProject
) -> None:
    # Quinn logs out of a shared device; Pat logs in on it (the device's anonymous profile of
    # after the logout merges into Pat). Erasing Pat must leave Quinn's own logout in Quinn's
    # history, naming nothing of Pat.
    identity, ingest = services
    device = f"inst-shared-{uuid.uuid4().hex[:8]}"
    pat_phone = f"inst-pat-{uuid.uuid4().hex[:8]}"
    quinn_id, pat_id = (f"{name}-{uuid.uuid4().hex[:8]}" for name in ("quinn", "pat"))
    await ingest.track(custom_event(device, event_id="q-1"))
    quinn = (await identity.identify(device, quinn_id)).profile_id
    logout = await identity.logout(device)
    await ingest.track(custom_event(pat_phone, event_id="p-1"))
    pat = (await identity.identify(pat_phone, pat_id)).profile_id
    merged = await identity.identify(device, pat_id)
    assert merged.outcome == pb.IDENTIFY_OUTCOME_MERGED
    before = export_document(await identity.export(quinn))["identityHistory"]
    assert [e["changeId"] for e in before] == [logout.change_id]

    await identity.delete(pat)

    (after,) = export_document(await identity.export(quinn))["identityHistory"]
    assert after["changeId"] == logout.change_id
    assert after["sourceProfileId"] == quinn
    assert after["targetProfileId"] == "another profile"  # the export names no one else
    assert after.get("installationIds", []) == []
    # (The device is Quinn's too: Quinn's own event on it stays.)
    assert await leftovers(db, project, {pat, logout.profile_id, pat_id, pat_phone}) == []
    # Erased in turn, Quinn takes the change along: it was no one else's.
    await identity.delete(quinn)
    changes = await db.fetchval(
        "SELECT count(*) FROM identity_changes WHERE change_id = $1",
        uuid.UUID(logout.change_id),
    )
    assert changes == 0


async def test_an_exact_erasure_of_a_merged_away_profile_erases_nobody(
    services: tuple[Identity, Ingest],
) -> None:
    identity, ingest = services
    phone = f"inst-{uuid.uuid4().hex[:8]}"
    await ingest.track(custom_event(phone, event_id="p1"))
    visitor = await identity.profile_of(phone)
    customer = f"cust-{uuid.uuid4().hex[:8]}"
    survivor = (await identity.identify(f"inst-{uuid.uuid4().hex[:8]}", customer)).profile_id
    merged = await identity.identify(phone, customer)  # the visitor logs in: merged into theirs
    assert merged.outcome == pb.IDENTIFY_OUTCOME_MERGED
    assert merged.profile_id == survivor
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await identity.delete(visitor, str(uuid.uuid4()), exact=True)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(refused.value).reason == "PROFILE_MERGED"
    assert await identity.profile_of(phone) == survivor  # nothing erased
    # Without `exact`, the merged-away ID leads to its survivor, as documented.
    reply = await identity.delete(visitor, str(uuid.uuid4()))
    assert reply.profile_id == survivor


async def test_delete_refuses_an_invalid_or_unknown_profile(identity_only: Identity) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await identity_only.delete("not-a-uuid")
    assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(invalid.value).reason == "PROFILE_ID_INVALID"
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await identity_only.delete(str(uuid.uuid4()))
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND


@pytest.fixture
async def identity_channel(start_services: Any) -> grpc.aio.Channel:
    channel: grpc.aio.Channel = (await start_services("identity"))["identity"].channel
    return channel


@pytest.fixture
def identity_only(identity_channel: grpc.aio.Channel, project: TestProject) -> Identity:
    return Identity(identity_channel, project)


async def test_another_projects_key_cannot_delete_or_export_a_profile(
    identity_only: Identity, identity_channel: grpc.aio.Channel, database_url: str
) -> None:
    profile = (await identity_only.identify(f"inst-{uuid.uuid4().hex[:8]}", "dave-1")).profile_id
    other = Identity(identity_channel, await create_test_project(database_url))
    for call in (other.delete(profile), other.export(profile)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() is grpc.StatusCode.NOT_FOUND
    assert await identity_only.profile_of_custom_id("dave-1") == profile


async def test_an_erasure_sent_twice_at_once_answers_both_alike(
    services: tuple[Identity, Ingest], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A double-clicked erase form: the twin looks for its answer before the first commits,
    then finds no profile. The answer, committed with the erasure, is the twin's too (it was
    refused NOT_FOUND). The twin's first look is made to miss, as it does in that race."""
    identity, ingest = services
    installation = f"inst-{uuid.uuid4().hex[:8]}"
    await ingest.track(custom_event(installation, event_id="twice-1"))
    profile = await identity.profile_of(installation)
    request_id = str(uuid.uuid4())
    reply = await identity.delete(profile, request_id, exact=True)

    original = IdentityService._stored_answer
    missed: list[str] = []

    async def first_look_misses(self: IdentityService, tx: Any, *args: Any) -> Any:
        if args[1] == "DeleteProfile" and not missed:
            missed.append(args[2])
            return None
        return await original(self, tx, *args)

    monkeypatch.setattr(IdentityService, "_stored_answer", first_look_misses)
    twin = await identity.delete(profile, request_id, exact=True)
    assert missed == [request_id]
    assert twin == reply
