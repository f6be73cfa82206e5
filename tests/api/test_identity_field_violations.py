"""Every identity RPC answers a request with several bad fields with one INVALID_ARGUMENT that
lists a BadRequest.FieldViolation per bad field (each with its own reason), not just the first,
and changes nothing; the same RPCs still answer a good request."""

from __future__ import annotations

import uuid

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2

from profiles.identity.v1 import identity_service_pb2 as pb
from shared.db import create_pool
from shared.tenancy import TenancyRepository
from tests.support.identity import (
    Identity,
    count,
    error_info,
    field_violations,
    new_id,
    violations,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
LONG_REQUEST_ID = "r" * 65


def violation_reasons(error: grpc.aio.AioRpcError) -> list[str]:
    """The `reason` of each field violation, in the order of violations()."""
    return [v.reason for v in field_violations(error)]


# -- Identify --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("installation_id", "custom_id", "request_id", "fields", "reasons"),
    [
        pytest.param(
            "",
            "",
            LONG_REQUEST_ID,
            ["installation_id", "custom_id", "request_id"],
            ["INSTALLATION_ID_INVALID", "CUSTOM_ID_INVALID", "REQUEST_ID_INVALID"],
            id="all-three",
        ),
        pytest.param(
            "i" * 129,
            "null",
            "",
            ["installation_id", "custom_id"],
            ["INSTALLATION_ID_INVALID", "CUSTOM_ID_INVALID"],
            id="installation-and-junk-custom-id",
        ),
        pytest.param(
            "",
            "judy",
            LONG_REQUEST_ID,
            ["installation_id", "request_id"],
            ["INSTALLATION_ID_INVALID", "REQUEST_ID_INVALID"],
            id="installation-and-request-id",
        ),
        pytest.param(
            "i",
            " judy",
            LONG_REQUEST_ID,
            ["custom_id", "request_id"],
            ["CUSTOM_ID_INVALID", "REQUEST_ID_INVALID"],
            id="padded-custom-id-and-request-id",
        ),
    ],
)
async def test_identify_lists_every_bad_field_and_changes_nothing(
    identity: Identity,
    db: asyncpg.Pool,
    installation_id: str,
    custom_id: str,
    request_id: str,
    fields: list[str],
    reasons: list[str],
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.identify(installation_id, custom_id, request_id)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(raised.value) == fields
    assert violation_reasons(raised.value) == reasons
    # The first bad field's reason, as when it was the only one reported.
    assert error_info(raised.value).reason == reasons[0]
    assert await count(db, "SELECT count(*) FROM profiles") == 0
    assert await count(db, "SELECT count(*) FROM installations") == 0


async def test_identify_lists_a_custom_id_of_the_projects_junk_list_with_other_bad_fields(
    identity: Identity, database_url: str
) -> None:
    pool = await create_pool(database_url, max_size=1)  # with the jsonb codec settings need
    try:
        await TenancyRepository(pool).set_setting(
            identity.project.project_id, "identity.extra_junk_custom_ids", ["test-user"]
        )
    finally:
        await pool.close()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.identify("", "TEST-USER", LONG_REQUEST_ID)
    assert violations(raised.value) == ["installation_id", "custom_id", "request_id"]


async def test_a_good_identify_still_succeeds(identity: Identity) -> None:
    reply = await identity.identify(new_id(), "judy", str(uuid.uuid4()))
    assert reply.outcome == pb.IDENTIFY_OUTCOME_IDENTIFIED
    assert reply.profile_id


# -- Logout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("installation_id", ["", "i" * 129], ids=["empty", "too-long"])
async def test_logout_lists_every_bad_field(identity: Identity, installation_id: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.logout(installation_id, LONG_REQUEST_ID)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(raised.value) == ["installation_id", "request_id"]
    assert violation_reasons(raised.value) == ["INSTALLATION_ID_INVALID", "REQUEST_ID_INVALID"]
    assert error_info(raised.value).reason == "INSTALLATION_ID_INVALID"


async def test_a_good_logout_still_succeeds(identity: Identity) -> None:
    installation = new_id()
    identified = await identity.identify(installation, "kate")
    reply = await identity.logout(installation, str(uuid.uuid4()))
    assert reply.outcome == pb.LOGOUT_OUTCOME_NEW_ANONYMOUS_PROFILE
    assert reply.previous_profile_id == identified.profile_id


# -- MergeProfiles ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "target", "request_id", "fields"),
    [
        ("x", "y", "q" * 65, ["source_profile_id", "target_profile_id", "request_id"]),
        ("", "not-a-uuid", "", ["source_profile_id", "target_profile_id"]),
        ("x", "", "q" * 65, ["source_profile_id", "target_profile_id", "request_id"]),
    ],
    ids=["both-ids-and-request-id", "both-ids", "empty-target"],
)
async def test_merge_lists_every_malformed_field(
    identity: Identity,
    db: asyncpg.Pool,
    source: str,
    target: str,
    request_id: str,
    fields: list[str],
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.merge(source, target, request_id=request_id)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(raised.value) == fields
    assert error_info(raised.value).reason == "PROFILE_ID_INVALID"
    assert await count(db, "SELECT count(*) FROM identity_changes") == 0


async def test_merge_lists_a_bad_target_with_a_bad_request_id(identity: Identity) -> None:
    profile = await identity.profile_of(new_id())
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.merge(profile, "nope", request_id="q" * 65)
    assert violations(raised.value) == ["target_profile_id", "request_id"]
    assert violation_reasons(raised.value) == ["PROFILE_ID_INVALID", "REQUEST_ID_INVALID"]


async def test_merge_into_itself_is_listed_with_a_bad_request_id(
    identity: Identity, db: asyncpg.Pool
) -> None:
    profile = await identity.profile_of(new_id())
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.merge(profile, profile.upper(), request_id="q" * 65)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(raised.value) == ["target_profile_id", "request_id"]
    assert violation_reasons(raised.value) == ["MERGE_INTO_ITSELF", "REQUEST_ID_INVALID"]
    assert error_info(raised.value).reason == "MERGE_INTO_ITSELF"
    assert await count(db, "SELECT count(*) FROM identity_changes") == 0


async def test_a_good_merge_still_succeeds(identity: Identity) -> None:
    source = await identity.profile_of(new_id())
    target = await identity.profile_of(new_id())
    reply = await identity.merge(source, target, request_id=str(uuid.uuid4()))
    assert (reply.source_profile_id, reply.target_profile_id) == (source, target)
    assert not reply.already_merged


# -- DeleteProfile ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "profile_id", ["x", "", "{" + str(uuid.UUID(int=1)) + "}"], ids=["junk", "empty", "braces"]
)
async def test_delete_lists_every_bad_field(identity: Identity, profile_id: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.delete(profile_id, request_id="q" * 65)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(raised.value) == ["profile_id", "request_id"]
    assert violation_reasons(raised.value) == ["PROFILE_ID_INVALID", "REQUEST_ID_INVALID"]
    assert error_info(raised.value).reason == "PROFILE_ID_INVALID"


async def test_delete_of_a_real_profile_with_a_bad_request_id_keeps_it(
    identity: Identity, db: asyncpg.Pool
) -> None:
    profile = await identity.profile_of(new_id())
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.delete(profile, request_id="q" * 65)
    assert violations(raised.value) == ["request_id"]
    assert await count(db, "SELECT count(*) FROM profiles") == 1


async def test_a_good_delete_still_succeeds(identity: Identity, db: asyncpg.Pool) -> None:
    profile = await identity.profile_of(new_id())
    reply = await identity.delete(profile, request_id=str(uuid.uuid4()))
    assert reply.profile_id == profile
    assert await count(db, "SELECT count(*) FROM profiles") == 0


# -- ResolveProfiles and ExportProfile: one client field that can be bad ----------------------


async def test_resolve_answers_each_bad_key_with_its_own_path(identity: Identity) -> None:
    results = await identity.resolve(
        pb.ProfileKey(installation_id=""),
        pb.ProfileKey(installation_id=new_id()),
        pb.ProfileKey(custom_id="null"),
        pb.ProfileKey(),
    )
    assert [r.status.code for r in results] == [INVALID, 0, INVALID, INVALID]
    paths = []
    for result in results:
        bad = error_details_pb2.BadRequest()
        paths.append(
            [v.field for d in result.status.details if d.Unpack(bad) for v in bad.field_violations]
        )
    assert paths == [["keys[0]"], [], ["keys[2]"], ["keys[3]"]]


async def test_export_lists_its_one_bad_field_and_a_good_export_succeeds(
    identity: Identity,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await identity.export("x")
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(raised.value) == ["profile_id"]
    profile = await identity.profile_of(new_id())
    chunks = await identity.export(profile)
    assert chunks
    assert chunks[0].section == pb.EXPORT_SECTION_PROFILE
