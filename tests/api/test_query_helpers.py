"""Helpers (no tests) for the query API tests: the suite (identity, ingest and query started
in-process), event builders, and JSON round trips."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from profiles.query.v1 import query_service_pb2 as pb
from profiles.query.v1 import query_service_pb2_grpc as pb_grpc
from shared.clock import FrozenClock
from tests.api.test_identity_helpers import Identity
from tests.api.test_ingest_helpers import NOW, attribute_event, custom_event, op, stamp

__all__ = ["NOW", "attribute_event", "custom_event", "op", "stamp"]


def round_trip(message: Message) -> None:
    """What grpcurl does: proto -> JSON -> proto gives the same message back."""
    text = json_format.MessageToJson(message)
    back = type(message)()
    json_format.Parse(text, back)
    assert back == message, text


@dataclass(slots=True)
class Suite:
    query: pb_grpc.QueryServiceStub
    ingest: ingest_grpc.IngestServiceStub
    identity: Identity
    project: Any  # tests.conftest.TestProject
    database_url: str
    clock: FrozenClock

    async def track(self, *events: ingest_pb.Event) -> ingest_pb.TrackEventsResponse:
        return await self.ingest.TrackEvents(
            ingest_pb.TrackEventsRequest(events=events),
            metadata=self.project.metadata("sdk"),
            timeout=20,
        )

    async def get(self, role: str = "read", **lookup: str) -> pb.GetProfileResponse:
        reply = await self.query.GetProfile(
            pb.GetProfileRequest(**lookup), metadata=self.project.metadata(role), timeout=20
        )
        round_trip(reply)
        return reply

    async def call(self, rpc: str, request: Message, role: str = "read") -> Any:
        reply = await getattr(self.query, rpc)(
            request, metadata=self.project.metadata(role), timeout=30
        )
        round_trip(reply)
        return reply

    async def fetchval(self, sql: str, *args: Any) -> Any:
        conn = await asyncpg.connect(self.database_url)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.database_url)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()


async def start_suite(
    start_services: Any,
    settings_for_test: Any,
    project: Any,
    database_url: str,
    *,
    clock: FrozenClock | None = None,
    query_settings: Any = None,
) -> Suite:
    clock = clock or FrozenClock(NOW)
    handles = await start_services("identity")
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": handles["identity"].address}
    )
    ingest = await start_services("ingest", settings=settings, clock=clock)
    query = await start_services("query", settings=query_settings or settings, clock=clock)
    return Suite(
        query=pb_grpc.QueryServiceStub(query["query"].channel),
        ingest=ingest_grpc.IngestServiceStub(ingest["ingest"].channel),
        identity=Identity(handles["identity"].channel, project),
        project=project,
        database_url=database_url,
        clock=clock,
    )


def base_event(
    installation_id: str | None, time: datetime, platform: int = types_pb2.PLATFORM_IOS
) -> ingest_pb.Event:
    event = ingest_pb.Event(event_id=uuid.uuid4().hex, platform=platform, event_time=stamp(time))  # type: ignore[arg-type]
    if installation_id is not None:
        event.installation_id = installation_id
    return event


def session_start(
    installation_id: str, session_id: str, time: datetime, *, country: str = "", **kw: Any
) -> ingest_pb.Event:
    event = base_event(installation_id, time, **kw)
    event.session_id = session_id
    event.session_start.country = country
    return event


def session_end(
    installation_id: str, session_id: str, time: datetime, seconds: int, **kw: Any
) -> ingest_pb.Event:
    event = base_event(installation_id, time, **kw)
    event.session_id = session_id
    event.session_end.duration.FromTimedelta(timedelta(seconds=seconds))
    return event


def subscription(
    installation_id: str, channel: int, kind: int, subscribed: bool, time: datetime
) -> ingest_pb.Event:
    event = base_event(installation_id, time)
    event.subscription_change.channel = channel  # type: ignore[assignment]
    event.subscription_change.kind = kind  # type: ignore[assignment]
    event.subscription_change.subscribed = subscribed
    return event


def installation_update(
    installation_id: str, time: datetime, platform: int = types_pb2.PLATFORM_IOS, **fields: Any
) -> ingest_pb.Event:
    event = base_event(installation_id, time, platform)
    for name, value in fields.items():
        setattr(event.installation_update, name, value)
    if not fields:
        event.installation_update.app_version = "1.0"
    return event


def crash(installation_id: str, time: datetime, name: str = "NullPointer") -> ingest_pb.Event:
    event = base_event(installation_id, time)
    event.crash.name = name
    event.crash.reason = "boom"
    event.crash.stack_trace = "at main()"
    event.crash.fatal = True
    return event


def is_grpc_error(error: BaseException, code: grpc.StatusCode) -> bool:
    return isinstance(error, grpc.aio.AioRpcError) and error.code() == code
