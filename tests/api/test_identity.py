"""Identity over real gRPC, PostgreSQL and Redis: resolution, the Identify rules, Logout,
operator merges, retries and project isolation."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest

from profiles.identity.v1 import identity_service_pb2 as pb
from shared.db import create_pool
from shared.settings import Settings
from shared.tenancy import TenancyRepository
from tests.support.identity import (
    Identity,
    count,
    error_info,
    installation_row,
    new_id,
    profile_row,
    violations,
)

if TYPE_CHECKING:
    pass

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


# -- ResolveProfiles ----------------------------------------------------------------------


async def test_resolving_a_new_installation_creates_one_anonymous_profile(
    identity: Identity, db: asyncpg.Pool
) -> None:
    installation = new_id()
    (first,) = await identity.resolve(pb.ProfileKey(installation_id=installation))
    (again,) = await identity.resolve(pb.ProfileKey(installation_id=installation))
    assert first.status.code == 0
    assert first.created
    assert not again.created
    assert first.profile_id == again.profile_id
    assert not first.identified
    assert first.link_version == 1 == again.link_version
    row = await profile_row(db, identity.project, first.profile_id)
    assert row["custom_id"] is None
    assert row["merged_into"] is None


async def test_resolving_a_new_custom_id_creates_one_identified_profile(
    identity: Identity, db: asyncpg.Pool
) -> None:
    (first,) = await identity.resolve(pb.ProfileKey(custom_id="user-1"))
    (again,) = await identity.resolve(pb.ProfileKey(custom_id="user-1"))
    assert first.created
    assert not again.created
    assert first.identified
    assert again.identified
    assert first.profile_id == again.profile_id
    assert first.link_version == 0
    assert (await profile_row(db, identity.project, first.profile_id))["custom_id"] == "user-1"


async def test_an_invalid_key_fails_alone_and_the_others_resolve(identity: Identity) -> None:
    keys = [
        pb.ProfileKey(installation_id="good-installation"),
        pb.ProfileKey(installation_id=""),
        pb.ProfileKey(custom_id="null"),
        pb.ProfileKey(),
        pb.ProfileKey(installation_id="x" * 129),
        pb.ProfileKey(custom_id="user-7"),
        pb.ProfileKey(custom_id="u" * 513),
    ]
    results = await identity.resolve(*keys)
    assert [r.status.code for r in results] == [0, INVALID, INVALID, INVALID, INVALID, 0, INVALID]
    assert results[0].profile_id
    assert results[5].profile_id
    assert results[5].identified
    assert all(not r.profile_id for r in results if r.status.code)
    reasons = {}
    bad_requests: dict[int, list[list[str]]] = {}  # each key's BadRequest details, by field
    for index, result in enumerate(results):
        for detail in result.status.details:
            from google.rpc import error_details_pb2

            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reasons[index] = info.reason
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad):
                bad_requests.setdefault(index, []).append([v.field for v in bad.field_violations])
    # Exactly one BadRequest per invalid key, naming that key's path, and none for a good one.
    assert bad_requests == {i: [[f"keys[{i}]"]] for i in (1, 2, 3, 4, 6)}
    assert reasons == {
        1: "INSTALLATION_ID_INVALID",
        2: "CUSTOM_ID_INVALID",
        3: "KEY_MISSING",
        4: "INSTALLATION_ID_INVALID",
        6: "CUSTOM_ID_INVALID",
    }


async def test_duplicate_keys_are_answered_alike(identity: Identity, db: asyncpg.Pool) -> None:
    key = pb.ProfileKey(installation_id=new_id())
    results = await identity.resolve(key, pb.ProfileKey(custom_id="dup"), key)
    assert results[0] == results[2]
    assert await count(db, "SELECT count(*) FROM profiles") == 2


@pytest.mark.parametrize("size", [0, 1001])
async def test_no_keys_or_too_many_keys_is_invalid_argument(identity: Identity, size: int) -> None:
    keys = [pb.ProfileKey(installation_id=f"i{n}") for n in range(size)]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.resolve(*keys)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(raised.value).reason == "KEYS_INVALID"
    assert violations(raised.value) == ["keys"]


async def test_a_batch_of_a_thousand_keys_resolves_in_order(identity: Identity) -> None:
    installations = [new_id() for _ in range(1000)]
    first = await identity.resolve(*(pb.ProfileKey(installation_id=i) for i in installations))
    again = await identity.resolve(*(pb.ProfileKey(installation_id=i) for i in installations))
    assert [r.profile_id for r in first] == [r.profile_id for r in again]
    assert len({r.profile_id for r in first}) == 1000
    assert all(r.created for r in first)
    assert not any(r.created for r in again)


async def test_concurrent_resolves_of_one_new_installation_create_one_profile(
    identity: Identity, db: asyncpg.Pool
) -> None:
    installation = new_id()
    key = pb.ProfileKey(installation_id=installation)
    results = await asyncio.gather(*(identity.resolve(key, key) for _ in range(20)))
    assert len({r.profile_id for batch in results for r in batch}) == 1
    assert sum(batch[0].created for batch in results) == 1
    assert await count(db, "SELECT count(*) FROM profiles") == 1


async def test_concurrent_resolves_of_one_new_custom_id_create_one_profile(
    identity: Identity, db: asyncpg.Pool
) -> None:
    key = pb.ProfileKey(custom_id="racer")
    results = await asyncio.gather(*(identity.resolve(key) for _ in range(20)))
    assert len({batch[0].profile_id for batch in results}) == 1
    assert await count(db, "SELECT count(*) FROM profiles") == 1


async def test_the_internal_credential_resolves_for_the_project_it_names(
    identity: Identity, settings_for_test: Settings
) -> None:
    installation = new_id()
    expected = await identity.profile_of(installation)
    reply = await identity.stub.ResolveProfiles(
        pb.ResolveProfilesRequest(keys=[pb.ProfileKey(installation_id=installation)]),
        metadata=(
            ("authorization", f"Bearer {settings_for_test.internal_token}"),
            ("x-profiles-project", str(identity.project.project_id)),
        ),
        timeout=10,
    )
    assert reply.results[0].profile_id == expected


async def test_the_sdk_key_cannot_resolve(identity: Identity) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.resolve(pb.ProfileKey(installation_id="i"), role="sdk")
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED


# -- Identify --------------------------------------------------------------------------------


async def test_rule_1_a_new_installation_becomes_identified(
    identity: Identity, db: asyncpg.Pool
) -> None:
    installation = new_id()
    reply = await identity.identify(installation, "alice")
    assert reply.outcome == pb.IDENTIFY_OUTCOME_IDENTIFIED
    assert reply.profile_created
    assert not reply.change_id
    assert not reply.merged_profile_id
    assert await identity.profile_of(installation) == reply.profile_id
    assert await identity.profile_of_custom_id("alice") == reply.profile_id
    assert await count(db, "SELECT count(*) FROM profiles") == 1


async def test_rule_1_an_anonymous_profile_keeps_its_id_and_gets_the_custom_id(
    identity: Identity, db: asyncpg.Pool
) -> None:
    installation = new_id()
    anonymous = await identity.profile_of(installation)
    before = await profile_row(db, identity.project, anonymous)
    reply = await identity.identify(installation, "alice")
    assert reply.outcome == pb.IDENTIFY_OUTCOME_IDENTIFIED
    assert reply.profile_id == anonymous
    assert not reply.profile_created
    after = await profile_row(db, identity.project, anonymous)
    assert after["custom_id"] == "alice"
    assert after["version"] > before["version"]
    link = await installation_row(db, identity.project, installation)
    assert link is not None
    assert link["link_version"] == 1


async def test_rule_2_an_anonymous_profile_merges_into_the_custom_ids_profile(
    identity: Identity, db: asyncpg.Pool
) -> None:
    known = await identity.profile_of_custom_id("bob")
    installation = new_id()
    anonymous = await identity.profile_of(installation)
    reply = await identity.identify(installation, "bob")
    assert reply.outcome == pb.IDENTIFY_OUTCOME_MERGED
    assert reply.profile_id == known
    assert reply.merged_profile_id == anonymous
    assert reply.change_id
    assert not reply.profile_created
    tombstone = await profile_row(db, identity.project, anonymous)
    assert tombstone["merged_into"] == uuid.UUID(known)
    link = await installation_row(db, identity.project, installation)
    assert link is not None
    assert link["profile_id"] == uuid.UUID(known)
    assert link["link_version"] == 2
    (resolved,) = await identity.resolve(pb.ProfileKey(installation_id=installation))
    assert resolved.profile_id == known
    assert resolved.identified
    assert resolved.link_version == 2
    change = await db.fetchrow(
        "SELECT * FROM identity_changes WHERE change_id = $1", uuid.UUID(reply.change_id)
    )
    assert change is not None
    assert (change["kind"], change["cause"]) == ("merge", "identify")
    assert change["source_profile_id"] == uuid.UUID(anonymous)
    assert change["target_profile_id"] == uuid.UUID(known)
    assert change["installation_ids"] == [installation]


async def test_rule_2_moves_every_installation_of_the_anonymous_profile(
    identity: Identity, db: asyncpg.Pool
) -> None:
    known = await identity.profile_of_custom_id("carol")
    first, second = new_id(), new_id()
    anonymous = await identity.profile_of(first)
    # A second installation on the same anonymous profile (as an earlier merge leaves it).
    other = await identity.profile_of(second)
    await identity.merge(other, anonymous)
    reply = await identity.identify(first, "carol")
    assert reply.outcome == pb.IDENTIFY_OUTCOME_MERGED
    assert await identity.profile_of(second) == known
    # The earlier tombstone now points at the survivor directly (one hop).
    assert (await profile_row(db, identity.project, other))["merged_into"] == uuid.UUID(known)


async def test_rule_3_identifying_again_changes_nothing(
    identity: Identity, db: asyncpg.Pool
) -> None:
    installation = new_id()
    first = await identity.identify(installation, "dave")
    version = (await profile_row(db, identity.project, first.profile_id))["version"]
    again = await identity.identify(installation, "dave")
    assert again.outcome == pb.IDENTIFY_OUTCOME_ALREADY_IDENTIFIED
    assert again.profile_id == first.profile_id
    assert not again.change_id
    assert (await profile_row(db, identity.project, first.profile_id))["version"] == version


async def test_rule_4_an_identified_installation_moves_to_a_new_custom_id(
    identity: Identity, db: asyncpg.Pool
) -> None:
    installation = new_id()
    erin = await identity.identify(installation, "erin")
    reply = await identity.identify(installation, "frank")
    assert reply.outcome == pb.IDENTIFY_OUTCOME_MOVED
    assert reply.previous_profile_id == erin.profile_id
    assert reply.profile_created
    assert reply.profile_id != erin.profile_id
    assert await identity.profile_of(installation) == reply.profile_id
    # Erin keeps her profile, identified, live, and nothing of hers was copied.
    erin_row = await profile_row(db, identity.project, erin.profile_id)
    assert erin_row["custom_id"] == "erin"
    assert erin_row["merged_into"] is None
    assert await identity.profile_of_custom_id("erin") == erin.profile_id
    change = await db.fetchrow(
        "SELECT * FROM identity_changes WHERE change_id = $1", uuid.UUID(reply.change_id)
    )
    assert change is not None
    assert (change["kind"], change["cause"]) == ("split", "identify_switch")


async def test_rule_4_moves_to_an_existing_profile_of_the_new_custom_id(identity: Identity) -> None:
    grace = await identity.profile_of_custom_id("grace")
    installation = new_id()
    await identity.identify(installation, "heidi")
    reply = await identity.identify(installation, "grace")
    assert reply.outcome == pb.IDENTIFY_OUTCOME_MOVED
    assert reply.profile_id == grace
    assert not reply.profile_created


async def test_custom_ids_are_case_sensitive(identity: Identity) -> None:
    upper = await identity.identify(new_id(), "Ivan")
    lower = await identity.identify(new_id(), "ivan")
    assert upper.profile_id != lower.profile_id
    assert lower.outcome == pb.IDENTIFY_OUTCOME_IDENTIFIED


JUNK = [
    "",
    " alice",
    "alice ",
    "\talice",
    "null",
    "NULL",
    "Undefined",
    "nil",
    "None",
    "NaN",
    "Infinity",
    "true",
    "FALSE",
    "0",
    "-1",
    "anonymous",
    "Guest",
    "[object Object]",
    '"null"',
    "'undefined'",
    '"0"',
    "u" * 513,
]


@pytest.mark.parametrize(
    "custom_id", ["", " alice", "NULL", '"undefined"', "[object Object]", "u" * 513]
)
async def test_a_junk_custom_id_is_refused_and_nothing_changes(
    identity: Identity, db: asyncpg.Pool, custom_id: str
) -> None:
    installation = new_id()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.identify(installation, custom_id)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(raised.value).reason == "CUSTOM_ID_INVALID"
    assert violations(raised.value) == ["custom_id"]
    assert await count(db, "SELECT count(*) FROM profiles") == 0
    assert await installation_row(db, identity.project, installation) is None


async def test_the_longest_custom_id_is_kept_whole(identity: Identity, db: asyncpg.Pool) -> None:
    custom_id = "é" * 511 + "x"
    reply = await identity.identify(new_id(), custom_id)
    assert (await profile_row(db, identity.project, reply.profile_id))["custom_id"] == custom_id


async def test_a_projects_own_junk_list_is_refused(
    identity: Identity, database_url: str, db: asyncpg.Pool
) -> None:
    pool = await create_pool(database_url, max_size=1)  # with the jsonb codec settings need
    try:
        await TenancyRepository(pool).set_setting(
            identity.project.project_id, "identity.extra_junk_custom_ids", ["test-user"]
        )
    finally:
        await pool.close()
    for value in ("test-user", "TEST-USER", '"Test-User"'):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await identity.identify(new_id(), value)
        assert error_info(raised.value).reason == "CUSTOM_ID_INVALID"
    (refused,) = await identity.resolve(pb.ProfileKey(custom_id="test-user"))
    assert refused.status.code == INVALID
    assert await count(db, "SELECT count(*) FROM profiles") == 0


@pytest.mark.parametrize(
    ("installation_id", "request_id", "field"),
    [
        ("", "", "installation_id"),
        ("i" * 129, "", "installation_id"),
        ("i", "r" * 65, "request_id"),
    ],
)
async def test_identify_refuses_bad_fields(
    identity: Identity, installation_id: str, request_id: str, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.identify(installation_id, "judy", request_id)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(raised.value) == [field]


async def test_a_retried_identify_returns_the_first_answer_and_merges_once(
    identity: Identity, db: asyncpg.Pool
) -> None:
    await identity.profile_of_custom_id("kim")
    installation = new_id()
    await identity.profile_of(installation)
    request_id = str(uuid.uuid4())
    first = await identity.identify(installation, "kim", request_id)
    again = await identity.identify(installation, "kim", request_id)
    assert first.outcome == pb.IDENTIFY_OUTCOME_MERGED
    assert again == first
    assert await count(db, "SELECT count(*) FROM identity_changes") == 1


async def test_concurrent_twins_of_one_request_merge_once(
    identity: Identity, db: asyncpg.Pool
) -> None:
    await identity.profile_of_custom_id("leo")
    installation = new_id()
    await identity.profile_of(installation)
    request_id = str(uuid.uuid4())
    replies = await asyncio.gather(
        *(identity.identify(installation, "leo", request_id) for _ in range(8))
    )
    assert all(reply == replies[0] for reply in replies)
    assert replies[0].outcome == pb.IDENTIFY_OUTCOME_MERGED
    assert await count(db, "SELECT count(*) FROM identity_changes") == 1


async def test_a_request_id_reused_for_another_request_is_refused(identity: Identity) -> None:
    request_id = str(uuid.uuid4())
    await identity.identify(new_id(), "mia", request_id)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.identify(new_id(), "mia", request_id)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(raised.value).reason == "REQUEST_ID_REUSED"


# -- Logout ----------------------------------------------------------------------------------


async def test_logout_starts_a_brand_new_anonymous_profile_every_time(
    identity: Identity, db: asyncpg.Pool
) -> None:
    installation = new_id()
    nick = await identity.identify(installation, "nick")
    seen = {nick.profile_id}
    for _ in range(3):
        out = await identity.logout(installation)
        assert out.outcome == pb.LOGOUT_OUTCOME_NEW_ANONYMOUS_PROFILE
        assert out.previous_profile_id == nick.profile_id
        assert out.profile_id not in seen
        seen.add(out.profile_id)
        assert await identity.profile_of(installation) == out.profile_id
        change = await db.fetchrow(
            "SELECT * FROM identity_changes WHERE change_id = $1", uuid.UUID(out.change_id)
        )
        assert change is not None
        assert (change["kind"], change["cause"]) == ("split", "logout")
        back = await identity.identify(installation, "nick")
        # Logging in again is rule 2: the logged-out period merges into nick.
        assert back.outcome == pb.IDENTIFY_OUTCOME_MERGED
        assert back.merged_profile_id == out.profile_id
        assert back.profile_id == nick.profile_id
    nick_row = await profile_row(db, identity.project, nick.profile_id)
    assert nick_row["custom_id"] == "nick"
    assert nick_row["merged_into"] is None


async def test_logout_of_an_anonymous_profile_changes_nothing(identity: Identity) -> None:
    installation = new_id()
    anonymous = await identity.profile_of(installation)
    out = await identity.logout(installation)
    assert out.outcome == pb.LOGOUT_OUTCOME_UNCHANGED
    assert out.profile_id == anonymous
    assert not out.change_id
    assert not out.previous_profile_id


async def test_logout_of_an_unknown_installation_is_not_found(identity: Identity) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.logout(new_id())
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    assert error_info(raised.value).reason == "INSTALLATION_NOT_FOUND"


async def test_a_retried_logout_returns_the_first_answer(identity: Identity) -> None:
    installation = new_id()
    await identity.identify(installation, "olga")
    request_id = str(uuid.uuid4())
    first = await identity.logout(installation, request_id)
    again = await identity.logout(installation, request_id)
    assert again == first
    assert await identity.profile_of(installation) == first.profile_id


async def test_a_logout_unless_the_profiles_custom_id_keeps_that_profiles_installations(
    identity: Identity,
) -> None:
    # Countly's device IDs: the user's own ID stays logged in; a device ID a login merged into
    # the user (the iOS SDK returns to it on logout) is logged out.
    user_device, merged_device = new_id(), new_id()
    user = await identity.identify(user_device, "pia")
    await identity.identify(merged_device, "pia")
    kept = await identity.logout(user_device, str(uuid.uuid4()), unless_custom_id="pia")
    assert kept.outcome == pb.LOGOUT_OUTCOME_UNCHANGED
    assert kept.profile_id == user.profile_id
    assert not kept.change_id
    assert await identity.profile_of(user_device) == user.profile_id
    request_id = str(uuid.uuid4())
    out = await identity.logout(merged_device, request_id, unless_custom_id=merged_device)
    assert out.outcome == pb.LOGOUT_OUTCOME_NEW_ANONYMOUS_PROFILE
    assert out.previous_profile_id == user.profile_id
    assert await identity.profile_of(merged_device) == out.profile_id
    # Part of the request its key stands for: the same key with another value is refused.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.logout(merged_device, request_id, unless_custom_id="pia")
    assert error_info(raised.value).reason == "REQUEST_ID_REUSED"
    assert await identity.logout(merged_device, request_id, unless_custom_id=merged_device) == out
    # An alias an operator's merge left keeps its profile too: the merged-away account's
    # devices still send under it.
    alias_device = new_id()
    alias_profile = (await identity.identify(alias_device, "pia-old")).profile_id
    await identity.merge(alias_profile, user.profile_id, allow_conflict=True)
    via_alias = await identity.logout(alias_device, str(uuid.uuid4()), unless_custom_id="pia-old")
    assert via_alias.outcome == pb.LOGOUT_OUTCOME_UNCHANGED
    assert await identity.profile_of(alias_device) == user.profile_id
    # An anonymous profile is unchanged whatever the value.
    anonymous = await identity.logout(merged_device, unless_custom_id="someone")
    assert anonymous.outcome == pb.LOGOUT_OUTCOME_UNCHANGED
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.logout(user_device, unless_custom_id="x" * 513)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(raised.value) == ["unless_custom_id"]


async def test_every_junk_custom_id_fails_alone_in_a_resolve_batch(
    identity: Identity, db: asyncpg.Pool
) -> None:
    keys = [pb.ProfileKey(custom_id=value) for value in JUNK]
    results = await identity.resolve(*keys, pb.ProfileKey(custom_id="real-user"))
    assert [r.status.code for r in results] == [INVALID] * len(JUNK) + [0]
    assert await count(db, "SELECT count(*) FROM profiles") == 1
