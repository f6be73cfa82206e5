"""Keys, roles and the internal credential, over real gRPC channels."""

from __future__ import annotations

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from profiles.common.v1 import types_pb2
from profiles.diagnostics.v1 import diagnostics_service_pb2 as diag_pb
from profiles.diagnostics.v1 import diagnostics_service_pb2_grpc as diag_grpc
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.query.v1 import query_service_pb2_grpc as query_grpc
from shared.tenancy import TenancyRepository


def error_reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    raise AssertionError("no ErrorInfo in the status details")


@pytest.fixture
async def query(start_services):  # type: ignore[no-untyped-def]
    return (await start_services("query"))["query"]


async def echo(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    stub = diag_grpc.DiagnosticsServiceStub(channel)
    reply = await stub.Echo(diag_pb.EchoRequest(payload=b"ping"), metadata=metadata, timeout=5)
    return reply.payload


async def test_a_call_without_a_key_is_unauthenticated(query) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await echo(query.channel)
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(raised.value) == "MISSING_CREDENTIAL"


@pytest.mark.parametrize(
    "credential",
    ["Bearer nonsense", "Bearer prf_0123456789abcdef_wrongsecret", "Basic abc"],
)
async def test_an_unknown_key_is_unauthenticated(query, project, credential: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await echo(query.channel, (("authorization", credential),))
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_a_right_key_id_with_a_wrong_secret_is_unauthenticated(query, project) -> None:  # type: ignore[no-untyped-def]
    key_id = project.keys["admin"].split("_")[1]
    forged = f"prf_{key_id}_{'x' * 43}"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await echo(query.channel, (("authorization", f"Bearer {forged}"),))
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(raised.value) == "INVALID_CREDENTIAL"


async def test_the_admin_key_reaches_echo_and_gets_its_payload_back(query, project) -> None:  # type: ignore[no-untyped-def]
    assert await echo(query.channel, project.metadata("admin")) == b"ping"


async def test_x_api_key_header_is_accepted_too(query, project) -> None:  # type: ignore[no-untyped-def]
    assert await echo(query.channel, (("x-api-key", project.keys["admin"]),)) == b"ping"


@pytest.mark.parametrize("role", ["sdk", "read"])
async def test_a_role_that_does_not_cover_echo_is_permission_denied(
    query, project, role: str
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await echo(query.channel, project.metadata(role))
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(raised.value) == "ROLE_NOT_ALLOWED"


async def test_the_read_key_reaches_the_query_service(query, project) -> None:  # type: ignore[no-untyped-def]
    stub = query_grpc.QueryServiceStub(query.channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetProfile(
            query_pb.GetProfileRequest(), metadata=project.metadata("read"), timeout=5
        )
    # Past authentication and authorization: the service itself answers, refusing a request
    # with no lookup (the contract's INVALID_ARGUMENT for GetProfile).
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(raised.value) == "REQUEST_INVALID"


async def test_the_sdk_key_cannot_read_profiles(query, project) -> None:  # type: ignore[no-untyped-def]
    stub = query_grpc.QueryServiceStub(query.channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetProfile(
            query_pb.GetProfileRequest(), metadata=project.metadata("sdk"), timeout=5
        )
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_a_revoked_key_is_unauthenticated(query, project, database_url: str) -> None:  # type: ignore[no-untyped-def]
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        tenancy = TenancyRepository(pool)
        issued = await tenancy.create_key(project.project_id, "admin")
        await tenancy.revoke_key(issued.key.key_id)
    finally:
        await pool.close()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await echo(query.channel, (("authorization", f"Bearer {issued.plain_key}"),))
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_the_internal_credential_needs_a_project_header(query, settings_for_test) -> None:  # type: ignore[no-untyped-def]
    token = settings_for_test.internal_token
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await echo(query.channel, (("authorization", f"Bearer {token}"),))
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_the_internal_credential_is_refused_outside_internal_rpcs(  # type: ignore[no-untyped-def]
    query, project, settings_for_test
) -> None:
    metadata = (
        ("authorization", f"Bearer {settings_for_test.internal_token}"),
        ("x-profiles-project", str(project.project_id)),
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await echo(query.channel, metadata)
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
    stub = query_grpc.QueryServiceStub(query.channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetProfile(query_pb.GetProfileRequest(), metadata=metadata, timeout=5)
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("role", "expected"),
    [("sdk", types_pb2.ROLE_SDK), ("read", types_pb2.ROLE_READ), ("admin", types_pb2.ROLE_ADMIN)],
)
async def test_get_caller_names_every_key_s_project_id_and_role(  # type: ignore[no-untyped-def]
    query, project, role: str, expected: int
) -> None:
    stub = query_grpc.QueryServiceStub(query.channel)
    reply = await stub.GetCaller(
        query_pb.GetCallerRequest(), metadata=project.metadata(role), timeout=5
    )
    assert reply.project_id == str(project.project_id)
    assert reply.role == expected
    # The key's ID (the part before its secret), never the secret.
    assert reply.key_id == project.keys[role].split("_")[1]
    assert reply.key_id not in ("", project.keys[role])


async def test_get_caller_tells_two_projects_and_a_key_s_name_apart(  # type: ignore[no-untyped-def]
    query, project, database_url: str
) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        tenancy = TenancyRepository(pool)
        other = await tenancy.create_project("another project")
        issued = await tenancy.create_key(other.project_id, "read", display_name="dashboards")
    finally:
        await pool.close()
    stub = query_grpc.QueryServiceStub(query.channel)
    reply = await stub.GetCaller(
        query_pb.GetCallerRequest(),
        metadata=(("authorization", f"Bearer {issued.plain_key}"),),
        timeout=5,
    )
    assert reply.project_id == str(other.project_id) != str(project.project_id)
    assert (reply.key_id, reply.display_name) == (issued.key.key_id, "dashboards")


async def test_get_caller_refuses_what_is_not_a_key(  # type: ignore[no-untyped-def]
    query, project, database_url: str, settings_for_test
) -> None:
    stub = query_grpc.QueryServiceStub(query.channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetCaller(query_pb.GetCallerRequest(), timeout=5)
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        tenancy = TenancyRepository(pool)
        issued = await tenancy.create_key(project.project_id, "admin")
        await tenancy.revoke_key(issued.key.key_id)
    finally:
        await pool.close()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetCaller(
            query_pb.GetCallerRequest(),
            metadata=(("authorization", f"Bearer {issued.plain_key}"),),
            timeout=5,
        )
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
    # The internal credential is no key: no role of the contract to name.
    internal = (
        ("authorization", f"Bearer {settings_for_test.internal_token}"),
        ("x-profiles-project", str(project.project_id)),
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetCaller(query_pb.GetCallerRequest(), metadata=internal, timeout=5)
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
