"""Ingest benchmark: TrackEvents throughput end to end, as a ratio to a raw COPY of the same rows.

    python -m bench.ingest [--quick] [--clients C] [--duration S]
    python -m bench.ingest --soak [--soak-minutes 15] [--warmup-minutes 2]

Starts identity and ingest as subprocesses (`profiles serve`) on embedded PostgreSQL and Redis
(the default of `profiles up`), creates a project, then:
- warm-up: one batch per group of installations, so identity knows all of them (steady state:
  most traffic comes from installations already seen);
- load: C concurrent clients (default 4, one channel each, in this process) send batches of 500
  realistic events (custom events with attributes, session start/heartbeat/end, attribute
  operations, consent changes, installation updates, crashes; over 5,000 installations) back
  to back for S seconds; per batch the latency and the accepted count are recorded. When
  TrackEvents returns, its accepted events are committed, so accepted/s is committed/s; the
  count of rows in `events` is checked against it at the end;
- baseline, in the same run: the rows just stored, read back and written with asyncpg's COPY
  (`copy_records_to_table`) in batches of 500 over one connection into a table created
  `LIKE events INCLUDING ALL` (same columns, identity, primary key and indexes), no service in
  between.

--soak: the same load, sustained; after the warm-up (default 2 minutes) the ingest process's RSS
is sampled every 30 s for 15 minutes and the growth from first to last sample is printed as the
JSON line `ingest_rss_growth_pct` (goal: under 5%). Shorter --soak-minutes/--warmup-minutes runs
are labelled SHORTENED (and `quick`).

Output: a report (with the breakdown, the default: database time per statement, rows written
per table, and the write-ahead log per event against the COPY's per row, by record kind and
relation; and the run's CPU per event by process, with the raw COPY's CPU per row and what the
0.3 and 0.5 ratios would leave the cores per event), then JSON lines; the headline is
`trackevents_events_per_s` with baseline `raw_copy_rows_per_s`. Everything shares this
machine's cores (client, two services, PostgreSQL, Redis), so the ratio is the figure, not the
absolute rates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import psutil

from bench.common import (
    ChildProcess,
    Figure,
    LatencySummary,
    add_backend_arguments,
    create_project,
    free_port,
    labelled_quick,
    make_work_dir,
    postgres_server_pid,
    print_figures,
    process_tree_cpu_seconds,
    run_main,
    service_settings,
    size_choice,
    start_backends,
    start_service_process,
    wait_serving,
)
from bench.cpu_ledger import (
    CpuLedger,
    ProcessCpu,
    budget_us_per_event,
    cpu_table,
    local_redis_pid,
    process_cpu_seconds,
    this_process_cpu_seconds,
)
from bench.statements import (
    STATEMENT_STATS_SETTINGS,
    breakdown_table,
    read_costs,
    start_recording,
)
from bench.table_writes import (
    TableWrites,
    WalRecords,
    read_table_writes,
    read_wal_position,
    read_wal_records,
    wal_table,
    writes_between,
    writes_table,
)
from profiles.client import open_channel
from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from shared.logging import configure_logging

BENCH = "ingest"
BATCH_SIZE = 500
INSTALLATIONS = 5_000
EVENT_COLUMNS = (
    "project_id",
    "installation_id",
    "custom_id",
    "event_id",
    "profile_id",
    "kind",
    "name",
    "event_time",
    "receive_time",
    "session_id",
    "platform",
    "payload",
    "imported",
)


# Distinct batches the clients send in turn (50,000 events), then again with fresh event IDs.
POOL_BATCHES = 100


@dataclass(frozen=True, slots=True)
class Sizes:
    clients: int
    duration_s: float
    installations: int = INSTALLATIONS  # each sends one event in the warm-up
    batch_size: int = BATCH_SIZE  # events a load batch carries
    pool_batches: int = POOL_BATCHES  # distinct load batches, built before timing


QUICK = Sizes(clients=4, duration_s=15.0)
# Only checks that the bench runs end to end (the tests run it): building the full pool of
# batches (50,000 events) took seconds, more than the one second of load sends.
SMOKE = Sizes(clients=2, duration_s=1.0, installations=BATCH_SIZE, pool_batches=8)
# PostgreSQL sends an idle backend's pending table counters 10 s after its last transaction.
STATS_IDLE_FLUSH_S = 11.0
# Passes of the raw COPY baseline; the fastest counts (raw_copy_rate).
COPY_PASSES = 2
SOAK_MINUTES = 15.0
SOAK_WARMUP_MINUTES = 2.0
SOAK_SAMPLE_S = 30.0
FULL = Sizes(clients=4, duration_s=60.0)


class Traffic:
    """Realistic batches: a mix of payload kinds over many installations, unique event IDs."""

    def __init__(
        self,
        seed: int,
        installations: int = INSTALLATIONS,
        batch_size: int = BATCH_SIZE,
        *,
        per_installation: bool = False,
    ) -> None:
        self._rng = random.Random(seed)
        self._batch_size = batch_size
        # An SDK's shape: each batch is one installation's events, not one event each of many.
        self._per_installation = per_installation
        self._installations = [
            (f"bench-{i:05d}", (types_pb2.PLATFORM_IOS, types_pb2.PLATFORM_ANDROID,
                                types_pb2.PLATFORM_WEB)[i % 3])
            for i in range(installations)
        ]  # fmt: skip
        self._sequence = 0

    def warmup_batches(self) -> list[list[pb.Event]]:
        events = [self._event(i, p, "custom") for i, p in self._installations]
        return [events[k : k + BATCH_SIZE] for k in range(0, len(events), BATCH_SIZE)]

    # Payload kinds of a load batch and their weights (percent).
    MIX = (("custom", 60), ("session_start", 8), ("session_heartbeat", 6), ("session_end", 6),
           ("attributes", 10), ("subscription", 3), ("installation", 5), ("crash", 2))  # fmt: skip

    @classmethod
    def mix_text(cls) -> str:
        return ", ".join(f"{kind} {weight}%" for kind, weight in cls.MIX)

    def batch(self) -> list[pb.Event]:
        rng = self._rng
        kinds = rng.choices(
            [kind for kind, _ in self.MIX],
            [weight for _, weight in self.MIX],
            k=self._batch_size,
        )
        if self._per_installation:
            one = rng.choice(self._installations)
            return [self._event(*one, kind) for kind in kinds]
        return [self._event(*rng.choice(self._installations), kind) for kind in kinds]

    def as_new_events(self, batch: list[pb.Event], later_by_s: int) -> list[pb.Event]:
        """The same batch again as new events: a new random 128-bit event ID each, and every
        event time `later_by_s` seconds later (the time since the batch was last sent), so that
        each event keeps its age: with the times repeated, every round of the pool added
        operations at the same attribute times and the late replay grew with the rounds (the
        15-minute soak fell to 2,872 events/s). About 2 us an event against 15 us to build
        one, on the same cores as the services."""
        for event in batch:
            event.event_id = uuid.UUID(int=self._rng.getrandbits(128)).hex
            event.event_time.seconds += later_by_s
        return batch

    def _event(self, installation_id: str, platform: int, kind: str) -> pb.Event:
        rng = self._rng
        self._sequence += 1
        event = pb.Event(
            event_id=uuid.UUID(int=rng.getrandbits(128)).hex,
            installation_id=installation_id,
            platform=platform,  # type: ignore[arg-type]
            session_id=f"{installation_id}-s{self._sequence % 7}",
        )
        event.event_time.FromDatetime(datetime.now(UTC) - timedelta(seconds=rng.randint(0, 600)))
        if kind == "custom":
            event.custom.name = rng.choice(("view_item", "add_to_cart", "search", "purchase"))
            event.custom.label = "catalog"
            event.custom.attributes["item"].string_value = f"sku-{rng.randint(1, 5000)}"
            event.custom.attributes["price"].number_value = round(rng.uniform(1, 300), 2)
            event.custom.attributes["in_stock"].bool_value = rng.random() < 0.9
        elif kind == "session_start":
            event.session_start.country = rng.choice(("FR", "US", "DE", "BR", "JP"))
        elif kind == "session_heartbeat":
            event.session_heartbeat.duration.FromSeconds(rng.randint(10, 600))
        elif kind == "session_end":
            event.session_end.duration.FromSeconds(rng.randint(10, 900))
        elif kind == "attributes":
            operations = event.attribute_operations.operations
            visits = operations.add(kind=types_pb2.ATTRIBUTE_OPERATION_KIND_INCREMENT)
            visits.custom_attribute = "visits"
            visits.value.number_value = 1
            plan = operations.add(kind=types_pb2.ATTRIBUTE_OPERATION_KIND_SET)
            plan.custom_attribute = "plan"
            plan.value.string_value = rng.choice(("free", "pro", "team"))
        elif kind == "subscription":
            event.subscription_change.channel = types_pb2.CHANNEL_EMAIL
            event.subscription_change.kind = types_pb2.SUBSCRIPTION_KIND_MARKETING
            event.subscription_change.subscribed = rng.random() < 0.5
        elif kind == "installation":
            event.installation_update.app_version = rng.choice(("4.1.0", "4.2.0"))
            event.installation_update.push_opt_in = rng.random() < 0.7
        else:
            event.crash.name = "NullPointerException"
            event.crash.reason = "cart was null"
            event.crash.stack_trace = "at Cart.total(Cart.java:42)\n" * 10
            event.crash.fatal = True
        return event


@dataclass(slots=True)
class LoadOutcome:
    latencies_s: list[float] = field(default_factory=list)
    accepted: int = 0
    rejected: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0


async def run_load(
    address: str,
    key: str,
    sizes: Sizes,
    traffic: Traffic,
    on_warmed: Callable[[], Awaitable[object]] | None = None,
) -> LoadOutcome:
    """Warm-up, then `on_warmed` (the statement counters' reset), then the timed load."""
    outcome = LoadOutcome()
    warm = open_channel(address, key, timeout=60)
    try:
        stub = pb_grpc.IngestServiceStub(warm)
        for batch in traffic.warmup_batches():
            await stub.TrackEvents(pb.TrackEventsRequest(events=batch))
    finally:
        await warm.close()
    if on_warmed is not None:
        await on_warmed()
    # Batches are built ahead, so the clients measure the service, not protobuf building: a
    # pool of distinct batches (POOL_BATCHES), each sent again as new events once the pool has
    # gone round (the installations, kinds and events' ages repeat, never the events).
    pool = [traffic.batch() for _ in range(max(sizes.pool_batches, sizes.clients * 4))]
    built = int(time.time())
    last_sent = [built] * len(pool)
    deadline = time.monotonic() + sizes.duration_s

    async def client(number: int) -> None:
        channel = open_channel(address, key, timeout=60)
        stub = pb_grpc.IngestServiceStub(channel)
        turn = number
        try:
            while time.monotonic() < deadline:
                slot = turn % len(pool)
                now = int(time.time())
                batch = traffic.as_new_events(pool[slot], now - last_sent[slot])
                last_sent[slot] = now
                request = pb.TrackEventsRequest(events=batch)
                turn += sizes.clients
                started = time.perf_counter()
                try:
                    reply = await stub.TrackEvents(request)
                except grpc.aio.AioRpcError as error:
                    name = error.code().name
                    outcome.errors[name] = outcome.errors.get(name, 0) + 1
                    continue
                outcome.latencies_s.append(time.perf_counter() - started)
                outcome.accepted += reply.accepted_count
                outcome.rejected += reply.rejected_count
        finally:
            await channel.close()

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for number in range(sizes.clients):
            group.create_task(client(number))
    outcome.elapsed_s = time.perf_counter() - started
    return outcome


@dataclass(frozen=True, slots=True)
class CopyBaseline:
    rows_per_s: float
    rows: int
    wal_bytes_per_row: float  # the write-ahead log one pass wrote, per row
    # The CPU the client and the server spent per row copied (all passes), when measured.
    cpu_us_per_row: float | None = None


async def raw_copy_rate(
    database_url: str,
    rows: int,
    passes: int = COPY_PASSES,
    *,
    cpu_seconds: Callable[[], float] | None = None,
) -> CopyBaseline:
    """Rows per second of COPY into a table like `events` (same indexes), 500 rows per COPY
    over one connection, of the last `rows` rows stored: the fastest of `passes` passes, each
    into a new table. Right after the load, autovacuum and the checkpointer work through what
    it wrote, and one pass ranged from 42,000 to 57,000 rows/s between runs of the same code;
    the least disturbed pass is the baseline, which only makes the ratio harder to reach."""
    conn = await asyncpg.connect(database_url)
    try:
        records = await conn.fetch(
            f"SELECT {', '.join(EVENT_COLUMNS)} FROM events ORDER BY event_seq DESC LIMIT $1",
            rows,
        )
        values = [tuple(r) for r in records]
        rates = []
        wal_bytes = 0
        cpu_spent = 0.0
        for _ in range(passes):
            await conn.execute("DROP TABLE IF EXISTS bench_events_copy")
            await conn.execute("CREATE TABLE bench_events_copy (LIKE events INCLUDING ALL)")
            wal_before = await read_wal_position(conn)
            cpu_before = cpu_seconds() if cpu_seconds else 0.0
            started = time.perf_counter()
            for k in range(0, len(values), BATCH_SIZE):
                await conn.copy_records_to_table(
                    "bench_events_copy", records=values[k : k + BATCH_SIZE], columns=EVENT_COLUMNS
                )
            rates.append(len(values) / (time.perf_counter() - started))
            cpu_spent += (cpu_seconds() if cpu_seconds else 0.0) - cpu_before
            wal_bytes = await read_wal_position(conn) - wal_before
        await conn.execute("DROP TABLE bench_events_copy")
        cpu_per_row = cpu_spent * 1e6 / max(1, len(values) * passes) if cpu_seconds else None
        return CopyBaseline(max(rates), len(values), wal_bytes / max(1, len(values)), cpu_per_row)
    finally:
        await conn.close()


async def wal_position(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return await read_wal_position(conn)
    finally:
        await conn.close()


async def wal_records_between(database_url: str, start: int, end: int) -> list[WalRecords]:
    conn = await asyncpg.connect(database_url)
    try:
        return await read_wal_records(conn, start, end)
    finally:
        await conn.close()


async def stored_events(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM events"))
    finally:
        await conn.close()


async def run_soak(
    address: str, key: str, ingest: ChildProcess, soak: SoakPlan, traffic: Traffic
) -> tuple[LoadOutcome, list[tuple[float, int]]]:
    """Sustained load for warm-up + soak minutes; the ingest process's RSS is sampled every
    `sample_s` once the warm-up is over. Returns the load and the (seconds since the warm-up
    ended, RSS bytes) samples."""
    process = psutil.Process(ingest.pid)
    sizes = Sizes(soak.clients, soak.warmup_s + soak.soak_s)
    samples: list[tuple[float, int]] = []

    async def sample() -> None:
        await asyncio.sleep(soak.warmup_s)
        started = time.monotonic()
        while True:
            ingest.check_alive()
            elapsed = time.monotonic() - started
            samples.append((elapsed, process.memory_info().rss))
            print(f"  soak {elapsed:6.0f} s: ingest RSS {samples[-1][1] / 2**20:.1f} MiB")
            if elapsed >= soak.soak_s - 1:
                return
            await asyncio.sleep(min(soak.sample_s, soak.soak_s - elapsed))

    async with asyncio.TaskGroup() as group:
        load = group.create_task(run_load(address, key, sizes, traffic))
        group.create_task(sample())
    return load.result(), samples


@dataclass(frozen=True, slots=True)
class SoakPlan:
    clients: int
    warmup_s: float
    soak_s: float
    sample_s: float = SOAK_SAMPLE_S

    @property
    def shortened(self) -> bool:
        return self.warmup_s < SOAK_WARMUP_MINUTES * 60 or self.soak_s < SOAK_MINUTES * 60


def soak_main(args: argparse.Namespace) -> int:
    soak = SoakPlan(args.clients or FULL.clients, args.warmup_minutes * 60, args.soak_minutes * 60)
    with contextlib.ExitStack() as stack:
        address, key, _, ingest, _ = start_suite(stack, args)
        print(
            f"soak: {soak.clients} clients x batches of {BATCH_SIZE}, warm-up"
            f" {args.warmup_minutes:g} min, then RSS every {soak.sample_s:.0f} s for"
            f" {args.soak_minutes:g} min" + (" (SHORTENED run)" if soak.shortened else "")
        )
        outcome, samples = asyncio.run(run_soak(address, key, ingest, soak, Traffic(seed=2)))
    first, last = samples[0][1], samples[-1][1]
    peak = max(rss for _, rss in samples)
    growth = (last - first) * 100 / first
    print(
        f"ingest RSS: {first / 2**20:.1f} MiB after warm-up -> {last / 2**20:.1f} MiB"
        f" (peak {peak / 2**20:.1f} MiB) = {growth:+.2f}% over {samples[-1][0] / 60:.1f} min;"
        f" {outcome.accepted} events accepted ({outcome.accepted / outcome.elapsed_s:.0f}/s),"
        f" errors {outcome.errors}"
        + (" [SHORTENED soak: not the 2 + 15 min run]" if soak.shortened else "")
    )
    print_figures(
        BENCH,
        [Figure("ingest_rss_growth_pct", growth, "%", "none", float("nan"))],
        quick=soak.shortened,
    )
    return 1 if outcome.errors else 0


INGEST = "ingest"
POSTGRES = "PostgreSQL (all its processes)"


def run_processes(
    ingest: ChildProcess, identity: ChildProcess, postgres_pid: int, redis_pid: int | None
) -> list[ProcessCpu]:
    """The processes of a run whose CPU the ledger reads: a Redis not on this machine is left
    out."""
    processes = [
        ProcessCpu("bench clients (this process)", this_process_cpu_seconds),
        ProcessCpu(INGEST, ingest.cpu_seconds),
        ProcessCpu("identity", identity.cpu_seconds),
        ProcessCpu(POSTGRES, lambda: process_tree_cpu_seconds(postgres_pid)),
    ]
    if redis_pid is not None:
        processes.append(ProcessCpu("Redis", process_cpu_seconds(redis_pid)))
    return processes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__)
    add_backend_arguments(parser)
    parser.add_argument("--clients", type=int, help="concurrent clients (default 4)")
    parser.add_argument("--duration", type=float, help="load seconds (quick 15, full 60)")
    parser.add_argument(
        "--batch-size",
        type=int,
        help=f"events per load batch (default {BATCH_SIZE}; an SDK's requests carry fewer)",
    )
    parser.add_argument(
        "--per-installation",
        action="store_true",
        help="each load batch is one installation's events (an SDK's shape); by default each"
        " event of a batch is a random installation's, the worst case for derived state",
    )
    parser.add_argument(
        "--write-partitions",
        type=int,
        help="ingest's write partitions (PROFILES_INGEST_WRITE_PARTITIONS; default the service's)",
    )
    parser.add_argument(
        "--group-writers",
        type=int,
        help="ingest's writers per partition (PROFILES_INGEST_GROUP_WRITERS; default the service)",
    )
    parser.add_argument("--log-level", default="warning", help="services' log level")
    parser.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="skip the per-statement database time breakdown (pg_stat_statements)",
    )
    parser.add_argument(
        "--soak",
        action="store_true",
        help="memory soak instead: sustained load, ingest RSS sampled every 30 s after a warm-up",
    )
    parser.add_argument(
        "--soak-minutes", type=float, default=SOAK_MINUTES, help="soak minutes (default 15)"
    )
    parser.add_argument(
        "--warmup-minutes",
        type=float,
        default=SOAK_WARMUP_MINUTES,
        help="warm-up minutes before the first sample (default 2)",
    )
    return parser.parse_args(argv)


def group_commit_totals(metrics_port: int) -> tuple[float, float]:
    """(batches, transactions) ingest's group commit has stored, read off its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as page:
        text = page.read().decode()
    values = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for suffix in values:
            if line.startswith(f"profiles_ingest_group_commit_batches_{suffix} "):
                values[suffix] = float(line.split()[1])
    return values["sum"], values["count"]


def start_suite(
    stack: contextlib.ExitStack, args: argparse.Namespace
) -> tuple[str, str, str, ChildProcess, ChildProcess]:
    """Back-ends, a project, identity and ingest; returns (ingest address, sdk key, database
    URL, ingest process, identity process)."""
    work_dir = make_work_dir(stack)
    backends = start_backends(
        stack,
        work_dir,
        args.database_url,
        args.redis_url,
        postgres_settings=STATEMENT_STATS_SETTINGS if getattr(args, "breakdown", False) else None,
    )
    project = asyncio.run(create_project(backends.database_url, roles=("sdk",)))
    identity_settings = service_settings(backends, "identity", work_dir, log_level=args.log_level)
    ingest_port = free_port()
    args.ingest_metrics_port = free_port()
    args.backend_redis_url = backends.redis_url
    writing = {
        name: value
        for name, value in (
            ("ingest_write_partitions", getattr(args, "write_partitions", None)),
            ("ingest_group_writers", getattr(args, "group_writers", None)),
        )
        if value is not None
    }
    ingest_settings = identity_settings.with_changes(
        **writing,
        ports={**identity_settings.ports, "ingest": ingest_port},
        metrics_ports={**identity_settings.metrics_ports, "ingest": args.ingest_metrics_port},
        addresses={
            **identity_settings.addresses,
            "identity": f"127.0.0.1:{identity_settings.ports['identity']}",
        },
    )
    identity = start_service_process(stack, "identity", identity_settings, work_dir)
    ingest = start_service_process(stack, "ingest", ingest_settings, work_dir)
    address = f"127.0.0.1:{ingest_port}"
    asyncio.run(wait_all(identity, ingest_settings.addresses["identity"], ingest, address))
    print(
        f"started identity (pid {identity.pid}) and ingest (pid {ingest.pid}; "
        f"{ingest_settings.ingest_write_partitions} write partitions, "
        f"{ingest_settings.ingest_group_writers} writer(s) each)"
    )
    return address, project.keys["sdk"], backends.database_url, ingest, identity


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("warning")
    if args.soak:
        return soak_main(args)
    base = size_choice(args, SMOKE, QUICK, FULL)
    sizes = Sizes(
        args.clients or base.clients,
        args.duration or base.duration_s,
        base.installations,
        args.batch_size or base.batch_size,
        base.pool_batches,
    )
    with contextlib.ExitStack() as stack:
        address, key, database_url, ingest, identity = start_suite(stack, args)
        print(
            f"{sizes.clients} clients x batches of {sizes.batch_size}"
            f"{' (one installation each)' if args.per_installation else ''}"
            f" for {sizes.duration_s:.0f} s"
        )
        print(f"payload mix of a batch: {Traffic.mix_text()}")
        postgres_pid = asyncio.run(postgres_server_pid(database_url))
        ledger = CpuLedger(
            run_processes(ingest, identity, postgres_pid, local_redis_pid(args.backend_redis_url))
        )
        ledger.start()
        recording: list[bool] = []
        writes_before: dict[str, TableWrites] = {}
        # The whole machine's CPU times when the load starts: whether the cores or something
        # else (locks, round trips) bound the rate.
        cores_at_load: list[Any] = []
        groups_at_load: list[tuple[float, float]] = []
        wal_at_load: list[int] = []

        async def reset_statements() -> None:
            if not args.smoke:
                # The warm-up's backends, idle now, send their last counters only after
                # STATS_IDLE_FLUSH_S: without the wait the warm-up's writes (5,000 new
                # profiles) land in the load's window.
                await asyncio.sleep(STATS_IDLE_FLUSH_S)
            writes_before.update(await read_table_writes(database_url))
            wal_at_load.append(await wal_position(database_url))
            if args.breakdown:
                recording.append(await start_recording(database_url))
            cores_at_load.append(psutil.cpu_times())
            groups_at_load.append(group_commit_totals(args.ingest_metrics_port))

        outcome = asyncio.run(
            run_load(
                address,
                key,
                sizes,
                Traffic(
                    seed=1,
                    installations=sizes.installations,
                    batch_size=sizes.batch_size,
                    per_installation=args.per_installation,
                ),
                on_warmed=reset_statements,
            )
        )
        busy_pct = cores_busy_pct(cores_at_load[0], psutil.cpu_times())
        batches_after, transactions_after = group_commit_totals(args.ingest_metrics_port)
        grouped = (batches_after - groups_at_load[0][0]) / max(
            1.0, transactions_after - groups_at_load[0][1]
        )
        costs = asyncio.run(read_costs(database_url)) if any(recording) else []
        written = writes_between(writes_before, asyncio.run(read_table_writes(database_url)))
        wal_end = asyncio.run(wal_position(database_url))
        wal_written = wal_end - wal_at_load[0]
        wal_records = (
            asyncio.run(wal_records_between(database_url, wal_at_load[0], wal_end))
            if args.breakdown
            else []
        )
        ingest.check_alive()
        # Includes the warm-up batches: CPU per event is what contention on this shared
        # machine disturbs least.
        cpu_spent = ledger.spent()
        ingest_cpu_s = cpu_spent[INGEST]
        postgres_cpu_s = cpu_spent[POSTGRES]
        total = asyncio.run(stored_events(database_url))
        baseline = asyncio.run(
            raw_copy_rate(
                database_url,
                outcome.accepted,
                cpu_seconds=lambda: (
                    this_process_cpu_seconds() + process_tree_cpu_seconds(postgres_pid)
                ),
            )
        )
        copy_rate = baseline.rows_per_s
    rate = outcome.accepted / outcome.elapsed_s
    latency = LatencySummary.of(outcome.latencies_s)
    print(
        f"TrackEvents: {outcome.accepted} events accepted in {outcome.elapsed_s:.1f} s"
        f" = {rate:.0f} events/s (all committed: {total} rows in events incl. warm-up);"
        f" {len(outcome.latencies_s)} batches, p50 {latency.p50_ms:.1f} ms,"
        f" p99 {latency.p99_ms:.1f} ms; rejected {outcome.rejected}; errors {outcome.errors}"
    )
    cpu_us_per_event = ingest_cpu_s * 1e6 / max(1, outcome.accepted + sizes.installations)
    print(f"ingest CPU: {ingest_cpu_s:.1f} s = {cpu_us_per_event:.0f} us per event")
    print(f"group commit: {grouped:.2f} batch parts per transaction during the load")
    # The whole server's (statement breakdown included, when it is on): what bounds the rate
    # when the machine's cores are shared by client, services and PostgreSQL.
    postgres_us_per_event = postgres_cpu_s * 1e6 / max(1, outcome.accepted + sizes.installations)
    print(f"PostgreSQL CPU: {postgres_cpu_s:.1f} s = {postgres_us_per_event:.0f} us per event")
    print(
        f"machine: its {psutil.cpu_count()} cores {busy_pct:.0f}% busy during the load"
        " (clients, services, PostgreSQL, Redis and anything else running)"
    )
    print(
        f"raw COPY: {baseline.rows} rows at {copy_rate:.0f} rows/s (one connection, 500 per COPY,"
        f" fastest of {COPY_PASSES} passes)"
    )
    print(f"ratio: {rate / copy_rate:.3f}")
    events_in_window = outcome.accepted + sizes.installations
    machine_us_per_event = sum(cpu_spent.values()) * 1e6 / max(1, events_in_window)
    print(
        "CPU per event stored, by process (warm-up and load; the raw COPY's client and server"
        f" spent {baseline.cpu_us_per_row or 0:.1f} us per row):"
    )
    print(cpu_table(cpu_spent, events_in_window))
    # What the floor and the goal leave: the cores, as busy as they were in this run, divided
    # by the rate each ratio asks for.
    for goal in (0.3, 0.5):
        budget = budget_us_per_event(goal * copy_rate, psutil.cpu_count() or 1, busy_pct / 100)
        print(
            f"at {goal} of the raw COPY ({goal * copy_rate:.0f} events/s) the cores,"
            f" {busy_pct:.0f}% busy, leave {budget:.0f} us of CPU per event; this run spent"
            f" {machine_us_per_event:.0f}"
        )
    # The log's volume per event against the COPY's per row: every row, index entry and
    # full-page image a batch writes goes through it, and the COPY's is the floor.
    events_in_load = written.get("events", TableWrites()).inserted
    wal_per_event = wal_written / max(1, events_in_load)
    print(
        f"write-ahead log: {wal_per_event:.0f} bytes per event stored during the load,"
        f" {baseline.wal_bytes_per_row:.0f} per row of the raw COPY"
    )
    if costs:
        batches = len(outcome.latencies_s)
        print(
            f"database time per batch of {sizes.batch_size}"
            f" (pg_stat_statements, {batches} batches):"
        )
        print(breakdown_table(costs, unit="batch", units=batches))
    elif args.breakdown:
        print("statement breakdown unavailable: the server does not preload pg_stat_statements")
    print(f"rows written per {BATCH_SIZE} events stored (pg_stat_user_tables, during the load):")
    print(writes_table(written, BATCH_SIZE))
    if args.breakdown:
        print(f"write-ahead log per {BATCH_SIZE} events stored (pg_walinspect, during the load):")
        print(wal_table(wal_records, events_in_load, BATCH_SIZE))
    print_figures(
        BENCH,
        [
            Figure("trackevents_events_per_s", rate, "events/s", "raw_copy_rows_per_s", copy_rate),
            Figure("trackevents_batch_p50_ms", latency.p50_ms, "ms", "none", float("nan")),
            Figure("trackevents_batch_p99_ms", latency.p99_ms, "ms", "none", float("nan")),
            Figure("ingest_cpu_us_per_event", cpu_us_per_event, "us", "none", float("nan")),
            Figure("postgres_cpu_us_per_event", postgres_us_per_event, "us", "none", float("nan")),
            Figure(
                "run_cpu_us_per_event",
                machine_us_per_event,
                "us",
                "raw_copy_cpu_us_per_row",
                baseline.cpu_us_per_row or float("nan"),
            ),
            Figure("machine_cpu_busy_pct", busy_pct, "%", "none", float("nan")),
        ],
        quick=labelled_quick(args),
    )
    if outcome.errors or outcome.rejected:
        return 1
    return 0


def cores_busy_pct(before: Any, after: Any) -> float:
    """The share of the machine's CPU time between two `psutil.cpu_times()` readings that was
    not idle (waiting for I/O counts as idle)."""
    spent = {name: getattr(after, name) - getattr(before, name) for name in after._fields}
    total = sum(spent.values())
    idle = spent.get("idle", 0.0) + spent.get("iowait", 0.0)
    return 100.0 * (total - idle) / total if total > 0 else float("nan")


async def wait_all(
    identity: ChildProcess, identity_address: str, ingest: ChildProcess, address: str
) -> None:
    await wait_serving(identity_address, identity)
    await wait_serving(address, ingest)


if __name__ == "__main__":
    run_main(main)
