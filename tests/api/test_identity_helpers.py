"""Helpers (no tests) shared by the identity API tests: stubs, calls, rows and bus messages."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from profiles.common.v1 import bus_pb2
from profiles.identity.v1 import identity_service_pb2 as pb
from profiles.identity.v1 import identity_service_pb2_grpc as pb_grpc
from shared.topics import IDENTITY

if TYPE_CHECKING:
    from tests.conftest import TestProject

Metadata = tuple[tuple[str, str], ...]


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo in the status details")


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields.extend(v.field for v in bad.field_violations)
    return fields


class Identity:
    """A project's view of the identity service: calls with the project's keys."""

    def __init__(self, channel: grpc.aio.Channel, project: TestProject) -> None:
        self.stub = pb_grpc.IdentityServiceStub(channel)
        self.project = project

    async def resolve(self, *keys: pb.ProfileKey, role: str = "admin") -> list[pb.ResolvedProfile]:
        reply = await self.stub.ResolveProfiles(
            pb.ResolveProfilesRequest(keys=list(keys)),
            metadata=self.project.metadata(role),
            timeout=30,
        )
        return list(reply.results)

    async def profile_of(self, installation_id: str) -> str:
        (result,) = await self.resolve(pb.ProfileKey(installation_id=installation_id))
        assert result.status.code == 0
        return result.profile_id

    async def profile_of_custom_id(self, custom_id: str) -> str:
        (result,) = await self.resolve(pb.ProfileKey(custom_id=custom_id))
        assert result.status.code == 0
        return result.profile_id

    async def identify(
        self, installation_id: str, custom_id: str, request_id: str = "", role: str = "sdk"
    ) -> pb.IdentifyResponse:
        return await self.stub.Identify(
            pb.IdentifyRequest(
                installation_id=installation_id, custom_id=custom_id, request_id=request_id
            ),
            metadata=self.project.metadata(role),
            timeout=60,
        )

    async def logout(self, installation_id: str, request_id: str = "") -> pb.LogoutResponse:
        return await self.stub.Logout(
            pb.LogoutRequest(installation_id=installation_id, request_id=request_id),
            metadata=self.project.metadata("sdk"),
            timeout=60,
        )

    async def merge(
        self, source: str, target: str, *, allow_conflict: bool = False, request_id: str = ""
    ) -> pb.MergeProfilesResponse:
        return await self.stub.MergeProfiles(
            pb.MergeProfilesRequest(
                source_profile_id=source,
                target_profile_id=target,
                allow_custom_id_conflict=allow_conflict,
                request_id=request_id,
            ),
            metadata=self.project.metadata("admin"),
            timeout=60,
        )


def new_id() -> str:
    return f"inst-{uuid.uuid4().hex[:12]}"


async def profile_row(db: asyncpg.Pool, project: TestProject, profile_id: str) -> asyncpg.Record:
    row = await db.fetchrow(
        "SELECT * FROM profiles WHERE project_id = $1 AND profile_id = $2",
        project.project_id,
        uuid.UUID(profile_id),
    )
    assert row is not None
    return row


async def installation_row(
    db: asyncpg.Pool, project: TestProject, installation_id: str
) -> asyncpg.Record | None:
    return await db.fetchrow(
        "SELECT * FROM installations WHERE project_id = $1 AND installation_id = $2",
        project.project_id,
        installation_id,
    )


async def count(db: asyncpg.Pool, sql: str, *args: Any) -> int:
    value = await db.fetchval(sql, *args)
    assert isinstance(value, int)
    return value


async def identity_messages(
    db: asyncpg.Pool, redis: Any, prefix: str, project: TestProject
) -> list[Any]:
    """Identity bus messages of the project, published (on the stream) or still in the outbox."""
    decoded: list[Any] = []
    rows = await db.fetch(
        "SELECT kind, payload FROM outbox WHERE project_id = $1 AND topic = $2 ORDER BY outbox_id",
        project.project_id,
        IDENTITY.name,
    )
    raw = [(r["kind"], bytes(r["payload"])) for r in rows]
    entries = await redis.xrange(f"{prefix}:{{{IDENTITY.name}}}")
    raw += [
        (fields[b"kind"].decode(), fields[b"data"])
        for _, fields in entries
        if fields[b"project"].decode() == str(project.project_id)
    ]
    for kind, data in raw:
        message_class = IDENTITY.message_class(kind)
        assert message_class is not None, kind
        decoded.append(message_class.FromString(data))
    return decoded


def of_type(messages: list[Any], kind: type) -> list[Any]:
    return [m for m in messages if isinstance(m, kind)]


__all__ = ["bus_pb2"]
