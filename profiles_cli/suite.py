"""What a running `profiles up` leaves in its data directory, and how other commands use it.

    <data dir>/up.lock   held (flock) by the one `profiles up` that owns the directory
    <data dir>/up.json   its record: pid, each service's address, ports, health check and log

The lock decides ownership: the kernel releases it when its holder dies, however it dies, so a
second `profiles up` can tell a running owner (lock held: refuse) from a killed one (lock free,
record left behind: clean up after it). The record is what `profiles status`, `profiles down`
and the commands that call the services read to find the suite; it names every service the same
way, whatever its protocol, so a new service is one more entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

HealthKind = Literal["grpc", "http"]
HEALTH_GRPC: HealthKind = "grpc"  # grpc.health.v1.Health/Check with service ""
HEALTH_HTTP: HealthKind = "http"  # GET /healthz answering 200

RECORD_FILE = "up.json"
LOCK_FILE = "up.lock"
SERVING = "SERVING"


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
class RunRecord:
    """The record of one `profiles up`, rewritten when a service restarts."""

    pid: int
    create_time: float  # of the pid's process: a reused pid does not pass for the suite
    data_dir: str
    state: str  # "starting" until every service serves, then "serving"
    services: dict[str, ServiceRecord] = field(default_factory=dict)

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
        return RunRecord(**raw, services=services)
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


def take_lock(data_dir: Path) -> IO[bytes] | None:
    """The open, locked lock file of data_dir, or None when another `profiles up` holds it.

    Keep the returned file open for as long as the suite runs; closing it (or dying) releases
    the lock. It is close-on-exec, so the services and databases started later do not inherit it
    and a killed supervisor cannot leave it held by an orphan.
    """
    lock = (data_dir / LOCK_FILE).open("ab")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


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


def release_lock(lock: IO[bytes] | None) -> None:
    if lock is not None:
        with contextlib.suppress(OSError):
            lock.close()
