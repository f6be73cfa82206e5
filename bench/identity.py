"""Identity benchmark: Identify (a real rule-2 merge) and ResolveProfiles, beside Echo.

    python -m bench.identity [--quick] [--rate R] [--concurrency C] [--duration S] [--rounds N]

Starts identity and ingest as subprocesses (`profiles serve`) on embedded PostgreSQL and Redis
(the default of `profiles up`), creates a project, then loads it:
- two template installations get their events through the real path (TrackEvents on ingest,
  which resolves them through identity): a "merge" template with 100 events (two sessions,
  custom events, attribute operations, consent changes, an installation update, a crash) and a
  small "stored" template;
- 100,000 stored profiles (half identified, `user-<n>`; --smoke: 1,000) and N anonymous
  profiles to merge are
  bulk-loaded through SQL: profiles and installations as identity writes them, and every row the
  services wrote for the template (events, sessions, attributes, subscriptions, installation
  details) copied to each clone with its own profile and installation (bench.common
  clone_profile_rows); then VACUUM ANALYZE, as autovacuum would after a bulk load.

Then two phases, each at a fixed rate with at most C calls in flight (default 8 concurrent
clients sharing one channel), from one client process, in alternating rounds with the Echo RPC
of the same identity process (DiagnosticsService/Echo, 64 B: the suite's bare RPC cost through
the same server and interceptors), at the same rate and concurrency, after a warm-up of each:
- Identify: every call logs a prepared anonymous installation (100 events) in with the custom ID
  of a stored identified profile, a real rule-2 merge (checked: outcome MERGED, and afterwards
  no event left on a merged-away profile); each pair is used once.
- ResolveProfiles: batches of 500 installations known to identity, 50 distinct batches over
  25,000 installations, each resolved once before measuring (warm: identity's cache of known
  installations holds them, services/identity/cache.py, except those whose profiles the
  Identify phase changed since, which the phase's warm-up reads again).
All calls use the admin key (the one role that may call all three RPCs), so authentication
costs the same on both sides. Output: a report with the goals, then JSON lines; headlines
`identify_p99_ms` and `resolve_p99_ms`, each with baseline `echo_p99_ms` of its phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg

from bench.common import (
    BenchError,
    Call,
    ChildProcess,
    Figure,
    LatencySummary,
    LoadPlan,
    LoadResult,
    add_backend_arguments,
    alternate,
    clone_profile_rows,
    create_project,
    labelled_quick,
    make_work_dir,
    print_figures,
    run_main,
    size_choice,
    start_backends,
    start_service_process,
    suite_settings,
    wait_serving,
)
from profiles.client import open_channel
from profiles.common.v1 import types_pb2
from profiles.diagnostics.v1 import diagnostics_service_pb2 as diagnostics_pb
from profiles.diagnostics.v1 import diagnostics_service_pb2_grpc as diagnostics_grpc
from profiles.identity.v1 import identity_service_pb2 as identity_pb
from profiles.identity.v1 import identity_service_pb2_grpc as identity_grpc
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from shared.logging import configure_logging

BENCH = "identity"
MERGE_EVENTS = 100
RESOLVE_BATCH = 500
ECHO_PAYLOAD = os.urandom(64)
# Goals of the identity issue (Speed).
IDENTIFY_P99_GOAL_MS = 20.0
IDENTIFY_ECHO_RATIO_GOAL = 10.0
RESOLVE_ECHO_RATIO_GOAL = 3.0
# Tables identity writes itself (the profiles and installations rows are written below), whose
# rows belong to no template (the outbox is drained by the relays), or that triggers keep from
# another table (profile_event_counts and profile_last_crashes, from the events copied: 0008,
# 0028).
NOT_CLONED = frozenset(
    {"profiles", "installations", "outbox", "profile_event_counts", "profile_last_crashes"}
)

IDENTIFY, RESOLVE, ECHO = "Identify", f"ResolveProfiles ({RESOLVE_BATCH})", "Echo"


@dataclass(frozen=True, slots=True)
class Sizes:
    stored_profiles: int
    resolve_batches: int  # distinct ResolveProfiles calls, RESOLVE_BATCH installations each
    stored_events: int  # events per stored profile (its template)
    rate: float  # calls per second, both sides of both phases
    concurrency: int
    duration_s: float  # per round and side
    rounds: int  # per side and phase
    warmup_s: float

    def identify_calls(self) -> int:
        per_round = LoadPlan(self.rate, self.concurrency, self.duration_s).calls or 0
        warmup = LoadPlan(self.rate, self.concurrency, self.warmup_s).calls or 0
        return warmup + self.rounds * per_round


# The rate is well below what identity sustains for Identify here, so latencies are per-call
# costs, not queueing; Echo and ResolveProfiles run at the same rate.
QUICK = Sizes(
    100_000, 50, stored_events=6, rate=40, concurrency=8, duration_s=5, rounds=3, warmup_s=1
)
FULL = Sizes(
    100_000, 50, stored_events=20, rate=40, concurrency=8, duration_s=20, rounds=5, warmup_s=3
)
# Only checks that the bench runs end to end (the tests run it).
SMOKE = Sizes(
    1_000, 2, stored_events=4, rate=20, concurrency=2, duration_s=0.25, rounds=1, warmup_s=0.1
)


# --- templates through the real path ---------------------------------------------------------


def _event(installation_id: str, when: datetime, session: str) -> ingest_pb.Event:
    event = ingest_pb.Event(
        event_id=uuid.uuid4().hex,
        installation_id=installation_id,
        platform=types_pb2.PLATFORM_IOS,
        session_id=session,
    )
    event.event_time.FromDatetime(when)
    return event


def _custom(event: ingest_pb.Event, rng: random.Random) -> None:
    event.custom.name = rng.choice(("view_item", "add_to_cart", "search", "purchase"))
    event.custom.label = "catalog"
    event.custom.attributes["item"].string_value = f"sku-{rng.randint(1, 5000)}"
    event.custom.attributes["price"].number_value = round(rng.uniform(1, 300), 2)


def _attributes(event: ingest_pb.Event, rng: random.Random) -> None:
    operations = event.attribute_operations.operations
    visits = operations.add(kind=types_pb2.ATTRIBUTE_OPERATION_KIND_INCREMENT)
    visits.custom_attribute = "visits"
    visits.value.number_value = 1
    plan = operations.add(kind=types_pb2.ATTRIBUTE_OPERATION_KIND_SET)
    plan.custom_attribute = "plan"
    plan.value.string_value = rng.choice(("free", "pro", "team"))


def session_events(
    installation_id: str, start: datetime, customs: int, session: str, rng: random.Random
) -> list[ingest_pb.Event]:
    """A session: start, `customs` custom events 20 s apart, one heartbeat, end."""
    events = [_event(installation_id, start, session)]
    events[0].session_start.country = "FR"
    for number in range(customs):
        event = _event(installation_id, start + timedelta(seconds=20 * (number + 1)), session)
        _custom(event, rng)
        events.append(event)
    duration = 20 * (customs + 1)
    heartbeat = _event(installation_id, start + timedelta(seconds=duration // 2), session)
    heartbeat.session_heartbeat.duration.FromSeconds(duration // 2)
    end = _event(installation_id, start + timedelta(seconds=duration), session)
    end.session_end.duration.FromSeconds(duration)
    return [*events, heartbeat, end]


def merge_template_events(installation_id: str, now: datetime) -> list[ingest_pb.Event]:
    """100 events of one anonymous installation over the last three hours."""
    rng = random.Random(7)
    update = _event(installation_id, now - timedelta(hours=3), "")
    update.installation_update.app_version = "4.2.0"
    update.installation_update.timezone = "Europe/Paris"
    update.installation_update.push_opt_in = True
    events = [update]
    events += session_events(installation_id, now - timedelta(hours=3), 40, "s1", rng)
    for minutes in range(4):
        event = _event(installation_id, now - timedelta(minutes=150 - minutes), "s1")
        _attributes(event, rng)
        events.append(event)
    for subscribed in (True, False):
        event = _event(installation_id, now - timedelta(minutes=120), "")
        event.subscription_change.channel = types_pb2.CHANNEL_EMAIL
        event.subscription_change.kind = types_pb2.SUBSCRIPTION_KIND_MARKETING
        event.subscription_change.subscribed = subscribed
        event.event_time.FromDatetime(now - timedelta(minutes=120 - int(subscribed)))
        events.append(event)
    crash = _event(installation_id, now - timedelta(minutes=100), "")
    crash.crash.name = "NullPointerException"
    crash.crash.reason = "cart was null"
    crash.crash.fatal = True
    events.append(crash)
    customs = MERGE_EVENTS - len(events) - 3  # start, heartbeat, end
    events += session_events(installation_id, now - timedelta(hours=1), customs, "s2", rng)
    assert len(events) == MERGE_EVENTS
    return events


def stored_template_events(
    installation_id: str, now: datetime, count: int
) -> list[ingest_pb.Event]:
    """`count` events (at least 4) of one session two days ago."""
    rng = random.Random(11)
    return session_events(installation_id, now - timedelta(days=2), count - 3, "s1", rng)


async def track_template(stub: ingest_grpc.IngestServiceStub, events: list[ingest_pb.Event]) -> str:
    """Sends the template's events; all must be accepted. Returns the profile they went to."""
    reply = await stub.TrackEvents(ingest_pb.TrackEventsRequest(events=events), timeout=60)
    if reply.accepted_count != len(events):
        problems = Counter(r.reason for r in reply.results if r.reason)
        raise BenchError(f"template events not all accepted: {dict(problems)}")
    profiles = {r.profile_id for r in reply.results}
    if len(profiles) != 1:
        raise BenchError(f"template events went to {len(profiles)} profiles")
    return profiles.pop()


# --- bulk load -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Template:
    profile_id: uuid.UUID
    installation_id: str


@dataclass(frozen=True, slots=True)
class Clone:
    installation_id: str
    custom_id: str | None


CLONES_TABLE = "bench_clones"
CREATE_CLONES = f"""
    CREATE TEMP TABLE {CLONES_TABLE} (
        template_profile_id uuid NOT NULL, template_installation_id text NOT NULL,
        profile_id uuid NOT NULL, installation_id text NOT NULL, custom_id text
    )"""
# As identity writes them: a new anonymous profile (version 1) for a new installation; rule 1
# of Identify gives it its custom ID and raises its version once.
INSERT_PROFILES = f"""
    INSERT INTO profiles (project_id, profile_id, custom_id, version, create_time, update_time)
    SELECT $1, profile_id, custom_id, CASE WHEN custom_id IS NULL THEN 1 ELSE 2 END, $2, $2
    FROM {CLONES_TABLE}"""
INSERT_INSTALLATIONS = f"""
    INSERT INTO installations (project_id, installation_id, profile_id, create_time)
    SELECT $1, installation_id, profile_id, $2 FROM {CLONES_TABLE}"""
# Every table holding rows of a profile or an installation (found in the catalog, so a table
# added later is loaded too).
SELECT_PROFILE_TABLES = """
    SELECT c.table_name, bool_or(c.column_name = 'profile_id') AS by_profile
    FROM information_schema.columns c
    JOIN information_schema.tables t
        ON t.table_schema = c.table_schema AND t.table_name = c.table_name
    WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE'
      AND c.column_name IN ('profile_id', 'installation_id')
    GROUP BY c.table_name ORDER BY c.table_name"""


async def load_clones(
    conn: asyncpg.Connection, project_id: uuid.UUID, template: Template, clones: Sequence[Clone]
) -> dict[str, int]:
    """Writes the clones' profiles and installations, and copies the template's rows of every
    other table to each; returns rows written per table."""
    now = datetime.now(UTC)
    await conn.execute(f"DROP TABLE IF EXISTS {CLONES_TABLE}")
    await conn.execute(CREATE_CLONES)
    await conn.copy_records_to_table(
        CLONES_TABLE,
        records=[
            (
                template.profile_id,
                template.installation_id,
                uuid.uuid4(),
                c.installation_id,
                c.custom_id,
            )
            for c in clones
        ],
    )
    written = {"profiles": len(clones), "installations": len(clones)}
    async with conn.transaction():
        await conn.execute(INSERT_PROFILES, project_id, now)
        await conn.execute(INSERT_INSTALLATIONS, project_id, now)
        for row in await conn.fetch(SELECT_PROFILE_TABLES):
            table = row["table_name"]
            if table in NOT_CLONED:
                continue
            by = "profile_id" if row["by_profile"] else "installation_id"
            rows = await clone_profile_rows(
                conn, table, project_id, project_id, CLONES_TABLE, by=by
            )
            if rows:
                written[table] = rows
    return written


async def bulk_load(
    database_url: str,
    project_id: uuid.UUID,
    stored: Template,
    merge: Template,
    pairs: int,
    stored_profiles: int,
) -> dict[str, dict[str, int]]:
    """The stored profiles (even numbers identified) and `pairs` anonymous profiles to merge."""
    if pairs > stored_profiles // 2:
        raise BenchError(f"{pairs} merges need more identified stored profiles")
    conn = await asyncpg.connect(database_url)
    try:
        stored_clones = [
            Clone(f"stored-{n:06d}", f"user-{n:06d}" if n % 2 == 0 else None)
            for n in range(stored_profiles)
        ]
        merge_clones = [Clone(f"anon-{n:06d}", None) for n in range(pairs)]
        written = {
            "stored": await load_clones(conn, project_id, stored, stored_clones),
            "to merge": await load_clones(conn, project_id, merge, merge_clones),
        }
        tables = sorted({t for w in written.values() for t in w})
        await conn.execute(f"VACUUM ANALYZE {', '.join(tables)}")
        return written
    finally:
        await conn.close()


# --- calls -----------------------------------------------------------------------------------


@dataclass(slots=True)
class IdentifyTally:
    """What the Identify calls answered: every measured call must be a rule-2 merge."""

    outcomes: Counter[str] = field(default_factory=Counter)
    merged_profile_ids: list[str] = field(default_factory=list)


def identify_call(
    stub: identity_grpc.IdentityServiceStub, pairs: Iterator[tuple[str, str]], tally: IdentifyTally
) -> Call:
    async def call() -> object:
        pair = next(pairs, None)
        if pair is None:
            raise BenchError("ran out of prepared merge pairs")
        installation_id, custom_id = pair
        request = identity_pb.IdentifyRequest(
            installation_id=installation_id, custom_id=custom_id, request_id=uuid.uuid4().hex
        )
        reply = await stub.Identify(request)
        tally.outcomes[identity_pb.IdentifyOutcome.Name(reply.outcome)] += 1
        tally.merged_profile_ids.append(reply.merged_profile_id)
        return reply

    return call


def resolve_call(
    stub: identity_grpc.IdentityServiceStub, requests: Sequence[identity_pb.ResolveProfilesRequest]
) -> Call:
    cycle = itertools.cycle(requests)

    async def call() -> object:
        return await stub.ResolveProfiles(next(cycle))

    return call


def echo_call(stub: diagnostics_grpc.DiagnosticsServiceStub) -> Call:
    request = diagnostics_pb.EchoRequest(payload=ECHO_PAYLOAD)

    async def call() -> object:
        return await stub.Echo(request)

    return call


def resolve_requests(seed: int, sizes: Sizes) -> list[identity_pb.ResolveProfilesRequest]:
    """sizes.resolve_batches batches of distinct stored installations (none of them merged)."""
    numbers = random.Random(seed).sample(
        range(sizes.stored_profiles), RESOLVE_BATCH * sizes.resolve_batches
    )
    return [
        identity_pb.ResolveProfilesRequest(
            keys=[
                identity_pb.ProfileKey(installation_id=f"stored-{n:06d}")
                for n in numbers[k : k + RESOLVE_BATCH]
            ]
        )
        for k in range(0, len(numbers), RESOLVE_BATCH)
    ]


async def warm_resolve(
    stub: identity_grpc.IdentityServiceStub, requests: Sequence[identity_pb.ResolveProfilesRequest]
) -> None:
    """Resolves every batch once; none may create a profile (they are all known)."""
    for request in requests:
        reply = await stub.ResolveProfiles(request)
        if any(r.created or not r.profile_id for r in reply.results):
            raise BenchError("ResolveProfiles created profiles for installations loaded before")


# --- measuring -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    identify: dict[str, list[LoadResult]]  # IDENTIFY and ECHO -> one result per round
    resolve: dict[str, list[LoadResult]]  # RESOLVE and ECHO
    tally: IdentifyTally


async def measure(
    identity: ChildProcess, address: str, api_key: str, sizes: Sizes, pairs: int
) -> Outcome:
    plan = LoadPlan(sizes.rate, sizes.concurrency, sizes.duration_s)
    warmup = LoadPlan(sizes.rate, sizes.concurrency, sizes.warmup_s)
    processes = {IDENTIFY: identity, RESOLVE: identity, ECHO: identity}
    tally = IdentifyTally()
    merge_pairs = iter([(f"anon-{n:06d}", f"user-{2 * n:06d}") for n in range(pairs)])
    requests = resolve_requests(3, sizes)
    async with open_channel(address, api_key) as channel:
        stub = identity_grpc.IdentityServiceStub(channel)
        echo = echo_call(diagnostics_grpc.DiagnosticsServiceStub(channel))
        await echo()  # fails loudly (not timed) if Echo is refused
        await warm_resolve(stub, requests)
        identify = await alternate(
            {IDENTIFY: identify_call(stub, merge_pairs, tally), ECHO: echo},
            plan,
            sizes.rounds,
            warmup=warmup,
            processes=processes,
        )
        resolve = await alternate(
            {RESOLVE: resolve_call(stub, requests), ECHO: echo},
            plan,
            sizes.rounds,
            warmup=warmup,
            processes=processes,
        )
    return Outcome(identify, resolve, tally)


# Events still on a merged-away profile (must be none), and how many of them are tombstones.
CHECK_MERGES = """
    SELECT (SELECT count(*) FROM events
            WHERE project_id = $1 AND profile_id = ANY($2::uuid[])) AS events_left,
           (SELECT count(*) FROM profiles
            WHERE project_id = $1 AND profile_id = ANY($2::uuid[])
              AND merged_into IS NOT NULL) AS tombstones"""


async def check_merges(database_url: str, project_id: uuid.UUID, tally: IdentifyTally) -> str:
    """Problems with the merges done, or an empty string."""
    ids = [uuid.UUID(p) for p in tally.merged_profile_ids if p]
    problems = [
        f"{count} Identify calls answered {name}"
        for name, count in tally.outcomes.items()
        if name != "IDENTIFY_OUTCOME_MERGED"
    ]
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(CHECK_MERGES, project_id, ids)
    finally:
        await conn.close()
    assert row is not None  # an aggregate of scalar subqueries always returns a row
    if row["events_left"]:
        problems.append(f"{row['events_left']} events left on merged-away profiles")
    if row["tombstones"] != len(ids):
        problems.append(f"{len(ids)} merges but {row['tombstones']} tombstones")
    return "; ".join(problems)


# --- report ----------------------------------------------------------------------------------


def _row(label: str, result: LoadResult) -> str:
    s = LatencySummary.of(result.latencies_s)
    return (
        f"  {label:<24}{result.completed:>7}{result.error_count:>7}{result.late_starts:>6}"
        f"{result.achieved_rate:>8.1f}{s.p50_ms:>9.2f}{s.p90_ms:>9.2f}{s.p99_ms:>9.2f}"
        f"{s.max_ms:>9.2f}{result.server_cpu_us_per_call:>10.0f}"
    )


def print_phase(title: str, results: dict[str, list[LoadResult]], measured: str) -> None:
    merged = {label: LoadResult.merged(rs) for label, rs in results.items()}
    print(title)
    print(
        f"  {'':<24}{'calls':>7}{'errors':>7}{'late':>6}{'rate/s':>8}{'p50 ms':>9}"
        f"{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}{'cpu us':>10}"
    )
    for label in (measured, ECHO):
        print(_row(label, merged[label]))
    a = LatencySummary.of(merged[measured].latencies_s)
    b = LatencySummary.of(merged[ECHO].latencies_s)
    print(
        f"  {'ratio to Echo':<24}{'':>28}{a.p50_ms / b.p50_ms:>9.2f}"
        f"{a.p90_ms / b.p90_ms:>9.2f}{a.p99_ms / b.p99_ms:>9.2f}"
    )
    for label in (measured, ECHO):
        p99s = ", ".join(f"{LatencySummary.of(r.latencies_s).p99_ms:.2f}" for r in results[label])
        print(f"  per round, {label}: p99 ms {p99s}")


def _verdict(ok: bool, quick: bool) -> str:
    word = "holds" if ok else "MISSED"
    return f"{word} (quick run: indicative, no verdict)" if quick else word


def goal_lines(outcome: Outcome, quick: bool) -> list[str]:
    identify = LatencySummary.of(LoadResult.merged(outcome.identify[IDENTIFY]).latencies_s)
    echo_i = LatencySummary.of(LoadResult.merged(outcome.identify[ECHO]).latencies_s)
    resolve = LatencySummary.of(LoadResult.merged(outcome.resolve[RESOLVE]).latencies_s)
    echo_r = LatencySummary.of(LoadResult.merged(outcome.resolve[ECHO]).latencies_s)
    i_ratio, r_ratio = identify.p99_ms / echo_i.p99_ms, resolve.p99_ms / echo_r.p99_ms
    return [
        f"  Identify p99 {identify.p99_ms:.2f} ms under {IDENTIFY_P99_GOAL_MS:g} ms: "
        + _verdict(identify.p99_ms < IDENTIFY_P99_GOAL_MS, quick),
        f"  Identify p99 within {IDENTIFY_ECHO_RATIO_GOAL:g}x Echo p99 ({i_ratio:.2f}x): "
        + _verdict(i_ratio <= IDENTIFY_ECHO_RATIO_GOAL, quick),
        f"  ResolveProfiles ({RESOLVE_BATCH}) p99 within {RESOLVE_ECHO_RATIO_GOAL:g}x Echo p99"
        f" ({r_ratio:.2f}x): " + _verdict(r_ratio <= RESOLVE_ECHO_RATIO_GOAL, quick),
    ]


def print_report(outcome: Outcome, sizes: Sizes, quick: bool) -> None:
    print(
        f"\nidentity, {sizes.stored_profiles:,} stored profiles; fixed rate {sizes.rate:g} calls/s,"
        f" concurrency {sizes.concurrency} (clients in flight at most, one channel, one client"
        f" process); {sizes.rounds} rounds of {sizes.duration_s:g} s per side, alternating with"
        " Echo on the same identity process, admin key on every call"
    )
    print("late: calls started over 5 ms after their slot; cpu us: identity process CPU per call\n")
    print_phase(
        f"Identify: anonymous profile with {MERGE_EVENTS} events merged into a stored identified"
        " one (rule 2), a new pair per call",
        outcome.identify,
        IDENTIFY,
    )
    print(f"  outcomes: {dict(outcome.tally.outcomes)}")
    print_phase(
        f"\nResolveProfiles: {RESOLVE_BATCH} known installations per call, warm",
        outcome.resolve,
        RESOLVE,
    )
    print("\ngoals (identity issue, Speed):")
    for line in goal_lines(outcome, quick):
        print(line)
    print()


def figures_of(outcome: Outcome) -> list[Figure]:
    figures = []
    for phase, label, name in (
        (outcome.identify, IDENTIFY, "identify"),
        (outcome.resolve, RESOLVE, "resolve"),
    ):
        a = LatencySummary.of(LoadResult.merged(phase[label]).latencies_s)
        b = LatencySummary.of(LoadResult.merged(phase[ECHO]).latencies_s)
        figures.append(Figure(f"{name}_p99_ms", a.p99_ms, "ms", "echo_p99_ms", b.p99_ms))
        figures.append(Figure(f"{name}_p50_ms", a.p50_ms, "ms", "echo_p50_ms", b.p50_ms))
    return figures


def error_problems(outcome: Outcome) -> list[str]:
    problems = []
    for phase in (outcome.identify, outcome.resolve):
        for label, results in phase.items():
            merged = LoadResult.merged(results)
            if merged.error_count:
                problems.append(f"{label}: errors {dict(merged.errors)}")
    return problems


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.identity", description=__doc__.split("\n\n")[0]
    )
    add_backend_arguments(parser)
    parser.add_argument("--rate", type=float, help="calls per second, every side (default 40)")
    parser.add_argument("--concurrency", type=int, help="calls in flight at most (default 8)")
    parser.add_argument("--duration", type=float, help="seconds per round (quick 5, full 20)")
    parser.add_argument("--rounds", type=int, help="rounds per side and phase (quick 3, full 5)")
    parser.add_argument("--log-level", default="warning", help="services' log level")
    return parser.parse_args(argv)


def sizes_of(args: argparse.Namespace) -> Sizes:
    base = size_choice(args, SMOKE, QUICK, FULL)
    return Sizes(
        stored_profiles=base.stored_profiles,
        resolve_batches=base.resolve_batches,
        stored_events=base.stored_events,
        rate=args.rate or base.rate,
        concurrency=args.concurrency or base.concurrency,
        duration_s=args.duration or base.duration_s,
        rounds=args.rounds or base.rounds,
        warmup_s=base.warmup_s,
    )


async def make_templates(ingest_address: str, api_key: str, sizes: Sizes) -> tuple[Template, ...]:
    now = datetime.now(UTC)
    async with open_channel(ingest_address, api_key) as channel:
        stub = ingest_grpc.IngestServiceStub(channel)
        stored = await track_template(
            stub, stored_template_events("template-stored", now, sizes.stored_events)
        )
        merge = await track_template(stub, merge_template_events("template-merge", now))
    return (
        Template(uuid.UUID(stored), "template-stored"),
        Template(uuid.UUID(merge), "template-merge"),
    )


async def start_all(
    identity: ChildProcess, identity_address: str, ingest: ChildProcess, ingest_address: str
) -> None:
    await wait_serving(identity_address, identity)
    await wait_serving(ingest_address, ingest)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sizes_of(args)
    pairs = sizes.identify_calls()
    configure_logging("warning")
    with contextlib.ExitStack() as stack:
        work_dir = make_work_dir(stack)
        backends = start_backends(stack, work_dir, args.database_url, args.redis_url)
        project = asyncio.run(create_project(backends.database_url, roles=("admin",)))
        key = project.keys["admin"]
        settings = suite_settings(
            backends, ("identity", "ingest"), work_dir, log_level=args.log_level
        )
        identity = start_service_process(stack, "identity", settings, work_dir)
        ingest = start_service_process(stack, "ingest", settings, work_dir)
        address = settings.addresses["identity"]
        asyncio.run(start_all(identity, address, ingest, settings.addresses["ingest"]))
        print(f"started identity (pid {identity.pid}) and ingest (pid {ingest.pid})")
        started = time.perf_counter()
        stored, merge = asyncio.run(make_templates(settings.addresses["ingest"], key, sizes))
        written = asyncio.run(
            bulk_load(
                backends.database_url,
                project.project_id,
                stored,
                merge,
                pairs,
                sizes.stored_profiles,
            )
        )
        print(f"loaded in {time.perf_counter() - started:.1f} s (templates through TrackEvents):")
        for part, tables in written.items():
            print(f"  {part}: " + ", ".join(f"{t} {n:,}" for t, n in tables.items()))
        outcome = asyncio.run(measure(identity, address, key, sizes, pairs))
        problems = error_problems(outcome)
        merge_problem = asyncio.run(
            check_merges(backends.database_url, project.project_id, outcome.tally)
        )
    if merge_problem:
        problems.append(merge_problem)
    print_report(outcome, sizes, labelled_quick(args))
    for problem in problems:
        print(f"INVALID: {problem}")
    print_figures(BENCH, figures_of(outcome), quick=labelled_quick(args))
    return 1 if problems else 0


if __name__ == "__main__":
    run_main(main)
