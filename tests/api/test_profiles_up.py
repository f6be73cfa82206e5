"""`profiles up` as a user runs it: a subprocess on a temporary data directory and free ports."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.query.v1 import query_service_pb2_grpc as query_grpc
from shared.settings import SERVICE_NAMES

READY_LINE = "Profiles is up"
# Generous: a slow CI machine must not fail these tests; nothing here measures time.
START_TIMEOUT = 120
STOP_TIMEOUT = 60


@dataclass(frozen=True, slots=True)
class Suite:
    data_dir: Path
    env: dict[str, str]
    ports: dict[str, int]


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now, all different (sockets held open until all are chosen)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def profiles_command() -> list[str]:
    script = Path(sys.executable).with_name("profiles")
    return [str(script)] if script.exists() else [sys.executable, "-m", "profiles.cli"]


@pytest.fixture
def suite() -> Iterator[Suite]:
    # Right under /tmp rather than in pytest's directory: as root, PostgreSQL runs as another user
    # that must pass through every parent, and each new pytest session on the machine takes that
    # permission away from pytest's base directory again.
    tmp_path = Path(tempfile.mkdtemp(prefix="profiles-test-", dir="/tmp"))
    data_dir = tmp_path / "data"
    ports = free_ports(2 * len(SERVICE_NAMES) + 2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROFILES_")}
    env["PROFILES_CONSOLE_PORT"] = str(ports[-2])
    env["PROFILES_CONSOLE_METRICS_PORT"] = str(ports[-1])
    env["PROFILES_DATA_DIR"] = str(data_dir)
    grpc_ports = {}
    for index, name in enumerate(SERVICE_NAMES):
        grpc_ports[name] = ports[2 * index]
        env[f"PROFILES_{name.upper()}_PORT"] = str(ports[2 * index])
        env[f"PROFILES_{name.upper()}_METRICS_PORT"] = str(ports[2 * index + 1])
    yield Suite(data_dir, env, grpc_ports)
    # Whatever a failed test left running, nothing outlives it.
    for proc in processes_of(tmp_path):
        proc.kill()
    shutil.rmtree(tmp_path, ignore_errors=True)


def processes_of(directory: Path) -> list[psutil.Process]:
    """Live processes started for directory: PostgreSQL (-D, or its working directory), Redis
    (its socket path) and the services (PROFILES_DATA_DIR in their environment)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
            continue
        try:
            environment = proc.environ().get("PROFILES_DATA_DIR", "")
        except psutil.Error:
            environment = ""
        mentions = [" ".join(proc.info["cmdline"] or []), proc.info["cwd"] or "", environment]
        if any(str(directory) in text for text in mentions):
            found.append(proc)
    return found


@pytest.fixture
async def started_up(suite: Suite) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await start_profiles_up(suite)
    yield process
    if process.returncode is None:
        process.kill()
        await process.wait()


async def start_profiles_up(suite: Suite) -> asyncio.subprocess.Process:
    """Starts `profiles up` and returns once it printed that it is ready."""
    process = await asyncio.create_subprocess_exec(
        *profiles_command(),
        "up",
        env=suite.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await read_until_ready(process)
    return process


async def read_until_ready(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    printed: list[str] = []
    async with asyncio.timeout(START_TIMEOUT):
        while True:
            line = (await process.stdout.readline()).decode()
            if not line:
                assert process.stderr is not None
                errors = (await process.stderr.read()).decode()
                pytest.fail(f"profiles up ended before it was ready:\n{''.join(printed)}{errors}")
            printed.append(line)
            if line.startswith(READY_LINE):
                return "".join(printed)


async def stop(process: asyncio.subprocess.Process) -> int:
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(STOP_TIMEOUT):
        return await process.wait()


async def health_status(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return int(reply.status)


async def test_profiles_up_serves_all_four_services_and_stops_leaving_nothing_behind(
    suite: Suite, started_up: asyncio.subprocess.Process
) -> None:
    for name in SERVICE_NAMES:
        status = await health_status(suite.ports[name])
        assert status == health_pb2.HealthCheckResponse.SERVING, name
    keys_file = suite.data_dir / "keys.json"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(suite.data_dir.stat().st_mode) & 0o066 == 0  # nobody else reads it
    keys = json.loads(keys_file.read_text())
    assert sorted(keys) == ["admin", "read", "sdk"]
    assert all(key.startswith("prf_") for key in keys.values())

    assert len(processes_of(suite.data_dir)) >= 6  # the check below sees what is running
    await check_keys_reach_the_query_service(suite.ports["query"], keys["read"])
    console = f"http://127.0.0.1:{suite.env['PROFILES_CONSOLE_PORT']}"
    with urllib.request.urlopen(f"{console}/healthz", timeout=5) as reply:  # noqa: ASYNC210
        assert reply.status == 200

    assert await stop(started_up) == 0

    assert processes_of(suite.data_dir) == []
    check_call_logs(suite.data_dir / "logs" / "query.log", secret=keys["read"])


async def check_keys_reach_the_query_service(port: int, read_key: str) -> None:
    """The issue's "done when": no key is refused; the printed read key reaches the service."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = query_grpc.QueryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetOverview(query_pb.GetOverviewRequest(), timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        metadata = (("authorization", f"Bearer {read_key}"), ("x-request-id", "req-up-1"))
        code = grpc.StatusCode.OK
        try:
            await stub.GetOverview(query_pb.GetOverviewRequest(), metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as error:  # an RPC whose issue has not landed yet
            code = error.code()
        assert code not in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.INTERNAL,
        )


def check_call_logs(log_file: Path, secret: str) -> None:
    """Each call is one JSON line with rpc, project, request id and latency; no key in sight."""
    text = log_file.read_text()
    assert secret not in text
    calls = [json.loads(line) for line in text.splitlines() if '"rpc_finished"' in line]
    call = next(c for c in calls if c.get("request_id") == "req-up-1")
    assert call["rpc"] == "/profiles.query.v1.QueryService/GetOverview"
    assert call["project_id"]
    assert isinstance(call["latency_ms"], float)


async def test_profiles_up_stops_everything_when_a_service_dies(
    suite: Suite, started_up: asyncio.subprocess.Process
) -> None:
    [query] = [p for p in processes_of(suite.data_dir) if "serve query" in " ".join(p.cmdline())]
    query.kill()

    async with asyncio.timeout(STOP_TIMEOUT):
        _, errors = await started_up.communicate()

    assert started_up.returncode != 0
    assert "query exited" in errors.decode()
    assert processes_of(suite.data_dir) == []


async def test_second_profiles_up_reuses_the_project_and_its_keys(suite: Suite) -> None:
    first = await start_profiles_up(suite)
    keys = (suite.data_dir / "keys.json").read_text()
    assert await stop(first) == 0

    second = await start_profiles_up(suite)
    try:
        listing = await asyncio.create_subprocess_exec(
            *profiles_command(), "project", "list", "--json", env=suite.env,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(STOP_TIMEOUT):
            output, _ = await listing.communicate()
        names = [json.loads(line)["name"] for line in output.decode().splitlines()]
        assert names == ["default"]
        assert (suite.data_dir / "keys.json").read_text() == keys
        assert await health_status(suite.ports["query"]) == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert await stop(second) == 0
    assert processes_of(suite.data_dir) == []


async def test_profiles_up_names_a_taken_port_and_starts_nothing(suite: Suite) -> None:
    taken = suite.ports["query"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        process = await asyncio.create_subprocess_exec(
            *profiles_command(), "up", env=suite.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(STOP_TIMEOUT):
            _, errors = await process.communicate()

    assert process.returncode != 0
    message = errors.decode()
    assert f"query: gRPC port {taken}" in message
    assert "PROFILES_QUERY_PORT=" in message
    assert not (suite.data_dir / "postgres").exists()
    assert processes_of(suite.data_dir) == []
