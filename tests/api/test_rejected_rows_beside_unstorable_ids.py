"""An event whose IDs hold U+0000 (which no string of the contract, and no PostgreSQL text, may
hold) is refused alone: the other refused events of its call keep their IDs and payload, as
they do without it. Ingest asks identity whether the IDs a refused row keeps name an erased
custom ID, and asks about them as the row keeps them (U+0000 replaced by U+FFFD): identity
refuses a whole lookup holding U+0000, which left every refused row of the call bare, as if
identity were down. The erasure protection holds beside such an event."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
import structlog

from profiles.ingest.v1 import ingest_service_pb2 as ipb
from services.ingest.errors import IdentityUnavailable
from services.ingest.identity_client import IdentityClient, LookupRefused, OriginKey
from shared.clock import FrozenClock
from tests.api.test_rejected_events_of_erased_ids import (
    erased_person,
    rows_by_event,
    untranslated,
)
from tests.conftest import eventually
from tests.support.identity import Identity, count, start_identity_and_ingest
from tests.support.ingest import NOW, Ingest, custom_event, ingest_client

if TYPE_CHECKING:
    from tests.conftest import TestProject

ACCEPTED = ipb.EVENT_OUTCOME_ACCEPTED
REJECTED = ipb.EVENT_OUTCOME_REJECTED


@pytest.fixture
async def services(
    start_services: Any, settings_for_test: Any, project: TestProject, database_url: str
) -> tuple[Identity, Ingest]:
    identity_channel, ingest_channel = await start_identity_and_ingest(
        start_services, settings_for_test, FrozenClock(NOW)
    )
    return Identity(identity_channel, project), ingest_client(ingest_channel, project, database_url)


async def _outbox_empty(db: asyncpg.Pool) -> bool:
    return await count(db, "SELECT count(*) FROM outbox") == 0


async def test_an_installation_id_holding_nul_leaves_the_other_refused_rows_their_details(
    services: tuple[Identity, Ingest], db: asyncpg.Pool, project: TestProject
) -> None:
    _, ingest = services
    tag = uuid.uuid4().hex[:8]
    good, spaced = f"good-{tag}", f"spaced-{tag}"

    reply = await ingest.track(
        custom_event(good, event_id="good", name="good_event"),
        custom_event(spaced, event_id="spaced", name="has space name", note="spaced-private"),
        custom_event("x\x00y", event_id="nul", name="other", note="nul-private"),
    )

    assert [(r.outcome, r.reason, r.field_path) for r in reply.results] == [
        (ACCEPTED, "", ""),
        (REJECTED, "NAME_INVALID", "custom.name"),
        (REJECTED, "INSTALLATION_ID_INVALID", "installation_id"),
    ]
    stored = await count(
        db,
        "SELECT count(*) FROM events WHERE project_id = $1 AND event_id = 'good'",
        project.project_id,
    )
    assert stored == 1
    rows = await rows_by_event(db, project)
    assert set(rows) == {"spaced", "nul"}
    spaced_row = rows["spaced"]
    assert (spaced_row["reason"], spaced_row["field_path"], spaced_row["installation_id"]) == (
        "NAME_INVALID",
        "custom.name",
        spaced,
    )
    assert "spaced-private" in str(spaced_row["payload"])
    assert "could not" not in spaced_row["message"]
    # The NUL event's own row: its precise reason, its IDs and payload as ingest stores any
    # unstorable string (U+0000 replaced), nothing lost, nothing bare.
    nul_row = rows["nul"]
    assert (nul_row["reason"], nul_row["field_path"], nul_row["installation_id"]) == (
        "INSTALLATION_ID_INVALID",
        "installation_id",
        "x\ufffdy",
    )
    assert nul_row["message"] == "installation_id contains a NUL character"
    assert "nul-private" in str(nul_row["payload"])


async def test_erased_ids_are_kept_bare_beside_ids_holding_nul(
    services: tuple[Identity, Ingest], db: asyncpg.Pool, project: TestProject
) -> None:
    identity, ingest = services
    alice = await erased_person(identity, ingest, db)
    # Another erased person whose custom ID holds U+FFFD: an event sending it with U+0000 in
    # its place would be kept with her ID in clear, once U+0000 is replaced.
    tag = uuid.uuid4().hex[:8]
    eve = f"eve\ufffd{tag}"
    eve_phone = f"eve-phone-{tag}"
    await ingest.track(custom_event(eve_phone, event_id="eve-before"))
    erased = await identity.delete((await identity.identify(eve_phone, eve)).profile_id)
    assert erased.custom_id_quarantined
    await eventually(lambda: _outbox_empty(db))
    bob = f"bob-phone-{tag}"

    reply = await ingest.track(
        # Alice's device under her erased custom ID: an unusable name.
        custom_event(alice, event_id="a-name", name="bad name!", note="alice-private"),
        # Eve's custom ID with U+0000 where it holds U+FFFD, in a server-side event.
        custom_event(None, custom_id=f"eve\x00{tag}", event_id="e-nul", note="eve-private"),
        # Other IDs holding U+0000: an installation ID and a string of an untranslated message.
        custom_event("x\x00y", event_id="x-nul", name="other"),
        untranslated("u-nul", f"anon-{tag}", {"type": "track", "userId": "a\x00b", "event": "!"}),
        custom_event(bob, event_id="b-name", name="bad name!", note="bob-private"),
    )

    assert [(r.outcome, r.reason) for r in reply.results] == [
        (REJECTED, "NAME_INVALID"),
        (REJECTED, "CUSTOM_ID_INVALID"),
        (REJECTED, "INSTALLATION_ID_INVALID"),
        (REJECTED, "NAME_UNUSABLE"),
        (REJECTED, "NAME_INVALID"),
    ]
    rows = await rows_by_event(db, project)
    assert [
        (
            rows[e]["reason"],
            rows[e]["field_path"],
            rows[e]["installation_id"],
            rows[e]["custom_id"],
            rows[e]["payload"],
        )
        for e in ("a-name", "e-nul")
    ] == [
        ("ERASED", "installation_id", None, None, None),
        ("ERASED", "custom_id", None, None, None),
    ]
    assert "NAME_INVALID" in rows["a-name"]["message"]
    assert "CUSTOM_ID_INVALID" in rows["e-nul"]["message"]
    # The rows naming nobody erased keep their details.
    assert (rows["x-nul"]["reason"], rows["x-nul"]["installation_id"]) == (
        "INSTALLATION_ID_INVALID",
        "x\ufffdy",
    )
    assert (rows["u-nul"]["reason"], rows["u-nul"]["installation_id"]) == (
        "NAME_UNUSABLE",
        f"anon-{tag}",
    )
    assert "a\ufffdb" in str(rows["u-nul"]["payload"])
    assert (rows["b-name"]["reason"], rows["b-name"]["installation_id"]) == ("NAME_INVALID", bob)
    assert "bob-private" in str(rows["b-name"]["payload"])


async def test_a_lookup_identity_refuses_whole_is_an_error_of_ingest_not_an_outage(
    start_services: Any, settings_for_test: Any, project: TestProject
) -> None:
    """Should ingest ever send a lookup identity refuses as malformed, the answer is no outage:
    the caller gets LookupRefused (not IdentityUnavailable) and an error names the reason and
    the field, never the keys."""
    handles = await start_services("identity")
    client = IdentityClient(handles["identity"].address, settings_for_test.internal_token)
    try:
        keys = [OriginKey(False, "fine-device"), OriginKey(True, "secret\x00id")]
        with structlog.testing.capture_logs() as logs, pytest.raises(LookupRefused) as refused:
            await client.find_erased(project.project_id, keys)
        assert not isinstance(refused.value, IdentityUnavailable)
        [entry] = [e for e in logs if e["event"].startswith("find_erased")]
        assert entry == {
            "event": "find_erased_refused",
            "log_level": "error",
            "code": "INVALID_ARGUMENT",
            "reason": "STRING_UNSTORABLE",
            "fields": ["keys[1].custom_id"],
            "keys": 2,
        }
        # Every key well formed: identity answers, nothing is erased.
        storable = [OriginKey(False, "fine-device"), OriginKey(True, "secret\ufffdid")]
        assert await client.find_erased(project.project_id, storable) == set()
    finally:
        await client.close()
