"""Helpers (no tests) shared by the identity API tests: stubs, calls, rows and bus messages."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from profiles.common.v1 import bus_pb2, types_pb2
from profiles.identity.v1 import identity_service_pb2 as pb
from profiles.identity.v1 import identity_service_pb2_grpc as pb_grpc
from profiles.ingest.v1 import ingest_service_pb2 as ipb
from shared.topics import IDENTITY
from tests.support.ingest import (
    NOW,
    Ingest,
    attribute_event,
    custom_event,
    op,
    stamp,
)

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


def field_violations(error: grpc.aio.AioRpcError) -> list[Any]:
    """The error's BadRequest field violations, in order."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    found = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            found.extend(bad.field_violations)
    return found


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    return [v.field for v in field_violations(error)]


class Identity:
    """A project's view of the identity service: calls with the project's keys."""

    def __init__(self, channel: grpc.aio.Channel, project: TestProject) -> None:
        self.channel = channel
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

    async def logout(
        self, installation_id: str, request_id: str = "", unless_custom_id: str = ""
    ) -> pb.LogoutResponse:
        return await self.stub.Logout(
            pb.LogoutRequest(
                installation_id=installation_id,
                request_id=request_id,
                unless_custom_id=unless_custom_id,
            ),
            metadata=self.project.metadata("sdk"),
            timeout=60,
        )

    async def merge(
        self,
        source: str,
        target: str,
        *,
        allow_conflict: bool = False,
        request_id: str = "",
        exact: bool = False,
    ) -> pb.MergeProfilesResponse:
        return await self.stub.MergeProfiles(
            pb.MergeProfilesRequest(
                source_profile_id=source,
                target_profile_id=target,
                allow_custom_id_conflict=allow_conflict,
                request_id=request_id,
                exact=exact,
            ),
            metadata=self.project.metadata("admin"),
            timeout=60,
        )

    async def delete(
        self, profile_id: str, request_id: str = "", *, exact: bool = False
    ) -> pb.DeleteProfileResponse:
        return await self.stub.DeleteProfile(
            pb.DeleteProfileRequest(profile_id=profile_id, request_id=request_id, exact=exact),
            metadata=self.project.metadata("admin"),
            timeout=60,
        )

    async def export(self, profile_id: str) -> list[pb.ExportProfileResponse]:
        call = self.stub.ExportProfile(
            pb.ExportProfileRequest(profile_id=profile_id),
            metadata=self.project.metadata("admin"),
            timeout=60,
        )
        return [chunk async for chunk in call]


def export_document(chunks: list[pb.ExportProfileResponse]) -> dict[str, Any]:
    """The whole export as one JSON object, checking the chunking rules on the way."""
    document: dict[str, Any] = {}
    names = {
        pb.EXPORT_SECTION_PROFILE: "profile",
        pb.EXPORT_SECTION_ATTRIBUTES: "attributes",
        pb.EXPORT_SECTION_SUBSCRIPTIONS: "subscriptions",
        pb.EXPORT_SECTION_INSTALLATIONS: "installations",
        pb.EXPORT_SECTION_IDENTITY_HISTORY: "identityHistory",
        pb.EXPORT_SECTION_SESSIONS: "sessions",
        pb.EXPORT_SECTION_EVENTS: "events",
        pb.EXPORT_SECTION_REJECTED_EVENTS: "rejectedEvents",
        pb.EXPORT_SECTION_SEGMENTS: "segments",
        pb.EXPORT_SECTION_ENGAGEMENT: "engagement",
        pb.EXPORT_SECTION_FUNNEL_PROGRESS: "funnelProgress",
    }
    objects = {
        pb.EXPORT_SECTION_PROFILE,
        pb.EXPORT_SECTION_ATTRIBUTES,
        pb.EXPORT_SECTION_SEGMENTS,
        pb.EXPORT_SECTION_ENGAGEMENT,
    }
    sections = [chunk.section for chunk in chunks]
    assert sections == sorted(sections), "sections come in the order of ExportSection"
    assert set(sections) == set(names), "every section is present"
    for index, chunk in enumerate(chunks):
        assert chunk.chunk_index == index
        value = json.loads(chunk.json)
        name = names[chunk.section]
        if chunk.section in objects:
            assert isinstance(value, dict)
            assert chunk.record_count == 1
            assert chunk.section_end
            assert name not in document
            document[name] = value
        else:
            assert isinstance(value, list)
            assert chunk.record_count == len(value)
            assert chunk.section_chunk_index == len(document.get(f"_{name}_chunks", []))
            document.setdefault(f"_{name}_chunks", []).append(chunk.section_end)
            document.setdefault(name, []).extend(value)
    for name in list(document):
        if name.startswith("_"):
            ends = document.pop(name)
            assert ends[-1], f"{name}: its last chunk ends it"
            assert not any(ends[:-1]), f"{name}: only its last chunk ends it"
    return document


async def start_identity_and_ingest(
    start_services: Any, settings_for_test: Any, clock: Any
) -> tuple[grpc.aio.Channel, grpc.aio.Channel]:
    """Identity, then ingest pointed at it, both on `clock`."""
    handles = await start_services("identity", clock=clock)
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": handles["identity"].address}
    )
    started = await start_services("ingest", settings=settings, clock=clock)
    return handles["identity"].channel, started["ingest"].channel


def subscription_event(installation_id: str, event_id: str) -> ipb.Event:
    event = ipb.Event(
        event_id=event_id,
        installation_id=installation_id,
        platform=types_pb2.PLATFORM_WEB,
        event_time=stamp(NOW - timedelta(minutes=5)),
    )
    event.subscription_change.channel = types_pb2.CHANNEL_EMAIL
    event.subscription_change.kind = types_pb2.SUBSCRIPTION_KIND_MARKETING
    event.subscription_change.subscribed = True
    return event


def device_event(installation_id: str, event_id: str, push_token: str) -> ipb.Event:
    event = ipb.Event(
        event_id=event_id,
        installation_id=installation_id,
        platform=types_pb2.PLATFORM_ANDROID,
        event_time=stamp(NOW - timedelta(minutes=4)),
    )
    event.installation_update.app_version = "9.9.9"
    event.installation_update.push_token = push_token
    return event


def session_events(installation_id: str, prefix: str) -> list[ipb.Event]:
    start = ipb.Event(
        event_id=f"{prefix}-start",
        installation_id=installation_id,
        session_id=f"{prefix}-session",
        platform=types_pb2.PLATFORM_IOS,
        event_time=stamp(NOW - timedelta(minutes=3)),
    )
    start.session_start.country = "FR"
    end = ipb.Event(
        event_id=f"{prefix}-end",
        installation_id=installation_id,
        session_id=f"{prefix}-session",
        platform=types_pb2.PLATFORM_IOS,
        event_time=stamp(NOW - timedelta(minutes=1)),
    )
    end.session_end.duration.FromTimedelta(timedelta(minutes=2))
    return [start, end]


async def person_events(ingest: Ingest, installation_id: str, tag: str) -> list[ipb.Event]:
    """A full life on one installation, every kind of state ingest keeps; returns the batch."""
    batch = [
        custom_event(
            installation_id,
            event_id=f"{tag}-buy",
            time=NOW - timedelta(minutes=10),
            sku=f"sku-{tag}-991",
        ),
        attribute_event(
            installation_id,
            [op("set", "EMAIL", f"{tag}@example.com"), op("set", "tier", f"tier-{tag}-gold")],
            time=NOW - timedelta(minutes=9),
            event_id=f"{tag}-attrs",
        ),
        subscription_event(installation_id, f"{tag}-sub"),
        device_event(installation_id, f"{tag}-device", f"push-token-{tag}"),
        *session_events(installation_id, tag),
    ]
    reply = await ingest.track(*batch)
    assert {r.outcome for r in reply.results} == {ipb.EVENT_OUTCOME_ACCEPTED}, reply
    return batch


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
    # Read outbox first, then stream: a row relayed in between is in both, so identical
    # entries (every message carries its own IDs) are one message.
    for kind, data in dict.fromkeys(raw):
        message_class = IDENTITY.message_class(kind)
        assert message_class is not None, kind
        decoded.append(message_class.FromString(data))
    return decoded


def of_type(messages: list[Any], kind: type) -> list[Any]:
    return [m for m in messages if isinstance(m, kind)]


__all__ = ["bus_pb2"]
