"""Identity over real gRPC, PostgreSQL and Redis: operator merges, rows of other tables, project
isolation and the bus messages."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from profiles.common.v1 import bus_pb2, types_pb2
from profiles.identity.v1 import identity_service_pb2 as pb
from services.identity.service import IdentityService
from shared.settings import Settings
from tests.conftest import create_test_project, eventually
from tests.support.identity import (
    Identity,
    count,
    error_info,
    identity_messages,
    new_id,
    of_type,
    profile_row,
    violations,
)

if TYPE_CHECKING:
    from tests.conftest import TestProject

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


# -- MergeProfiles ----------------------------------------------------------------------------


async def test_an_anonymous_profile_merges_into_an_identified_one(
    identity: Identity, db: asyncpg.Pool
) -> None:
    installation = new_id()
    anonymous = await identity.profile_of(installation)
    target = await identity.profile_of_custom_id("pat")
    reply = await identity.merge(anonymous, target)
    assert (reply.source_profile_id, reply.target_profile_id) == (anonymous, target)
    assert not reply.already_merged
    assert reply.change_id
    assert reply.merge_time.seconds > 0
    assert await identity.profile_of(installation) == target
    change = await db.fetchrow(
        "SELECT cause FROM identity_changes WHERE change_id = $1", uuid.UUID(reply.change_id)
    )
    assert change is not None
    assert change["cause"] == "operator_merge"


async def test_a_merge_by_the_internal_credential_is_recorded_as_token_reintegration(
    identity: Identity, db: asyncpg.Pool, redis_url: str, settings_for_test: Settings
) -> None:
    # Only ingest calls MergeProfiles with the internal credential, to fold an installation
    # imported by ImportTokens into the real one with the same push token.
    installation = new_id()
    imported = await identity.profile_of(installation)
    real = await identity.profile_of_custom_id("tess")
    reply = await identity.stub.MergeProfiles(
        pb.MergeProfilesRequest(source_profile_id=imported, target_profile_id=real),
        metadata=(
            ("authorization", f"Bearer {settings_for_test.internal_token}"),
            ("x-profiles-project", str(identity.project.project_id)),
        ),
        timeout=60,
    )
    assert await identity.profile_of(installation) == real
    cause = await db.fetchval(
        "SELECT cause FROM identity_changes WHERE change_id = $1", uuid.UUID(reply.change_id)
    )
    assert cause == "token_reintegration"
    redis = Redis.from_url(redis_url)

    async def merges() -> list[Any]:
        found = await identity_messages(db, redis, settings_for_test.redis_prefix, identity.project)
        return of_type(found, bus_pb2.ProfileMerged)

    async def published() -> bool:
        return len(await merges()) == 1

    try:
        await eventually(published)
        (merged,) = await merges()
    finally:
        await redis.aclose()
    assert merged.change_id == reply.change_id
    assert merged.cause == types_pb2.IDENTITY_CHANGE_CAUSE_TOKEN_REINTEGRATION
    # The admin key's merges stay operator merges.
    other = await identity.merge(await identity.profile_of(new_id()), real)
    cause = await db.fetchval(
        "SELECT cause FROM identity_changes WHERE change_id = $1", uuid.UUID(other.change_id)
    )
    assert cause == "operator_merge"


async def test_two_identified_profiles_need_an_explicit_permission(identity: Identity) -> None:
    source = await identity.profile_of_custom_id("quinn")
    target = await identity.profile_of_custom_id("rita")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.merge(source, target)
    assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(raised.value).reason == "CUSTOM_ID_CONFLICT"
    assert await identity.profile_of_custom_id("quinn") == source


async def test_an_allowed_conflict_leaves_the_source_custom_id_as_an_alias(
    identity: Identity, db: asyncpg.Pool
) -> None:
    installation = new_id()
    source = (await identity.identify(installation, "sam")).profile_id
    target = await identity.profile_of_custom_id("tom")
    reply = await identity.merge(source, target, allow_conflict=True)
    assert reply.alias_custom_id == "sam"
    (resolved,) = await identity.resolve(pb.ProfileKey(custom_id="sam"))
    assert resolved.profile_id == target
    assert not resolved.created
    assert await identity.profile_of(installation) == target
    # Identify with the alias lands on the target too: already there, then from elsewhere.
    again = await identity.identify(installation, "sam")
    assert again.outcome == pb.IDENTIFY_OUTCOME_ALREADY_IDENTIFIED
    assert again.profile_id == target
    other = await identity.identify(new_id(), "sam")
    assert other.outcome == pb.IDENTIFY_OUTCOME_MERGED
    assert other.profile_id == target
    assert await count(db, "SELECT count(*) FROM profiles WHERE custom_id = 'sam'") == 0


async def test_an_identified_source_gives_its_custom_id_to_an_anonymous_target(
    identity: Identity,
) -> None:
    source = await identity.profile_of_custom_id("uma")
    target = await identity.profile_of(new_id())
    reply = await identity.merge(source, target)
    assert not reply.alias_custom_id
    (resolved,) = await identity.resolve(pb.ProfileKey(custom_id="uma"))
    assert resolved.profile_id == target
    assert resolved.identified


async def test_merged_away_ids_resolve_to_their_survivor(
    identity: Identity, db: asyncpg.Pool
) -> None:
    a, b, c = [await identity.profile_of(new_id()) for _ in range(3)]
    await identity.merge(a, b)
    reply = await identity.merge(b, c)
    assert reply.source_profile_id == b
    # A was merged into B, then B into C: A points at C in one hop.
    assert (await profile_row(db, identity.project, a))["merged_into"] == uuid.UUID(c)
    again = await identity.merge(a, c)
    assert again.already_merged
    assert again.target_profile_id == c
    assert not again.change_id
    assert not again.HasField("merge_time")


async def test_merging_a_profile_into_itself_is_invalid(identity: Identity) -> None:
    profile = await identity.profile_of(new_id())
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.merge(profile, profile)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(raised.value).reason == "MERGE_INTO_ITSELF"


@pytest.mark.parametrize("bad", ["", "not-a-uuid", "ABCDEF00-0000-0000-0000-000000000000x"])
async def test_a_malformed_profile_id_is_invalid(identity: Identity, bad: str) -> None:
    profile = await identity.profile_of(new_id())
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.merge(bad, profile)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(raised.value) == ["source_profile_id"]


async def test_an_unknown_profile_is_not_found(identity: Identity) -> None:
    profile = await identity.profile_of(new_id())
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.merge(profile, str(uuid.uuid4()))
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    assert error_info(raised.value).reason == "PROFILE_NOT_FOUND"
    assert error_info(raised.value).metadata["field"] == "target_profile_id"


async def test_an_exact_merge_of_two_live_profiles_merges_them_and_answers_a_retry_alike(
    identity: Identity, db: asyncpg.Pool
) -> None:
    installation = new_id()
    source = await identity.profile_of(installation)
    target = await identity.profile_of_custom_id(f"exact-{new_id()}")
    request_id = str(uuid.uuid4())
    reply = await identity.merge(source, target, request_id=request_id, exact=True)
    assert (reply.source_profile_id, reply.target_profile_id) == (source, target)
    assert not reply.already_merged
    assert reply.change_id
    assert await identity.profile_of(installation) == target
    # The retry finds the source merged away by that very merge: the stored answer comes first.
    again = await identity.merge(source, target, request_id=request_id, exact=True)
    assert again == reply
    assert await count(db, "SELECT count(*) FROM identity_changes WHERE kind = 'merge'") == 1


async def merge_state(db: asyncpg.Pool, project: TestProject, *profile_ids: str) -> list[Any]:
    """What a merge would change: the profiles' rows, the project's recorded changes and its
    stored merge answers."""
    rows = [dict(await profile_row(db, project, p)) for p in profile_ids]
    changes = await db.fetch(
        "SELECT * FROM identity_changes WHERE project_id = $1 ORDER BY change_id",
        project.project_id,
    )
    answers = await db.fetch(
        "SELECT request_id FROM identity_requests WHERE project_id = $1 AND rpc = 'MergeProfiles'",
        project.project_id,
    )
    return [rows, [dict(r) for r in changes], [r["request_id"] for r in answers]]


@pytest.mark.parametrize("side", ["source_profile_id", "target_profile_id"])
async def test_an_exact_merge_of_a_merged_away_profile_merges_nobody(
    identity: Identity, db: asyncpg.Pool, side: str
) -> None:
    phone = new_id()
    visitor = await identity.profile_of(phone)
    customer = f"cust-{new_id()}"
    survivor = (await identity.identify(new_id(), customer)).profile_id
    merged = await identity.identify(phone, customer)  # the visitor logs in: merged into theirs
    assert merged.outcome == pb.IDENTIFY_OUTCOME_MERGED
    other = await identity.profile_of(new_id())  # the operator's other profile, live
    source, target = (visitor, other) if side == "source_profile_id" else (other, visitor)
    before = await merge_state(db, identity.project, visitor, survivor, other)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await identity.merge(source, target, request_id=str(uuid.uuid4()), exact=True)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(refused.value)
    assert info.reason == "PROFILE_MERGED"
    assert (info.metadata["field"], info.metadata["survivor"]) == (side, survivor)
    assert await merge_state(db, identity.project, visitor, survivor, other) == before
    assert await identity.profile_of(phone) == survivor
    # Without `exact`, the merged-away ID resolves to its survivor, as before.
    reply = await identity.merge(source, target)
    resolved = (survivor, other) if side == "source_profile_id" else (other, survivor)
    assert (reply.source_profile_id, reply.target_profile_id) == resolved
    assert not reply.already_merged


async def test_an_exact_merge_racing_a_login_of_its_source_never_merges_a_third_profile(
    identity: Identity, db: asyncpg.Pool
) -> None:
    # The operator confirmed `source` (an anonymous visitor) into `target`; meanwhile the
    # visitor logs in as a customer, which merges `source` into the customer's profile. Either
    # the operator's merge commits first, or it is refused: never the customer merged instead.
    for _ in range(12):
        phone = new_id()
        source = await identity.profile_of(phone)
        target = await identity.profile_of(new_id())
        customer = f"cust-{new_id()}"
        third = (await identity.identify(new_id(), customer)).profile_id
        merge, login = await asyncio.gather(
            identity.merge(source, target, request_id=str(uuid.uuid4()), exact=True),
            identity.identify(phone, customer),
            return_exceptions=True,
        )
        assert not isinstance(login, BaseException), login
        operator_merges = await db.fetch(
            "SELECT source_profile_id, target_profile_id FROM identity_changes"
            " WHERE project_id = $1 AND cause = 'operator_merge'"
            " AND target_profile_id = $2",
            identity.project.project_id,
            uuid.UUID(target),
        )
        if isinstance(merge, grpc.aio.AioRpcError):
            assert merge.code() is grpc.StatusCode.FAILED_PRECONDITION, merge
            info = error_info(merge)
            assert info.reason == "PROFILE_MERGED"
            assert info.metadata["field"] == "source_profile_id"
            assert info.metadata["survivor"] == third
            assert operator_merges == []
            assert (await profile_row(db, identity.project, target))["merged_into"] is None
        else:
            assert not isinstance(merge, BaseException), merge
            assert (merge.source_profile_id, merge.target_profile_id) == (source, target)
            assert [tuple(map(str, r)) for r in operator_merges] == [(source, target)]
        # The customer's profile was never merged away by the operator's call, and the visitor
        # was merged once: by the operator (the login then moved the target) or by the login.
        assert (await profile_row(db, identity.project, third))["merged_into"] is None
        merges_of_source = await count(
            db,
            "SELECT count(*) FROM identity_changes WHERE project_id = $1 AND kind = 'merge'"
            " AND source_profile_id = $2",
            identity.project.project_id,
            uuid.UUID(source),
        )
        assert merges_of_source == 1


async def test_merge_profiles_needs_the_admin_key(identity: Identity) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.stub.MergeProfiles(
            pb.MergeProfilesRequest(), metadata=identity.project.metadata("sdk"), timeout=5
        )
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED


# -- rows of other tables, isolation, bus ------------------------------------------------------


async def test_a_merge_moves_rows_of_every_table_with_a_profile_id(
    start_services: Any, database_url: str, project: TestProject, db: asyncpg.Pool
) -> None:
    # Tables whose owner declared merge hooks before identity starts, like ingest's.
    await db.execute(
        "CREATE TABLE test_notes (project_id uuid, profile_id uuid, note text,"
        " PRIMARY KEY (project_id, note))"
    )
    await db.execute(
        """CREATE FUNCTION test_merge_notes(p uuid, s uuid, t uuid) RETURNS void
           LANGUAGE sql AS $$
             UPDATE test_notes SET profile_id = t WHERE project_id = p AND profile_id = s;
           $$"""
    )
    await db.execute(
        "INSERT INTO profile_hooks (kind, owner, function_name, run_order) VALUES"
        " ('merge', 'ingest', 'test_merge_notes', 1000),"
        " ('merge', 'ingest', 'profiles_merge_test_scores', 1001)"
    )
    await db.execute(
        "CREATE TABLE test_scores (project_id uuid, profile_id uuid, score int,"
        " PRIMARY KEY (project_id, profile_id))"
    )
    # A table whose key includes profile_id supplies its own merge rule.
    await db.execute(
        """CREATE FUNCTION profiles_merge_test_scores(p uuid, s uuid, t uuid) RETURNS void
           LANGUAGE sql AS $$
             UPDATE test_scores SET score = score + (
               SELECT coalesce(sum(score), 0) FROM test_scores WHERE project_id = p
                 AND profile_id = s) WHERE project_id = p AND profile_id = t;
             DELETE FROM test_scores WHERE project_id = p AND profile_id = s;
           $$"""
    )
    channel = (await start_services("identity"))["identity"].channel
    identity = Identity(channel, project)
    target = await identity.profile_of_custom_id("vic")
    installation = new_id()
    source = await identity.profile_of(installation)
    pid = project.project_id
    await db.executemany(
        "INSERT INTO test_notes VALUES ($1, $2, $3)",
        [(pid, uuid.UUID(source), "s1"), (pid, uuid.UUID(source), "s2")],
    )
    await db.executemany(
        "INSERT INTO test_scores VALUES ($1, $2, $3)",
        [(pid, uuid.UUID(source), 2), (pid, uuid.UUID(target), 3)],
    )
    await identity.identify(installation, "vic")
    notes = await db.fetch("SELECT DISTINCT profile_id FROM test_notes")
    assert [r["profile_id"] for r in notes] == [uuid.UUID(target)]
    scores = await db.fetch("SELECT profile_id, score FROM test_scores")
    assert [(r["profile_id"], r["score"]) for r in scores] == [(uuid.UUID(target), 5)]


async def test_a_project_cannot_reach_another_projects_profiles(
    identity: Identity, database_url: str, db: asyncpg.Pool
) -> None:
    p = identity
    q = Identity(identity.channel, await create_test_project(database_url))
    installation = new_id()
    p_profile = (await p.identify(installation, "wendy")).profile_id
    # The same installation and custom ID in Q are Q's own, new profiles.
    assert await q.profile_of(installation) != p_profile
    q_reply = await q.identify(installation, "wendy")
    assert q_reply.profile_id != p_profile
    assert q_reply.outcome == pb.IDENTIFY_OUTCOME_IDENTIFIED
    q_profile = await q.profile_of_custom_id("xena")
    for source, target in ((p_profile, q_profile), (q_profile, p_profile)):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await q.merge(source, target)
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await q.logout(new_id())
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    row = await profile_row(db, p.project, p_profile)
    assert row["custom_id"] == "wendy"
    assert row["merged_into"] is None
    assert await p.profile_of(installation) == p_profile


async def test_merges_splits_and_creations_are_published(
    identity: Identity, db: asyncpg.Pool, redis_url: str, settings_for_test: Settings
) -> None:
    known = await identity.profile_of_custom_id("yves")
    installation = new_id()
    anonymous = await identity.profile_of(installation)
    merged = await identity.identify(installation, "yves")
    out = await identity.logout(installation)
    other = new_id()
    identified = await identity.identify(other, "zoe")
    redis = Redis.from_url(redis_url)

    async def all_published() -> bool:
        found = await identity_messages(db, redis, settings_for_test.redis_prefix, identity.project)
        return (
            len(of_type(found, bus_pb2.ProfileCreated)) == 4
            and len(of_type(found, bus_pb2.ProfileMerged)) == 1
            and len(of_type(found, bus_pb2.ProfileSplit)) == 1
            and len(of_type(found, bus_pb2.ProfileIdentified)) == 1
        )

    try:
        await eventually(all_published)
        found = await identity_messages(db, redis, settings_for_test.redis_prefix, identity.project)
    finally:
        await redis.aclose()
    (merge,) = of_type(found, bus_pb2.ProfileMerged)
    assert (merge.source_profile_id, merge.target_profile_id) == (anonymous, known)
    assert merge.change_id == merged.change_id
    assert list(merge.installation_ids) == [installation]
    assert merge.cause == 1  # IDENTITY_CHANGE_CAUSE_IDENTIFY
    (split,) = of_type(found, bus_pb2.ProfileSplit)
    assert (split.old_profile_id, split.new_profile_id) == (known, out.profile_id)
    assert split.new_profile_created
    assert split.installation_id == installation
    (identify,) = of_type(found, bus_pb2.ProfileIdentified)
    assert identify.profile_id == identified.profile_id
    assert identify.installation_id == other
    created = {m.profile_id for m in of_type(found, bus_pb2.ProfileCreated)}
    assert created == {known, anonymous, out.profile_id, identified.profile_id}


async def test_an_exact_merge_sent_twice_at_once_answers_both_alike(
    identity: Identity, db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A form double-clicked: the twin request looks for its answer before the first commits,
    then finds the source merged away. The answer, committed with the merge, is the twin's too
    (it was refused PROFILE_MERGED: the console showed the merge form again, with an error).
    The twin's first look is made to miss, as it does in that race."""
    installation = new_id()
    source = await identity.profile_of(installation)
    target = await identity.profile_of_custom_id(f"twice-{new_id()}")
    request_id = str(uuid.uuid4())
    reply = await identity.merge(source, target, request_id=request_id, exact=True)

    original = IdentityService._stored_answer
    missed: list[str] = []

    async def first_look_misses(self: IdentityService, tx: Any, *args: Any) -> Any:
        if args[1] == "MergeProfiles" and not missed:
            missed.append(args[2])
            return None
        return await original(self, tx, *args)

    monkeypatch.setattr(IdentityService, "_stored_answer", first_look_misses)
    twin = await identity.merge(source, target, request_id=request_id, exact=True)
    assert missed == [request_id]
    assert twin == reply
    assert await count(db, "SELECT count(*) FROM identity_changes WHERE kind = 'merge'") == 1
