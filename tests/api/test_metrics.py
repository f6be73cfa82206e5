"""Prometheus metrics: every call is counted by method and status code, with its latency."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest

from profiles.diagnostics.v1 import diagnostics_service_pb2 as pb
from profiles.diagnostics.v1 import diagnostics_service_pb2_grpc as pb_grpc
from profiles_cli.runner import BUILDERS
from shared.ports import free_port
from shared.server import start_service

ECHO = "/profiles.diagnostics.v1.DiagnosticsService/Echo"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def sample(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
async def served_with_metrics(settings_for_test, project):  # type: ignore[no-untyped-def]
    port = free_port()
    ports = {**settings_for_test.metrics_ports, "segments": port}
    settings = settings_for_test.with_changes(metrics_ports=ports)
    running = await start_service("segments", settings, BUILDERS["segments"], port=0)
    channel = grpc.aio.insecure_channel(running.address)
    yield channel, port
    await channel.close()
    await running.stop(grace=1.0)


async def test_calls_are_counted_by_method_and_code(served_with_metrics, project) -> None:  # type: ignore[no-untyped-def]
    channel, port = served_with_metrics
    ok = f'profiles_rpc_total{{code="OK",method="{ECHO}"}}'
    refused = f'profiles_rpc_total{{code="UNAUTHENTICATED",method="{ECHO}"}}'
    before = await asyncio.to_thread(scrape, port)
    stub = pb_grpc.DiagnosticsServiceStub(channel)
    for _ in range(3):
        await stub.Echo(pb.EchoRequest(payload=b"x"), metadata=project.metadata("admin"))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Echo(pb.EchoRequest(payload=b"x"))
    after = await asyncio.to_thread(scrape, port)
    assert sample(after, ok) - sample(before, ok) == 3
    assert sample(after, refused) - sample(before, refused) == 1
    latency = f'profiles_rpc_seconds_count{{method="{ECHO}"}}'
    assert sample(after, latency) - sample(before, latency) == 4
    assert "profiles_outbox_backlog" in after
