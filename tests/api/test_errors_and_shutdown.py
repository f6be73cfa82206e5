"""Error mapping, stream caps and graceful shutdown, through a test servicer on the real stack."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from profiles.query.v1 import query_service_pb2 as pb
from profiles.query.v1 import query_service_pb2_grpc as pb_grpc
from shared import errors
from shared.server import Runtime, ServiceDefinition
from tests.conftest import eventually


class ScriptedQueryServicer(pb_grpc.QueryServiceServicer):
    """GetProfile does what the `x-test` header says; WatchProfile streams until cancelled."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.in_flight = asyncio.Event()
        self.streaming = 0
        self.streams_closed = 0

    async def GetProfile(self, request: pb.GetProfileRequest, context) -> pb.GetProfileResponse:  # type: ignore[no-untyped-def, override]
        script = dict(context.invocation_metadata()).get("x-test", "")
        if script == "invalid":
            raise errors.InvalidArgument(
                "bad lookup",
                [
                    errors.FieldViolation("lookup.email", "not an email", "EMAIL_MALFORMED"),
                    errors.FieldViolation("lookup.phone", "not E.164", "PHONE_MALFORMED"),
                ],
            )
        if script == "not_found":
            raise errors.NotFound("no such profile", metadata={"profile_id": "p1"})
        if script == "crash":
            raise RuntimeError("secret internal detail")
        if script == "database_gone":  # a server stopped cleanly: its socket is gone
            await asyncpg.connect("postgresql:///db?host=/nonexistent-dir&port=5999", timeout=5)
        if script == "redis_gone":
            # Not retried: the same ConnectionError, without the client's seconds of backoff.
            client = Redis(
                unix_socket_path="/nonexistent-dir/redis.sock", retry=Retry(NoBackoff(), 0)
            )
            try:
                await client.ping()
            finally:
                await client.aclose()
        if script == "slow":
            self.in_flight.set()
            await self.release.wait()
        return pb.GetProfileResponse()

    async def WatchProfile(  # type: ignore[no-untyped-def, override]
        self, request: pb.WatchProfileRequest, context
    ) -> AsyncIterator[pb.WatchProfileResponse]:
        self.streaming += 1
        try:
            while True:
                yield pb.WatchProfileResponse()
                await asyncio.sleep(0.05)
        finally:
            self.streams_closed += 1


@pytest.fixture
def servicer() -> ScriptedQueryServicer:
    return ScriptedQueryServicer()


@pytest.fixture
async def scripted(servicer, settings_for_test, start_services):  # type: ignore[no-untyped-def]
    from profiles_cli.runner import BUILDERS
    from shared.server import start_service

    async def build(runtime: Runtime) -> ServiceDefinition:
        return ServiceDefinition(
            full_names=["profiles.query.v1.QueryService"],
            register=lambda server: pb_grpc.add_QueryServiceServicer_to_server(servicer, server),
        )

    assert BUILDERS  # the real builders stay untouched; this test brings its own
    settings = settings_for_test.with_changes(max_streams=2)
    running = await start_service("query", settings, build, port=0, metrics=False)
    channel = grpc.aio.insecure_channel(running.address)
    yield running, channel
    await channel.close()
    await running.stop(grace=1.0)


def _details(error: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info, fields = error_details_pb2.ErrorInfo(), []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields = [v.field for v in bad.field_violations]
        detail.Unpack(info)
    return info, fields


async def call(channel, project, script: str, **kwargs) -> pb.GetProfileResponse:  # type: ignore[no-untyped-def]
    stub = pb_grpc.QueryServiceStub(channel)
    metadata = (*project.metadata("read"), ("x-test", script))
    return await stub.GetProfile(pb.GetProfileRequest(), metadata=metadata, timeout=10, **kwargs)


async def test_invalid_argument_carries_error_info_and_one_violation_per_field(
    scripted, project
) -> None:  # type: ignore[no-untyped-def]
    _, channel = scripted
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(channel, project, "invalid")
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    info, fields = _details(raised.value)
    assert info.reason == "INVALID_ARGUMENT"
    assert info.domain == "profiles.dev"
    assert fields == ["lookup.email", "lookup.phone"]


async def test_not_found_keeps_its_reason_and_metadata(scripted, project) -> None:  # type: ignore[no-untyped-def]
    _, channel = scripted
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(channel, project, "not_found")
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    info, _ = _details(raised.value)
    assert info.reason == "NOT_FOUND"
    assert dict(info.metadata) == {"profile_id": "p1", "request_id": info.metadata["request_id"]}
    assert info.metadata["request_id"]


async def test_an_unexpected_error_is_internal_and_reveals_nothing(scripted, project) -> None:  # type: ignore[no-untyped-def]
    _, channel = scripted
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(channel, project, "crash")
    assert raised.value.code() is grpc.StatusCode.INTERNAL
    assert "secret" not in (raised.value.details() or "")
    # Like every error, it carries its ErrorInfo with the request ID to quote.
    info, _ = _details(raised.value)
    assert info.reason == "INTERNAL"
    assert info.metadata["request_id"]


@pytest.mark.parametrize(
    ("script", "reason"),
    [("database_gone", "DATABASE_UNAVAILABLE"), ("redis_gone", "BUS_UNAVAILABLE")],
)
async def test_a_database_or_redis_away_is_unavailable_not_internal(  # type: ignore[no-untyped-def]
    scripted, project, script: str, reason: str
) -> None:
    _, channel = scripted
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(channel, project, script)
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    info, _ = _details(raised.value)
    assert info.reason == reason


async def test_streams_beyond_the_cap_are_resource_exhausted(scripted, project) -> None:  # type: ignore[no-untyped-def]
    _, channel = scripted
    stub = pb_grpc.QueryServiceStub(channel)
    open_streams = [
        stub.WatchProfile(pb.WatchProfileRequest(), metadata=project.metadata("read"))
        for _ in range(2)
    ]
    for stream in open_streams:
        await stream.read()
    third = stub.WatchProfile(pb.WatchProfileRequest(), metadata=project.metadata("read"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await third.read()
    assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    # Unary calls are not starved by the open streams.
    await call(channel, project, "ok")
    for stream in open_streams:
        stream.cancel()

    # A closed stream frees its slot.
    async def slot_free() -> bool:
        fresh = stub.WatchProfile(pb.WatchProfileRequest(), metadata=project.metadata("read"))
        try:
            await fresh.read()
            return True
        except grpc.aio.AioRpcError:
            return False
        finally:
            fresh.cancel()

    await eventually(slot_free)


async def test_shutdown_finishes_in_flight_calls_and_ends_streams_unavailable(  # type: ignore[no-untyped-def]
    scripted, servicer, project
) -> None:
    running, channel = scripted
    stub = pb_grpc.QueryServiceStub(channel)
    stream = stub.WatchProfile(pb.WatchProfileRequest(), metadata=project.metadata("read"))
    await stream.read()
    slow = asyncio.create_task(call(channel, project, "slow"))
    await asyncio.wait_for(servicer.in_flight.wait(), 10)
    health = health_pb2_grpc.HealthStub(channel)

    stopping = asyncio.create_task(running.stop(grace=10.0))

    async def stream_ended_unavailable() -> bool:
        try:
            while True:
                await stream.read()
        except grpc.aio.AioRpcError as error:
            return error.code() is grpc.StatusCode.UNAVAILABLE

    assert await asyncio.wait_for(stream_ended_unavailable(), 10)
    assert not slow.done()  # the unary call is still being served
    servicer.release.set()
    assert await asyncio.wait_for(slow, 10) == pb.GetProfileResponse()
    await asyncio.wait_for(stopping, 15)
    with pytest.raises(grpc.aio.AioRpcError):
        await health.Check(health_pb2.HealthCheckRequest(), timeout=2)


async def test_a_client_cancelling_a_stream_ends_the_servicer_generator(  # type: ignore[no-untyped-def]
    scripted, servicer, project
) -> None:
    _, channel = scripted
    stub = pb_grpc.QueryServiceStub(channel)
    stream = stub.WatchProfile(pb.WatchProfileRequest(), metadata=project.metadata("read"))
    await stream.read()
    stream.cancel()

    async def generator_closed() -> bool:
        return servicer.streams_closed == 1

    await eventually(generator_closed)
