"""`profiles up` as a user runs it: a subprocess on a temporary data directory and free ports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.query.v1 import query_service_pb2_grpc as query_grpc
from profiles_cli.up import SUITE
from shared.ports import free_ports
from shared.settings import SERVICE_NAMES
from tests.conftest import server_scratch_dir
from tests.support.bytecode import compile_project
from tests.support.ingest import custom_event

READY_LINE = "Profiles is up"
# Generous: a slow CI machine must not fail these tests; nothing here measures time.
START_TIMEOUT = 120
STOP_TIMEOUT = 60


@dataclass(frozen=True, slots=True)
class Suite:
    data_dir: Path
    env: dict[str, str]
    ports: dict[str, int]


def profiles_command() -> list[str]:
    script = Path(sys.executable).with_name("profiles")
    return [str(script)] if script.exists() else [sys.executable, "-m", "profiles_cli.cli"]


def assign_free_ports(env: dict[str, str]) -> dict[str, int]:
    """Sets a free port for every port setting of every process `profiles up` runs; returns
    the gRPC services' ports."""
    ports = iter(free_ports(2 * len(SUITE)))
    for spec in SUITE:
        env[spec.port_env] = str(next(ports))
        env[spec.metrics_port_env] = str(next(ports))
    return {name: int(env[f"PROFILES_{name.upper()}_PORT"]) for name in SERVICE_NAMES}


@pytest.fixture
def suite() -> Iterator[Suite]:
    compile_project()
    tmp_path = server_scratch_dir("profiles-test-")
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROFILES_")}
    env["PROFILES_DATA_DIR"] = str(data_dir)
    # Every process of the suite (the edge and console too) on free ports, never the fixed
    # defaults, which others may hold.
    grpc_ports = assign_free_ports(env)
    yield Suite(data_dir, env, grpc_ports)
    # Whatever a failed test left running, nothing outlives it.
    for proc in processes_of(tmp_path):
        with contextlib.suppress(psutil.NoSuchProcess):  # it may end on its own meanwhile
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
    async with running_up(suite) as process:
        yield process


# What PROFILES_RESTART_DELAY_SECONDS is for `quickly_restarting_up`: five deaths in a row then
# wait 0.05 + 0.1 + 0.2 + 0.4 s for their restarts, not the default 0.5 + 1 + 2 + 4 s.
QUICK_RESTART_DELAY = 0.05


@pytest.fixture
async def quickly_restarting_up(suite: Suite) -> AsyncIterator[asyncio.subprocess.Process]:
    """`profiles up` that starts a dead service again after QUICK_RESTART_DELAY."""
    suite.env["PROFILES_RESTART_DELAY_SECONDS"] = str(QUICK_RESTART_DELAY)
    async with running_up(suite) as process:
        yield process


@contextlib.asynccontextmanager
async def running_up(suite: Suite) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await start_profiles_up(suite)
    try:
        yield process
    finally:
        if process.returncode is None:
            # As Ctrl-C stops it: a SIGKILL would leave its services and databases to the
            # fixture.
            try:
                await stop(process)
            except TimeoutError:
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

    edge = f"http://127.0.0.1:{suite.env['PROFILES_EDGE_PORT']}/healthz"
    assert await asyncio.to_thread(lambda: urllib.request.urlopen(edge, timeout=10).status) == 200
    assert len(processes_of(suite.data_dir)) >= 7  # the check below sees what is running
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


async def run_profiles(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Runs `profiles ARGS` to its end; returns its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        *profiles_command(), *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(STOP_TIMEOUT):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def record_of(suite: Suite) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((suite.data_dir / "up.json").read_text())
    return record


def moved_ports(suite: Suite) -> tuple[dict[str, str], dict[str, int]]:
    """The same data directory, every port moved to another free one."""
    env = dict(suite.env)
    grpc_ports = assign_free_ports(env)
    return env, grpc_ports


async def test_a_second_up_on_the_data_directory_refuses_and_status_and_down_reach_the_first(
    suite: Suite, started_up: asyncio.subprocess.Process
) -> None:
    """The second start touches nothing of the first; from another terminal, `profiles status`
    describes the first and `profiles down` stops it as Ctrl-C would."""
    record_before = (suite.data_dir / "up.json").read_text()
    keys = json.loads((suite.data_dir / "keys.json").read_text())
    running = {p.pid for p in processes_of(suite.data_dir)}
    other_env, other_ports = moved_ports(suite)

    code, _, errors = await run_profiles(other_env, "up")

    assert code != 0
    assert f"pid {started_up.pid}" in errors
    assert f"query {suite.ports['query']}" in errors
    assert "profiles down" in errors
    assert (suite.data_dir / "up.json").read_text() == record_before
    assert {p.pid for p in processes_of(suite.data_dir)} == running
    for port in other_ports.values():
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing of the second started
    for name in SERVICE_NAMES:
        status = await health_status(suite.ports[name])
        assert status == health_pb2.HealthCheckResponse.SERVING, name
    await check_keys_reach_the_query_service(suite.ports["query"], keys["read"])

    code, out, _ = await run_profiles(suite.env, "status")
    assert code == 0
    assert f"pid {started_up.pid}" in out
    for name in SERVICE_NAMES:
        assert f"127.0.0.1:{suite.ports[name]}" in out
    assert out.count("SERVING") == len(SUITE)
    # Where the logs are: the services' folder and each embedded server's own log.
    [logs] = [line for line in out.splitlines() if line.strip().startswith("logs")]
    assert f"logs      {suite.data_dir / 'logs'}/<service>.log; postgres " in logs
    assert "; redis " in logs

    code, out, _ = await run_profiles(suite.env, "down")

    assert code == 0
    assert "Stopped." in out
    async with asyncio.timeout(STOP_TIMEOUT):
        assert await started_up.wait() == 0  # stopped as Ctrl-C stops it
    assert processes_of(suite.data_dir) == []
    assert not (suite.data_dir / "up.json").exists()
    code, _, errors = await run_profiles(suite.env, "status")
    assert code == 1
    assert "no `profiles up` runs on" in errors
    code, out, _ = await run_profiles(suite.env, "down")
    assert code == 0
    assert "nothing to stop" in out


async def test_a_killed_service_is_started_again_and_one_that_keeps_dying_stops_everything(
    suite: Suite, quickly_restarting_up: asyncio.subprocess.Process
) -> None:
    first = record_of(suite)["services"]
    others = {name: first[name]["pid"] for name in SERVICE_NAMES if name != "query"}
    killed = first["query"]["pid"]
    psutil.Process(killed).kill()

    async with asyncio.timeout(START_TIMEOUT):
        while True:
            pid = record_of(suite)["services"]["query"]["pid"]
            if pid != killed and await serving(suite.ports["query"]):
                break
            await asyncio.sleep(0.2)

    assert quickly_restarting_up.returncode is None
    assert {name: record_of(suite)["services"][name]["pid"] for name in others} == others
    keys = json.loads((suite.data_dir / "keys.json").read_text())
    await check_keys_reach_the_query_service(suite.ports["query"], keys["read"])
    assert '"service_exited"' in (suite.data_dir / "logs" / "query.log").read_text()

    # Four more deaths within the minute: restarting will not help, everything stops.
    for _ in range(4):
        killed = await next_pid_of(suite, "query", after=killed)
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(killed).kill()
    async with asyncio.timeout(STOP_TIMEOUT):
        _, errors_bytes = await quickly_restarting_up.communicate()

    errors = errors_bytes.decode()
    assert quickly_restarting_up.returncode == 1
    assert f"query exited (killed by SIGKILL); restarting it in {QUICK_RESTART_DELAY} s" in errors
    assert "query died 5 times within 60 s" in errors
    assert str(suite.data_dir / "logs" / "query.log") in errors
    assert processes_of(suite.data_dir) == []


async def test_a_killed_embedded_postgres_or_redis_is_started_again_and_status_names_it_down(
    suite: Suite, started_up: asyncio.subprocess.Process
) -> None:
    """kill -9 of the embedded PostgreSQL, then of the embedded Redis: `profiles status` says
    which one is down and exits non-zero; `profiles up` starts it again on the same data and
    socket (reaping a dead Redis: no zombie), and the suite serves again.

    While a server is down and `profiles status` runs, the supervisor is stopped (SIGSTOP), so
    that its restart cannot win the race against the check; it notices the death once it
    continues (SIGCONT)."""
    keys = json.loads((suite.data_dir / "keys.json").read_text())
    supervisor = psutil.Process(started_up.pid)
    servers = record_of(suite)["servers"]
    assert servers["postgres"]["embedded"]
    assert servers["redis"]["embedded"]

    # PostgreSQL: its crash recovery runs on the restart, which waits for it.
    killed_postgres = server_pid(suite, "postgres")
    assert servers["postgres"]["pid"] == killed_postgres
    with supervisor_paused(supervisor):
        os.kill(killed_postgres, signal.SIGKILL)
        await gone(killed_postgres)
        await check_status_names_a_server_down(suite, "PostgreSQL", "postgres")
    restarted_postgres = await next_server_pid(suite, "postgres", after=killed_postgres)
    assert server_pid(suite, "postgres") == restarted_postgres
    await wait_until_serving_again(suite, keys, "after-postgres", installs=1)
    await check_status_serving(suite)

    # Redis: a child of `profiles up`; dead, it stays a zombie until `profiles up` reaps it.
    killed_redis = server_pid(suite, "redis")
    assert servers["redis"]["pid"] == killed_redis
    with supervisor_paused(supervisor):
        os.kill(killed_redis, signal.SIGKILL)
        await gone(killed_redis)
        await check_status_names_a_server_down(suite, "Redis", "redis")
    async with asyncio.timeout(START_TIMEOUT):
        while True:
            if not psutil.pid_exists(killed_redis):  # reaped, not left a zombie
                break
            await asyncio.sleep(0.1)
    restarted_redis = await next_server_pid(suite, "redis", after=killed_redis)
    assert server_pid(suite, "redis") == restarted_redis
    await wait_until_serving_again(suite, keys, "after-redis", installs=2)
    await check_status_serving(suite)

    assert [c.pid for c in supervisor.children() if c.status() == psutil.STATUS_ZOMBIE] == []
    assert started_up.returncode is None
    assert await stop(started_up) == 0
    assert started_up.stdout is not None
    assert started_up.stderr is not None
    printed = (await started_up.stdout.read()).decode()
    errors = (await started_up.stderr.read()).decode()
    assert f"PostgreSQL is gone (pid {killed_postgres}); restarting it in 0.5 s" in errors
    assert f"Redis is gone (pid {killed_redis}); restarting it in 0.5 s" in errors
    assert f"Restarted PostgreSQL (pid {restarted_postgres})." in printed
    assert f"Restarted Redis (pid {restarted_redis})." in printed
    assert processes_of(suite.data_dir) == []


def server_pid(suite: Suite, key: str) -> int:
    """The pid in the pid file of the data directory's embedded PostgreSQL or Redis."""
    if key == "postgres":
        return int((suite.data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
    return int((suite.data_dir / "redis" / "redis.pid").read_text().strip())


async def next_server_pid(suite: Suite, key: str, after: int) -> int:
    """The pid of the server `profiles up` started for key after the one with pid `after`, as
    its record has it."""
    async with asyncio.timeout(START_TIMEOUT):
        while True:
            servers = record_of(suite).get("servers", {})
            pid = int(servers.get(key, {}).get("pid", after))
            if pid not in (after, 0):  # 0: waiting to be started again
                return pid
            await asyncio.sleep(0.05)


@contextlib.contextmanager
def supervisor_paused(supervisor: psutil.Process) -> Iterator[None]:
    supervisor.suspend()
    try:
        yield
    finally:
        supervisor.resume()


def ended(pid: int) -> bool:
    """True once pid has ended: it is gone, or a zombie, whose reaping is its parent's business
    (init's, for a killed `profiles up`'s services: on some machines seconds later)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def gone(pid: int) -> None:
    """Waits until pid has ended (a zombie has: only its parent's wait() is left)."""
    async with asyncio.timeout(STOP_TIMEOUT):
        while True:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    return
            except psutil.NoSuchProcess:
                return
            await asyncio.sleep(0.05)


async def check_status_names_a_server_down(suite: Suite, name: str, key: str) -> None:
    code, out, errors = await run_profiles(suite.env, "status")
    assert code == 1, out
    header, *lines = out.splitlines()
    assert "not serving (" in header
    assert f"{name} DOWN)" in header  # the servers come after the services
    [line] = [line for line in lines if line.strip().startswith(key)]
    assert "DOWN" in line
    for service in SERVICE_NAMES:  # up themselves: their health does not see the server
        [line] = [line for line in lines if line.strip().startswith(service)]
        assert "SERVING" in line
    assert f"profiles status: {name} does not answer" in errors
    assert "starts it again by itself" in errors
    assert f"profiles down --data-dir {suite.data_dir}" in errors


async def check_status_serving(suite: Suite) -> None:
    code, out, errors = await run_profiles(suite.env, "status")
    assert code == 0, out + errors
    assert ": serving" in out
    for key in ("postgres", "redis"):
        [line] = [line for line in out.splitlines() if line.strip().startswith(key)]
        assert " OK " in line


async def wait_until_serving_again(
    suite: Suite, keys: dict[str, str], installation: str, installs: int
) -> None:
    """Until an event of a new installation is accepted (PostgreSQL) and counted in GetOverview
    (the query service's rollups, which read it from the Redis stream): `installs` in all."""
    sdk = (("authorization", f"Bearer {keys['sdk']}"),)
    read = (("authorization", f"Bearer {keys['read']}"),)
    event = custom_event(installation, time=datetime.now(UTC))
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{suite.ports['ingest']}") as ingest_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{suite.ports['query']}") as query_channel,
        asyncio.timeout(START_TIMEOUT),
    ):
        ingest = ingest_grpc.IngestServiceStub(ingest_channel)
        query = query_grpc.QueryServiceStub(query_channel)
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                request = ingest_pb.TrackEventsRequest(events=[event])
                reply = await ingest.TrackEvents(request, metadata=sdk, timeout=10)
                if reply.accepted_count + reply.duplicate_count == 1:
                    break
            await asyncio.sleep(0.2)
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                request = query_pb.GetOverviewRequest()
                answer = await query.GetOverview(request, metadata=read, timeout=10)
                if answer.overview.install_count == installs:
                    break
            await asyncio.sleep(0.2)


async def next_pid_of(suite: Suite, name: str, after: int) -> int:
    """The pid of the process `profiles up` started for name after the one with pid `after`."""
    async with asyncio.timeout(START_TIMEOUT):
        while True:
            pid = int(record_of(suite)["services"][name]["pid"])
            if pid not in (after, 0):  # 0: waiting to be started again
                return pid
            await asyncio.sleep(0.05)


async def serving(port: int) -> bool:
    try:
        return await health_status(port) == health_pb2.HealthCheckResponse.SERVING
    except grpc.aio.AioRpcError:
        return False


async def test_the_start_after_a_killed_profiles_up_stops_what_it_left_and_starts(
    suite: Suite,
) -> None:
    killed = await start_profiles_up(suite)
    left = record_of(suite)
    killed.kill()  # SIGKILL: no shutdown; services, PostgreSQL and Redis stay behind
    await killed.wait()
    assert processes_of(suite.data_dir) != []

    process = await asyncio.create_subprocess_exec(
        *profiles_command(), "up", env=suite.env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await read_until_ready(process)
        assert await health_status(suite.ports["query"]) == health_pb2.HealthCheckResponse.SERVING
        assert record_of(suite)["pid"] == process.pid
        for name in SERVICE_NAMES:
            assert ended(left["services"][name]["pid"]), name
    finally:
        assert await stop(process) == 0
    assert process.stderr is not None
    errors = (await process.stderr.read()).decode()
    assert f"(pid {left['pid']}) is gone; stopped what it left running" in errors
    assert "PostgreSQL" in errors
    assert "Redis" in errors
    assert processes_of(suite.data_dir) == []


async def test_status_names_what_a_killed_profiles_up_left_and_down_stops_it(
    suite: Suite,
) -> None:
    killed = await start_profiles_up(suite)
    left = record_of(suite)
    killed.kill()  # SIGKILL: no shutdown; services, PostgreSQL and Redis stay behind
    await killed.wait()
    assert processes_of(suite.data_dir) != []

    code, _, errors = await run_profiles(suite.env, "status")

    assert code == 1
    assert f"(pid {left['pid']}) was killed and left running" in errors
    assert f"query (pid {left['services']['query']['pid']})" in errors
    assert "PostgreSQL" in errors
    assert "Redis" in errors
    assert "`profiles down" in errors

    code, out, errors = await run_profiles(suite.env, "down")

    assert code == 0, errors
    assert "nothing to stop" not in out
    assert "PostgreSQL" in out
    assert processes_of(suite.data_dir) == []
    assert not (suite.data_dir / "up.json").exists()
    code, out, _ = await run_profiles(suite.env, "down")
    assert code == 0
    assert "nothing to stop" in out


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


async def test_profiles_up_names_the_taken_ports_and_starts_nothing(suite: Suite) -> None:
    taken = suite.ports["query"]
    edge_metrics = int(suite.env["PROFILES_EDGE_METRICS_PORT"])
    with socket.socket() as squatter, socket.socket() as other:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        other.bind(("127.0.0.1", edge_metrics))
        other.listen()
        process = await asyncio.create_subprocess_exec(
            *profiles_command(), "up", env=suite.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(STOP_TIMEOUT):
            _, errors = await process.communicate()

    assert process.returncode != 0
    message = errors.decode()
    assert f"query: gRPC port {taken}" in message
    assert f"edge: metrics port {edge_metrics}" in message
    # One command moves both, on the same data directory.
    [advice] = [line for line in message.splitlines() if "e.g.:" in line]
    assert "PROFILES_QUERY_PORT=" in advice
    assert "PROFILES_EDGE_METRICS_PORT=" in advice
    assert advice.endswith(f"profiles up --data-dir {suite.data_dir}")
    assert not (suite.data_dir / "postgres").exists()
    assert processes_of(suite.data_dir) == []


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--data-dir", "{a_file}"], "--data-dir {a_file} is a file"),
        (["--data-dir", "{a_file}/below"], "cannot create --data-dir {a_file}/below"),
        (["--redis-url", "redis://127.0.0.1:{nowhere}"], "Redis at redis://127.0.0.1:{nowhere}"),
        (["--database-url", "postgresql://u:pw@127.0.0.1:{nowhere}/p"], "PostgreSQL at"),
    ],
)
async def test_profiles_up_with_a_bad_flag_says_so_in_one_line_and_starts_nothing(
    suite: Suite, flags: list[str], expected: str
) -> None:
    a_file = suite.data_dir.parent / "a-file"
    a_file.write_text("")
    [nowhere] = free_ports(1)
    given = [flag.format(a_file=a_file, nowhere=nowhere) for flag in flags]

    code, _, errors = await run_profiles(suite.env, "up", *given)

    assert code != 0
    assert "Traceback" not in errors
    [line] = errors.strip().splitlines()
    assert expected.format(a_file=a_file, nowhere=nowhere) in line
    assert flags[0] in line
    assert processes_of(suite.data_dir.parent) == []


async def test_a_refused_profiles_up_leaves_no_lock_and_a_dead_holders_lock_blocks_nothing(
    suite: Suite,
) -> None:
    """The lock file is there only while held: a refused start leaves none. One a killed
    command left behind does not stop the next start, and a record a killed `profiles up` left
    is not taken for the command that holds the lock now."""
    lock = suite.data_dir / "up.lock"
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", suite.ports["query"]))
        squatter.listen()

        code, _, errors = await run_profiles(suite.env, "up")
        assert code == 1
        assert f"query: gRPC port {suite.ports['query']}" in errors
        assert not lock.exists()
        assert not (suite.data_dir / "up.json").exists()

        # Another command holds the directory; the record of a `profiles up` that is gone lies
        # there too.
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c",
            "import sys, time; from pathlib import Path; from profiles_cli.suite import take_lock;"
            " lock = take_lock(Path(sys.argv[1])); print(lock is not None, flush=True);"
            " time.sleep(600)",
            str(suite.data_dir), stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert holder.stdout is not None
            assert (await holder.stdout.readline()).strip() == b"True"
            gone = await asyncio.create_subprocess_exec("true")
            await gone.wait()
            stale = {"pid": gone.pid, "create_time": 1.0, "data_dir": str(suite.data_dir),
                     "state": "serving", "services": {}, "servers": {}}  # fmt: skip
            (suite.data_dir / "up.json").write_text(json.dumps(stale))

            code, _, errors = await run_profiles(suite.env, "up")
            assert code == 1
            assert "another `profiles` command holds" in errors
            assert f"pid {gone.pid}" not in errors
            assert lock.exists()  # the holder's: a refusal leaves it alone
        finally:
            holder.kill()  # no release: its lock file stays behind, free
            await holder.wait()
        (suite.data_dir / "up.json").unlink()
        assert lock.exists()

        code, _, errors = await run_profiles(suite.env, "up")
        assert code == 1
        assert f"query: gRPC port {suite.ports['query']}" in errors  # got past the lock
        assert not lock.exists()
    assert processes_of(suite.data_dir) == []


async def start_up_in_own_session(suite: Suite) -> asyncio.subprocess.Process:
    """`profiles up` as a terminal runs it: its own process group, which a Ctrl-C there signals
    whole (initdb and pg_ctl, run in the foreground, included)."""
    return await asyncio.create_subprocess_exec(
        *profiles_command(), "up", env=suite.env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip


async def first_initdb(suite: Suite) -> psutil.Process:
    """The initdb of the first start on the suite's data directory, once it runs."""
    async with asyncio.timeout(START_TIMEOUT):
        while True:
            for proc in psutil.process_iter(["name", "cmdline"]):
                if proc.info["name"] == "initdb" and str(suite.data_dir) in " ".join(
                    proc.info["cmdline"] or []
                ):
                    return proc
            await asyncio.sleep(0.01)


async def test_ctrl_c_during_the_first_initdb_is_one_line_and_exit_130_and_the_next_up_starts(
    suite: Suite,
) -> None:
    process = await start_up_in_own_session(suite)
    await first_initdb(suite)

    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in its terminal
    async with asyncio.timeout(STOP_TIMEOUT):
        _, errors_bytes = await process.communicate()

    errors = errors_bytes.decode()
    assert process.returncode == 130
    assert errors.strip().splitlines() == [
        "profiles up: interrupted (Ctrl-C) while starting; nothing is left running"
    ]
    assert processes_of(suite.data_dir) == []
    assert not (suite.data_dir / "up.lock").exists()
    second = await start_profiles_up(suite)
    assert await stop(second) == 0
    assert processes_of(suite.data_dir) == []


async def test_a_first_cluster_cut_short_by_an_interrupt_is_removed_and_the_next_up_makes_it(
    suite: Suite,
) -> None:
    """An initdb that dies without cleaning up after itself (a signal it does not catch), as
    the start is interrupted: its half-made cluster (PG_VERSION, no more) must not make the next
    start fail."""
    process = await start_up_in_own_session(suite)
    initdb = await first_initdb(suite)
    async with asyncio.timeout(START_TIMEOUT):
        while True:
            if (suite.data_dir / "postgres" / "PG_VERSION").exists():
                break
            await asyncio.sleep(0.01)

    process.send_signal(signal.SIGINT)  # `profiles up` only
    await asyncio.sleep(0.2)  # for its handler to note the interrupt before initdb dies
    for proc in [initdb, *initdb.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    async with asyncio.timeout(STOP_TIMEOUT):
        await process.communicate()

    assert process.returncode == 130
    assert not (suite.data_dir / "postgres" / "PG_VERSION").exists()
    second = await start_profiles_up(suite)
    assert await stop(second) == 0
    assert processes_of(suite.data_dir) == []
