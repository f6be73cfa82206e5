"""Every RPC refuses, over a real gRPC channel, each role the README's role table (the published
contract, which shared/auth_policy.py's POLICY is meant to implement) does not allow:
PERMISSION_DENIED with reason ROLE_NOT_ALLOWED; the roles it allows get past authorization. The
interceptor authorizes before it looks at the request (shared/interceptors.py `_enter`), so an
empty request (or an empty client stream) is enough. The expected roles are read from the README,
not from POLICY, so a row of POLICY that drifts from the contract fails here on the wire."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# The generated modules register the contract's methods in the default descriptor pool.
from profiles.diagnostics.v1 import diagnostics_service_pb2  # noqa: F401
from profiles.identity.v1 import identity_service_pb2  # noqa: F401
from profiles.ingest.v1 import ingest_service_pb2  # noqa: F401
from profiles.query.v1 import query_service_pb2  # noqa: F401
from profiles.segments.v1 import segments_service_pb2  # noqa: F401
from profiles_cli.runner import BUILDERS
from shared.auth_policy import ADMIN, INTERNAL, POLICY, READ, SDK, service_of

ROLES = (SDK, READ, ADMIN, INTERNAL)
README = Path(__file__).resolve().parents[2] / "README.md"
SERVING = {
    "profiles.ingest.v1.IngestService": "ingest",
    "profiles.identity.v1.IdentityService": "identity",
    "profiles.segments.v1.SegmentsService": "segments",
    "profiles.query.v1.QueryService": "query",
}
DIAGNOSTICS = "profiles.diagnostics.v1.DiagnosticsService"
# A refusal comes first, so it gets a generous deadline; an allowed call may go on to stream
# (a watch sends nothing until something changes), so past authorization a deadline is fine.
REFUSAL_TIMEOUT_S = 30.0
ALLOWED_TIMEOUT_S = 3.0

Outcome = tuple[grpc.StatusCode, str]


def reason_of(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


async def no_messages() -> AsyncIterator[bytes]:
    return
    yield b""  # an async generator that ends at once: the client half-closes with no message


async def call_with_empty_request(
    channel: grpc.aio.Channel, method: str, metadata: tuple[tuple[str, str], ...], deadline_s: float
) -> Outcome:
    """Calls `method` in its own shape with an empty message (b"" decodes to any message with
    every field unset) and no serializers: the code and ErrorInfo reason it ends with, or OK
    once the first response arrives."""
    descriptor = descriptor_pool.Default().FindMethodByName(method.lstrip("/").replace("/", "."))
    client_streams, server_streams = descriptor.client_streaming, descriptor.server_streaming
    try:
        if not client_streams and not server_streams:
            await channel.unary_unary(method)(b"", metadata=metadata, timeout=deadline_s)
        elif client_streams and not server_streams:
            await channel.stream_unary(method)(no_messages(), metadata=metadata, timeout=deadline_s)
        else:
            if client_streams:
                call = channel.stream_stream(method)(
                    no_messages(), metadata=metadata, timeout=deadline_s
                )
            else:
                call = channel.unary_stream(method)(b"", metadata=metadata, timeout=deadline_s)
            await call.read()
            call.cancel()
    except grpc.aio.AioRpcError as error:
        return error.code(), reason_of(error)
    return grpc.StatusCode.OK, ""


def documented_roles() -> dict[str, frozenset[str]]:
    """`/package.Service/Method` -> roles, from the README's `| service | RPC | roles |` table."""
    section = README.read_text().partition("## Keys and roles")[2].partition("\n## ")[0]
    rows = re.findall(r"^\| `([a-z]+)` \| `([A-Za-z]+)` \| ([a-z, ]+) \|$", section, re.M)
    return {
        f"/profiles.{short}.v1.{short.capitalize()}Service/{rpc}": frozenset(roles.split(", "))
        for short, rpc, roles in rows
    }


@pytest.fixture
async def all_services(start_services):  # type: ignore[no-untyped-def]
    return await start_services(*BUILDERS)


async def test_every_rpc_refuses_each_role_the_contract_does_not_allow(  # type: ignore[no-untyped-def]
    all_services, project, settings_for_test
) -> None:
    metadata = {role: project.metadata(role) for role in (SDK, READ, ADMIN)}
    metadata[INTERNAL] = (
        ("authorization", f"Bearer {settings_for_test.internal_token}"),
        ("x-profiles-project", str(project.project_id)),
    )
    expected = documented_roles()
    assert set(expected) == set(POLICY)  # the table documents every RPC, and only those
    # (channel name, method): the diagnostics service is served by every service.
    calls = [(SERVING[service_of(m)], m) for m in expected if service_of(m) in SERVING]
    diagnostics = [m for m in expected if service_of(m) == DIAGNOSTICS]
    calls += [(name, method) for name in BUILDERS for method in diagnostics]
    assert {method for _, method in calls} == set(expected)  # every row has a service to ask

    wrong: list[tuple[str, str, str, Outcome]] = []
    refused = 0
    for name, method in calls:
        channel = all_services[name].channel
        for role in ROLES:
            if role in expected[method]:
                got = await call_with_empty_request(
                    channel, method, metadata[role], ALLOWED_TIMEOUT_S
                )
                if got[1] == "ROLE_NOT_ALLOWED" or got[0] in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.UNIMPLEMENTED,
                ):
                    wrong.append((name, method, role, got))
            else:
                got = await call_with_empty_request(
                    channel, method, metadata[role], REFUSAL_TIMEOUT_S
                )
                refused += 1
                if got != (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED"):
                    wrong.append((name, method, role, got))
    assert wrong == []
    # Every RPC is closed to some role, so each row was checked for a refusal.
    assert refused == sum(len(set(ROLES) - expected[m]) for _, m in calls) >= len(calls)
