"""Parts every benchmark uses: back-ends, a project with keys, service processes, load, figures.

A benchmark runs in one process that owns everything it starts:

    with contextlib.ExitStack() as stack:
        work_dir = make_work_dir(stack)
        backends = start_backends(stack, work_dir, args.database_url, args.redis_url)
        project = asyncio.run(create_project(backends.database_url, roles=("admin",)))
        settings = service_settings(backends, "query", work_dir)
        service = start_service_process(stack, "query", settings, work_dir)
        figures = asyncio.run(measure(...))  # wait_serving, drive, summarize
    print_figures("echo", figures, quick=labelled_quick(args))

Everything started is stopped when the `with` block ends, in reverse order, also on Ctrl-C and
SIGTERM (`run_main` turns SIGTERM into KeyboardInterrupt). Life-cycle steps are synchronous on
purpose: a KeyboardInterrupt then always reaches the ExitStack, even in the middle of a start.

The service under test and the baseline run as subprocesses, so the client (this process) does not
share an event loop or a GIL with either server. All of them share this machine's cores, so
absolute figures are only hints; the ratio to a baseline measured in the same run is the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, TypeVar

import asyncpg
import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.cpu_ledger import cpu_seconds_of
from shared.db import create_pool, migrate
from shared.embedded import EmbeddedPostgres, EmbeddedRedis
from shared.ports import free_port
from shared.settings import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, Settings
from shared.tenancy import TenancyRepository

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
# A call that starts this much after its slot in the schedule found every worker busy.
LATE_START_S = 0.005

T = TypeVar("T")


class BenchError(RuntimeError):
    """The benchmark cannot go on (a process did not start, a check call failed)."""


# --- arguments and the main wrapper ----------------------------------------------------------


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument(
        "--quick",
        action="store_true",
        help="small sizes (under two minutes); figures are labelled quick and carry no verdict",
    )
    sizes.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes (seconds): checks that the benchmark runs end to end, as the tests do;"
        " figures are labelled quick and mean nothing",
    )
    parser.add_argument(
        "--database-url",
        help="PostgreSQL to use instead of an embedded one (a project bench-<random> is created)",
    )
    parser.add_argument("--redis-url", help="Redis to use instead of an embedded one")


def size_choice(args: argparse.Namespace, smoke: T, quick: T, full: T) -> T:
    """The sizes the arguments ask for: --smoke, --quick, or the full run."""
    if args.smoke:
        return smoke
    return quick if args.quick else full


def labelled_quick(args: argparse.Namespace) -> bool:
    """Whether the figures are labelled quick (no verdict): every run but the full one."""
    return bool(args.quick or args.smoke)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `with` block and `finally` runs."""


def run_main(main: Callable[[], int]) -> None:
    """Runs main and exits with its code; Ctrl-C and SIGTERM end it cleanly with 130 and 143."""

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        code = main()
    except KeyboardInterrupt as exc:
        print("interrupted; everything started was stopped", file=sys.stderr)
        code = 143 if isinstance(exc, Terminated) else 130
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


# --- back-ends and a project -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backends:
    database_url: str
    redis_url: str
    embedded: bool
    # The embedded PostgreSQL when this run started one (a bench may restart it), else None.
    postgres: EmbeddedPostgres | None = None


@dataclass(frozen=True, slots=True)
class BenchProject:
    project_id: uuid.UUID
    keys: dict[str, str]  # role -> plain API key


def make_work_dir(stack: contextlib.ExitStack) -> Path:
    """A temporary directory for embedded data and process logs, removed at the end."""
    directory = stack.enter_context(
        tempfile.TemporaryDirectory(prefix="profiles-bench-", ignore_cleanup_errors=True)
    )
    return Path(directory)


def start_backends(
    stack: contextlib.ExitStack,
    work_dir: Path,
    database_url: str | None,
    redis_url: str | None,
    *,
    postgres_settings: Mapping[str, str] | None = None,
) -> Backends:
    """Embedded PostgreSQL and Redis in work_dir (Unix sockets only), unless URLs are given;
    `postgres_settings` go to the embedded PostgreSQL only."""
    embedded = not (database_url and redis_url)
    postgres = None
    if not database_url:
        postgres = EmbeddedPostgres(
            work_dir / "postgres", fast_unsafe=True, settings=postgres_settings
        )
        stack.callback(postgres.stop)  # registered first: stop is idempotent, start may fail
        database_url = postgres.start()
    if not redis_url:
        redis = EmbeddedRedis(work_dir / "redis", persist=False)
        stack.callback(redis.stop)
        redis_url = redis.start()
    return Backends(database_url, redis_url, embedded, postgres)


async def create_project(database_url: str, roles: Iterable[str] = ("admin",)) -> BenchProject:
    """Migrates, then creates a project bench-<random> with one key per role."""
    await migrate(database_url)
    pool = await create_pool(database_url, max_size=2)
    try:
        tenancy = TenancyRepository(pool)
        project = await tenancy.create_project(f"bench-{uuid.uuid4().hex[:12]}")
        keys = {}
        for role in roles:
            issued = await tenancy.create_key(project.project_id, role, "benchmark")
            keys[role] = issued.plain_key
        return BenchProject(project.project_id, keys)
    finally:
        await pool.close()


# The columns a bulk copy writes: all but those the database fills (identity, generated).
CATALOG_COLUMNS = """
    SELECT column_name FROM information_schema.columns
    WHERE table_schema = current_schema() AND table_name = $1
      AND is_identity = 'NO' AND is_generated = 'NEVER'
    ORDER BY ordinal_position"""

# Names come from the catalog and the benchmark's own code, quoted; values are parameters.
CLONE_ROWS = """
    INSERT INTO {table} ({columns})
    SELECT {values}
    FROM {clones} AS m
    JOIN {table} AS x ON x.project_id = $1::uuid AND x.{by} = m.{template}"""


async def clone_profile_rows(
    conn: asyncpg.Connection,
    table: str,
    source_project: uuid.UUID,
    target_project: uuid.UUID,
    clones: str,
    *,
    by: str = "profile_id",
    expressions: Mapping[str, str] | None = None,
) -> int:
    """Copies every row of `table` that belongs to a template profile (or installation, `by`)
    to each of its clones, in one INSERT ... SELECT; returns the rows written.

    `clones` names a table with columns template_profile_id, template_installation_id,
    profile_id and installation_id, one row per clone. Rows take the clone's project_id,
    profile_id and installation_id; `expressions` overrides other columns (SQL over `x`, the
    template row, and `m`, the clone). Columns filled by the database (identity, generated) are
    left to it. Bulk loading by copying rows the real services wrote for a template keeps the
    loaded rows exactly as the services would write them."""
    columns = await conn.fetch(CATALOG_COLUMNS, table)
    if not columns:
        raise BenchError(f"no table {table}")
    own = {
        "project_id": "$2::uuid",
        "profile_id": "m.profile_id",
        "installation_id": "m.installation_id",
        **(expressions or {}),
    }
    names = [r["column_name"] for r in columns]
    values = [own.get(n, f"x.{_quoted(n)}") for n in names]
    statement = CLONE_ROWS.format(
        table=_quoted(table),
        columns=", ".join(_quoted(n) for n in names),
        values=", ".join(values),
        clones=_quoted(clones),
        by=_quoted(by),
        template="template_profile_id" if by == "profile_id" else "template_installation_id",
    )
    status = await conn.execute(statement, source_project, target_project)
    return int(status.rsplit(" ", 1)[-1])


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --- processes -------------------------------------------------------------------------------


def service_settings(
    backends: Backends, name: str, work_dir: Path, *, log_level: str = "warning"
) -> Settings:
    """Settings for one service on free ports, its metrics server on too (as in production)."""
    return Settings(
        database_url=backends.database_url,
        redis_url=backends.redis_url,
        redis_prefix=f"bench-{uuid.uuid4().hex[:8]}",
        internal_token=secrets.token_urlsafe(32),
        ports={**DEFAULT_PORTS, name: free_port()},
        metrics_ports={**DEFAULT_METRICS_PORTS, name: free_port()},
        log_level=log_level,
        data_dir=work_dir,
    )


def suite_settings(
    backends: Backends, names: Sequence[str], work_dir: Path, *, log_level: str = "warning"
) -> Settings:
    """Settings shared by several services that talk to each other (one Redis prefix, one
    internal credential): each named service on free ports, the others reaching it there."""
    ports = {**DEFAULT_PORTS, **{name: free_port() for name in names}}
    return Settings(
        database_url=backends.database_url,
        redis_url=backends.redis_url,
        redis_prefix=f"bench-{uuid.uuid4().hex[:8]}",
        internal_token=secrets.token_urlsafe(32),
        ports=ports,
        metrics_ports={**DEFAULT_METRICS_PORTS, **{name: free_port() for name in names}},
        addresses={name: f"127.0.0.1:{port}" for name, port in ports.items()},
        log_level=log_level,
        data_dir=work_dir,
    )


class ChildProcess:
    """A subprocess in its own session (a terminal's Ctrl-C reaches only the benchmark, which
    stops its children itself), its output kept in a log file for the error message."""

    def __init__(self, label: str, command: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.label = label
        self.log = log
        self._command = list(command)
        self._env = env
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self) -> None:
        with self.log.open("wb") as output:
            self._process = subprocess.Popen(
                self._command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            raise BenchError(
                f"{self.label} exited with code {self._process.returncode}:\n{self.log_tail()}"
            )

    def stop(self) -> None:
        """SIGTERM (a graceful shutdown), then SIGKILL after STOP_TIMEOUT_S. Idempotent."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def cpu_seconds(self) -> float:
        """CPU time (user + system, all threads) the process has used so far."""
        assert self._process is not None
        try:
            return cpu_seconds_of(psutil.Process(self._process.pid))
        except psutil.Error as exc:
            raise BenchError(f"{self.label} is gone: {exc}") from exc

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"


def child_env(settings: Settings | None = None) -> dict[str, str]:
    """This process's environment without PROFILES_* variables, plus the given settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROFILES_")}
    if settings is not None:
        env.update(settings.to_env())
    return env


def serve_command(name: str) -> list[str]:
    """`python -m profiles_cli.cli serve NAME`, or the same through profiles_cli.runner without a
    CLI."""
    if importlib.util.find_spec("profiles_cli.cli") is not None:
        return [sys.executable, "-m", "profiles_cli.cli", "serve", name]
    script = (
        "import sys; from profiles_cli.runner import run_service;"
        " from shared.settings import Settings;"
        " run_service(sys.argv[1], Settings.from_env())"
    )
    return [sys.executable, "-c", script, name]


def start_process(stack: contextlib.ExitStack, process: ChildProcess) -> ChildProcess:
    stack.callback(process.stop)
    process.start()
    return process


def start_service_process(
    stack: contextlib.ExitStack, name: str, settings: Settings, work_dir: Path
) -> ChildProcess:
    """Starts one suite service as a subprocess; wait for it with wait_serving."""
    process = ChildProcess(name, serve_command(name), child_env(settings), work_dir / f"{name}.log")
    return start_process(stack, process)


def start_bare_echo(stack: contextlib.ExitStack, work_dir: Path) -> tuple[ChildProcess, str]:
    """Starts bench.bare_echo (the baseline Echo server); returns it and its address."""
    port = free_port()
    command = [sys.executable, "-m", "bench.bare_echo", str(port)]
    process = ChildProcess("bare echo", command, child_env(), work_dir / "bare_echo.log")
    return start_process(stack, process), f"127.0.0.1:{port}"


def wait_http(url: str, process: ChildProcess, limit_s: float = START_TIMEOUT_S) -> None:
    """Polls `url` (an HTTP service's health check) until it answers 200; raises if the process
    exits."""
    deadline = time.monotonic() + limit_s
    while True:
        process.check_alive()
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1.0) as reply:
            if reply.status == 200:
                return
        if time.monotonic() > deadline:
            raise BenchError(f"{url} not up after {limit_s:.0f} s")
        time.sleep(0.1)


async def wait_serving(
    address: str, process: ChildProcess, service: str = "", limit_s: float = START_TIMEOUT_S
) -> None:
    """Polls grpc.health.v1 Check until `service` is SERVING; raises if the process exits."""
    deadline = time.monotonic() + limit_s
    request = health_pb2.HealthCheckRequest(service=service)
    while True:
        process.check_alive()
        # A channel per attempt: a channel whose connection was refused (the process is still
        # starting) waits out gRPC's reconnect backoff (1 s, 1.6 s, 2.6 s, ...) before it tries
        # again, which would find the service seconds after it began serving.
        async with grpc.aio.insecure_channel(address) as channel:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health_pb2_grpc.HealthStub(channel).Check(request, timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        if time.monotonic() > deadline:
            raise BenchError(f"{process.label} not SERVING after {limit_s:.0f} s")
        await asyncio.sleep(0.1)


# --- load ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """Open loop at `rate`: call i is due at start + i / rate, whatever earlier calls do, and at
    most `concurrency` calls are in flight; a call whose slot comes while all workers are busy
    starts late (counted), so a rate the target cannot sustain shows as a lower achieved rate.
    rate None: closed loop, each worker calls again as soon as its call ends, for duration_s
    (the throughput at this concurrency)."""

    rate: float | None  # calls per second; None: as fast as the target answers
    concurrency: int
    duration_s: float

    @property
    def calls(self) -> int | None:
        """Calls of an open-loop plan; a closed loop is bounded by time only."""
        if self.rate is None:
            return None
        return max(1, round(self.rate * self.duration_s))

    @property
    def time_limit_s(self) -> float:
        """No call starts after this (a target far behind schedule must not run for ever)."""
        if self.rate is None:
            return self.duration_s
        return 2 * self.duration_s + 5.0


@dataclass(slots=True)
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)  # send to reply, successful calls
    errors: Counter[str] = field(default_factory=Counter)  # status code name -> calls
    late_starts: int = 0
    planned: int = 0
    elapsed_s: float = 0.0
    server_cpu_s: float | None = None  # CPU the target process used meanwhile, if known

    @property
    def completed(self) -> int:
        return len(self.latencies_s) + sum(self.errors.values())

    @property
    def achieved_rate(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def server_cpu_us_per_call(self) -> float:
        """Server CPU per completed call in microseconds (NaN if not measured): unlike latency,
        hardly disturbed by other work on the machine."""
        if self.server_cpu_s is None or not self.completed:
            return math.nan
        return self.server_cpu_s * 1e6 / self.completed

    @classmethod
    def merged(cls, results: Iterable[LoadResult]) -> LoadResult:
        total = cls()
        for result in results:
            total.latencies_s.extend(result.latencies_s)
            total.errors.update(result.errors)
            total.late_starts += result.late_starts
            total.planned += result.planned
            total.elapsed_s += result.elapsed_s
            if result.server_cpu_s is not None:
                total.server_cpu_s = (total.server_cpu_s or 0.0) + result.server_cpu_s
        return total


async def drive(call: Callable[[], Awaitable[object]], plan: LoadPlan) -> LoadResult:
    """Runs `call` as plan says with plan.concurrency workers (see LoadPlan).

    A call that ends with a gRPC status other than OK is counted by code, not timed; any other
    exception is a bug of the benchmark and propagates.
    """
    planned = plan.calls
    result = LoadResult(planned=planned or 0)
    # Shared by the workers, so each slot goes to exactly one of them.
    slots = iter(range(planned)) if planned is not None else itertools.count()
    # An open loop starts its schedule a moment ahead, so that slot 0 is not late already.
    start = time.perf_counter() + (0.01 if plan.rate is not None else 0.0)
    stop_at = start + plan.time_limit_s

    async def worker() -> None:
        for slot in slots:
            now = time.perf_counter()
            if now > stop_at:
                return
            if plan.rate is not None:
                due = start + slot / plan.rate
                if due > now:
                    await asyncio.sleep(due - now)
                elif now - due > LATE_START_S:
                    result.late_starts += 1
            sent = time.perf_counter()
            try:
                await call()
            except grpc.aio.AioRpcError as exc:
                result.errors[exc.code().name] += 1
                continue
            result.latencies_s.append(time.perf_counter() - sent)

    async with asyncio.TaskGroup() as group:
        for _ in range(plan.concurrency):
            group.create_task(worker())
    result.elapsed_s = time.perf_counter() - start
    return result


Call = Callable[[], Awaitable[object]]


async def alternate(
    calls: Mapping[str, Call],
    plan: LoadPlan,
    rounds: int,
    *,
    warmup: LoadPlan | None = None,
    processes: Mapping[str, ChildProcess] | None = None,
) -> dict[str, list[LoadResult]]:
    """Drives each target `rounds` times, alternating the order (A B, B A, A B, ...), so drift
    in this machine's load falls on every target alike; `warmup` runs once per target first
    and is discarded. For a target with a process, each round checks that it is alive and
    records the CPU it used."""
    labels = list(calls)
    processes = processes or {}
    if warmup is not None:
        for label in labels:
            await drive(calls[label], warmup)
    results: dict[str, list[LoadResult]] = {label: [] for label in labels}
    for round_no in range(rounds):
        for label in labels if round_no % 2 == 0 else labels[::-1]:
            process = processes.get(label)
            if process is None:
                results[label].append(await drive(calls[label], plan))
                continue
            process.check_alive()
            cpu_before = process.cpu_seconds()
            result = await drive(calls[label], plan)
            result.server_cpu_s = process.cpu_seconds() - cpu_before
            results[label].append(result)
    return results


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of values, interpolated linearly between closest ranks
    (numpy's default); values need not be sorted. NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class LatencySummary:
    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, latencies_s: Sequence[float]) -> LatencySummary:
        ms = sorted(v * 1000 for v in latencies_s)
        return cls(
            count=len(ms),
            p50_ms=percentile(ms, 50),
            p90_ms=percentile(ms, 90),
            p99_ms=percentile(ms, 99),
            max_ms=ms[-1] if ms else math.nan,
        )


# --- figures ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured figure next to its baseline from the same run; ratio = value / baseline."""

    metric: str
    value: float
    unit: str
    baseline: str
    baseline_value: float

    @property
    def ratio(self) -> float | None:
        if not self.baseline_value or math.isnan(self.baseline_value) or math.isnan(self.value):
            return None
        return self.value / self.baseline_value


def _number(value: float | None, digits: int) -> float | None:
    if value is None or math.isnan(value):
        return None
    return round(value, digits)


def figure_line(bench: str, figure: Figure, *, quick: bool) -> str:
    """The JSON line of one figure, keys in the documented order."""
    return json.dumps(
        {
            "bench": bench,
            "metric": figure.metric,
            "value": _number(figure.value, 4),
            "unit": figure.unit,
            "baseline": figure.baseline,
            "baseline_value": _number(figure.baseline_value, 4),
            "ratio": _number(figure.ratio, 3),
            "quick": quick,
        }
    )


def print_figures(
    bench: str, figures: Iterable[Figure], *, quick: bool, file: IO[str] | None = None
) -> None:
    """Prints one JSON line per figure: the last lines of every benchmark's output."""
    out = file or sys.stdout
    for figure in figures:
        print(figure_line(bench, figure, quick=quick), file=out)
    out.flush()


async def postgres_server_pid(database_url: str) -> int:
    """The pid of the PostgreSQL server behind database_url (its postmaster), on this machine:
    the parent of its checkpointer."""
    conn = await asyncpg.connect(database_url)
    try:
        checkpointer = await conn.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'"
        )
    finally:
        await conn.close()
    return int(psutil.Process(checkpointer).ppid())


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user and system) of a process, of its children that ended (as it reaped
    them) and of those still running: a server's whole CPU, its connections' backends
    included."""
    process = psutil.Process(pid)
    times = process.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in process.children():
        with contextlib.suppress(psutil.NoSuchProcess):
            child_times = child.cpu_times()
            total += child_times.user + child_times.system
    return total
