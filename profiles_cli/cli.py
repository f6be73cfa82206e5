"""The `profiles` command: run the suite (`up`, `serve`) and manage projects, keys and settings.

Admin commands connect to PROFILES_DATABASE_URL or, when it is empty, to the embedded PostgreSQL
of the data directory (started for the command if `profiles up` is not running, and stopped again
afterwards). Domain errors print one line and exit 2.

Commands that call the services (`demo`, `import`, `status`) find the suite of their data
directory in the record `profiles up` keeps there (profiles_cli/suite.py): its addresses, and the
keys it stored. Explicit flags (--address, --key) and PROFILES_<SERVICE>_ADDRESS win. A call that
fails prints one line: what was tried, what came back, what to do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import shlex
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.errors import DomainError, FailedPrecondition
from shared.settings import SERVICE_NAMES, SETTINGS, SettingInvalid, Settings

if TYPE_CHECKING:
    from profiles_cli.suite import Leftovers, ServerRecord
    from shared.tenancy import TenancyRepository

Handler = Callable[[argparse.Namespace], int]

# `profiles up` gives its services their grace period, then stops PostgreSQL (up to 30 s).
DOWN_TIMEOUT_SECONDS = 120
DOWN_POLL_SECONDS = 0.1
RESTART_POLL_SECONDS = 0.2

# Every process `profiles up` runs, as `serve` and `restart` name them.
SUITE_NAMES = (*SERVICE_NAMES, "edge", "console")

DESCRIPTION = """\
Profiles: a gRPC microservice suite that keeps one real-time view of every customer.

Run everything on this machine with `profiles up`; manage tenants with `profiles project`,
`profiles keys` and `profiles settings`. Configuration comes from PROFILES_* environment
variables (see the README's table); flags override them."""

UP_DESCRIPTION = """\
Starts the whole suite on this machine: an embedded PostgreSQL and Redis (unless
--database-url / --redis-url or PROFILES_DATABASE_URL / PROFILES_REDIS_URL are given),
migrations, a default project with one key per role on first run, and the four services as
child processes. Prints the endpoints and keys, then runs until Ctrl-C, SIGTERM or
`profiles down`, when it stops everything. Data is kept in the data directory across restarts.

One `profiles up` per data directory: a second one refuses, naming the running one; what a
killed one left running is stopped by `profiles down` or the next start. A service, or an
embedded PostgreSQL or Redis, that dies is started again (after 0.5, 1, 2, 4 s); the fifth death
within 60 s stops everything. `profiles restart SERVICE` restarts one service on request (no
death: it does not count).

Ports come from PROFILES_<SERVICE>_PORT and PROFILES_<SERVICE>_METRICS_PORT (0 turns a
metrics server off); the defaults:
{ports}"""

EXAMPLES = """\
examples:
  profiles up
  PROFILES_QUERY_PORT=60054 profiles up --data-dir /tmp/profiles
  profiles status --data-dir /tmp/profiles
  profiles restart query --data-dir /tmp/profiles
  profiles down --data-dir /tmp/profiles
  profiles keys --json
  profiles project create shop
  profiles keys create --project shop --role read --name dashboard
  profiles settings set --project shop identity.quarantine_days 60
  profiles demo --users 200
  profiles import bench/sample_events.jsonl"""


# How a shell reports a command killed by SIGPIPE (128 + 13), which is how Unix tools end when
# the reader of their output is gone (`profiles status | head -1`).
EXIT_OUTPUT_CLOSED = 128 + signal.SIGPIPE


def main(argv: Sequence[str] | None = None) -> None:
    try:
        code: int | str | None
        try:
            code = run(argv)
        except SystemExit as exited:  # argparse's (--help, a usage error)
            code = exited.code
        # Here, not at exit: a reader gone before the last buffered line is one more closed
        # pipe, which the interpreter would report on its way out.
        sys.stdout.flush()
    except KeyboardInterrupt:
        # Ctrl-C before a command set up its own handling (while modules load): no traceback.
        sys.exit(130)
    except BrokenPipeError:
        # Python ignores SIGPIPE (its sockets need that), so a closed stdout raises instead of
        # ending the command quietly. Only a closed stdout or stderr is that case: a broken
        # socket of a command's own stays an error.
        closed = _closed_outputs()
        if not closed:
            raise
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in closed:
            # So that the interpreter's own flush on the way out finds nothing to report.
            os.dup2(devnull, stream.fileno())
        sys.exit(EXIT_OUTPUT_CLOSED)
    sys.exit(code)


def _closed_outputs() -> list[IO[str]]:
    """stdout and stderr, those of them whose reader is gone (a pipe or socket polls POLLERR
    once its other end is closed)."""
    closed = []
    for stream in (sys.stdout, sys.stderr):
        try:
            poller = select.poll()
            poller.register(stream.fileno(), select.POLLOUT)
            events = poller.poll(0)
        except (OSError, ValueError):  # no file descriptor (replaced by a caller)
            continue
        if any(event & (select.POLLERR | select.POLLHUP) for _, event in events):
            closed.append(stream)
    return closed


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse hands what a subcommand does not know up to `profiles`, whose usage says
        # nothing of that subcommand's options: the subcommand refuses it, with its own usage.
        command: argparse.ArgumentParser = getattr(args, "command_parser", parser)
        command.error(f"unrecognized arguments: {' '.join(unknown)}")  # exits 2
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        # A command group typed without its subcommand: show what it offers.
        getattr(args, "group_parser", parser).print_help()
        return 2
    try:
        return handler(args)
    except DomainError as exc:
        print(f"profiles: {exc.message}", file=sys.stderr)
        return 2
    except SettingInvalid as exc:  # a PROFILES_* variable of the environment
        print(f"profiles: {exc}", file=sys.stderr)
        return 2


# --- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="profiles",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Typed as plain parsers: only `run` needs to know they are CommandParsers (as are the
    # parsers of their own subcommands, which take their parent's class).
    commands = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=CommandParser),
    )
    _add_up(commands)
    _add_status(commands)
    _add_restart(commands)
    _add_down(commands)
    _add_serve(commands)
    _add_health(commands)
    _add_project(commands)
    _add_keys(commands)
    _add_settings(commands)
    _add_demo(commands)
    _add_import(commands)
    _add_dead_letters(commands)
    return parser


class CommandParser(argparse.ArgumentParser):
    """The parser of a subcommand (and of theirs: subparsers take their parent's class). Each
    names itself in the arguments it parses, so that `run` knows whose usage an unknown
    argument calls for: the innermost subcommand typed sets it last."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_defaults(command_parser=self)


def _connection_options() -> argparse.ArgumentParser:
    # SUPPRESS, so that a subcommand's unset option does not erase the same option given to its
    # group (`profiles keys --data-dir X list`) and an unset flag falls back to the environment.
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--data-dir",
        default=argparse.SUPPRESS,
        help="data directory of `profiles up` (default: PROFILES_DATA_DIR or ~/.profiles)",
    )
    options.add_argument(
        "--database-url",
        default=argparse.SUPPRESS,
        help="PostgreSQL URL (default: PROFILES_DATABASE_URL; empty: the embedded one)",
    )
    return options


def default_ports_text() -> str:
    """Every port `profiles up` uses by default, one line per process, for `profiles up --help`
    (from the settings table, so it cannot drift from it)."""
    defaults = {s.env: s.default for s in SETTINGS}
    lines = []
    for name in (*SERVICE_NAMES, "edge", "console"):
        kind = "HTTP" if name in ("edge", "console") else "gRPC"
        port = defaults[f"PROFILES_{name.upper()}_PORT"]
        metrics = defaults[f"PROFILES_{name.upper()}_METRICS_PORT"]
        lines.append(f"  {name:<9} {kind} {port:<6} metrics {metrics}")
    return "\n".join(lines)


def _add_up(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = commands.add_parser(
        "up",
        parents=[_connection_options()],
        help="run the whole suite on this machine (embedded PostgreSQL and Redis)",
        description=UP_DESCRIPTION.format(ports=default_ports_text()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument(
        "--redis-url",
        default=argparse.SUPPRESS,
        help="Redis URL (default: PROFILES_REDIS_URL; empty: an embedded Redis)",
    )
    up.set_defaults(handler=_up)


def _add_status(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser(
        "status",
        parents=[_data_dir_option()],
        help="is a suite running on the data directory, and does each service serve",
        description="Reads the record `profiles up` keeps in the data directory, checks each"
        " service's health and that PostgreSQL and Redis answer (a connection and SELECT 1,"
        " PING). Prints the pid of `profiles up`, and each service's and server's address,"
        " health and pid; a server that is down gets a line on what to do. Exits 0 only when a"
        " suite runs there, every service answers SERVING and both servers answer.",
    )
    status.add_argument("--json", action="store_true", help="print the record and health as JSON")
    status.set_defaults(handler=_status)


def _add_restart(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    restart = commands.add_parser(
        "restart",
        parents=[_data_dir_option()],
        help="restart one service of the suite running on the data directory",
        description="Asks the `profiles up` of the data directory to restart SERVICE: it sends"
        " the service SIGTERM (it drains its calls, as on shutdown), kills it if it has not"
        " ended after PROFILES_SHUTDOWN_GRACE_SECONDS + 5 s (a hung or stopped process), and"
        " starts it again at once. A restart asked for is no death: it does not count towards"
        " the five deaths within 60 s that stop everything. Waits until the new process"
        " serves; exits 0 then, 1 if no `profiles up` serves there or the service does not"
        " serve again in time. The embedded PostgreSQL and Redis are not restarted this way"
        " (`profiles status` says what to do about one that does not answer).",
    )
    restart.add_argument(
        "service",
        metavar="SERVICE",
        choices=SUITE_NAMES,
        help=f"the service to restart: {', '.join(SUITE_NAMES)}",
    )
    restart.set_defaults(handler=_restart)


def _restart(args: argparse.Namespace) -> int:
    from profiles_cli.suite import (
        KILL_AFTER_EXTRA_SECONDS,
        READY_TIMEOUT_SECONDS,
        SERVING,
        check_health,
        find_leftovers,
        live_record,
        read_record,
        request_restart,
    )

    settings = settings_from(args)
    data_dir = settings.data_dir
    name: str = args.service
    record = live_record(data_dir)
    if record is None:
        why = _not_running(data_dir, find_leftovers(data_dir))
        print(f"profiles restart: {why}", file=sys.stderr)
        return 1
    if record.state != "serving" or name not in record.services:
        print(
            f"profiles restart: the `profiles up` on {data_dir} (pid {record.pid}) is still"
            " starting its services; try again once `profiles status` says it serves",
            file=sys.stderr,
        )
        return 1
    old_pid = record.services[name].pid
    request_restart(data_dir, name)
    print(
        f"Asked `profiles up` (pid {record.pid}) to restart {name} (pid {old_pid}) ...", flush=True
    )
    # The stop may take the whole grace and the kill after it, then the start its own time.
    wait_s = settings.shutdown_grace_seconds + KILL_AFTER_EXTRA_SECONDS + READY_TIMEOUT_SECONDS
    deadline = time.monotonic() + wait_s
    while True:
        current = read_record(data_dir)
        if current is None or not current.is_alive():
            print(
                f"profiles restart: `profiles up` (pid {record.pid}) stopped meanwhile; see its"
                " terminal",
                file=sys.stderr,
            )
            return 1
        service = current.services[name]
        started = service.pid not in (0, old_pid)
        if started and check_health(service.health, service.address, timeout=1.0) == SERVING:
            print(f"Restarted {name} (pid {service.pid}); it serves.")
            return 0
        if time.monotonic() > deadline:
            state = f"pid {service.pid} does not serve" if started else "it did not stop"
            print(
                f"profiles restart: {name} is not serving again {wait_s:.0f} s after the request"
                f" ({state}); see {service.log} and the terminal of `profiles up`",
                file=sys.stderr,
            )
            return 1
        time.sleep(RESTART_POLL_SECONDS)


def _add_down(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    down = commands.add_parser(
        "down",
        parents=[_data_dir_option()],
        help="stop the suite running on the data directory (as Ctrl-C would)",
        description="Sends SIGTERM to the `profiles up` of the data directory and waits until it"
        " has stopped its services and embedded databases. If that `profiles up` was killed,"
        " stops what it left running (its services, PostgreSQL and Redis), as the next"
        " `profiles up` would. Exits 0 when nothing runs there any more (also when nothing"
        " ran), 1 if it did not stop in time.",
    )
    down.set_defaults(handler=_down)


def _status(args: argparse.Namespace) -> int:
    from profiles_cli.suite import (
        SERVER_DOWN,
        SERVING,
        check_health,
        find_leftovers,
        read_record,
        server_health,
    )

    settings = settings_from(args)
    data_dir = settings.data_dir
    record = read_record(data_dir)
    if record is None or not record.is_alive():
        print(
            f"profiles status: {_not_running(data_dir, find_leftovers(data_dir))}", file=sys.stderr
        )
        return 1
    health = {
        name: check_health(service.health, service.address)
        for name, service in record.services.items()
    }
    # The services answer SERVING with their database down (their calls answer UNAVAILABLE),
    # so the servers are checked on their own.
    given = {"postgres": settings.database_url, "redis": settings.redis_url}
    servers = asyncio.run(server_health(record.servers, given))
    state = suite_state(record.state, health, servers)
    if args.json:
        print(
            json.dumps(
                {
                    "pid": record.pid,
                    "data_dir": record.data_dir,
                    "state": state,
                    "services": {
                        name: {
                            "address": s.address,
                            "pid": s.pid,
                            "health": health[name],
                            "log": s.log,
                        }
                        for name, s in record.services.items()
                    },
                    "servers": {
                        key: {
                            "url": s.url,
                            "embedded": s.embedded,
                            "pid": s.pid,
                            "health": servers[key][0],
                            "problem": servers[key][1],
                            "log": s.log,
                        }
                        for key, s in record.servers.items()
                    },
                },
                indent=2,
            )
        )
    else:
        print(f"profiles up (pid {record.pid}) runs on {record.data_dir}: {state}")
        rows = [
            (name, service.address, health[name], f"pid {service.pid}")
            for name, service in record.services.items()
        ]
        for key, server in record.servers.items():
            owner = f"pid {server.pid}" if server.embedded else "given by URL"
            rows.append((key, server.url, servers[key][0], owner))
        for line in aligned(rows):
            print(f"  {line}")
        # Where to look when one of them misbehaves: one line (the lines above are by name),
        # its label in the column of names.
        server_logs = [
            f"{key} {server.log}" for key, server in record.servers.items() if server.log
        ]
        label = "logs".ljust(max(len(row[0]) for row in [*rows, ("logs",)]))
        print(
            f"  {label}  {Path(record.data_dir) / 'logs'}/<service>.log"
            + "".join(f"; {entry}" for entry in server_logs)
        )
    for key, server in record.servers.items():
        advice = _server_advice(key, server, servers[key], data_dir)
        if advice:
            print(f"profiles status: {advice}", file=sys.stderr)
    serving = bool(health) and all(status == SERVING for status in health.values())
    servers_up = all(status != SERVER_DOWN for status, _ in servers.values())
    return 0 if serving and servers_up else 1


def aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """rows as lines whose columns line up: each column as wide as its widest value (an address
    or a URL has any length), two spaces apart."""
    widths = [max(len(value) for value in column) for column in zip(*rows, strict=True)]
    return [
        "  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _server_advice(
    key: str, server: ServerRecord, health: tuple[str, str], data_dir: Path
) -> str | None:
    """What to do about a server that does not answer (or was not checked); None when it
    answers."""
    from profiles_cli.suite import (
        PROCESS_RUNNING,
        PROCESS_STOPPED,
        SERVER_NAMES,
        SERVER_OK,
        SERVER_UNCHECKED,
        data_dir_flag,
        embedded_server_process,
    )

    status, why = health
    name = SERVER_NAMES[key]
    if status == SERVER_OK:
        return None
    if status == SERVER_UNCHECKED:
        return f"{name} at {server.url} was not checked: {why}"
    if not server.embedded:
        return (
            f"{name} at {server.url} does not answer ({why}); `profiles up` does not manage a"
            " server given by URL: start it again (until then the services answer UNAVAILABLE)"
        )
    flag = data_dir_flag(data_dir)
    restart_suite = f"restart the suite: `profiles down{flag}` and `profiles up{flag}`"
    # `profiles up` notices only a server whose process ended; one that is stopped or hangs
    # is left alone (restarting a PostgreSQL that is merely slow under load would cost more
    # than it saves), so what to say depends on the process.
    process, pid = embedded_server_process(data_dir, key)
    if process == PROCESS_STOPPED:
        return (
            f"{name} does not answer ({why}): its process (pid {pid}) is stopped (SIGSTOP, or"
            f" a debugger), which `profiles up` does not restart. `kill -CONT {pid}` (as its"
            f" owner) resumes it; if it stays down, see {server.log}, then {restart_suite}"
        )
    if process == PROCESS_RUNNING:
        return (
            f"{name} does not answer ({why}), though its process (pid {pid}) runs: it hangs"
            " or is overloaded, and `profiles up` restarts only a server whose process ended."
            f" See {server.log}; if it stays so, {restart_suite}"
        )
    return (
        f"{name} does not answer ({why}): its process is gone, and `profiles up` starts it"
        f" again by itself within seconds (its terminal says so). If it stays down, see"
        f" {server.log}, then {restart_suite}"
    )


def suite_state(
    recorded: str,
    health: dict[str, str],
    servers: dict[str, tuple[str, str]] | None = None,
) -> str:
    """The suite's state as `profiles status` prints it: what the record says ("starting",
    "serving"), unless a service does not answer SERVING now, or a server (by key, with its
    health and why) is down, which the header then names."""
    from profiles_cli.suite import SERVER_DOWN, SERVER_NAMES, SERVING

    failing = [f"{name} {status}" for name, status in health.items() if status != SERVING]
    failing += [
        f"{SERVER_NAMES[key]} {status}"
        for key, (status, _) in (servers or {}).items()
        if status == SERVER_DOWN
    ]
    if not failing or recorded == "starting":
        return recorded
    return f"not serving ({', '.join(failing)})"


def _not_running(data_dir: Path, leftovers: Leftovers | None) -> str:
    """No `profiles up` runs on data_dir: and what a killed one left running, if anything."""
    from profiles_cli.suite import data_dir_flag

    text = f"no `profiles up` runs on {data_dir}"
    if leftovers is None:
        return text
    left = leftovers.names()
    if not left:
        return f"{text} (a record of pid {leftovers.pid} remains; it is gone)"
    return (
        f"{text}, but the one that ran there (pid {leftovers.pid}) was killed and left running:"
        f" {', '.join(left)}; `profiles down{data_dir_flag(data_dir)}` stops them"
    )


def _down(args: argparse.Namespace) -> int:
    import psutil

    from profiles_cli.suite import live_record

    data_dir = settings_from(args).data_dir
    record = live_record(data_dir)
    if record is None:
        return _down_leftovers(data_dir)
    print(f"Stopping `profiles up` (pid {record.pid}) on {data_dir} ...", flush=True)
    try:
        psutil.Process(record.pid).send_signal(signal.SIGTERM)
    except psutil.NoSuchProcess:
        pass
    except psutil.AccessDenied:
        print(
            f"profiles down: pid {record.pid} belongs to another user; stop it as that user",
            file=sys.stderr,
        )
        return 1
    # Polled, not waited on: `profiles up` is not this command's child, and once it has
    # stopped it may stay a zombie until whatever started it reaps it (is_alive: gone).
    deadline = time.monotonic() + DOWN_TIMEOUT_SECONDS
    while record.is_alive():
        if time.monotonic() > deadline:
            print(
                f"profiles down: pid {record.pid} still runs after {DOWN_TIMEOUT_SECONDS} s;"
                f" see its terminal and {data_dir / 'logs'}",
                file=sys.stderr,
            )
            return 1
        time.sleep(DOWN_POLL_SECONDS)
    print("Stopped.")
    return 0


def _down_leftovers(data_dir: Path) -> int:
    """`profiles down` when no `profiles up` runs: stops what a killed one left running, as the
    next `profiles up` would."""
    from profiles_cli.suite import find_leftovers, release_lock, stop_leftovers, take_lock

    if find_leftovers(data_dir) is None:
        print(f"No `profiles up` runs on {data_dir}; nothing to stop.")
        return 0
    lock = take_lock(data_dir)
    if lock is None:
        print(
            f"profiles down: another `profiles` command holds {data_dir} (a `profiles up`"
            " starting, or a command using its database); try again in a moment",
            file=sys.stderr,
        )
        return 1
    try:
        # Again, holding the lock: what runs now is what this command stops.
        leftovers = find_leftovers(data_dir)
        if leftovers is None:
            print(f"No `profiles up` runs on {data_dir}; nothing to stop.")
            return 0
        print(
            f"The `profiles up` on {data_dir} (pid {leftovers.pid}) is gone; stopping what it"
            " left running ...",
            flush=True,
        )
        stopped = stop_leftovers(data_dir, leftovers)
    except RuntimeError as exc:  # a server that would not stop
        print(f"profiles down: {exc}", file=sys.stderr)
        return 1
    finally:
        release_lock(lock)
    print(f"Stopped: {', '.join(stopped) if stopped else 'nothing was left running'}.")
    return 0


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve",
        help="run one service against PROFILES_DATABASE_URL and PROFILES_REDIS_URL",
        description="Runs one service in the foreground against PROFILES_DATABASE_URL and"
        " PROFILES_REDIS_URL (what docker-compose and `profiles up` start). Applies migrations"
        " first; stops gracefully on SIGTERM or Ctrl-C.",
    )
    serve.add_argument(
        "service",
        choices=SUITE_NAMES,
        help="the service to run (edge: the HTTP gateway for SDKs, a client of ingest and"
        " identity, which needs no database; console: the web console)",
    )
    serve.set_defaults(handler=_serve)


def _add_health(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    health = commands.add_parser(
        "health",
        help="check that a service answers SERVING (for container health checks)",
        description="Calls grpc.health.v1.Health/Check on ADDRESS; exits 0 when it answers"
        " SERVING, 1 otherwise. Used by docker-compose's health checks. The edge and the"
        " console serve HTTP: their health is GET /healthz (200 when serving).",
    )
    health.add_argument("address", help="host:port of a service, e.g. 127.0.0.1:50054")
    health.add_argument("--service", default="", help="service name to check (default: all)")
    health.set_defaults(handler=_health)


def _health(args: argparse.Namespace) -> int:
    with grpc.insecure_channel(args.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=3.0)
        except grpc.RpcError as error:
            print(f"{args.address}: {error.code().name}{_http_hint(args.address)}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _http_hint(address: str) -> str:
    """When an HTTP server (the edge, the console) answers on address: how to check it."""
    from profiles_cli.suite import check_health

    if check_health("http", address, timeout=2.0) == "UNAVAILABLE":
        return ""
    return (
        f"; {address} serves HTTP, not gRPC (the edge or the console?): check it with"
        f" `curl -f http://{address}/healthz`"
    )


def _add_project(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    project = commands.add_parser(
        "project", help="create and list projects (tenants)", description="Projects are tenants."
    )
    project.set_defaults(group_parser=project)
    actions = project.add_subparsers(title="actions", metavar="ACTION")
    create = actions.add_parser(
        "create",
        parents=[_connection_options()],
        help="create a project",
        description=("Creates a project; then give it keys with `profiles keys create`."),
    )
    create.add_argument("name", help="unique project name (1 to 100 characters)")
    create.set_defaults(handler=_async(_project_create))
    listing = actions.add_parser(
        "list", parents=[_connection_options()], help="list projects", description="Lists projects."
    )
    listing.add_argument("--json", action="store_true", help="print JSON lines")
    listing.set_defaults(handler=_async(_project_list))


def _add_keys(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser(
        "keys",
        parents=[_connection_options()],
        help="show the keys of `profiles up`; create, revoke and list API keys",
        description="Without an action: prints the default project's keys that `profiles up`"
        " stored in the data directory. Actions manage the API keys of any project; only key"
        " hashes are stored, so a plain key is shown once, when it is created.",
    )
    keys.add_argument("--json", action="store_true", help="print the stored keys as JSON")
    keys.add_argument("--role", choices=("sdk", "read", "admin"), help="print only this key")
    keys.set_defaults(handler=_keys_stored)
    actions = keys.add_subparsers(title="actions", metavar="ACTION")
    create = actions.add_parser(
        "create",
        parents=[_connection_options()],
        help="create a key and print it once",
        description="Creates an API key; the plain key is printed once and never stored.",
    )
    create.add_argument("--project", required=True, help="project name")
    create.add_argument(
        "--role",
        required=True,
        choices=("sdk", "read", "admin"),
        help="sdk: tracking and identity calls of apps; read: query and segment reads;"
        " admin: everything",
    )
    create.add_argument("--name", default="", help="what the key is for (shown by `keys list`)")
    create.set_defaults(handler=_async(_keys_create))
    revoke = actions.add_parser(
        "revoke",
        parents=[_connection_options()],
        help="revoke a key",
        description="Revokes a key at once: calls with it are refused from now on.",
    )
    revoke.add_argument("key_id", help="the key ID (as `keys list` shows it)")
    revoke.set_defaults(handler=_async(_keys_revoke))
    listing = actions.add_parser(
        "list",
        parents=[_connection_options()],
        help="list keys (never their secrets)",
        description="Lists keys, revoked ones included, of one project or of all.",
    )
    listing.add_argument("--project", help="project name (default: all projects)")
    listing.add_argument("--json", action="store_true", help="print JSON lines")
    listing.set_defaults(handler=_async(_keys_list))


def _add_settings(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    settings = commands.add_parser(
        "settings",
        help="read and change per-project settings",
        description="Per-project settings (for example identity.quarantine_days).",
    )
    settings.set_defaults(group_parser=settings)
    actions = settings.add_subparsers(title="actions", metavar="ACTION")
    get = actions.add_parser(
        "get",
        parents=[_connection_options()],
        help="print settings as JSON",
        description="Prints one setting, or all of them with their defaults, as JSON.",
    )
    get.add_argument("--project", required=True, help="project name")
    get.add_argument("setting", nargs="?", help="setting name (default: all)")
    get.set_defaults(handler=_async(_settings_get))
    set_ = actions.add_parser(
        "set",
        parents=[_connection_options()],
        help="change a setting",
        description='Changes a setting. VALUE is read as JSON (60, true, ["a", "b"]) and'
        " otherwise taken as a plain string.",
    )
    set_.add_argument("--project", required=True, help="project name")
    set_.add_argument("setting", help="setting name")
    set_.add_argument("value", help="new value, as JSON or a plain string")
    set_.set_defaults(handler=_async(_settings_set))


# --- running the suite -------------------------------------------------------------------------


def _data_dir_option() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--data-dir",
        default=argparse.SUPPRESS,
        help="data directory of `profiles up`, where its keys are (default: PROFILES_DATA_DIR"
        " or ~/.profiles)",
    )
    return options


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo",
        parents=[_data_dir_option()],
        help="feed the running suite with realistic synthetic users",
        description="Sends synthetic traffic through the public API of the running suite:"
        " installations on iOS, Android and Web, weeks of sessions (ImportEvents), logins and"
        " logouts (Identify, Logout), consent changes, crashes and a few live sessions"
        " (TrackEvents). Calls the suite `profiles up` runs on the data directory, with the"
        " keys it stored there (flags and PROFILES_INGEST_ADDRESS / PROFILES_IDENTITY_ADDRESS"
        " win). Identified users get the custom IDs user-1, user-2, ... (user-1 always logs"
        " in). A progress bar goes to stderr, a summary to stdout.",
    )
    demo.add_argument("--users", type=int, default=100, help="synthetic users (default 100)")
    demo.add_argument("--ingest-address", help="ingest's host:port (default: the running suite's)")
    demo.add_argument(
        "--identity-address", help="identity's host:port (default: the running suite's)"
    )
    demo.add_argument(
        "--key", help="an admin API key for every call (default: the keys `profiles up` stored)"
    )
    demo.add_argument(
        "--seed", type=int, help="random seed; the same seed sends the same (duplicate) events"
    )
    demo.set_defaults(handler=_demo)


def _add_import(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    importer = commands.add_parser(
        "import",
        parents=[_data_dir_option()],
        help="backfill events from a JSONL file through ImportEvents",
        description="Sends every line of FILE (one profiles.ingest.v1.Event in proto JSON per"
        ' line; see docs/ingest.md, "Validation rules") through ImportEvents in batches'
        " of 500, with a progress bar on stderr, then prints how many events were accepted,"
        " duplicates or rejected (by reason). Safe to re-run: events already stored come back"
        " as duplicates, so an interrupted import resumes. Exits 1 if any line was rejected or"
        " unreadable.",
    )
    importer.add_argument("file", type=Path, help="the JSONL file")
    importer.add_argument(
        "--address",
        help="ingest's host:port (default: the running suite's, or PROFILES_INGEST_ADDRESS)",
    )
    importer.add_argument("--key", help="an admin API key (default: the one `profiles up` stored)")
    importer.add_argument("--json", action="store_true", help="print the summary as JSON")
    importer.set_defaults(handler=_import)


def _stored_key(args: argparse.Namespace, role: str) -> str:
    from profiles_cli.datadir import DataDir

    return DataDir(settings_from(args).data_dir).read_keys()[role]


def _key_source(args: argparse.Namespace) -> str:
    from profiles_cli.datadir import DataDir

    if getattr(args, "key", None):
        return "the key given with --key"
    return f"the keys stored in {DataDir(settings_from(args).data_dir).keys_file}"


def _demo(args: argparse.Namespace) -> int:
    from profiles_cli.demo import run_demo

    if args.users < 1:
        print("profiles demo: --users must be at least 1", file=sys.stderr)
        return 2
    addresses = suite_addresses(
        args,
        {
            "ingest": (args.ingest_address, "--ingest-address"),
            "identity": (args.identity_address, "--identity-address"),
        },
    )
    ingest, identity = addresses["ingest"], addresses["identity"]
    sdk_key = args.key or _stored_key(args, "sdk")
    admin_key = args.key or _stored_key(args, "admin")
    try:
        summary = asyncio.run(
            run_demo(args.users, ingest, identity, sdk_key, admin_key, seed=args.seed)
        )
    except (grpc.aio.AioRpcError, ExceptionGroup) as failure:
        error = first_rpc_error(failure)
        if error is None:
            raise
        tried = f"ingest at {ingest} and identity at {identity} with {_key_source(args)}"
        message = call_failed("profiles demo", tried, error, "--ingest-address", _where(args))
        print(message, file=sys.stderr)
        return 1
    print(summary.text())
    if summary.users_logged_in:
        print("Look one up: GetProfile with custom_id user-1 (see the README)")
    return 0


def _import(args: argparse.Namespace) -> int:
    from profiles_cli.importer import run_import

    path: Path = args.file
    problem = _not_a_file(path)
    if problem:
        print(f"profiles import: {path}: {problem}", file=sys.stderr)
        return 2
    address = suite_addresses(args, {"ingest": (args.address, "--address")})["ingest"]
    key = args.key or _stored_key(args, "admin")
    try:
        summary = asyncio.run(run_import(path, address, key, size=path.stat().st_size))
    except (grpc.aio.AioRpcError, ExceptionGroup) as failure:
        error = first_rpc_error(failure)
        if error is None:
            raise
        tried = f"ingest at {address} with {_key_source(args)}"
        message = call_failed("profiles import", tried, error, "--address", _where(args))
        print(f"{message}; re-run to resume", file=sys.stderr)
        return 1
    print(json.dumps(summary.as_dict(), indent=2) if args.json else summary.text())
    return 1 if summary.rejected or summary.unreadable else 0


def _not_a_file(path: Path) -> str:
    """Why path is no file to read events from, else "": what it is instead, not just "no such
    file" for a directory that is there."""
    try:
        if path.is_dir():
            return "is a directory; give the JSONL file (one event per line)"
        if not path.exists():
            return "no such file"
        if not path.is_file():
            return "is not a regular file; give the JSONL file (one event per line)"
    except OSError as exc:  # a directory on the way that this user may not enter
        return f"cannot read it ({exc.strerror or exc})"
    return ""


def first_rpc_error(failure: BaseException) -> grpc.aio.AioRpcError | None:
    """The call error behind failure, also when a TaskGroup wrapped it in an ExceptionGroup."""
    if isinstance(failure, grpc.aio.AioRpcError):
        return failure
    if isinstance(failure, BaseExceptionGroup):
        for inner in failure.exceptions:
            found = first_rpc_error(inner)
            if found is not None:
                return found
    return None


def call_failed(
    command: str,
    tried: str,
    error: grpc.aio.AioRpcError,
    address_flag: str,
    where: str = "",
) -> str:
    """One line: what was tried, what came back, what to do. `where` is the --data-dir flag the
    command was given, for the commands the advice names. Both commands call with admin keys
    (import only with one; demo's --key is used for every call)."""
    code = error.code()
    answer = f"{code.name} ({error.details()})"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        advice = (
            "is the suite running? `profiles up` starts it, `profiles status` shows where it"
            f" listens; or pass {address_flag}"
        )
    elif code == grpc.StatusCode.PERMISSION_DENIED:
        advice = (
            "the suite knows this key, but its role may not make this call, which needs an admin"
            f' key: pass --key "$(profiles keys{where} --role admin)" (the admin key'
            f" `profiles up` stored), or make one with `profiles keys create{where} --project"
            " NAME --role admin`"
        )
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        advice = (
            "that suite does not know this key: is it the suite of this data directory"
            " (`profiles status`, --data-dir)? Or pass --key"
        )
    else:
        advice = "see the services' logs (`profiles status` shows where they are)"
    return f"{command}: tried {tried}: {answer}; {advice}"


class NoSuiteRunning(FailedPrecondition):
    reason = "NO_SUITE_RUNNING"


def suite_addresses(
    args: argparse.Namespace, given: dict[str, tuple[str | None, str]]
) -> dict[str, str]:
    """The address of each service in `given` (name -> (address from its flag or None, the
    flag)): the flag's, else PROFILES_<SERVICE>_ADDRESS, else the address of the suite `profiles
    up` runs on the data directory. With none of these, and a data directory that holds a suite
    (or was named), raises NoSuiteRunning rather than trying the default ports, where another
    suite (or nothing) may listen; with a data directory that never held one, the defaults."""
    from profiles_cli.preflight import holds_suite
    from profiles_cli.suite import data_dir_flag, live_record

    settings = settings_from(args)
    addresses = dict(settings.addresses)
    from_env = {name for name in addresses if f"PROFILES_{name.upper()}_ADDRESS" in os.environ}
    record = live_record(settings.data_dir)
    if record is not None:
        for name, address in record.addresses().items():
            if name not in from_env:
                addresses[name] = address
    else:
        unresolved = [
            flag for name, (value, flag) in given.items() if not value and name not in from_env
        ]
        chosen = bool(getattr(args, "data_dir", None)) or "PROFILES_DATA_DIR" in os.environ
        if unresolved and (chosen or holds_suite(settings.data_dir)):
            raise NoSuiteRunning(
                f"no `profiles up` runs on {settings.data_dir}: start it with"
                f" `profiles up{data_dir_flag(settings.data_dir)}`, or pass"
                f" {' and '.join(unresolved)}"
            )
    addresses.update({name: value for name, (value, _) in given.items() if value})
    return addresses


def settings_from(args: argparse.Namespace) -> Settings:
    """PROFILES_* environment, overridden by the flags given."""
    settings = Settings.from_env()
    changes: dict[str, object] = {}
    if getattr(args, "data_dir", None):
        changes["data_dir"] = Path(args.data_dir).expanduser().absolute()
    if getattr(args, "database_url", None):
        changes["database_url"] = args.database_url
    if getattr(args, "redis_url", None):
        changes["redis_url"] = args.redis_url
    return settings.with_changes(**changes) if changes else settings


def _up(args: argparse.Namespace) -> int:
    from profiles_cli.up import run_up  # grpc and the embedded servers only when needed

    return run_up(settings_from(args))


def _serve(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if args.service == "edge":
        return _serve_edge(settings)
    if args.service == "console":
        return _serve_console(settings)
    missing = [
        env
        for env, value in (
            ("PROFILES_DATABASE_URL", settings.database_url),
            ("PROFILES_REDIS_URL", settings.redis_url),
        )
        if not value
    ]
    if missing:
        print(
            f"profiles serve: {' and '.join(missing)} must be set"
            " (`profiles up` starts embedded databases and sets them)",
            file=sys.stderr,
        )
        return 2
    from profiles_cli.preflight import redact
    from profiles_cli.runner import run_service
    from shared.db import connection_lost
    from shared.server import PortInUse

    try:
        run_service(args.service, settings)
    except PortInUse as exc:
        env = f"PROFILES_{args.service.upper()}_PORT"
        print(f"profiles serve: {exc}; choose another with {env}", file=sys.stderr)
        return 1
    except Exception as exc:
        # A database it cannot reach at start (down, a wrong host or port, a malformed URL):
        # one line naming it, without its password, not a traceback.
        if not (connection_lost(exc) or type(exc).__module__.startswith("asyncpg")):
            raise
        print(
            f"profiles serve: {args.service}: cannot use the database at"
            f" {redact(settings.database_url)} ({type(exc).__name__}: {exc});"
            " check PROFILES_DATABASE_URL",
            file=sys.stderr,
        )
        return 1
    return 0


def _serve_edge(settings: Settings) -> int:
    """The edge talks to ingest and identity only (PROFILES_INGEST_ADDRESS and
    PROFILES_IDENTITY_ADDRESS), never to PostgreSQL or Redis."""
    from profiles_cli.preflight import port_is_free
    from services.edge.app import run

    if not port_is_free(settings.bind_address, settings.edge_port):
        print(
            f"profiles serve: edge: port {settings.edge_port} is in use; choose another with"
            " PROFILES_EDGE_PORT",
            file=sys.stderr,
        )
        return 1
    run(settings)
    return 0


def _serve_console(settings: Settings) -> int:
    """The web console needs Redis only (its session store); it reads through the services."""
    if not settings.redis_url:
        print("profiles serve: PROFILES_REDIS_URL must be set", file=sys.stderr)
        return 2
    from profiles_cli.preflight import port_is_free
    from services.console.app import run_console

    if not port_is_free(settings.bind_address, settings.console_port):
        print(
            f"profiles serve: console: port {settings.console_port} is in use; choose another"
            " with PROFILES_CONSOLE_PORT",
            file=sys.stderr,
        )
        return 1
    try:
        run_console(settings)
    except OSError as exc:  # the port is taken
        print(
            f"profiles serve: console: {exc}; choose another port with PROFILES_CONSOLE_PORT",
            file=sys.stderr,
        )
        return 1
    return 0


class _TopicNames:
    """The bus topics' names as argparse choices, looked up only when a topic is checked or
    listed: the topic catalogue imports the bus (Redis, structlog), which would cost every
    `profiles` command a fifth of a second of CPU for a parser it does not use."""

    def __contains__(self, name: object) -> bool:
        from shared.topics import TOPICS

        return name in TOPICS

    def __iter__(self) -> Iterator[str]:
        from shared.topics import TOPICS

        return iter(sorted(TOPICS))


def _add_dead_letters(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from profiles_cli.dead_letters import HANDLER_REASONS

    redis_options = argparse.ArgumentParser(add_help=False)
    redis_options.add_argument(
        "--data-dir",
        default=argparse.SUPPRESS,
        help="data directory of `profiles up`, whose Redis to read (default: PROFILES_DATA_DIR"
        " or ~/.profiles)",
    )
    redis_options.add_argument(
        "--redis-url",
        default=argparse.SUPPRESS,
        help="Redis URL (default: PROFILES_REDIS_URL, else the Redis of `profiles up`)",
    )
    dead = commands.add_parser(
        "dead-letters",
        parents=[redis_options],
        help="list the messages the bus gave up on; replay them once the cause is fixed",
        description="Without an action: counts each topic's dead letters by reason and consumer"
        " group. A consumer dead-letters a message it cannot decode, or whose handler failed on"
        " its last delivery (an outage of the database or Redis spends no delivery). Replay"
        " puts letters back on their topic, every consumer group reads them again (they"
        " tolerate repeats), and removes them from the dead-letter stream.",
    )
    dead.add_argument("--json", action="store_true", help="print every letter as a JSON line")
    dead.set_defaults(handler=_async(_dead_letters_list), group_parser=dead)
    actions = dead.add_subparsers(title="actions", metavar="ACTION")
    replay = actions.add_parser(
        "replay",
        parents=[redis_options],
        help="put dead letters back on their topic",
        description="Replays the oldest dead letters of a topic: by default those whose handler"
        f" failed ({', '.join(HANDLER_REASONS)}); name other reasons with --reason (a message of"
        " an unknown kind, once an upgrade knows it).",
    )
    # A metavar, as argparse would otherwise spell the choices out while building the parser.
    replay.add_argument(
        "topic", choices=_TopicNames(), metavar="TOPIC", help="the topic: %(choices)s"
    )
    replay.add_argument(
        "--reason",
        action="append",
        dest="reasons",
        metavar="REASON",
        help=f"replay letters of this reason (repeatable; default: {', '.join(HANDLER_REASONS)})",
    )
    replay.add_argument("--group", default="", help="only the letters of this consumer group")
    replay.add_argument(
        "--limit", type=int, default=1000, help="at most this many, oldest first (default 1000)"
    )
    replay.set_defaults(handler=_async(_dead_letters_replay))


def _redis_url_for(args: argparse.Namespace) -> str:
    """--redis-url, else PROFILES_REDIS_URL, else the Redis of the `profiles up` running on the
    data directory."""
    from profiles_cli.suite import data_dir_flag, read_record

    settings = settings_from(args)
    if settings.redis_url:
        return settings.redis_url
    record = read_record(settings.data_dir)
    server = None if record is None or not record.is_alive() else record.servers.get("redis")
    if server is None:
        raise NoSuiteRunning(
            f"no `profiles up` runs on {settings.data_dir}: start it with"
            f" `profiles up{data_dir_flag(settings.data_dir)}`, or pass --redis-url"
        )
    return server.url


async def _dead_letters_list(args: argparse.Namespace) -> int:
    from profiles_cli.dead_letters import summaries
    from shared.bus import Bus
    from shared.topics import TOPICS

    bus = Bus.from_url(_redis_url_for(args), settings_from(args).redis_prefix)
    try:
        if args.json:
            for topic in TOPICS:
                for letter in await bus.dead_letters(topic):
                    print(json.dumps(_letter_json(letter)))
            return 0
        for summary in await summaries(bus):
            reasons = ", ".join(f"{reason}: {n}" for reason, n in summary.by_reason.items())
            print(f"{summary.topic:<16} {summary.count:>6}  {reasons}")
    finally:
        await bus.aclose()
    return 0


def _letter_json(letter: Any) -> dict[str, Any]:
    return {
        "topic": letter.topic,
        "dead_id": letter.dead_id,
        "reason": letter.reason,
        "group": letter.group,
        "entry_id": letter.entry_id,
        "deliveries": letter.deliveries,
        "kind": letter.kind,
        "project_id": letter.project,
    }


async def _dead_letters_replay(args: argparse.Namespace) -> int:
    from profiles_cli.dead_letters import HANDLER_REASONS, replay
    from shared.bus import Bus

    if args.limit < 1:
        print("profiles dead-letters replay: --limit must be at least 1", file=sys.stderr)
        return 2
    bus = Bus.from_url(_redis_url_for(args), settings_from(args).redis_prefix)
    try:
        reasons = args.reasons or list(HANDLER_REASONS)
        replayed = await replay(bus, args.topic, reasons, args.group, args.limit)
    finally:
        await bus.aclose()
    for letter, entry_id in replayed:
        print(f"replayed {letter.dead_id} ({letter.reason}, {letter.kind}) as {entry_id}")
    print(f"{len(replayed)} dead letters of {args.topic} replayed")
    return 0


# --- admin commands ----------------------------------------------------------------------------


def _async(command: Callable[[argparse.Namespace], Coroutine[Any, Any, int]]) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        from shared.logging import configure_logging

        configure_logging("warning")  # migration notices would mix with the output
        return asyncio.run(command(args))

    return handler


@asynccontextmanager
async def tenancy_for(args: argparse.Namespace) -> AsyncIterator[TenancyRepository]:
    """A TenancyRepository on the configured or embedded database, migrated."""
    from profiles_cli.datadir import DataDir
    from profiles_cli.preflight import check_postgres, require_suite_data, unusable, usual_data_dirs
    from profiles_cli.suite import release_lock, take_lock
    from shared.db import create_pool, migrate
    from shared.embedded import EmbeddedPostgres
    from shared.tenancy import TenancyRepository

    settings = settings_from(args)
    url = settings.database_url
    postgres: EmbeddedPostgres | None = None
    lock = None
    if not url:
        data_dir = DataDir(settings.data_dir)
        # Never a new database: a typo'd --data-dir would get one, and the project with it.
        require_suite_data(data_dir.path, usual_data_dirs())
        try:
            data_dir.create()
            # Held while this command uses the directory's PostgreSQL on its own, so that a
            # `profiles up` cannot adopt a server this command is about to stop. None: a
            # `profiles up` owns the directory and its server.
            lock = take_lock(data_dir.path)
        except OSError as exc:
            raise unusable(data_dir.path, exc) from exc
        embedded = EmbeddedPostgres(data_dir.postgres)
        # Stopped afterwards only if this command started it (not when `profiles up` runs).
        postgres = None if embedded.is_running() or lock is None else embedded
        url = await asyncio.to_thread(embedded.start)
    else:
        await check_postgres(url)
    try:
        await migrate(url)
        pool = await create_pool(url, max_size=2)
        try:
            yield TenancyRepository(pool)
        finally:
            await pool.close()
    finally:
        if postgres is not None:
            await asyncio.to_thread(postgres.stop)
        release_lock(lock)


async def _project_create(args: argparse.Namespace) -> int:
    async with tenancy_for(args) as tenancy:
        project = await tenancy.create_project(args.name)
    print(f"Created project {project.name} ({project.project_id}).")
    print(
        f"Give it a key: profiles keys create{_where(args)} --project"
        f" {shlex.quote(project.name)} --role admin"
    )
    return 0


async def _project_list(args: argparse.Namespace) -> int:
    async with tenancy_for(args) as tenancy:
        projects = await tenancy.list_projects()
    rows = [
        {"name": p.name, "project_id": str(p.project_id), "create_time": _time(p.create_time)}
        for p in projects
    ]
    empty = f"No projects yet: profiles project create{_where(args)} NAME"
    _print_rows(rows, as_json=args.json, empty=empty)
    return 0


async def _keys_create(args: argparse.Namespace) -> int:
    async with tenancy_for(args) as tenancy:
        project = await tenancy.get_project_by_name(args.project)
        issued = await tenancy.create_key(project.project_id, args.role, args.name)
    print(f"Created {issued.key.role} key {issued.key.key_id} of project {project.name}.")
    print("The key is shown this once; store it now:")
    print(issued.plain_key)
    return 0


async def _keys_revoke(args: argparse.Namespace) -> int:
    async with tenancy_for(args) as tenancy:
        key = await tenancy.revoke_key(args.key_id)
    print(f"Revoked {key.role} key {key.key_id} (project {key.project_id}).")
    return 0


async def _keys_list(args: argparse.Namespace) -> int:
    async with tenancy_for(args) as tenancy:
        if args.project:
            projects = [await tenancy.get_project_by_name(args.project)]
        else:
            projects = await tenancy.list_projects()
        rows = []
        for project in projects:
            for key in await tenancy.list_keys(project.project_id):
                rows.append(
                    {
                        "key_id": key.key_id,
                        "project": project.name,
                        "role": key.role,
                        "name": key.display_name,
                        "create_time": _time(key.create_time),
                        "revoke_time": _time(key.revoke_time),
                    }
                )
    _print_rows(rows, as_json=args.json, empty="No keys.")
    return 0


def _where(args: argparse.Namespace) -> str:
    """The --data-dir the command was given (or the directory PROFILES_DATA_DIR names), for a
    command it suggests: the suggestion must reach the same database."""
    from profiles_cli.suite import data_dir_flag

    settings = settings_from(args)
    return "" if settings.database_url else data_dir_flag(settings.data_dir)


def _keys_stored(args: argparse.Namespace) -> int:
    from profiles_cli.datadir import DataDir

    keys = DataDir(settings_from(args).data_dir).read_keys()
    if args.role:
        print(keys[args.role])
    elif args.json:
        print(json.dumps(keys, indent=2))
    else:
        for role, key in keys.items():
            print(f"{role:<6} {key}")
    return 0


async def _settings_get(args: argparse.Namespace) -> int:
    async with tenancy_for(args) as tenancy:
        project = await tenancy.get_project_by_name(args.project)
        values = await tenancy.get_settings(project.project_id)
    if args.setting is None:
        print(json.dumps(values, indent=2, sort_keys=True))
        return 0
    if args.setting not in values:
        from shared.errors import NotFound

        raise NotFound(f"no setting named {args.setting!r}; known: {', '.join(sorted(values))}")
    print(json.dumps(values[args.setting]))
    return 0


async def _settings_set(args: argparse.Namespace) -> int:
    value = parse_value(args.value)
    async with tenancy_for(args) as tenancy:
        project = await tenancy.get_project_by_name(args.project)
        await tenancy.set_setting(project.project_id, args.setting, value)
    print(f"{project.name}: {args.setting} = {json.dumps(value)}")
    return 0


def parse_value(text: str) -> Any:
    """JSON if it parses (60, true, ["a"]), else the text itself, so words need no quotes."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds")


def _print_rows(rows: list[dict[str, str | None]], *, as_json: bool, empty: str) -> None:
    if as_json:
        for record in rows:
            print(json.dumps(record))
        return
    if not rows:
        print(empty)
        return
    table = [{c: v or "" for c, v in row.items()} for row in rows]  # null prints as blank
    columns = list(table[0])
    widths = {c: max(len(c), *(len(r[c]) for r in table)) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for line in table:
        print("  ".join(line[c].ljust(widths[c]) for c in columns).rstrip())


if __name__ == "__main__":
    main()
