"""`profiles up`: the whole suite on one machine, from pip packages only.

Order matters on the way up and, reversed, on the way down: ports are checked before anything
starts (so a taken port costs nothing to undo), then PostgreSQL and Redis, migrations and the
default project, then the four services as child processes, each in its own session so that a
Ctrl-C in the terminal reaches only this supervisor, which stops the services before the
databases they are still using.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from profiles.datadir import DataDir
from shared.db import create_pool, migrate
from shared.embedded import EmbeddedPostgres, EmbeddedRedis
from shared.logging import configure_logging
from shared.settings import SERVICE_NAMES, Settings
from shared.tenancy import ROLES, ProjectNameTaken, TenancyRepository

DEFAULT_PROJECT = "default"
READY_TIMEOUT_SECONDS = 60.0
# On top of the services' own grace period, before they are killed.
KILL_AFTER_EXTRA_SECONDS = 5.0
_LOOPBACK_ALIASES = {"", "0.0.0.0", "::", "[::]"}
# Short reconnect backoff: the default (1 s, growing) would add seconds to every start-up.
_PROBE_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 250),
]


class StartupFailed(Exception):
    """Something `profiles up` needs did not come up; the message says what and why."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived while starting."""


@dataclass(frozen=True, slots=True)
class TakenPort:
    service: str
    kind: str  # "gRPC" or "metrics"
    port: int
    env: str

    def advice(self, bind_address: str) -> str:
        other = suggest_port(bind_address, self.port)
        off = " (0 turns metrics off)" if self.kind == "metrics" else ""
        return (
            f"{self.service}: {self.kind} port {self.port} on {bind_address} is already in use."
            f" Choose another with {self.env}{off}, e.g.: {self.env}={other} profiles up"
        )


@dataclass(slots=True)
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path


def port_is_free(host: str, port: int) -> bool:
    """True if a server could listen on host:port now (SO_REUSEADDR, as gRPC binds)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            return False
    return True


def suggest_port(host: str, taken: int) -> int:
    """A free port to offer instead: taken + 10000 when free (easy to remember), else any."""
    if taken + 10000 <= 65535 and port_is_free(host, taken + 10000):
        return taken + 10000
    with socket.socket() as sock:
        sock.bind((probe_host(host), 0))
        port: int = sock.getsockname()[1]
        return port


def taken_ports(settings: Settings) -> list[TakenPort]:
    """Every configured port some other process (or another service of ours) already has."""
    wanted: list[TakenPort] = []
    for name in SERVICE_NAMES:
        upper = name.upper()
        wanted.append(TakenPort(name, "gRPC", settings.ports[name], f"PROFILES_{upper}_PORT"))
        metrics = settings.metrics_ports[name]
        if metrics:  # 0 turns the metrics server off
            wanted.append(TakenPort(name, "metrics", metrics, f"PROFILES_{upper}_METRICS_PORT"))
    wanted += _console_ports(settings)
    taken, seen = [], set()
    for candidate in wanted:
        if candidate.port in seen or not port_is_free(settings.bind_address, candidate.port):
            taken.append(candidate)
        seen.add(candidate.port)
    return taken


def probe_host(bind_address: str) -> str:
    """Where this machine reaches a server bound to bind_address."""
    return "127.0.0.1" if bind_address in _LOOPBACK_ALIASES else bind_address


def endpoint(bind_address: str, port: int) -> str:
    host = probe_host(bind_address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def bootstrap(database_url: str, data_dir: DataDir) -> dict[str, str] | None:
    """Migrates; on first run creates the default project with one key per role, stores the
    plain keys in the data directory and returns them (None on later runs)."""
    await migrate(database_url)
    if data_dir.has_keys():
        return None
    pool = await create_pool(database_url, max_size=2)
    try:
        tenancy = TenancyRepository(pool)
        try:
            project = await tenancy.create_project(DEFAULT_PROJECT)
        except ProjectNameTaken:
            # An external database that already has it: this data directory gets keys of its own.
            project = await tenancy.get_project_by_name(DEFAULT_PROJECT)
        keys = {}
        for role in ROLES:
            issued = await tenancy.create_key(project.project_id, role, f"profiles up ({role})")
            keys[role] = issued.plain_key
    finally:
        await pool.close()
    data_dir.write_keys(keys)
    return keys


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Supervisor:
    """Runs the suite until a signal (exit 0) or until a service dies (exit 1)."""

    def __init__(self, settings: Settings, out: IO[str] = sys.stdout) -> None:
        self._settings = settings
        self._data_dir = DataDir(settings.data_dir)
        self._out = out
        self._stop = threading.Event()
        self._postgres: EmbeddedPostgres | None = None
        self._redis: EmbeddedRedis | None = None
        self._children: list[Child] = []

    def run(self) -> int:
        self._install_signal_handlers()
        taken = taken_ports(self._settings)
        if taken:
            for port in taken:
                self._error(port.advice(self._settings.bind_address))
            return 1
        try:
            settings = self._start_databases(self._settings)
            new_keys = self._bootstrap(settings)
            settings = settings.with_changes(
                internal_token=settings.internal_token or self._data_dir.internal_token()
            )
            self._start_services(settings)
            self._wait_until_serving(settings)
            self._print_ready(settings, new_keys)
            return self._supervise()
        except Interrupted:
            return 0
        except StartupFailed as exc:
            self._error(str(exc))
            return 1
        finally:
            self._shutdown()

    def _install_signal_handlers(self) -> None:
        def request_stop(signum: int, frame: FrameType | None) -> None:
            self._stop.set()

        # SIGHUP too: a closed terminal must not leave the services (in their own sessions) behind.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, request_stop)

    def _check_interrupted(self) -> None:
        if self._stop.is_set():
            raise Interrupted

    def _say(self, text: str = "") -> None:
        print(text, file=self._out, flush=True)

    def _error(self, text: str) -> None:
        print(f"profiles up: {text}", file=sys.stderr, flush=True)

    def _start_databases(self, settings: Settings) -> Settings:
        self._data_dir.create()
        changes: dict[str, object] = {}
        try:
            if not settings.database_url:
                self._say(f"Starting PostgreSQL in {self._data_dir.postgres} ...")
                self._postgres = EmbeddedPostgres(self._data_dir.postgres)
                changes["database_url"] = self._postgres.start()
            self._check_interrupted()
            if not settings.redis_url:
                self._say(f"Starting Redis in {self._data_dir.redis} ...")
                self._redis = EmbeddedRedis(self._data_dir.redis)
                changes["redis_url"] = self._redis.start()
        except RuntimeError as exc:  # EmbeddedServerError, and a missing binary or user
            raise StartupFailed(str(exc)) from exc
        self._check_interrupted()
        return settings.with_changes(**changes)

    def _bootstrap(self, settings: Settings) -> dict[str, str] | None:
        self._say("Applying migrations ...")
        try:
            new_keys = asyncio.run(bootstrap(settings.database_url, self._data_dir))
        except (OSError, RuntimeError) as exc:
            raise StartupFailed(f"cannot prepare the database: {exc}") from exc
        self._check_interrupted()
        return new_keys

    def _start_services(self, settings: Settings) -> None:
        env = {**os.environ, **settings.to_env()}
        self._say("Starting " + ", ".join(SERVICE_NAMES) + f" and the {CONSOLE} ...")
        for name in (*SERVICE_NAMES, CONSOLE):
            log_path = self._data_dir.logs / f"{name}.log"
            with log_path.open("ab") as log_file:
                process = subprocess.Popen(
                    [sys.executable, "-m", "profiles.cli", "serve", name],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            self._children.append(Child(name, process, log_path))

    def _wait_until_serving(self, settings: Settings) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        pending = {c.name: c for c in self._children}
        channels = {
            name: grpc.insecure_channel(
                endpoint(settings.bind_address, settings.ports[name]), options=_PROBE_OPTIONS
            )
            for name in pending
            if name != CONSOLE
        }
        try:
            while pending:
                self._check_interrupted()
                self._raise_if_a_child_died()
                for name in list(pending):
                    if name == CONSOLE:
                        ready = _console_is_up(console_url(settings))
                    else:
                        ready = _is_serving(channels[name])
                    if ready:
                        del pending[name]
                if pending and time.monotonic() > deadline:
                    raise StartupFailed(
                        f"not SERVING after {READY_TIMEOUT_SECONDS:.0f} s: {', '.join(pending)};"
                        f" see {self._data_dir.logs}"
                    )
                self._stop.wait(0.1)
        finally:
            for channel in channels.values():
                channel.close()

    def _raise_if_a_child_died(self) -> None:
        for child in self._children:
            code = child.process.poll()
            if code is not None:
                raise StartupFailed(
                    f"{child.name} exited with code {code}; end of {child.log_path}:\n"
                    + log_tail(child.log_path)
                )

    def _supervise(self) -> int:
        while not self._stop.wait(0.2):
            try:
                self._raise_if_a_child_died()
            except StartupFailed as exc:
                self._error(f"stopping everything: {exc}")
                return 1
        self._say("Stopping ...")
        return 0

    def _shutdown(self) -> None:
        self._stop_services()
        for server in (self._redis, self._postgres):
            if server is not None:
                try:
                    server.stop()
                except RuntimeError as exc:
                    self._error(str(exc))
        if self._children or self._postgres or self._redis:
            self._say("Stopped.")

    def _stop_services(self) -> None:
        running = [c for c in self._children if c.process.poll() is None]
        for child in running:
            child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._settings.shutdown_grace_seconds
        deadline += KILL_AFTER_EXTRA_SECONDS
        for child in running:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._error(f"{child.name} did not stop in time; killing it")
                child.process.kill()
                child.process.wait()

    def _print_ready(self, settings: Settings, new_keys: dict[str, str] | None) -> None:
        bind = settings.bind_address
        self._say()
        self._say(f"Profiles is up. Data directory: {self._data_dir.path}")
        self._say()
        for name in SERVICE_NAMES:
            metrics_port = settings.metrics_ports[name]
            metrics = f"http://{endpoint(bind, metrics_port)}/metrics" if metrics_port else "off"
            self._say(f"  {name:<9} {endpoint(bind, settings.ports[name]):<22} metrics {metrics}")
        self._say_console(settings)
        self._say()
        keys_command = "profiles keys" + self._data_dir_flag()
        if new_keys is not None:
            self._say(
                f'Keys of project "{DEFAULT_PROJECT}" (shown once; kept owner-only in'
                f" {self._data_dir.keys_file}):"
            )
            for role, key in new_keys.items():
                self._say(f"  {role:<6} {key}")
        else:
            self._say(
                f'Keys of project "{DEFAULT_PROJECT}": {self._data_dir.keys_file}'
                f" (print them with `{keys_command} --json`)"
            )
        query = endpoint(bind, settings.ports["query"])
        self._say()
        self._say("Try it:")
        self._say(f"  grpcurl -plaintext {query} list")
        self._say(
            f'  grpcurl -plaintext -d \'{{"service": "profiles.query.v1.QueryService"}}\''
            f" {query} grpc.health.v1.Health/Check"
        )
        self._say(
            f'  grpcurl -plaintext -H "authorization: Bearer $({keys_command} --role read)"'
            f" -d '{{}}' {query} profiles.query.v1.QueryService/GetOverview"
        )
        self._say()
        self._say(f"Logs: {self._data_dir.logs}/<service>.log. Press Ctrl-C to stop.")

    def _say_console(self, settings: Settings) -> None:
        metrics_port = settings.console_metrics_port
        bind = settings.bind_address
        metrics = f"http://{endpoint(bind, metrics_port)}/metrics" if metrics_port else "off"
        self._say(f"  {CONSOLE:<9} {console_url(settings):<22} metrics {metrics}")
        self._say("            (web console: sign in with the read or admin key)")

    def _data_dir_flag(self) -> str:
        if self._data_dir.path == Settings().data_dir:
            return ""
        return f" --data-dir {self._data_dir.path}"


# --- the web console: an HTTP child process beside the four gRPC services ---------------------

CONSOLE = "console"


def _console_ports(settings: Settings) -> list[TakenPort]:
    ports = [TakenPort(CONSOLE, "HTTP", settings.console_port, "PROFILES_CONSOLE_PORT")]
    if settings.console_metrics_port:
        ports.append(
            TakenPort(
                CONSOLE, "metrics", settings.console_metrics_port, "PROFILES_CONSOLE_METRICS_PORT"
            )
        )
    return ports


def console_url(settings: Settings) -> str:
    return f"http://{endpoint(settings.bind_address, settings.console_port)}"


def _console_is_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=1.0) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def _is_serving(channel: grpc.Channel) -> bool:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def run_up(settings: Settings) -> int:
    """Runs `profiles up` with these settings; returns the exit code."""
    # Our own log lines (migrations) would interleave with the banner; the services log to files.
    configure_logging("debug" if settings.log_level == "debug" else "warning")
    return Supervisor(settings).run()
