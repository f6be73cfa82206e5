"""Identity racing ingest (real TrackEvents through a started ingest service): events never land
on a profile their installation has left, none is lost or duplicated; an erasure racing a
merge leaves no orphan row."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest

from profiles.ingest.v1 import ingest_service_pb2 as ipb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ipb_grpc
from shared.clock import FrozenClock
from tests.support.identity import (
    Identity,
    count,
    error_info,
    start_identity_and_ingest,
)
from tests.support.ingest import NOW, Ingest, custom_event

if TYPE_CHECKING:
    from tests.conftest import TestProject

ACCEPTED = ipb.EVENT_OUTCOME_ACCEPTED

# Every table holding profile rows, from the schema; the outbox is left out (a queued message
# may name a profile merged away since), and so is identity's record of erased profiles (0061).
PROFILE_TABLES = """
    SELECT table_name FROM information_schema.columns
    WHERE table_schema = current_schema() AND column_name = 'profile_id'
        AND table_name NOT IN ('profiles', 'outbox', 'erased_profiles')
        AND table_name IN (SELECT table_name FROM information_schema.tables
                           WHERE table_schema = current_schema() AND table_type = 'BASE TABLE')"""


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


async def orphan_rows(db: asyncpg.Pool) -> dict[str, int]:
    """Rows of any table naming a profile that is not live (erased, or a tombstone)."""
    orphans = {}
    for row in await db.fetch(PROFILE_TABLES):
        table = row["table_name"]
        found = await count(
            db,
            f'SELECT count(*) FROM "{table}" t WHERE t.profile_id IS NOT NULL AND NOT EXISTS ('
            " SELECT 1 FROM profiles p WHERE p.project_id = t.project_id"
            " AND p.profile_id = t.profile_id AND p.merged_into IS NULL)",
        )
        if found:
            orphans[table] = found
    return orphans


async def events_by_profile(db: asyncpg.Pool, installation_id: str) -> dict[str | None, int]:
    """The installation's events by profile, an erasure's markers under None: those no longer
    name their installation (0060), so they are found by the event IDs `send` gives them."""
    rows = await db.fetch(
        "SELECT profile_id, count(*) AS n FROM events WHERE installation_id = $1"
        " OR (profile_id IS NULL AND starts_with(event_id, $1 || '-'))"
        " GROUP BY profile_id",
        installation_id,
    )
    return {None if r["profile_id"] is None else str(r["profile_id"]): r["n"] for r in rows}


async def send(ingest: Ingest, installation_id: str, prefix: str, batches: int) -> list[str]:
    """`batches` batches of 3 events, one after the other; returns the event IDs accepted, each
    starting with the installation ID (an erasure's marker keeps only the event ID)."""
    accepted = []
    for number in range(batches):
        events = [
            custom_event(installation_id, event_id=f"{installation_id}-{prefix}-{number}-{i}")
            for i in range(3)
        ]
        reply = await ingest.track(*events)
        assert {r.outcome for r in reply.results} == {ACCEPTED}, reply
        accepted += [e.event_id for e in events]
    return accepted


async def test_events_ingested_while_their_installation_identifies_all_end_on_the_survivor(
    services: tuple[Identity, Ingest], db: asyncpg.Pool
) -> None:
    identity, ingest = services
    for round_number in range(6):
        custom_id = f"grace-{round_number}-{uuid.uuid4().hex[:6]}"
        holder = await identity.identify(f"inst-h-{uuid.uuid4().hex[:8]}", custom_id)
        installation = f"inst-r{round_number}-{uuid.uuid4().hex[:8]}"
        before = await send(ingest, installation, "before", 2)
        anonymous = await identity.profile_of(installation)

        during, login = await asyncio.gather(
            send(ingest, installation, "during", 8), identity.identify(installation, custom_id)
        )
        after = await send(ingest, installation, "after", 1)

        assert login.profile_id == holder.profile_id
        assert login.merged_profile_id == anonymous
        sent = len(before) + len(during) + len(after)
        assert await events_by_profile(db, installation) == {holder.profile_id: sent}
        assert (
            await count(
                db,
                "SELECT count(DISTINCT event_id) FROM events WHERE installation_id = $1",
                installation,
            )
            == sent
        )
    assert await orphan_rows(db) == {}


async def test_events_sent_after_logout_returned_land_on_the_new_anonymous_profile(
    services: tuple[Identity, Ingest], db: asyncpg.Pool
) -> None:
    identity, ingest = services
    for round_number in range(6):
        installation = f"inst-l{round_number}-{uuid.uuid4().hex[:8]}"
        identified = await identity.identify(installation, f"heidi-{uuid.uuid4().hex[:8]}")
        # Ingest's cache now knows the installation (warm).
        logged_in = await send(ingest, installation, "in", 2)
        racing = asyncio.ensure_future(send(ingest, installation, "racing", 4))
        out = await identity.logout(installation)
        after = await send(ingest, installation, "after", 3)
        racing_ids = await racing

        placed = await db.fetch(
            "SELECT event_id, profile_id::text FROM events WHERE installation_id = $1",
            installation,
        )
        where = {r["event_id"]: r["profile_id"] for r in placed}
        assert len(placed) == len(logged_in) + len(racing_ids) + len(after)
        assert {where[e] for e in logged_in} == {identified.profile_id}
        assert {where[e] for e in after} == {out.profile_id}
        # Events racing the logout land on one side or the other, never elsewhere.
        assert {where[e] for e in racing_ids} <= {identified.profile_id, out.profile_id}
    assert await orphan_rows(db) == {}


async def test_delete_racing_an_operator_merge_into_the_profile_leaves_no_orphan_rows(
    services: tuple[Identity, Ingest], db: asyncpg.Pool
) -> None:
    identity, ingest = services
    outcomes = set()
    for round_number in range(8):
        target_installation = f"inst-t{round_number}-{uuid.uuid4().hex[:8]}"
        source_installation = f"inst-s{round_number}-{uuid.uuid4().hex[:8]}"
        target = (
            await identity.identify(target_installation, f"ivan-{uuid.uuid4().hex}")
        ).profile_id
        await send(ingest, target_installation, "t", 2)
        await send(ingest, source_installation, "s", 2)
        source = await identity.profile_of(source_installation)

        merge, erase = await asyncio.gather(
            identity.merge(source, target), identity.delete(target), return_exceptions=True
        )

        assert not isinstance(erase, BaseException), erase
        assert erase.profile_id == target
        assert await events_by_profile(db, target_installation) == {None: 6}
        if isinstance(merge, grpc.aio.AioRpcError):
            # Erased first: the merge found its target gone; the source keeps its own data.
            assert merge.code() is grpc.StatusCode.NOT_FOUND, merge
            assert error_info(merge).reason == "PROFILE_NOT_FOUND"
            assert await events_by_profile(db, source_installation) == {source: 6}
            outcomes.add("erased first")
        else:
            # Merged first: the erasure took the source's data too.
            assert not isinstance(merge, BaseException), merge
            assert erase.unlinked_installation_count == 2
            assert await events_by_profile(db, source_installation) == {None: 6}
            outcomes.add("merged first")
        assert await orphan_rows(db) == {}
    assert outcomes  # which orders happen depends on scheduling; each is checked above


async def test_delete_racing_a_login_into_the_profile_ends_erased_or_refused(
    services: tuple[Identity, Ingest], db: asyncpg.Pool
) -> None:
    identity, ingest = services
    for round_number in range(8):
        custom_id = f"judy-{round_number}-{uuid.uuid4().hex[:8]}"
        first = f"inst-a{round_number}-{uuid.uuid4().hex[:8]}"
        second = f"inst-b{round_number}-{uuid.uuid4().hex[:8]}"
        target = (await identity.identify(first, custom_id)).profile_id
        await send(ingest, second, "anon", 1)

        login, erase, events = await asyncio.gather(
            identity.identify(second, custom_id),
            identity.delete(target),
            send(ingest, first, "late", 2),
            return_exceptions=True,
        )

        assert not isinstance(erase, BaseException), erase
        assert not isinstance(events, BaseException), events
        if isinstance(login, grpc.aio.AioRpcError):
            assert login.code() is grpc.StatusCode.FAILED_PRECONDITION, login
            assert error_info(login).reason == "CUSTOM_ID_ERASED"
            assert set(await events_by_profile(db, second)) != {None}
        else:
            assert not isinstance(login, BaseException), login
            assert login.profile_id == target
            assert await events_by_profile(db, second) == {None: 3}
        # The late events were erased, or stored on a fresh profile after the erasure.
        late = await events_by_profile(db, first)
        assert target not in late
        assert sum(late.values()) == 6
        assert await orphan_rows(db) == {}
