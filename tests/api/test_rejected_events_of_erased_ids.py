"""Events refused before identity is asked (ingest's validation: an unusable name, a time out
of range, an edge's untranslatable message) that name an erased person's custom ID, as their
custom ID, as their installation ID (a Countly device ID is its user's custom ID after a login)
or inside an untranslated message, are kept during the quarantine as bare ERASED rows of
rejected_events: no installation ID, custom ID, payload or profile, and no text sent by the
client. A refused event of anyone else keeps its details, and the check creates nothing."""

from __future__ import annotations

import socket
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest

from profiles.identity.v1 import identity_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2 as ipb
from shared.clock import FrozenClock
from tests.conftest import eventually
from tests.support.cells import cells_naming
from tests.support.identity import Identity, count, start_identity_and_ingest
from tests.support.ingest import NOW, Ingest, custom_event, ingest_client

if TYPE_CHECKING:
    from tests.conftest import TestProject

ACCEPTED = ipb.EVENT_OUTCOME_ACCEPTED
REJECTED = ipb.EVENT_OUTCOME_REJECTED

ROWS = """
    SELECT event_id, reason, field_path, message, installation_id, custom_id, payload,
           profile_id
    FROM rejected_events WHERE project_id = $1"""


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


def untranslated(event_id: str, installation_id: str, message: dict[str, Any]) -> ipb.Event:
    """An SDK message the edge could not translate, as the edge sends it to ingest."""
    event = ipb.Event(event_id=event_id, installation_id=installation_id)
    event.untranslated.reason = "NAME_UNUSABLE"
    event.untranslated.explanation = "the event name has no usable character"
    event.untranslated.dialect = "segment"
    event.untranslated.message.update(message)
    return event


async def rows_by_event(db: asyncpg.Pool, project: TestProject) -> dict[str, asyncpg.Record]:
    return {r["event_id"]: r for r in await db.fetch(ROWS, project.project_id)}


async def _outbox_empty(db: asyncpg.Pool) -> bool:
    return await count(db, "SELECT count(*) FROM outbox") == 0


async def erased_person(identity: Identity, ingest: Ingest, db: asyncpg.Pool) -> str:
    """Alice logs in on her phone, then (Countly) under her custom ID as device ID; she is
    erased. Returns her custom ID, quarantined."""
    alice = f"alice-cid-{uuid.uuid4().hex[:8]}"
    phone = f"alice-phone-{uuid.uuid4().hex[:8]}"
    await ingest.track(custom_event(phone, event_id="alice-before"))
    profile = (await identity.identify(phone, alice)).profile_id
    assert (await identity.identify(alice, alice)).profile_id == profile
    stored = await ingest.track(custom_event(alice, event_id="alice-after"))
    assert stored.results[0].outcome == ACCEPTED
    erased = await identity.delete(profile)
    assert erased.custom_id_quarantined
    await eventually(lambda: _outbox_empty(db))
    return alice


async def test_refused_events_naming_an_erased_id_are_kept_bare_and_others_keep_their_details(
    services: tuple[Identity, Ingest], db: asyncpg.Pool, project: TestProject
) -> None:
    identity, ingest = services
    bob = f"bob-phone-{uuid.uuid4().hex[:8]}"
    assert (await ingest.track(custom_event(bob, event_id="bob-ok"))).results[0].outcome == (
        ACCEPTED
    )
    bob_profile = await identity.profile_of(bob)
    alice = await erased_person(identity, ingest, db)
    cells_before = await cells_naming(db, alice)
    stranger = f"carol-phone-{uuid.uuid4().hex[:8]}"  # never seen: refused, not created
    installations_before = await count(db, "SELECT count(*) FROM installations")
    too_old = NOW - timedelta(days=40)

    reply = await ingest.track(
        # Her device, under her erased custom ID as device ID: an unusable name.
        custom_event(alice, event_id="a-name", name="bad name!", note="alice-private"),
        # A server-side event naming her custom ID, from too long ago.
        custom_event(None, custom_id=alice, event_id="a-old", time=too_old, note="alice-private"),
        # An SDK message the edge could not translate, her custom ID in it (Segment's userId
        # beside an anonymous ID nobody erased).
        untranslated(
            "a-untranslated",
            f"anon-{uuid.uuid4().hex[:8]}",
            {
                "type": "track",
                "userId": alice,
                "event": "!!!",
                "properties": {"n": "alice-private"},
            },
        ),
        # Bob's and a stranger's refused events keep what they sent.
        custom_event(bob, event_id="b-name", name="bad name!", note="bob-private"),
        custom_event(stranger, event_id="c-name", name="bad name!", note="carol-private"),
        custom_event(bob, event_id="b-fine", name="fine"),
    )

    # The answers are the validation's: the client is told what was wrong with its event.
    assert [(r.outcome, r.reason) for r in reply.results] == [
        (REJECTED, "NAME_INVALID"),
        (REJECTED, "EVENT_TIME_TOO_OLD"),
        (REJECTED, "NAME_UNUSABLE"),
        (REJECTED, "NAME_INVALID"),
        (REJECTED, "NAME_INVALID"),
        (ACCEPTED, ""),
    ]
    rows = await rows_by_event(db, project)
    # Hers: bare ERASED rows; which ID was erased and what refused the event first are said in
    # words of the suite only.
    assert [
        (
            rows[e]["reason"],
            rows[e]["field_path"],
            rows[e]["installation_id"],
            rows[e]["custom_id"],
            rows[e]["payload"],
            rows[e]["profile_id"],
        )
        for e in ("a-name", "a-old", "a-untranslated")
    ] == [
        ("ERASED", "installation_id", None, None, None, None),
        ("ERASED", "custom_id", None, None, None, None),
        ("ERASED", "untranslated.message", None, None, None, None),
    ]
    assert "NAME_INVALID" in rows["a-name"]["message"]
    assert "EVENT_TIME_TOO_OLD" in rows["a-old"]["message"]
    assert "NAME_UNUSABLE" in rows["a-untranslated"]["message"]
    assert await cells_naming(db, alice) == cells_before
    assert await cells_naming(db, "alice-private") == {}
    # The others' refused events keep their IDs, reason, path and payload.
    kept = {
        e: (
            rows[e]["reason"],
            rows[e]["field_path"],
            rows[e]["installation_id"],
            str(rows[e]["profile_id"]),
        )
        for e in ("b-name", "c-name")
    }
    assert kept == {
        "b-name": ("NAME_INVALID", "custom.name", bob, bob_profile),
        "c-name": ("NAME_INVALID", "custom.name", stranger, "None"),
    }
    assert "bob-private" in str(rows["b-name"]["payload"])
    assert "carol-private" in str(rows["c-name"]["payload"])
    # Asking identity created nothing: the stranger's device is still unknown.
    assert await count(db, "SELECT count(*) FROM installations") == installations_before
    assert (
        await count(db, "SELECT count(*) FROM installations WHERE installation_id = $1", stranger)
        == 0
    )


async def test_after_the_quarantine_a_refused_event_keeps_its_details(
    services: tuple[Identity, Ingest], db: asyncpg.Pool, project: TestProject, clock: FrozenClock
) -> None:
    identity, ingest = services
    alice = await erased_person(identity, ingest, db)
    clock.advance(timedelta(days=30, seconds=1))  # the project's default period is over

    reply = await ingest.track(
        custom_event(
            alice,
            event_id="a-later",
            name="bad name!",
            time=clock.now() - timedelta(seconds=1),
        )
    )
    assert reply.results[0].reason == "NAME_INVALID"
    row = (await rows_by_event(db, project))["a-later"]
    assert (row["reason"], row["installation_id"]) == ("NAME_INVALID", alice)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_refused_events_are_kept_bare_when_identity_cannot_be_asked(
    start_services: Any,
    settings_for_test: Any,
    project: TestProject,
    database_url: str,
    db: asyncpg.Pool,
) -> None:
    """Identity unreachable: nothing is lost (the refusals are kept and answered), and nothing
    is kept in clear that might be an erased person's. The reason stays the validation's, since
    nobody could tell whether an ID was erased."""
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": f"127.0.0.1:{closed_port()}"}
    )
    started = await start_services("ingest", settings=settings, clock=FrozenClock(NOW))
    ingest = ingest_client(started["ingest"].channel, project, database_url)
    device = f"dave-phone-{uuid.uuid4().hex[:8]}"
    # A map key the client chose (here its device ID) is in the field path: left out too.
    event = custom_event(device, event_id="d-attribute", note="dave-private")
    event.custom.attributes[device].string_value = "x"

    reply = await ingest.track(event)

    assert [(r.outcome, r.reason) for r in reply.results] == [(REJECTED, "ATTRIBUTE_NAME_INVALID")]
    assert reply.results[0].field_path == f'custom.attributes["{device}"]'
    row = (await rows_by_event(db, project))["d-attribute"]
    assert (
        row["reason"],
        row["field_path"],
        row["installation_id"],
        row["custom_id"],
        row["payload"],
        row["profile_id"],
    ) == ("ATTRIBUTE_NAME_INVALID", "custom.attributes", None, None, None, None)
    assert "could not" in row["message"]
    assert await cells_naming(db, device) == {}
    assert await cells_naming(db, "dave-private") == {}


async def test_resolving_with_lookup_only_answers_without_creating_anything(
    services: tuple[Identity, Ingest], db: asyncpg.Pool
) -> None:
    identity, ingest = services
    bob = f"bob-phone-{uuid.uuid4().hex[:8]}"
    await ingest.track(custom_event(bob, event_id="bob-ok"))
    bob_profile = await identity.profile_of(bob)
    alice = await erased_person(identity, ingest, db)
    stranger, newcomer = f"zed-{uuid.uuid4().hex[:8]}", f"zoe-cid-{uuid.uuid4().hex[:8]}"
    rows_before = [
        await count(db, f"SELECT count(*) FROM {table}")
        for table in ("installations", "profiles", "outbox")
    ]

    reply = await identity.stub.ResolveProfiles(
        pb.ResolveProfilesRequest(
            lookup_only=True,
            keys=[
                pb.ProfileKey(installation_id=bob),
                pb.ProfileKey(installation_id=stranger),
                pb.ProfileKey(installation_id=alice),
                pb.ProfileKey(custom_id=alice),
                pb.ProfileKey(custom_id=newcomer),
                pb.ProfileKey(custom_id="null"),
            ],
        ),
        metadata=identity.project.metadata("admin"),
        timeout=30,
    )

    assert [(r.status.code, r.profile_id, r.created, r.erased) for r in reply.results] == [
        (0, bob_profile, False, False),
        (0, "", False, False),
        (0, "", False, True),
        (0, "", False, True),
        (0, "", False, False),
        (grpc.StatusCode.INVALID_ARGUMENT.value[0], "", False, False),
    ]
    assert [
        await count(db, f"SELECT count(*) FROM {table}")
        for table in ("installations", "profiles", "outbox")
    ] == rows_before
