"""The contract's RPCs read from the descriptors, and how to call any of them generically: the
bad-input tests cover every RPC and every string field, including ones added later."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from profiles.diagnostics.v1 import diagnostics_service_pb2
from profiles.identity.v1 import identity_service_pb2
from profiles.ingest.v1 import ingest_service_pb2
from profiles.query.v1 import query_service_pb2
from profiles.segments.v1 import segments_service_pb2
from shared.clock import FrozenClock

CONTRACT: tuple[ModuleType, ...] = (
    ingest_service_pb2,
    identity_service_pb2,
    segments_service_pb2,
    query_service_pb2,
    diagnostics_service_pb2,
)
# Which of the four processes serves a contract service (diagnostics: every one).
HOSTS = {
    "profiles.ingest.v1.IngestService": "ingest",
    "profiles.identity.v1.IdentityService": "identity",
    "profiles.segments.v1.SegmentsService": "segments",
    "profiles.query.v1.QueryService": "query",
    "profiles.diagnostics.v1.DiagnosticsService": "query",
}
NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
NUL_TEXT = "a\x00b"
_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


@dataclass(frozen=True, slots=True)
class Rpc:
    method: MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def host(self) -> str:
        return HOSTS[self.method.containing_service.full_name]

    @property
    def request_class(self) -> type[Message]:
        return GetMessageClass(self.method.input_type)

    @property
    def response_class(self) -> type[Message]:
        return GetMessageClass(self.method.output_type)

    def __str__(self) -> str:
        return self.path


def contract_rpcs() -> list[Rpc]:
    """Every RPC of the contract, in the order of the proto files."""
    return [
        Rpc(method)
        for module in CONTRACT
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


# One step of a field path: the field and how it is entered ("one", "item", "key", "value").
Step = tuple[FieldDescriptor, str]


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def string_paths(descriptor: Descriptor, seen: tuple[str, ...] = ()) -> list[tuple[Step, ...]]:
    """Every way down to a string field (map keys included), each message type at most once
    per path so recursive messages (filter groups) end."""
    seen = (*seen, descriptor.full_name)
    paths: list[tuple[Step, ...]] = []
    for field in descriptor.fields:
        if _is_map(field):
            key, value = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            if key.type == _STRING:
                paths.append(((field, "key"),))
            if value.type == _STRING:
                paths.append(((field, "value"),))
            elif value.type == _MESSAGE and value.message_type.full_name not in seen:
                paths.extend(
                    ((field, "value"), *sub) for sub in string_paths(value.message_type, seen)
                )
            continue
        how = "item" if field.is_repeated else "one"
        if field.type == _STRING:
            paths.append(((field, how),))
        elif field.type == _MESSAGE and field.message_type.full_name not in seen:
            paths.extend(((field, how), *sub) for sub in string_paths(field.message_type, seen))
    return paths


TIMES = ("google.protobuf.Timestamp", "google.protobuf.Duration")


def time_paths(descriptor: Descriptor, seen: tuple[str, ...] = ()) -> list[tuple[Step, ...]]:
    """Every way down to a Timestamp or Duration field, as string_paths."""
    seen = (*seen, descriptor.full_name)
    paths: list[tuple[Step, ...]] = []
    for field in descriptor.fields:
        if field.type != _MESSAGE:
            continue
        how = "item" if field.is_repeated else "one"
        target = field.message_type
        if _is_map(field):
            how, target = "value", field.message_type.fields_by_name["value"].message_type
            if target is None:
                continue
        if target.full_name in TIMES:
            paths.append(((field, how),))
        elif target.full_name not in seen:
            paths.extend(((field, how), *sub) for sub in time_paths(target, seen))
    return paths


def time_reason(steps: tuple[Step, ...]) -> str:
    """The reason the server gives for the malformed time at `steps`."""
    field, how = steps[-1]
    target = field.message_type
    if how == "value":
        target = target.fields_by_name["value"].message_type
    return "TIMESTAMP_INVALID" if target.full_name == TIMES[0] else "DURATION_INVALID"


def put_bad_time(message: Message, steps: tuple[Step, ...]) -> str:
    """Sets nanos -1 (outside the range of either type) on the time at `steps`; returns its
    field path as the server names it."""
    target = message
    parts: list[str] = []
    for field, how in steps:
        container = getattr(target, field.name)
        if how == "value":
            target = container.get_or_create("k")
            parts.append(f'{field.name}["k"]')
        elif how == "item":
            target = container.add()
            parts.append(f"{field.name}[0]")
        else:
            target = container
            target.SetInParent()
            parts.append(field.name)
    target.nanos = -1  # type: ignore[attr-defined]
    if target.DESCRIPTOR.full_name == TIMES[1]:
        target.seconds = 1  # type: ignore[attr-defined]  # a Duration's nanos take its sign
    return ".".join(parts).replace(".[", "[")


def put_nul(message: Message, steps: tuple[Step, ...]) -> str:
    """Sets the string at `steps` in `message` to NUL_TEXT; returns its field path as the
    server names it (`keys[0].custom_id`, `attributes["k"]`, `attributes["a\\u0000b"]`)."""
    target = message
    parts: list[str] = []
    for i, (field, how) in enumerate(steps):
        last = i == len(steps) - 1
        container = getattr(target, field.name)
        if how == "key":
            value_field = field.message_type.fields_by_name["value"]
            if value_field.type == _MESSAGE:
                container.get_or_create(NUL_TEXT)
            else:
                container[NUL_TEXT] = type(container[NUL_TEXT])()
            parts.append(f'{field.name}["a\\u0000b"]')
        elif how == "value":
            if last:
                container["k"] = NUL_TEXT
            else:
                target = container.get_or_create("k")
            parts.append(f'{field.name}["k"]')
        elif how == "item":
            if last:
                container.append(NUL_TEXT)
            else:
                target = container.add()
            parts.append(f"{field.name}[0]")
        else:
            if last:
                setattr(target, field.name, NUL_TEXT)
            else:
                target = container
                target.SetInParent()
            parts.append(field.name)
    return ".".join(parts).replace(".[", "[")


def violations(error: grpc.aio.AioRpcError | status_pb2.Status) -> tuple[str, list[str]]:
    """The ErrorInfo reason and the BadRequest field paths of a failed call (or of the status
    a streamed answer carries)."""
    if isinstance(error, status_pb2.Status):
        status: status_pb2.Status | None = error
    else:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    reason, fields = "", []
    for detail in status.details if status is not None else ():
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(bad):
            fields = [v.field for v in bad.field_violations]
    return reason, fields


def refused_in(replies: list[Any]) -> tuple[grpc.StatusCode, str, list[str]] | None:
    """(code, reason, field paths) of an answer that refuses its request in a `status` of its
    own (StreamEvents answers a malformed batch so and goes on), else None."""
    if not replies or "status" not in replies[0].DESCRIPTOR.fields_by_name:
        return None
    status = replies[0].status
    if not isinstance(status, status_pb2.Status) or status.code == 0:
        return None
    code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
    return (code, *violations(status))


async def _once(item: Any) -> AsyncIterator[Any]:
    yield item


def _identity(data: bytes) -> bytes:
    return data


async def call(
    channel: grpc.aio.Channel,
    rpc: Rpc,
    request: Message | bytes,
    metadata: tuple[tuple[str, str], ...],
    *,
    seconds: float | None = 10.0,
) -> list[Any]:
    """Calls `rpc` with `request` (a message, or raw bytes sent as they are); a server stream is
    cancelled after its first item. Returns the responses; raises AioRpcError."""
    serialize: Callable[[Any], bytes] = (
        _identity if isinstance(request, bytes) else rpc.request_class.SerializeToString
    )
    deserialize = rpc.response_class.FromString
    method = rpc.method
    kwargs = {"request_serializer": serialize, "response_deserializer": deserialize}
    if not method.client_streaming and not method.server_streaming:
        unary = channel.unary_unary(rpc.path, **kwargs)
        return [await unary(request, metadata=metadata, timeout=seconds)]
    if method.client_streaming and not method.server_streaming:
        stream_unary = channel.stream_unary(rpc.path, **kwargs)
        return [await stream_unary(_once(request), metadata=metadata, timeout=seconds)]
    if method.client_streaming:
        stream = channel.stream_stream(rpc.path, **kwargs)(
            _once(request), metadata=metadata, timeout=seconds
        )
    else:
        stream = channel.unary_stream(rpc.path, **kwargs)(
            request, metadata=metadata, timeout=seconds
        )
    try:
        first = await stream.read()
        return [] if first is grpc.aio.EOF else [first]
    finally:
        stream.cancel()


@pytest.fixture
async def contract_suite(start_services: Any, settings_for_test: Any) -> dict[str, Any]:
    """All four services on the test's database, ingest pointed at identity; name -> handle."""
    clock = FrozenClock(NOW)
    handles = await start_services("identity", clock=clock)
    settings = settings_for_test.with_changes(
        addresses={**settings_for_test.addresses, "identity": handles["identity"].address}
    )
    handles.update(
        await start_services("ingest", "segments", "query", settings=settings, clock=clock)
    )
    return handles


async def still_serving(
    handles: dict[str, Any], admin: tuple[tuple[str, str], ...] | None = None
) -> None:
    """Every service answers its health check (and, given an admin key, a real call)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from profiles.diagnostics.v1 import diagnostics_service_pb2_grpc

    for handle in handles.values():
        stub = health_pb2_grpc.HealthStub(handle.channel)
        reply = await asyncio.wait_for(stub.Check(health_pb2.HealthCheckRequest()), 10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        if admin is not None:
            echo = diagnostics_service_pb2_grpc.DiagnosticsServiceStub(handle.channel).Echo
            request = diagnostics_service_pb2.EchoRequest(payload=b"still")
            assert (await echo(request, metadata=admin, timeout=10)).payload == b"still"
