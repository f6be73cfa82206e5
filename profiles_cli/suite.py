"""What a running `profiles up` leaves in its data directory, and how other commands use it.

    <data dir>/up.lock   held (flock) by the one `profiles up` that owns the directory (or
                         a command using its database meanwhile); there only while held
    <data dir>/up.json   its record: pid, each service's address, ports, health check and log;
                         where its PostgreSQL and Redis are (URLs without passwords)
    <data dir>/restart/<service>
                         `profiles restart <service>` asks the running `profiles up` to
                         restart that service (an empty file; `profiles up` takes it away)

The lock decides ownership: the kernel releases it when its holder dies, however it dies, so a
second `profiles up` can tell a running owner (lock held: refuse) from a killed one (lock free,
record left behind: clean up after it). The record is what `profiles status`, `profiles down`
and the commands that call the services read to find the suite; it names every service the same
way, whatever its protocol, so a new service is one more entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import http.client
import json
import os
import shlex
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import urlsplit

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

HealthKind = Literal["grpc", "http"]
HEALTH_GRPC: HealthKind = "grpc"  # grpc.health.v1.Health/Check with service ""
HEALTH_HTTP: HealthKind = "http"  # GET /healthz answering 200

RECORD_FILE = "up.json"
LOCK_FILE = "up.lock"
RESTART_DIR = "restart"
SERVING = "SERVING"

# How long `profiles up` waits for a service it started to serve; and, on top of the services'
# own grace period, for one it asked to stop before it kills it. Here, not in profiles_cli.up,
# so that `profiles restart`, which waits as long, does not load what the supervisor needs.
READY_TIMEOUT_SECONDS = 60.0
KILL_AFTER_EXTRA_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    """One service of a running suite, as other commands reach it."""

    address: str  # host:port a client on this machine connects to
    port: int
    metrics_port: int  # 0: off
    health: HealthKind
    pid: int  # 0 while it waits to be started again
    log: str


@dataclass(frozen=True, slots=True)
class ServerRecord:
    """The PostgreSQL or the Redis of a running suite, as `profiles status` checks it."""

    url: str  # without its password (`redact`): the record is no place for secrets
    embedded: bool  # started (and restarted) by `profiles up` in its data directory
    pid: int  # of an embedded server; 0 for a given one, or while it waits to be started again
    log: str  # an embedded server's own log; empty for a given one


# The servers of a record, by key, as messages name them.
SERVER_NAMES = {"postgres": "PostgreSQL", "redis": "Redis"}


@dataclass(frozen=True, slots=True)
class RunRecord:
    """The record of one `profiles up`, rewritten when a service or server restarts."""

    pid: int
    create_time: float  # of the pid's process: a reused pid does not pass for the suite
    data_dir: str
    state: str  # "starting" until every service serves, then "serving"
    services: dict[str, ServiceRecord] = field(default_factory=dict)
    # "postgres" and "redis", once they run (a record of an older `profiles up` has none)
    servers: dict[str, ServerRecord] = field(default_factory=dict)

    def ports_text(self) -> str:
        """`ports ingest 50051, identity 50052, ...`: what a person needs to recognise the
        suite (`still starting` before its services are)."""
        if not self.services:
            return "still starting"
        return "ports " + ", ".join(f"{name} {s.port}" for name, s in self.services.items())

    def addresses(self) -> dict[str, str]:
        return {name: s.address for name, s in self.services.items()}

    def is_alive(self) -> bool:
        """True while the `profiles up` that wrote this record runs."""
        try:
            process = psutil.Process(self.pid)
            return (
                process.status() != psutil.STATUS_ZOMBIE
                and abs(process.create_time() - self.create_time) < 1.0
            )
        except psutil.Error:
            return False


def record_path(data_dir: Path) -> Path:
    return data_dir / RECORD_FILE


def read_record(data_dir: Path) -> RunRecord | None:
    """The record in data_dir, or None when there is none (or it cannot be read)."""
    try:
        raw: dict[str, Any] = json.loads(record_path(data_dir).read_text())
        services = {name: ServiceRecord(**s) for name, s in raw.pop("services").items()}
        servers = {name: ServerRecord(**s) for name, s in raw.pop("servers", {}).items()}
        return RunRecord(**raw, services=services, servers=servers)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def write_record(data_dir: Path, record: RunRecord) -> None:
    """Replaces the record atomically: a reader sees the old one or the new one, never half."""
    path = record_path(data_dir)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(asdict(record), indent=2) + "\n")
    os.replace(temporary, path)


def remove_record(data_dir: Path) -> None:
    record_path(data_dir).unlink(missing_ok=True)


def live_record(data_dir: Path) -> RunRecord | None:
    """The record of the suite running on data_dir now, if one does."""
    record = read_record(data_dir)
    return record if record is not None and record.is_alive() else None


def request_restart(data_dir: Path, service: str) -> None:
    """Asks the `profiles up` of data_dir to restart `service` (it looks every round, 0.2 s).
    A file rather than a signal: a signal `profiles up` did not expect would end it."""
    directory = data_dir / RESTART_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    (directory / service).touch()


def take_restart_request(data_dir: Path, service: str) -> bool:
    """True once for each request to restart `service` (it is taken away)."""
    try:
        (data_dir / RESTART_DIR / service).unlink()
    except FileNotFoundError:
        return False
    return True


def clear_restart_requests(data_dir: Path) -> None:
    """Forgets requests no `profiles up` took (one made as the last one stopped): a start
    restarts nothing it did not start."""
    directory = data_dir / RESTART_DIR
    with contextlib.suppress(FileNotFoundError):
        for request in directory.iterdir():
            request.unlink(missing_ok=True)


def take_lock(data_dir: Path) -> IO[bytes] | None:
    """The open, locked lock file of data_dir, or None when another `profiles up` holds it.

    Keep the returned file open for as long as the suite runs; `release_lock` (or dying)
    releases the lock. It is close-on-exec, so the services and databases started later do not
    inherit it and a killed supervisor cannot leave it held by an orphan. A lock file a killed
    holder left behind is free (the kernel released it) and is taken like a new one.
    """
    path = data_dir / LOCK_FILE
    while True:
        lock = path.open("ab")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return None
        # The holder before us removes the file as it lets go (`release_lock`): the file we
        # opened before that is no longer the lock, and another command may hold the new one.
        if _same_file(path, lock):
            return lock
        lock.close()


def _same_file(path: Path, opened: IO[bytes]) -> bool:
    try:
        named, held = path.stat(), os.fstat(opened.fileno())
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def check_health(kind: HealthKind, address: str, timeout: float = 2.0) -> str:
    """SERVING, another health status name, or what went wrong reaching address."""
    if kind == HEALTH_HTTP:
        return _http_health(address, timeout)
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as error:
            return str(error.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _http_health(address: str, timeout: float) -> str:
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=timeout) as reply:
            return SERVING if reply.status == 200 else f"HTTP {reply.status}"
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}"
    except (urllib.error.URLError, OSError):
        return "UNAVAILABLE"
    except http.client.HTTPException:  # not an HTTP server at all (a gRPC port)
        return "NOT HTTP"


def server_url(server: ServerRecord, given: str) -> str | None:
    """Where to reach a recorded server: its URL, unless the record left a password out of it;
    then `given` (this command's PROFILES_DATABASE_URL or PROFILES_REDIS_URL) if it names the
    same server; else None (it cannot be checked from here)."""
    from profiles_cli.preflight import redact

    if given and redact(given) == server.url:
        return given
    return None if urlsplit(server.url).password == "***" else server.url


# A server's health as `profiles status` prints it (a service's is SERVING or another name).
SERVER_OK = "OK"  # it answered a connection and `SELECT 1`, or PING
SERVER_DOWN = "DOWN"
SERVER_UNCHECKED = "UNCHECKED"  # a given server whose password the record leaves out


async def server_health(
    servers: dict[str, ServerRecord], given: dict[str, str]
) -> dict[str, tuple[str, str]]:
    """For each recorded server, its health and why (empty when OK). `given` holds this
    command's own URLs by server key."""
    from profiles_cli.preflight import postgres_problem, redis_problem

    async def check(key: str, server: ServerRecord) -> tuple[str, str]:
        url = server_url(server, given.get(key, ""))
        if url is None:
            variable = "PROFILES_DATABASE_URL" if key == "postgres" else "PROFILES_REDIS_URL"
            return SERVER_UNCHECKED, f"its password is not in the record; set {variable} for it"
        why = await (postgres_problem(url) if key == "postgres" else redis_problem(url))
        return (SERVER_OK, "") if why is None else (SERVER_DOWN, why)

    keys = list(servers)
    answers = await asyncio.gather(*(check(key, servers[key]) for key in keys))
    return dict(zip(keys, answers, strict=True))


# What the process of an embedded server is doing, as `profiles status` tells it apart: only a
# server whose process is gone is started again by `profiles up`.
PROCESS_GONE = "gone"
PROCESS_STOPPED = "stopped"  # SIGSTOP (or a debugger): alive, answering nothing
PROCESS_RUNNING = "running"


def embedded_server_process(data_dir: Path, key: str) -> tuple[str, int]:
    """What the process of data_dir's embedded PostgreSQL or Redis (`key`) is doing, and its
    pid (0 when gone), found as `profiles up` finds it: by its pid file."""
    from profiles_cli.datadir import DataDir
    from shared.embedded import EmbeddedPostgres, EmbeddedRedis

    directory = DataDir(data_dir)
    server = EmbeddedPostgres(directory.postgres) if key == "postgres" else None
    pid = (server or EmbeddedRedis(directory.redis)).pid()
    if pid is None:
        return PROCESS_GONE, 0
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return PROCESS_GONE, 0
    except psutil.Error:  # not ours to read: it is there, and nothing says it is stopped
        return PROCESS_RUNNING, pid
    if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
        return PROCESS_STOPPED, pid
    if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
        return PROCESS_GONE, 0
    return PROCESS_RUNNING, pid


def release_lock(lock: IO[bytes] | None) -> None:
    """Removes the lock file, while still holding it (so the file is gone when the lock is, and
    a command left waiting on the old file knows to take a new one), then lets go of it."""
    if lock is not None:
        with contextlib.suppress(OSError):
            os.unlink(lock.name)
        with contextlib.suppress(OSError):
            lock.close()


# A service asked to stop gets this long (on top of nothing: it was left alone) before a kill.
LEFTOVER_STOP_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Leftovers:
    """What a killed `profiles up` left running on its data directory: its services (each
    checked to be that service of that directory, not a reused pid), Redis and PostgreSQL."""

    pid: int  # of the `profiles up` that is gone
    services: tuple[tuple[str, psutil.Process], ...]
    redis: bool
    postgres: bool

    def names(self) -> list[str]:
        """`ingest (pid 12)`, ..., `Redis`, `PostgreSQL`: empty when nothing is left."""
        names = [f"{name} (pid {process.pid})" for name, process in self.services]
        return names + ["Redis"] * self.redis + ["PostgreSQL"] * self.postgres


def find_leftovers(data_dir: Path) -> Leftovers | None:
    """What the `profiles up` of data_dir's record left running, when that `profiles up` is gone;
    None when there is no record or its `profiles up` still runs. Reads only; stops nothing."""
    from profiles_cli.datadir import DataDir
    from shared.embedded import EmbeddedPostgres, EmbeddedRedis

    record = read_record(data_dir)
    if record is None or record.is_alive():
        return None
    services = tuple(
        (name, process)
        for name, service in record.services.items()
        if (process := _orphaned_service(service.pid, name, data_dir)) is not None
    )
    directory = DataDir(data_dir)
    return Leftovers(
        pid=record.pid,
        services=services,
        redis=EmbeddedRedis(directory.redis).is_running(),
        postgres=EmbeddedPostgres(directory.postgres).is_running(),
    )


def stop_leftovers(data_dir: Path, leftovers: Leftovers) -> list[str]:
    """Stops what a killed `profiles up` left (services first, then Redis and PostgreSQL, as a
    shutdown does) and removes its record; returns what was stopped. Call it holding the lock
    (`take_lock`), so that no `profiles up` starts on the directory meanwhile."""
    from profiles_cli.datadir import DataDir
    from shared.embedded import EmbeddedPostgres, EmbeddedRedis

    processes = [process for _, process in leftovers.services]
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    for process in _running_after(processes, LEFTOVER_STOP_SECONDS):
        with contextlib.suppress(psutil.Error):
            process.kill()
    directory = DataDir(data_dir)
    if leftovers.redis:
        EmbeddedRedis(directory.redis).stop()
    if leftovers.postgres:
        EmbeddedPostgres(directory.postgres).stop()
    remove_record(data_dir)
    return leftovers.names()


def _running_after(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of processes (not our children) still running once all ended or timeout passed.
    A zombie has ended: an orphan's new parent, init, reaps it when it gets to it, on some
    machines seconds later (psutil.wait_procs would wait for that)."""
    deadline = time.monotonic() + timeout
    while True:
        running = [process for process in processes if _runs(process)]
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(0.02)


def _runs(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _orphaned_service(pid: int, name: str, data_dir: Path) -> psutil.Process | None:
    """The process of service `name` a killed `profiles up` on data_dir left running, if pid is
    still that process (and not a reused pid)."""
    if pid <= 0:  # a service that was waiting to be started again
        return None
    try:
        process = psutil.Process(pid)
        command = process.cmdline()
        environment = process.environ()
    except psutil.Error:
        return None
    if name not in command or environment.get("PROFILES_DATA_DIR") != str(data_dir):
        return None
    return process


def data_dir_flag(data_dir: Path) -> str:
    """` --data-dir DIR` for the commands a message suggests, empty for the default directory."""
    from shared.settings import Settings

    if data_dir == Settings().data_dir:
        return ""
    return f" --data-dir {shlex.quote(str(data_dir))}"
