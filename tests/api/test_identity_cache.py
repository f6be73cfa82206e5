"""Identity's ResolveProfiles cache across two replicas sharing one database: a replica answers
known installations from its cache, drops them when any replica changes their profiles
(Identify, Logout, MergeProfiles, DeleteProfile), and the replica that made the change never
answers older than it; events ingested through the other replica land on the new profile."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

from profiles.identity.v1 import identity_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2 as ipb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ipb_grpc
from services.identity.cache import ResolutionCache, links_payload
from services.identity.link_listener import LINKS_CHANNEL, NOTIFY_LINKS
from services.identity.repository import IdentityRepository
from services.identity.service import IdentityService
from shared.clock import FrozenClock, SystemClock
from shared.tenancy import TenancyRepository
from tests.support.identity import Identity, new_id
from tests.support.ingest import NOW, Ingest, custom_event

if TYPE_CHECKING:
    from tests.conftest import TestProject

# Another replica learns of a change by a notification sent at commit: polled, never slept.
# A bound on waiting, not a figure: a replica's listener starting on a loaded machine took over
# 10 s once (three test runs beside this one), and the deadline only says when to give up.
DEADLINE_S = 30.0


@pytest.fixture
async def replicas(start_services: Any, project: TestProject) -> tuple[Identity, Identity]:
    """Two identity services (replicas A and B) on the test's database."""
    first = (await start_services("identity"))["identity"]
    second = (await start_services("identity"))["identity"]
    return Identity(first.channel, project), Identity(second.channel, project)


async def answer(identity: Identity, installation_id: str) -> pb.ResolvedProfile:
    (result,) = await identity.resolve(pb.ProfileKey(installation_id=installation_id))
    assert result.status.code == 0
    return result


async def add_decoy_profile(db: asyncpg.Pool, project: TestProject) -> uuid.UUID:
    """A live profile written behind identity's back."""
    decoy = uuid.uuid4()
    await db.execute(
        "INSERT INTO profiles (project_id, profile_id, create_time, update_time)"
        " VALUES ($1, $2, now(), now())",
        project.project_id,
        decoy,
    )
    return decoy


async def relink(
    db: asyncpg.Pool, project: TestProject, installation_id: str, profile_id: uuid.UUID
) -> None:
    """Moves the installation behind identity's back: no notification, so only a cached answer
    can still name its previous profile."""
    await db.execute(
        "UPDATE installations SET profile_id = $3 WHERE project_id = $1 AND installation_id = $2",
        project.project_id,
        installation_id,
        profile_id,
    )


async def answered_from_cache(
    identity: Identity, db: asyncpg.Pool, project: TestProject, installation_id: str
) -> pb.ResolvedProfile:
    """Resolves until the replica answers from its cache (its listener may still be starting),
    proven by moving the installation's row behind identity's back, with no notification:
    only a cached answer can still name the old profile. The row is put back after."""
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    cached = await answer(identity, installation_id)
    original = uuid.UUID(cached.profile_id)
    decoy = await add_decoy_profile(db, project)
    await relink(db, project, installation_id, decoy)
    try:
        while (await answer(identity, installation_id)).profile_id != cached.profile_id:
            assert asyncio.get_running_loop().time() < deadline, "the replica never cached"
            # That answer was the decoy's, read from the row, and cached if the listener started
            # meanwhile: dropped as identity drops a profile's entries (a link notification),
            # else the loop would read the cached decoy for ever. Then cache the original.
            dropped = links_payload(project.project_id, [decoy])
            await db.execute(NOTIFY_LINKS, LINKS_CHANNEL, dropped)
            await relink(db, project, installation_id, original)
            await answer(identity, installation_id)
            await relink(db, project, installation_id, decoy)
    finally:
        await relink(db, project, installation_id, original)
        await db.execute(
            "DELETE FROM profiles WHERE project_id = $1 AND profile_id = $2",
            project.project_id,
            decoy,
        )
    return cached


async def eventually(identity: Identity, installation_id: str, profile_id: str) -> None:
    """Polls the replica until it answers `profile_id` for the installation."""
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while (await answer(identity, installation_id)).profile_id != profile_id:
        assert asyncio.get_running_loop().time() < deadline, "the replica kept a stale answer"
        await asyncio.sleep(0.01)


async def test_a_replica_answers_known_installations_from_its_cache(
    replicas: tuple[Identity, Identity], db: asyncpg.Pool, project: TestProject
) -> None:
    _, b = replicas
    installation = new_id()
    created = await answer(b, installation)
    assert created.created
    cached = await answered_from_cache(b, db, project, installation)
    assert cached.profile_id == created.profile_id
    assert not cached.created  # "created" is true once, never replayed from the cache


async def test_identify_on_one_replica_reaches_the_other_replicas_cache(
    replicas: tuple[Identity, Identity], db: asyncpg.Pool, project: TestProject
) -> None:
    a, b = replicas
    installation, holder_installation = new_id(), new_id()
    await answer(b, installation)
    await answered_from_cache(b, db, project, installation)
    await a.identify(holder_installation, "carol")
    reply = await a.identify(installation, "carol")
    assert reply.outcome == pb.IDENTIFY_OUTCOME_MERGED
    assert (await answer(a, installation)).profile_id == reply.profile_id
    await eventually(b, installation, reply.profile_id)


async def test_rule_1_on_one_replica_makes_the_other_answer_identified(
    replicas: tuple[Identity, Identity], db: asyncpg.Pool, project: TestProject
) -> None:
    a, b = replicas
    installation = new_id()
    await answer(b, installation)
    cached = await answered_from_cache(b, db, project, installation)
    assert not cached.identified
    await answered_from_cache(a, db, project, installation)
    reply = await a.identify(installation, "dave")
    assert reply.outcome == pb.IDENTIFY_OUTCOME_IDENTIFIED
    assert (await answer(a, installation)).identified
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while not (await answer(b, installation)).identified:
        assert asyncio.get_running_loop().time() < deadline, "B kept `identified` false"
        await asyncio.sleep(0.01)


async def test_logout_then_resolve_on_either_replica_gives_the_new_profile(
    replicas: tuple[Identity, Identity], db: asyncpg.Pool, project: TestProject
) -> None:
    a, b = replicas
    installation = new_id()
    await a.identify(installation, "erin")
    await answered_from_cache(a, db, project, installation)
    await answered_from_cache(b, db, project, installation)
    reply = await a.logout(installation)
    assert reply.outcome == pb.LOGOUT_OUTCOME_NEW_ANONYMOUS_PROFILE
    assert (await answer(a, installation)).profile_id == reply.profile_id
    await eventually(b, installation, reply.profile_id)


async def test_an_operator_merge_on_one_replica_moves_the_other_replicas_answer(
    replicas: tuple[Identity, Identity], db: asyncpg.Pool, project: TestProject
) -> None:
    a, b = replicas
    source_installation, target_installation = new_id(), new_id()
    source = (await answer(a, source_installation)).profile_id
    target = (await answer(a, target_installation)).profile_id
    await answered_from_cache(a, db, project, source_installation)
    await answered_from_cache(b, db, project, source_installation)
    await a.merge(source, target)
    assert (await answer(a, source_installation)).profile_id == target
    await eventually(b, source_installation, target)


async def test_an_erasure_on_one_replica_is_never_answered_from_a_cache(
    replicas: tuple[Identity, Identity], db: asyncpg.Pool, project: TestProject
) -> None:
    a, b = replicas
    installation = new_id()
    erased = (await answer(a, installation)).profile_id
    await answered_from_cache(a, db, project, installation)
    await answered_from_cache(b, db, project, installation)
    await a.delete(erased)
    fresh = await answer(a, installation)
    assert fresh.created
    assert fresh.profile_id != erased
    await eventually(b, installation, fresh.profile_id)


async def test_events_after_logout_on_one_replica_land_on_the_new_profile_through_the_other(
    start_services: Any, settings_for_test: Any, project: TestProject, database_url: str
) -> None:
    """Ingest resolves through replica B (cache warm, and ingest's own cache warm) while the
    installation logs out through replica A: ingest's write reads the installation's link
    itself, so no event goes to the profile it left, whatever B's cache still says."""
    clock = FrozenClock(NOW)  # the events' times are relative to NOW
    first = (await start_services("identity", clock=clock))["identity"]
    second = (await start_services("identity", clock=clock))["identity"]
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": second.address}
    )
    started = await start_services("ingest", settings=settings, clock=clock)
    ingest_channel = started["ingest"].channel
    ingest = Ingest(
        ipb_grpc.IngestServiceStub(ingest_channel),
        project.metadata("sdk"),
        project.metadata("admin"),
        database_url,
    )
    a = Identity(first.channel, project)
    installation = new_id()
    await a.identify(installation, "frank")
    before = await ingest.track(custom_event(installation), custom_event(installation))
    identified = {r.profile_id for r in before.results}
    assert identified == {(await answer(a, installation)).profile_id}
    reply = await a.logout(installation)
    after = await ingest.track(*[custom_event(installation) for _ in range(20)])
    assert {r.profile_id for r in after.results} == {reply.profile_id}
    assert reply.profile_id not in identified


@pytest.fixture
async def lone_service(db: asyncpg.Pool) -> tuple[IdentityService, ResolutionCache]:
    """A service whose cache hears no notification (no listener, enabled by hand): what it
    answers after a change can only come from its own invalidation before returning."""
    cache = ResolutionCache()
    cache.enable()
    repository = await IdentityRepository.connect(db)
    service = IdentityService(repository, TenancyRepository(db), SystemClock(), cache=cache)
    return service, cache


async def resolved(service: IdentityService, project: TestProject, installation: str) -> Any:
    (result,) = await service.resolve_installations(project.project_id, [installation])
    assert not isinstance(result, Exception)
    return result


async def test_the_replica_that_changes_a_link_answers_the_change_before_any_notification(
    lone_service: tuple[IdentityService, ResolutionCache], project: TestProject
) -> None:
    service, cache = lone_service
    project_id = project.project_id
    one, two, three = new_id(), new_id(), new_id()
    for installation in (one, two, three):
        await resolved(service, project, installation)
        await resolved(service, project, installation)  # now cached
    assert len(cache) == 3
    # Rule 1: same profile, now identified.
    await service.identify(project_id, one, "gina", "")
    assert (await resolved(service, project, one)).identified
    # Rule 2: two's anonymous profile merges into gina's.
    gina = (await resolved(service, project, one)).profile_id
    await service.identify(project_id, two, "gina", "")
    assert (await resolved(service, project, two)).profile_id == gina
    # Logout: a brand-new anonymous profile.
    logged_out = await service.logout(project_id, two, "")
    assert (await resolved(service, project, two)).profile_id == logged_out.profile_id
    # Operator merge: three's profile into gina's.
    three_profile = (await resolved(service, project, three)).profile_id
    await service.merge_profiles(project_id, three_profile, gina, False, "")
    assert (await resolved(service, project, three)).profile_id == gina
    # Erasure: one and three were on gina's profile; they start over.
    await service.delete_profile(project_id, gina, "")
    for installation in (one, three):
        fresh = await resolved(service, project, installation)
        assert fresh.created
        assert fresh.profile_id != gina


async def test_a_fresh_resolve_reads_past_a_stale_cache(
    replicas: tuple[Identity, Identity], db: asyncpg.Pool, project: TestProject
) -> None:
    """The installation is moved behind identity's back (no notification), so only the cache
    still names its old profile: a `fresh` request reads the database, and both stay usable."""
    _, b = replicas
    installation = new_id()
    await answer(b, installation)  # creates it (a creation's answer is never cached)
    cached = await answered_from_cache(b, db, project, installation)
    decoy = await add_decoy_profile(db, project)
    await relink(db, project, installation, decoy)
    key = pb.ProfileKey(installation_id=installation)
    for request, expected in (
        (pb.ResolveProfilesRequest(keys=[key]), cached.profile_id),
        (pb.ResolveProfilesRequest(keys=[key], fresh=True), str(decoy)),
        # A batch with a custom ID takes the general path: `fresh` holds there too.
        (
            pb.ResolveProfilesRequest(keys=[key, pb.ProfileKey(custom_id="gina")], fresh=True),
            str(decoy),
        ),
    ):
        reply = await b.stub.ResolveProfiles(request, metadata=project.metadata("admin"))
        assert reply.results[0].profile_id == expected


async def test_ingest_stores_events_whose_installation_vanished_behind_a_stale_cache(
    start_services: Any,
    settings_for_test: Any,
    project: TestProject,
    database_url: str,
    db: asyncpg.Pool,
) -> None:
    """Ingest resolves through replica B, whose cache still names a profile the installation
    no longer has (its link deleted behind identity's back, as an erasure on a replica B has
    not heard from yet): ingest's write finds the link gone, and its next resolve reads past
    B's cache, so the events land on a new profile instead of failing the batch."""
    clock = FrozenClock(NOW)  # the events' times are relative to NOW
    identity = (await start_services("identity", clock=clock))["identity"]
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": identity.address}
    )
    started = await start_services("ingest", settings=settings, clock=clock)
    ingest = Ingest(
        ipb_grpc.IngestServiceStub(started["ingest"].channel),
        project.metadata("sdk"),
        project.metadata("admin"),
        database_url,
    )
    b = Identity(identity.channel, project)
    installation = new_id()
    before = await ingest.track(custom_event(installation))
    (old_profile,) = {r.profile_id for r in before.results}
    await answered_from_cache(b, db, project, installation)
    await db.execute(
        "DELETE FROM installations WHERE project_id = $1 AND installation_id = $2",
        project.project_id,
        installation,
    )
    after = await ingest.track(*[custom_event(installation) for _ in range(3)])
    assert {r.outcome for r in after.results} == {ipb.EVENT_OUTCOME_ACCEPTED}, after
    (new_profile,) = {r.profile_id for r in after.results}
    assert new_profile != old_profile
    assert (await answer(b, installation)).profile_id == new_profile
