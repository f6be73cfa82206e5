"""Builders and fixtures shared by the ingest API tests."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as pb_grpc

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


def stamp(moment: datetime) -> Timestamp:
    result = Timestamp()
    result.FromDatetime(moment)
    return result


def custom_event(
    installation_id: str | None = "inst-1",
    *,
    event_id: str | None = None,
    name: str = "purchase",
    time: datetime = NOW,
    custom_id: str | None = None,
    **attributes: Any,
) -> pb.Event:
    event = pb.Event(
        event_id=event_id or uuid.uuid4().hex,
        platform=types_pb2.PLATFORM_IOS,
        event_time=stamp(time),
    )
    if custom_id is not None:
        event.custom_id = custom_id
        event.platform = types_pb2.PLATFORM_API
    elif installation_id is not None:
        event.installation_id = installation_id
    event.custom.name = name
    for key, value in attributes.items():
        if isinstance(value, str):
            event.custom.attributes[key].string_value = value
        elif isinstance(value, bool):
            event.custom.attributes[key].bool_value = value
        else:
            event.custom.attributes[key].number_value = value
    return event


def attribute_event(
    installation_id: str,
    operations: list[types_pb2.AttributeOperation],
    *,
    time: datetime = NOW,
    event_id: str | None = None,
) -> pb.Event:
    event = pb.Event(
        event_id=event_id or uuid.uuid4().hex,
        installation_id=installation_id,
        platform=types_pb2.PLATFORM_ANDROID,
        event_time=stamp(time),
    )
    event.attribute_operations.operations.extend(operations)
    return event


def op(kind: str, name: str, value: Any = None) -> types_pb2.AttributeOperation:
    operation = types_pb2.AttributeOperation(
        kind=getattr(types_pb2, f"ATTRIBUTE_OPERATION_KIND_{kind.upper()}")
    )
    native = getattr(types_pb2, f"NATIVE_ATTRIBUTE_{name.upper()}", None)
    if native is not None and name.upper() == name:
        operation.native_attribute = native
    else:
        operation.custom_attribute = name
    if isinstance(value, list):
        operation.value.string_list_value.values.extend(value)
    elif isinstance(value, str):
        operation.value.string_value = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        operation.value.number_value = value
    return operation


@dataclass(slots=True)
class Ingest:
    stub: pb_grpc.IngestServiceStub
    metadata: tuple[tuple[str, str], ...]
    admin: tuple[tuple[str, str], ...]
    database_url: str

    async def track(
        self, *events: pb.Event, send_time: datetime | None = None
    ) -> pb.TrackEventsResponse:
        request = pb.TrackEventsRequest(events=events)
        if send_time is not None:
            request.send_time.CopyFrom(stamp(send_time))
        return await self.stub.TrackEvents(request, metadata=self.metadata, timeout=20)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.database_url)
        await conn.set_type_codec(
            "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()


def ingest_client(channel: grpc.aio.Channel, project: Any, database_url: str) -> Ingest:
    """An Ingest over `channel`, with the project's sdk and admin keys."""
    return Ingest(
        pb_grpc.IngestServiceStub(channel),
        project.metadata("sdk"),
        project.metadata("admin"),
        database_url,
    )


async def start_ingest(
    start_services: Any, settings_for_test: Any, **kwargs: Any
) -> grpc.aio.Channel:
    handles = await start_services("identity", settings=settings_for_test)
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": handles["identity"].address}
    )
    started = await start_services("ingest", settings=settings, **kwargs)
    return started["ingest"].channel


async def aiter_of(*items: Any) -> AsyncIterator[Any]:
    for item in items:
        yield item


def in_days(days: float) -> datetime:
    return NOW + timedelta(days=days)
