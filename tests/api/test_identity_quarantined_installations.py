"""An installation ID equal to a custom ID under quarantine is refused like the custom ID: after
a login, Countly's SDKs send under the user's ID as their device ID, and an erased person's
device brought the erased custom ID back as a new installation on a new anonymous profile. Its
events are rejected ERASED (kept without installation, custom ID or payload) until the
quarantine ends; no row naming it is created meanwhile."""

from __future__ import annotations

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
from tests.support.identity import (
    Identity,
    count,
    error_info,
    installation_row,
    start_identity_and_ingest,
)
from tests.support.ingest import NOW, Ingest, custom_event, ingest_client

if TYPE_CHECKING:
    from tests.conftest import TestProject

ACCEPTED = ipb.EVENT_OUTCOME_ACCEPTED
REJECTED = ipb.EVENT_OUTCOME_REJECTED

# Every table of the schema, partitions read through their partitioned table.
TABLES = """
    SELECT t.table_name,
           EXISTS (SELECT 1 FROM information_schema.columns c
                   WHERE c.table_schema = t.table_schema AND c.table_name = t.table_name
                     AND c.column_name = 'project_id') AS tenant
    FROM information_schema.tables t
    WHERE t.table_schema = current_schema() AND t.table_type = 'BASE TABLE'
        AND NOT EXISTS (
            SELECT 1 FROM pg_class pc
            WHERE pc.oid = to_regclass(quote_ident(t.table_name)) AND pc.relispartition
        )
    ORDER BY t.table_name"""


async def row_counts(db: asyncpg.Pool, project: TestProject) -> dict[str, int]:
    """Rows per table: the project's, or all of a table without project_id."""
    counts = {}
    for table in await db.fetch(TABLES):
        name = table["table_name"]
        where, args = (
            ("WHERE project_id = $1", [project.project_id]) if table["tenant"] else ("", [])
        )
        counts[name] = await count(db, f'SELECT count(*) FROM "{name}" {where}', *args)
    return counts


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


async def test_an_installation_named_by_an_erased_custom_id_is_refused_until_the_quarantine_ends(
    services: tuple[Identity, Ingest], db: asyncpg.Pool, project: TestProject, clock: FrozenClock
) -> None:
    identity, ingest = services
    custom_id = f"alice-cid-{uuid.uuid4().hex[:8]}"
    anonymous_device = f"inst-{uuid.uuid4().hex[:8]}"
    # Countly's login: the anonymous device logs in, then the user's ID, as the SDK's new device
    # ID, is an installation of the identified profile too.
    await ingest.track(custom_event(anonymous_device, event_id="before-login"))
    profile = (await identity.identify(anonymous_device, custom_id)).profile_id
    assert (await identity.identify(custom_id, custom_id)).profile_id == profile
    under_user_id = await ingest.track(custom_event(custom_id, event_id="after-login"))
    assert under_user_id.results[0].outcome == ACCEPTED
    assert under_user_id.results[0].profile_id == profile
    await identity.delete(profile)
    await eventually(lambda: _outbox_empty(db))
    rows_before = await row_counts(db, project)
    cells_before = await cells_naming(db, custom_id)

    # The device goes on sending under the erased custom ID: refused, as events naming it are.
    refused = await ingest.track(
        custom_event(custom_id, event_id="erased-1", note="alice-private"),
        custom_event(custom_id, event_id="erased-2", name="opened"),
    )
    assert [r.outcome for r in refused.results] == [REJECTED, REJECTED]
    assert {(r.reason, r.field_path) for r in refused.results} == {("ERASED", "installation_id")}
    assert all(
        r.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] for r in refused.results
    )
    (resolved,) = await identity.resolve(pb.ProfileKey(installation_id=custom_id))
    assert (resolved.status.code, resolved.erased, resolved.profile_id) == (0, True, "")
    # A login of that installation, with any custom ID, is refused like the custom ID.
    with pytest.raises(grpc.aio.AioRpcError) as login:
        await identity.identify(custom_id, f"bob-{uuid.uuid4().hex[:8]}")
    assert login.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(login.value).reason == "CUSTOM_ID_ERASED"
    assert error_info(login.value).metadata["field"] == "installation_id"
    with pytest.raises(grpc.aio.AioRpcError) as logout:
        await identity.logout(custom_id)
    assert logout.value.code() is grpc.StatusCode.NOT_FOUND

    # Nothing was created anywhere, except the two bare ERASED markers of the refused events
    # and their keys, which keep a retry from listing them twice (digests of the event ID,
    # reason and field path: a bare row has no origin); the custom ID is in no new cell.
    await eventually(lambda: _outbox_empty(db))
    rows_after = await row_counts(db, project)
    assert {t: n - rows_before[t] for t, n in rows_after.items() if n != rows_before[t]} == {
        "rejected_events": 2,
        "event_keys": 2,
    }
    markers = await db.fetch(
        "SELECT reason, field_path, installation_id, custom_id, payload, profile_id"
        " FROM rejected_events WHERE event_id LIKE 'erased-%'"
    )
    assert [tuple(m) for m in markers] == [
        ("ERASED", "installation_id", None, None, None, None)
    ] * 2
    assert await cells_naming(db, custom_id) == cells_before
    assert await cells_naming(db, "alice-private") == {}

    # Exact and case-sensitive, as custom IDs are: another ID is another installation.
    other = await ingest.track(custom_event(custom_id.upper(), event_id="upper-1"))
    assert other.results[0].outcome == ACCEPTED

    clock.advance(timedelta(days=30, seconds=1))  # the project's default period is over

    later = await ingest.track(
        custom_event(custom_id, event_id="erased-3", time=clock.now() - timedelta(seconds=1))
    )
    assert later.results[0].outcome == ACCEPTED
    fresh = later.results[0].profile_id
    assert fresh != profile
    row = await installation_row(db, project, custom_id)
    assert row is not None
    assert str(row["profile_id"]) == fresh
    assert (
        await count(db, "SELECT count(*) FROM events WHERE profile_id = $1", uuid.UUID(fresh)) == 1
    )
