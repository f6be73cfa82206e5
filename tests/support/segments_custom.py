"""The stack of the custom segment and funnel API tests: identity, ingest and segments in-process
on real PostgreSQL and Redis with one frozen clock; data goes in through TrackEvents."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from profiles.segments.v1 import filters_pb2
from profiles.segments.v1 import segments_service_pb2 as pb
from profiles.segments.v1 import segments_service_pb2_grpc as pb_grpc
from services.segments.app import make_build
from services.segments.definitions import DefinitionsService
from services.segments.definitions_repository import DefinitionsRepository
from shared.bus import Bus
from shared.clock import FrozenClock
from shared.server import Build, start_service
from shared.tenancy import TenancyRepository
from shared.topics import EVENTS
from tests.conftest import eventually
from tests.support.ingest import NOW, stamp
from tests.support.ingest_running import running_ingest, session_event
from tests.support.segments import drained

if TYPE_CHECKING:
    from shared.settings import Settings
    from tests.conftest import StartServices, TestProject

IOS = types_pb2.PLATFORM_IOS
ANDROID = types_pb2.PLATFORM_ANDROID
WEB = types_pb2.PLATFORM_WEB


def days_ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def error_details(error: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    """(ErrorInfo reason, BadRequest field paths) of a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    reason, fields = "", []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(bad):
            fields.extend(v.field for v in bad.field_violations)
    return reason, fields


def attribute(
    name: str | int,
    operator: int,
    value: Any = None,
    *,
    values: Any = (),
    ignore_case: bool = False,
) -> filters_pb2.FilterNode:
    """An attribute condition: `name` a custom attribute name or a NativeAttribute number."""
    test = filters_pb2.AttributeCondition(operator=operator, ignore_case=ignore_case)  # type: ignore[arg-type]
    if isinstance(name, str):
        test.custom_attribute = name
    else:
        test.native_attribute = name  # type: ignore[assignment]
    if value is not None:
        test.value.CopyFrom(operand(value))
    test.values.extend(operand(v) for v in values)
    return filters_pb2.FilterNode(condition=filters_pb2.Condition(attribute=test))


def operand(value: Any) -> types_pb2.AttributeValue:
    if isinstance(value, types_pb2.AttributeValue):
        return value
    if isinstance(value, bool):
        return types_pb2.AttributeValue(bool_value=value)
    if isinstance(value, int | float):
        return types_pb2.AttributeValue(number_value=value)
    if isinstance(value, list):
        return types_pb2.AttributeValue(string_list_value=types_pb2.StringList(values=value))
    if isinstance(value, datetime):
        return types_pb2.AttributeValue(timestamp_value=stamp(value))
    return types_pb2.AttributeValue(string_value=value)


def condition(**kwargs: Any) -> filters_pb2.FilterNode:
    return filters_pb2.FilterNode(condition=filters_pb2.Condition(**kwargs))


def group(operator: int, *children: filters_pb2.FilterNode) -> filters_pb2.FilterNode:
    return filters_pb2.FilterNode(
        group=filters_pb2.FilterGroup(operator=operator, children=children)  # type: ignore[arg-type]
    )


def all_of(*children: filters_pb2.FilterNode) -> filters_pb2.FilterNode:
    return group(filters_pb2.GROUP_OPERATOR_AND, *children)


def not_(child: filters_pb2.FilterNode) -> filters_pb2.FilterNode:
    return group(filters_pb2.GROUP_OPERATOR_NOT, child)


@dataclass
class Stack:
    ingest: ingest_grpc.IngestServiceStub
    segments: pb_grpc.SegmentsServiceStub
    clock: FrozenClock
    project: TestProject
    bus: Bus
    pool: asyncpg.Pool
    definitions: DefinitionsService
    identity_channel: grpc.aio.Channel
    tenancy: TenancyRepository

    @property
    def read(self) -> Any:
        return self.project.metadata("read")

    @property
    def admin(self) -> Any:
        return self.project.metadata("admin")

    async def track(self, *events: ingest_pb.Event) -> list[str]:
        """Sends the events; returns the profile of each (all must be accepted), once segments
        has consumed them."""
        response = await self.ingest.TrackEvents(
            ingest_pb.TrackEventsRequest(events=events),
            metadata=self.project.metadata("sdk"),
            timeout=20,
        )
        for result in response.results:
            assert result.outcome == ingest_pb.EVENT_OUTCOME_ACCEPTED, result
        await self.consumed()
        return [r.profile_id for r in response.results]

    async def consumed(self) -> None:
        """Waits until ingest's outbox has published every event and segments has handled it."""

        async def done() -> bool:
            waiting = await self.pool.fetchval(
                "SELECT count(*) FROM outbox WHERE topic = $1", EVENTS.name
            )
            return waiting == 0 and await drained(self.bus, EVENTS)

        await eventually(done)

    async def import_events(self, *events: ingest_pb.Event) -> list[str]:
        """Like track, through ImportEvents (event times may be any past time)."""
        response = await self.ingest.ImportEvents(
            ingest_pb.ImportEventsRequest(events=events), metadata=self.admin, timeout=20
        )
        for result in response.results:
            assert result.outcome == ingest_pb.EVENT_OUTCOME_ACCEPTED, result
        await self.consumed()
        return [r.profile_id for r in response.results]

    async def size(self, filter_node: filters_pb2.FilterNode) -> int:
        """The size of a new segment with this filter (created, read, deleted)."""
        name = f"s-{uuid.uuid4().hex}"
        created = await self.segments.CreateSegment(
            pb.CreateSegmentRequest(display_name=name, filter=filter_node), metadata=self.admin
        )
        got = await self.segments.GetSegment(
            pb.GetSegmentRequest(segment_id=created.segment.segment_id), metadata=self.read
        )
        assert got.segment.size == created.segment.size
        await self.segments.DeleteSegment(
            pb.DeleteSegmentRequest(segment_id=created.segment.segment_id), metadata=self.admin
        )
        return created.segment.size

    async def members(self, filter_node: filters_pb2.FilterNode) -> set[str]:
        """The profiles matching a filter, through the membership the segment stores."""
        name = f"m-{uuid.uuid4().hex}"
        created = await self.segments.CreateSegment(
            pb.CreateSegmentRequest(display_name=name, filter=filter_node), metadata=self.admin
        )
        rows = await self.pool.fetch(
            "SELECT profile_id FROM custom_segment_members WHERE segment_id = $1",
            uuid.UUID(created.segment.segment_id),
        )
        await self.segments.DeleteSegment(
            pb.DeleteSegmentRequest(segment_id=created.segment.segment_id), metadata=self.admin
        )
        assert len(rows) == created.segment.size
        return {str(r["profile_id"]) for r in rows}


def custom_event(
    installation_id: str, name: str, time: datetime, platform: int = IOS, **attributes: Any
) -> ingest_pb.Event:
    event = ingest_pb.Event(
        event_id=uuid.uuid4().hex,
        installation_id=installation_id,
        platform=platform,  # type: ignore[arg-type]
        event_time=stamp(time),
    )
    event.custom.name = name
    for key, value in attributes.items():
        event.custom.attributes[key].CopyFrom(operand(value))
    return event


# Attribute changes at one event time replay in event ID order (the documented tie-break), so
# the changes a test sends at the same time get increasing IDs: they apply in the order sent.
_ATTRIBUTE_EVENT_SEQUENCE = itertools.count()


def set_attributes(
    installation_id: str,
    time: datetime = NOW,
    *,
    native: dict[int, str] | None = None,
    **custom: Any,
) -> ingest_pb.Event:
    event = ingest_pb.Event(
        event_id=f"{next(_ATTRIBUTE_EVENT_SEQUENCE):012d}-{uuid.uuid4().hex}",
        installation_id=installation_id,
        platform=IOS,
        event_time=stamp(time),
    )
    for number, text in (native or {}).items():
        operation = event.attribute_operations.operations.add(
            kind=types_pb2.ATTRIBUTE_OPERATION_KIND_SET,
            native_attribute=number,  # type: ignore[arg-type]
        )
        if number == types_pb2.NATIVE_ATTRIBUTE_AVATAR_URL:
            operation.value.url_value = text
        else:
            operation.value.string_value = text
    for name, value in custom.items():
        operation = event.attribute_operations.operations.add(
            kind=types_pb2.ATTRIBUTE_OPERATION_KIND_UNSET
            if value is None
            else types_pb2.ATTRIBUTE_OPERATION_KIND_SET,
            custom_attribute=name,
        )
        if value is not None:
            operation.value.CopyFrom(operand(value))
    return event


def subscription(
    installation_id: str, channel: int, kind: int, subscribed: bool
) -> ingest_pb.Event:
    event = ingest_pb.Event(
        event_id=uuid.uuid4().hex,
        installation_id=installation_id,
        platform=IOS,
        event_time=stamp(NOW - timedelta(minutes=1)),
    )
    event.subscription_change.channel = channel  # type: ignore[assignment]
    event.subscription_change.kind = kind  # type: ignore[assignment]
    event.subscription_change.subscribed = subscribed
    return event


def session(
    installation_id: str,
    start: datetime,
    minutes: float = 2.0,
    *,
    platform: int = IOS,
    country: str = "",
) -> list[ingest_pb.Event]:
    session_id = uuid.uuid4().hex[:16]
    return [
        session_event(
            "start", installation_id, session_id, start, country=country, platform=platform
        ),
        session_event(
            "end",
            installation_id,
            session_id,
            start + timedelta(minutes=minutes),
            duration=timedelta(minutes=minutes),
            platform=platform,
        ),
    ]


@pytest.fixture
def segments_build() -> Build:
    """The segments service of the stack. Its background evaluation and thresholds check run
    once at start, then every hour: tests evaluate by hand (a module may override this)."""
    return make_build(evaluation_interval_s=3600.0, thresholds_interval_s=3600.0)


@pytest.fixture
async def stack(
    start_services: StartServices,
    settings_for_test: Settings,
    project: TestProject,
    database_url: str,
    segments_build: Build,
) -> AsyncIterator[Stack]:
    clock = FrozenClock(NOW)
    handles = await start_services("identity")
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": handles["identity"].address}
    )
    segments = await start_service(
        "segments",
        settings_for_test,
        segments_build,
        port=0,
        clock=clock,
        metrics=False,
    )
    channel = grpc.aio.insecure_channel(segments.address)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=3)
    try:
        async with running_ingest(settings, clock) as ingest_channel:
            yield Stack(
                ingest_grpc.IngestServiceStub(ingest_channel),
                pb_grpc.SegmentsServiceStub(channel),
                clock,
                project,
                segments.runtime.bus,
                pool,
                DefinitionsService(DefinitionsRepository(segments.runtime.pool), clock),
                handles["identity"].channel,
                segments.runtime.tenancy,
            )
    finally:
        await pool.close()
        await channel.close()
        await segments.stop(grace=1.0)
