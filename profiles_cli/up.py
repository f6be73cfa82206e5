"""`profiles up`: the whole suite on one machine, from pip packages only.

Order matters on the way up and, reversed, on the way down: the data directory's lock is taken
first (one `profiles up` per data directory; what a killed one left running is stopped), ports
are checked before anything starts (so a taken port costs nothing to undo), then PostgreSQL and
Redis, then the services of `SUITE` as child processes while the migrations run and the default
project is made (a service waits for the migrations as it starts), each service in its own
session so that a Ctrl-C in the terminal reaches only this supervisor, which stops the services
before the databases they are still using. A service that dies meanwhile is started
again with backoff; one that keeps dying stops everything; one `profiles restart` names is
stopped and started again on request, which is no death. So is an embedded PostgreSQL or Redis
(on the same data directory and socket: the services reconnect on their own); a server given by
URL is not ours to restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

import psutil

from profiles_cli.datadir import DataDir
from profiles_cli.preflight import (
    Unreachable,
    UnusableDataDir,
    check_postgres,
    check_redis,
    port_is_free,
    prepare_data_dir,
    redact,
    unusable,
)
from profiles_cli.suite import (
    HEALTH_GRPC,
    HEALTH_HTTP,
    KILL_AFTER_EXTRA_SECONDS,
    READY_TIMEOUT_SECONDS,
    SERVER_NAMES,
    SERVING,
    HealthKind,
    RunRecord,
    ServerRecord,
    ServiceRecord,
    check_health,
    clear_restart_requests,
    data_dir_flag,
    find_leftovers,
    live_record,
    release_lock,
    remove_record,
    stop_leftovers,
    take_lock,
    take_restart_request,
    write_record,
)
from shared.db import create_pool, migrate
from shared.embedded import EmbeddedPostgres, EmbeddedRedis
from shared.logging import configure_logging
from shared.settings import SERVICE_NAMES, SETTINGS, Settings
from shared.tenancy import ROLES, ProjectNameTaken, TenancyRepository

DEFAULT_PROJECT = "default"
# A service (or embedded server) that dies is started again after 0.5 s (by default:
# PROFILES_RESTART_DELAY_SECONDS), then 1, 2 and 4 s while it keeps dying (never more than 8 s);
# the fifth death within a minute means restarting will not help, so everything stops.
RESTART_FIRST_DELAY_SECONDS = 0.5
RESTART_MAX_DELAY_SECONDS = 8.0
CRASH_LIMIT = 5
CRASH_WINDOW_SECONDS = 60.0
# How often the supervisor looks round once the suite serves, besides when a child ends (SIGCHLD).
ROUND_SECONDS = 0.2
_LOOPBACK_ALIASES = {"", "0.0.0.0", "::", "[::]"}


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """One process `profiles up` runs: `python -m profiles_cli.cli <command>`, its port settings
    (names of settings that `Settings.to_env()` passes on) and how its health is checked."""

    name: str
    command: tuple[str, ...]
    port_env: str
    metrics_port_env: str
    health: HealthKind

    def port(self, settings: Settings) -> int:
        return _setting_int(settings, self.port_env)

    def metrics_port(self, settings: Settings) -> int:
        return _setting_int(settings, self.metrics_port_env)


def _grpc_service(name: str) -> ServiceSpec:
    upper = name.upper()
    ports = f"PROFILES_{upper}_PORT", f"PROFILES_{upper}_METRICS_PORT"
    return ServiceSpec(name, ("serve", name), *ports, HEALTH_GRPC)


# Every process of the suite, in start order; the banner, the port check, the health wait, the
# record and the supervision all follow this table. An HTTP service is healthy when GET /healthz
# answers 200 (the edge's only once ingest and identity answer).
SUITE: tuple[ServiceSpec, ...] = (
    *(_grpc_service(name) for name in SERVICE_NAMES),
    ServiceSpec(
        "edge", ("serve", "edge"), "PROFILES_EDGE_PORT", "PROFILES_EDGE_METRICS_PORT", HEALTH_HTTP
    ),
    ServiceSpec(
        "console",
        ("serve", "console"),
        "PROFILES_CONSOLE_PORT",
        "PROFILES_CONSOLE_METRICS_PORT",
        HEALTH_HTTP,
    ),
)


def _setting_int(settings: Settings, env: str) -> int:
    values = settings.to_env()
    if env in values:
        return int(values[env])
    default = next(s.default for s in SETTINGS if s.env == env)
    return int(os.environ.get(env, default))


class StartupFailed(Exception):
    """Something `profiles up` needs did not come up; the message says what and why."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived while starting."""


@dataclass(frozen=True, slots=True)
class TakenPort:
    service: str
    kind: str  # "gRPC", "HTTP" or "metrics"
    port: int
    env: str

    def describe(self, bind_address: str) -> str:
        return f"{self.service}: {self.kind} port {self.port} on {bind_address} is already in use"


def move_ports_command(moves: dict[str, int], flags: str) -> str:
    """The one command that starts the suite with every taken port moved: `PROFILES_QUERY_PORT=
    60054 PROFILES_EDGE_PORT=18340 profiles up --data-dir X`, flags being those to keep."""
    assignments = " ".join(f"{env}={port}" for env, port in moves.items())
    return f"{assignments} profiles up{flags}"


def taken_ports_advice(settings: Settings, taken: list[TakenPort], flags: str) -> list[str]:
    """What `profiles up` says when ports are taken: each taken port, then one command that
    moves them all (to free ports, none offered twice)."""
    bind = settings.bind_address
    moves: dict[str, int] = {}
    for port in taken:
        offered = suggest_port(bind, port.port)
        while offered in moves.values():
            offered = suggest_port(bind, offered)
        moves[port.env] = offered
    metrics = any(port.kind == "metrics" for port in taken)
    off = " (a metrics port of 0 turns that metrics server off)" if metrics else ""
    lines = [f"{port.describe(bind)}." for port in taken]
    lines.append(
        f"Nothing was started. Move {'it' if len(taken) == 1 else 'them'} with"
        f" {'its variable' if len(taken) == 1 else 'their variables'}{off}, e.g.:"
        f" {move_ports_command(moves, flags)}"
    )
    return lines


@dataclass(slots=True)
class Restarts:
    """When a service that died is started again (time is an argument: no clock inside)."""

    first_delay: float = RESTART_FIRST_DELAY_SECONDS
    # Times of its deaths within the last CRASH_WINDOW_SECONDS.
    deaths: deque[float] = field(default_factory=deque)

    def after_death(self, now: float) -> float | None:
        """Seconds to wait before starting it again, doubling with each recent death; None
        when it died CRASH_LIMIT times within CRASH_WINDOW_SECONDS (restarting will not help)."""
        self.deaths.append(now)
        while now - self.deaths[0] > CRASH_WINDOW_SECONDS:
            self.deaths.popleft()
        if len(self.deaths) >= CRASH_LIMIT:
            return None
        delay = self.first_delay * 2 ** (len(self.deaths) - 1)
        return min(delay, RESTART_MAX_DELAY_SECONDS)


@dataclass(slots=True)
class Child:
    spec: ServiceSpec
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: Restarts = field(default_factory=Restarts)
    restart_at: float | None = None
    # A restart `profiles restart` asked for, under way: the process was sent SIGTERM and is
    # killed at kill_at if still running. Its end is no death: started again at once, not
    # counted towards CRASH_LIMIT.
    restart_requested: bool = False
    kill_at: float | None = None

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(slots=True)
class Server:
    """An embedded PostgreSQL or Redis `profiles up` started, and starts again when it dies."""

    key: str  # "postgres" or "redis", as the record names it
    embedded: EmbeddedPostgres | EmbeddedRedis
    pid: int = 0  # of the running server; 0 while it waits to be started again
    restarts: Restarts = field(default_factory=Restarts)
    restart_at: float | None = None

    @property
    def name(self) -> str:
        return SERVER_NAMES[self.key]


def bind_address_problem(host: str) -> str:
    """Why the services could not listen on `host` (PROFILES_BIND_ADDRESS) at all, else "": a
    name that does not resolve, or an address that is not this machine's. Asked before the
    ports, which would otherwise all read as taken."""
    try:
        infos = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"PROFILES_BIND_ADDRESS={host!r} does not resolve ({exc.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        try:
            sock.bind(address)
        except OSError as exc:
            return (
                f"PROFILES_BIND_ADDRESS={host!r} is not an address of this machine"
                f" ({exc.strerror}); use 127.0.0.1, 0.0.0.0 or one of its own addresses"
            )
    return ""


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
    for spec in SUITE:
        kind = "gRPC" if spec.health == HEALTH_GRPC else "HTTP"
        wanted.append(TakenPort(spec.name, kind, spec.port(settings), spec.port_env))
        metrics = spec.metrics_port(settings)
        if metrics:  # 0 turns the metrics server off
            wanted.append(TakenPort(spec.name, "metrics", metrics, spec.metrics_port_env))
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


def describe_exit(code: int) -> str:
    """`exit code 3`, `killed by SIGKILL`: a Popen return code as a person reads it."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


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


def _print_unless_closed(text: str, stream: IO[str]) -> None:
    """Prints a line; once the stream's reader is gone (`profiles up | head`), this and every
    later line go nowhere, and the suite keeps running: the supervisor's lines tell what it
    does, and a reader that stopped reading them asked for no stop (`profiles down` does that;
    the log files keep what follows)."""
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


class Supervisor:
    """Runs the suite until a signal (exit 0; Ctrl-C before it is up: 130), or until a service
    keeps dying (exit 1)."""

    def __init__(self, settings: Settings, out: IO[str] = sys.stdout) -> None:
        self._settings = settings
        self._data_dir = DataDir(settings.data_dir)
        self._out = out
        self._stop = threading.Event()
        self._stop_signal: int | None = None  # the first SIGINT, SIGTERM or SIGHUP
        # Set by a stop signal and, while supervising, by SIGCHLD: a child that ended (a
        # service, Redis) is seen at once, not at the next look round.
        self._wake = threading.Event()
        self._postgres: EmbeddedPostgres | None = None
        # True from the moment initdb may run on an empty directory until PostgreSQL has started
        # on the cluster it made: what an interrupted first start leaves there is removed.
        self._cluster_unfinished = False
        self._redis: EmbeddedRedis | None = None
        self._servers: list[Server] = []  # the embedded ones, watched once the suite serves
        self._server_urls: dict[str, str] = {}  # by server key, embedded or given
        self._children: list[Child] = []
        self._env: dict[str, str] = {}
        self._state = "starting"

    def run(self) -> int:
        self._install_signal_handlers()
        try:
            # Only the directory itself, so that a refused start changes nothing of the running
            # one.
            prepare_data_dir(self._data_dir.path)
            lock = take_lock(self._data_dir.path)
        except UnusableDataDir as exc:
            self._error(exc.message)
            return 1
        except OSError as exc:
            self._error(unusable(self._data_dir.path, exc).message)
            return 1
        if lock is None:
            self._refuse()
            return 1
        try:
            return self._run_as_owner()
        finally:
            remove_record(self._data_dir.path)
            release_lock(lock)

    def _refuse(self) -> None:
        # Only a live record names the holder: a killed `profiles up` leaves its record behind.
        record = live_record(self._data_dir.path)
        if record is None:
            # Between taking the lock and writing the record, or an admin command
            # (`profiles keys create` ...) running on the directory's PostgreSQL: seconds.
            self._error(
                f"another `profiles` command holds {self._data_dir.path} (a `profiles up`"
                " starting, or a command using its database); nothing was started. Try again"
                " in a moment, or give this one another --data-dir"
            )
            return
        self._error(
            f"another `profiles up` owns {self._data_dir.path} (pid {record.pid},"
            f" {record.ports_text()}); nothing was started. Stop it with"
            f" `profiles down{self._data_dir_flag()}` (or Ctrl-C in its terminal), or give this"
            " one another --data-dir"
        )

    def _run_as_owner(self) -> int:
        try:
            self._stop_what_a_killed_run_left()
        except RuntimeError as exc:
            self._error(str(exc))
            return 1
        # At once, so that a refused start can name this one, and a start after this one is
        # killed (even before its services run) knows to clean up after it.
        self._write_record()
        unusable = bind_address_problem(self._settings.bind_address)
        if unusable:
            self._error(unusable)
            return 2
        taken = taken_ports(self._settings)
        if taken:
            for line in taken_ports_advice(self._settings, taken, self._data_dir_flag()):
                self._error(line)
            return 1
        try:
            self._check_interrupted()  # a Ctrl-C during the checks above: start nothing
            self._check_given_servers(self._settings)
            settings = self._start_databases(self._settings)
            settings = settings.with_changes(
                internal_token=settings.internal_token or self._data_dir.internal_token()
            )
            # The services before the migrations: each applies them too as it starts, under
            # the same lock, so it waits for these rather than failing, and loads its code (a
            # second of CPU or so) meanwhile instead of after them.
            self._start_services(settings)
            new_keys = self._bootstrap(settings)
            self._wait_until_serving(settings)
            self._servers = [
                Server(key, server, server.pid() or 0, self._restarts())
                for key, server in (("postgres", self._postgres), ("redis", self._redis))
                if server is not None
            ]
            self._state = "serving"
            self._write_record()
            self._print_ready(settings, new_keys)
            return self._supervise()
        except Interrupted:
            pass
        except StartupFailed as exc:
            if not self._stop.is_set():
                self._error(str(exc))
                return 1
            # Ctrl-C reaches the initdb or pg_ctl running in the foreground with this process:
            # their failure is the interrupt's doing, not a problem to report.
        finally:
            self._shutdown(quiet=self._stop.is_set() and self._state == "starting")
        return self._interrupted_while_starting()

    def _interrupted_while_starting(self) -> int:
        """Once what started is stopped: one line, and the exit code of an interrupted command
        for Ctrl-C (130); 0 for the SIGTERM of `profiles down` (or a SIGHUP), a stop that was
        asked for. A first PostgreSQL cluster whose making was cut short goes too, so that the
        next start makes it anew rather than refusing a directory initdb left half-made."""
        if self._cluster_unfinished and not (self._postgres and self._postgres.is_running()):
            shutil.rmtree(self._data_dir.postgres, ignore_errors=True)
        if self._stop_signal == signal.SIGINT:
            self._error("interrupted (Ctrl-C) while starting; nothing is left running")
            return 130
        name = signal.Signals(self._stop_signal).name if self._stop_signal else "a signal"
        self._error(f"stopped by {name} while starting; nothing is left running")
        return 0

    def _stop_what_a_killed_run_left(self) -> None:
        """A record without a lock holder: its `profiles up` was killed and may have left its
        services and embedded databases running, holding ports and the data. Stops them (the
        same rule `profiles down` follows)."""
        leftovers = find_leftovers(self._data_dir.path)
        if leftovers is None:
            return
        stopped = stop_leftovers(self._data_dir.path, leftovers)
        left = ", ".join(stopped) if stopped else "nothing was left running"
        self._error(
            f"the previous `profiles up` on {self._data_dir.path} (pid {leftovers.pid}) is gone;"
            f" stopped what it left running: {left}. Starting normally."
        )

    def _install_signal_handlers(self) -> None:
        def request_stop(signum: int, frame: FrameType | None) -> None:
            if self._stop_signal is None:
                self._stop_signal = signum
            self._stop.set()
            self._wake.set()

        # SIGHUP too: a closed terminal must not leave the services (in their own sessions) behind.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, request_stop)

    def _check_interrupted(self) -> None:
        if self._stop.is_set():
            raise Interrupted

    def _say(self, text: str = "") -> None:
        _print_unless_closed(text, self._out)

    def _error(self, text: str) -> None:
        _print_unless_closed(f"profiles up: {text}", sys.stderr)

    def _check_given_servers(self, settings: Settings) -> None:
        """PostgreSQL and Redis given by URL answer, before anything starts: a wrong URL costs
        one line naming it, not a minute of services failing to come up."""

        async def check() -> None:
            if settings.database_url:
                await check_postgres(settings.database_url)
            if settings.redis_url:
                await check_redis(settings.redis_url)

        try:
            asyncio.run(check())
        except Unreachable as exc:
            raise StartupFailed(exc.message) from exc

    def _start_databases(self, settings: Settings) -> Settings:
        self._data_dir.create()
        changes: dict[str, object] = {}
        try:
            if not settings.database_url:
                self._say(f"Starting PostgreSQL in {self._data_dir.postgres} ...")
                self._postgres = EmbeddedPostgres(self._data_dir.postgres)
                self._cluster_unfinished = _missing_or_empty(self._data_dir.postgres)
                changes["database_url"] = self._postgres.start()
                self._cluster_unfinished = False
            self._check_interrupted()
            if not settings.redis_url:
                self._say(f"Starting Redis in {self._data_dir.redis} ...")
                self._redis = EmbeddedRedis(self._data_dir.redis)
                changes["redis_url"] = self._redis.start()
        except RuntimeError as exc:  # EmbeddedServerError, and a missing binary or user
            raise StartupFailed(str(exc)) from exc
        self._check_interrupted()
        settings = settings.with_changes(**changes)
        self._server_urls = {"postgres": settings.database_url, "redis": settings.redis_url}
        return settings

    def _bootstrap(self, settings: Settings) -> dict[str, str] | None:
        self._say("Applying migrations ...")
        try:
            new_keys = asyncio.run(bootstrap(settings.database_url, self._data_dir))
        except (OSError, RuntimeError) as exc:
            raise StartupFailed(f"cannot prepare the database: {exc}") from exc
        self._check_interrupted()
        return new_keys

    def _start_services(self, settings: Settings) -> None:
        self._env = {**os.environ, **settings.to_env()}
        clear_restart_requests(self._data_dir.path)
        self._say("Starting " + ", ".join(spec.name for spec in SUITE) + " ...")
        for spec in SUITE:
            child = Child(spec, self._data_dir.logs / f"{spec.name}.log", restarts=self._restarts())
            self._spawn(child)
            self._children.append(child)
        self._write_record()

    def _restarts(self) -> Restarts:
        return Restarts(self._settings.restart_delay_seconds)

    def _spawn(self, child: Child) -> None:
        with child.log_path.open("ab") as log_file:
            child.process = subprocess.Popen(
                [sys.executable, "-m", "profiles_cli.cli", *child.spec.command],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,
            )

    def _write_record(self) -> None:
        bind = self._settings.bind_address
        services = {
            child.name: ServiceRecord(
                address=endpoint(bind, child.spec.port(self._settings)),
                port=child.spec.port(self._settings),
                metrics_port=child.spec.metrics_port(self._settings),
                health=child.spec.health,
                pid=child.process.pid if child.process is not None else 0,
                log=str(child.log_path),
            )
            for child in self._children
        }
        embedded = {"postgres": self._postgres, "redis": self._redis}
        servers = {}
        for key, url in self._server_urls.items():
            server = embedded[key]
            servers[key] = ServerRecord(
                url=redact(url),
                embedded=server is not None,
                pid=(server.pid() or 0) if server is not None else 0,
                log=str(server.log_file) if server is not None else "",
            )
        me = psutil.Process()
        record = RunRecord(
            pid=me.pid,
            create_time=me.create_time(),
            data_dir=str(self._data_dir.path),
            state=self._state,
            services=services,
            servers=servers,
        )
        write_record(self._data_dir.path, record)

    def _wait_until_serving(self, settings: Settings) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        pending = {c.name: c for c in self._children}
        while pending:
            self._check_interrupted()
            self._raise_if_a_child_died()
            for name, child in list(pending.items()):
                address = endpoint(settings.bind_address, child.spec.port(settings))
                if check_health(child.spec.health, address, timeout=1.0) == SERVING:
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise StartupFailed(
                    f"not SERVING after {READY_TIMEOUT_SECONDS:.0f} s: {', '.join(pending)};"
                    f" see {self._data_dir.logs}"
                )
            self._stop.wait(0.1)

    def _raise_if_a_child_died(self) -> None:
        # While starting, a death is a configuration problem that a restart would repeat.
        for child in self._children:
            code = None if child.process is None else child.process.poll()
            if code is not None:
                raise StartupFailed(
                    f"{child.name} exited ({describe_exit(code)}); end of {child.log_path}:\n"
                    + log_tail(child.log_path)
                )

    def _supervise(self) -> int:
        signal.signal(signal.SIGCHLD, lambda signum, frame: self._wake.set())
        while not self._stop.is_set():
            self._wake.wait(self._until_next_round())
            self._wake.clear()
            if self._stop.is_set():
                break
            now = time.monotonic()
            # The servers first, so that a service started again in this round finds them. A
            # server's restart blocks the loop for as long as it takes (seconds; at most the
            # embedded servers' start timeout).
            for server in self._servers:
                if not self._watch_server(server, now):
                    return 1
            now = time.monotonic()  # a server's restart may have taken seconds
            for child in self._children:
                if take_restart_request(self._data_dir.path, child.name):
                    self._begin_requested_restart(child, now)
                if child.process is not None and child.process.poll() is not None:
                    if child.restart_requested:
                        self._restart_as_requested(child)
                    elif not self._note_death(child, child.process.returncode, now):
                        return 1
                elif child.kill_at is not None and now >= child.kill_at:
                    # SIGTERM did not end it (a hung or stopped process): as on shutdown.
                    child.kill_at = None
                    self._error(f"{child.name} did not stop in time; killing it")
                    assert child.process is not None
                    child.process.kill()
                elif child.restart_at is not None and now >= child.restart_at:
                    child.restart_at = None
                    self._spawn(child)
                    self._write_record()
                    assert child.process is not None
                    self._say(f"Restarted {child.name} (pid {child.process.pid}).")
        self._say("Stopping ...")
        return 0

    def _until_next_round(self) -> float:
        """Seconds until the next look round: ROUND_SECONDS for what sends no signal (restart
        requests, PostgreSQL, which is not our child), less when a restart or a kill is due
        sooner."""
        due = [child.restart_at for child in self._children if child.restart_at is not None]
        due += [child.kill_at for child in self._children if child.kill_at is not None]
        due += [server.restart_at for server in self._servers if server.restart_at is not None]
        now = time.monotonic()
        return max(0.0, min([ROUND_SECONDS, *(at - now for at in due)]))

    def _begin_requested_restart(self, child: Child, now: float) -> None:
        """`profiles restart <name>`: SIGTERM (the service drains as on shutdown), and a kill
        after the same grace as on shutdown if it does not end; a service waiting to be started
        again after a death is started at once."""
        if child.restart_requested:
            return  # one under way already does what was asked
        if child.process is None:
            child.restart_at = now
            return
        child.restart_requested = True
        grace = self._settings.shutdown_grace_seconds + KILL_AFTER_EXTRA_SECONDS
        child.kill_at = now + grace
        self._say(
            f"Restarting {child.name} (pid {child.process.pid}), as `profiles restart` asked."
        )
        child.process.send_signal(signal.SIGTERM)

    def _restart_as_requested(self, child: Child) -> None:
        """Starts a service that ended because `profiles restart` asked, at once; not counted
        as a death (restarting it on purpose says nothing about it crashing)."""
        assert child.process is not None
        how = describe_exit(child.process.returncode)
        child.process = None
        child.restart_requested = False
        child.kill_at = None
        child.restart_at = None
        _append_log_line(
            child.log_path, {"event": "service_restart_requested", "how": how}, level="info"
        )
        self._spawn(child)
        self._write_record()
        assert child.process is not None
        self._say(f"Restarted {child.name} (pid {child.process.pid}).")

    def _note_death(self, child: Child, code: int, now: float) -> bool:
        """Schedules the restart of a dead service; False when it died too often to go on."""
        child.process = None
        how = describe_exit(code)
        _append_log_line(child.log_path, {"event": "service_exited", "how": how, "code": code})
        delay = child.restarts.after_death(now)
        if delay is None:
            self._error(
                f"{child.name} died {CRASH_LIMIT} times within {CRASH_WINDOW_SECONDS:.0f} s"
                f" (last: {how}); stopping everything. Its log: {child.log_path}; its end:\n"
                + log_tail(child.log_path)
            )
            return False
        child.restart_at = now + delay
        self._error(
            f"{child.name} exited ({how}); restarting it in {delay:g} s. Its log: {child.log_path}"
        )
        return True

    def _watch_server(self, server: Server, now: float) -> bool:
        """Notices the death of an embedded server and starts it again when its time comes;
        False when it died too often to go on."""
        if server.restart_at is None:
            # pid() reaps a Redis this process started: a killed one does not stay a zombie.
            if server.embedded.pid() is not None:
                return True
            return self._note_server_death(server, f"is gone (pid {server.pid})", now)
        if now < server.restart_at:
            return True
        server.restart_at = None
        try:
            # On the same data directory and socket. After a kill PostgreSQL first replays its
            # WAL (crash recovery); start() returns once it accepts connections (Redis: PING).
            server.embedded.start()
        except RuntimeError as exc:  # EmbeddedServerError; its log says more
            first_line = str(exc).strip().split("\n", 1)[0]
            how = f"did not start again ({first_line.removesuffix(':')})"
            return self._note_server_death(server, how, time.monotonic())
        server.pid = server.embedded.pid() or 0
        self._write_record()
        self._say(f"Restarted {server.name} (pid {server.pid}).")
        return True

    def _note_server_death(self, server: Server, how: str, now: float) -> bool:
        """Schedules the restart of a dead embedded server; False when it died too often to go
        on. (Not our child, PostgreSQL cannot tell how it died; its log may.)"""
        server.pid = 0
        self._write_record()  # `profiles status` shows pid 0: waiting to be started again
        log = server.embedded.log_file
        delay = server.restarts.after_death(now)
        if delay is None:
            self._error(
                f"{server.name} died {CRASH_LIMIT} times within {CRASH_WINDOW_SECONDS:.0f} s"
                f" (last: {how}); stopping everything. Its log: {log}; its end:\n" + log_tail(log)
            )
            return False
        server.restart_at = now + delay
        self._error(f"{server.name} {how}; restarting it in {delay:g} s. Its log: {log}")
        return True

    def _shutdown(self, *, quiet: bool = False) -> None:
        """Stops what runs; says "Stopped." unless quiet (an interrupted start says so itself)."""
        self._stop_services()
        for server in (self._redis, self._postgres):
            if server is not None:
                try:
                    server.stop()
                except RuntimeError as exc:
                    self._error(str(exc))
        if not quiet and (self._children or self._postgres or self._redis):
            self._say("Stopped.")

    def _stop_services(self) -> None:
        running = [
            (c.name, c.process)
            for c in self._children
            if c.process is not None and c.process.poll() is None
        ]
        for _, process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._settings.shutdown_grace_seconds
        deadline += KILL_AFTER_EXTRA_SECONDS
        for name, process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._error(f"{name} did not stop in time; killing it")
                process.kill()
                process.wait()

    def _print_ready(self, settings: Settings, new_keys: dict[str, str] | None) -> None:
        bind = settings.bind_address
        self._say()
        self._say(f"Profiles is up. Data directory: {self._data_dir.path}")
        self._say()
        for spec in SUITE:
            metrics_port = spec.metrics_port(settings)
            metrics = f"http://{endpoint(bind, metrics_port)}/metrics" if metrics_port else "off"
            address = endpoint(bind, spec.port(settings))
            if spec.health == HEALTH_HTTP:
                address = f"http://{address}"
            self._say(f"  {spec.name:<9} {address:<22} metrics {metrics}")
            if spec.name == "console":
                self._say("            (web console: sign in with the read or admin key)")
        self._say()
        flag = self._data_dir_flag()
        keys_command = f"profiles keys{flag}"
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
        query = endpoint(bind, _port_of("query", settings))
        self._say()
        self._say("grpcurl comes with the dev extras (README, command 2), or use your own.")
        self._say("Try it:")
        self._say(f"  grpcurl -plaintext {query} list")
        self._say(f"  grpcurl -plaintext {query} grpc.health.v1.Health/Check")
        self._say(
            f'  grpcurl -plaintext -H "authorization: Bearer $({keys_command} --role read)"'
            f" -d '{{}}' {query} profiles.query.v1.QueryService/GetOverview"
        )
        self._say(f"  profiles demo{flag}")
        self._say(f"  profiles status{flag}")
        self._say()
        self._say(
            f"Logs: {self._data_dir.logs}/<service>.log. Press Ctrl-C to stop"
            f" (or run `profiles down{flag}`)."
        )

    def _data_dir_flag(self) -> str:
        return data_dir_flag(self._data_dir.path)


def _missing_or_empty(directory: Path) -> bool:
    """True when initdb may make a cluster in directory: nothing of anyone's is there yet."""
    try:
        return not any(directory.iterdir())
    except FileNotFoundError:
        return True
    except OSError:  # not a directory, not ours to read: EmbeddedPostgres says what is wrong
        return False


def _port_of(name: str, settings: Settings) -> int:
    return next(spec.port(settings) for spec in SUITE if spec.name == name)


def _append_log_line(path: Path, entry: dict[str, object], level: str = "error") -> None:
    """One JSON line in a service's log, in the services' own format, from the supervisor."""
    line = {"level": level, "logger": "profiles_cli.up", **entry}
    with contextlib.suppress(OSError), path.open("a") as log_file:
        log_file.write(json.dumps(line) + "\n")


def run_up(settings: Settings) -> int:
    """Runs `profiles up` with these settings; returns the exit code."""
    # Our own log lines (migrations) would interleave with the banner; the services log to files.
    configure_logging("debug" if settings.log_level == "debug" else "warning")
    return Supervisor(settings).run()
