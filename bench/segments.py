"""Segments benchmark: the smart segment distribution at a million profiles, and freshness.

    python -m bench.segments [--quick] [--sizes N,M] [--repeats R] [--sessions S]

On embedded PostgreSQL and Redis (the default of `profiles up`):

1. Load (through the database, not the API). Segments' consumer itself stores a few thousand
   template profiles: random session histories (New, One-time, Engaged and Dormant shapes, one
   to three platforms, some with a time zone) go through SegmentsService.record_activity, the
   code the EventsIngested handler runs, in a project of their own and at one instant "now", so
   segment_profiles, segment_sessions and segment_states (classification, flag, schedule,
   next_transition_time) hold exactly what the consumer writes. Then the rows of each template
   are copied, with INSERT ... SELECT, to many profiles of the benchmark project (own profile
   IDs, session keys naming their own installation): first up to the first size, measured, then
   up to the second, measured again. VACUUM ANALYZE after each load, as autovacuum would.
2. Distribution, at each size: the read contract `segment_distribution(project, 0, now)` (what
   query's overview calls) beside a bare `SELECT segment, flag, count(*) ... GROUP BY` over the
   same rows of segment_states, from one connection, alternating (contract, bare, bare,
   contract, ...) after one warm-up each; the median of R runs of each is the figure. Both
   totals must equal the profiles loaded.
3. Freshness: identity, ingest and segments as subprocesses. For each of S installations, one
   session is tracked first (and awaited) so its profile is known to all services; then, one at
   a time, a second session (start and end events) goes through TrackEvents, and GetEngagement
   is polled (a call every 2 ms, one in flight) until its session count includes it: the lag is
   from TrackEvents returning to that answer. Baseline, in the same run and alternating rounds:
   the Echo RPC of the same segments process, one call in flight, 200 calls/s (about the pace
   of the polling), 100 calls per round.

4. Custom segment size, at the larger size, with the services running: the clones also get
   what custom segment filters read (an identity profile row, an installation with its platform,
   a custom `plan` attribute on every second profile, `pro` on every fourth, and 0 to 4
   `purchase` events in the last 30 days on every third), and one realistic segment is created
   through CreateSegment: Engaged (smart segment) AND on iOS AND plan = "pro" AND at least 3
   `purchase` in the last 30 days. Then GetSegment (its size, read from the counted members) is
   timed beside the same filter written by hand as one bare SQL count, alternating, median of R
   runs each; the counts must agree (within what the seconds between the sweep and the count
   changed). Also timed: ListSegments, the live count of the compiled filter (how GetSegment
   sized a segment before sizes were stored) and the two scans of one sweep evaluation of the
   segment (3 runs each). The segment stays for the freshness part, so every tracked event is
   evaluated against it (and the 5 s sweep runs over it), as in production.
Output: a report with the goals, then JSON lines; headlines `distribution_s` (baseline
`bare_group_by_s`), `segment_size_s` (baseline `bare_segment_count_s`) and
`engagement_lag_p99_ms` (baseline `echo_p99_ms`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc

from bench.common import (
    BenchError,
    ChildProcess,
    Figure,
    LatencySummary,
    LoadPlan,
    LoadResult,
    add_backend_arguments,
    clone_profile_rows,
    create_project,
    drive,
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
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from profiles.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from profiles.segments.v1 import filters_pb2
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from services.segments.change_stream import ChangeStream
from services.segments.definitions import EVALUATION_BATCH
from services.segments.definitions_repository import DefinitionsRepository
from services.segments.filters import PlatformTest, SegmentDefinition
from services.segments.model import ProfileActivity, SessionUpdate
from services.segments.repository import SegmentsRepository
from services.segments.service import SegmentsService
from shared.bus import Bus
from shared.clock import FrozenClock
from shared.db import create_pool
from shared.logging import configure_logging
from shared.tenancy import TenancyRepository
from tests.support.segments import store_time_zone

BENCH = "segments"
PLATFORMS = (types_pb2.PLATFORM_IOS, types_pb2.PLATFORM_ANDROID, types_pb2.PLATFORM_WEB)
TIME_ZONES = ("Europe/Paris", "America/New_York", "Asia/Tokyo", "Australia/Sydney")
# Goals of the segments issue (Freshness and scale).
DISTRIBUTION_GOAL_S = 2.0
DISTRIBUTION_BARE_RATIO_GOAL = 3.0
LAG_P99_GOAL_MS = 1000.0
SEGMENT_SIZE_GOAL_S = 2.0
POLL_INTERVAL_S = 0.002
LAG_TIMEOUT_S = 10.0
# The baseline: Echo on segments at about the polling's pace, one call in flight.
ECHO_RATE = 200.0
ECHO_ROUND_S = 0.5
CLONE_CHUNK = 200_000
SEGMENT_TABLES = ("segment_profiles", "segment_sessions", "segment_states")


@dataclass(frozen=True, slots=True)
class Sizes:
    profiles: tuple[int, int]  # the two sizes measured, smaller first
    templates: int
    repeats: int  # distribution runs per side and size
    sessions: int  # engagement lag samples
    rounds: int  # lag rounds alternating with Echo


QUICK = Sizes(profiles=(20_000, 100_000), templates=500, repeats=5, sessions=50, rounds=5)
FULL = Sizes(profiles=(100_000, 1_000_000), templates=2_000, repeats=7, sessions=200, rounds=10)
# Only checks that the bench runs end to end (the tests run it).
SMOKE = Sizes(profiles=(200, 400), templates=20, repeats=1, sessions=2, rounds=1)


# --- templates, stored by segments' own code ------------------------------------------------


def _sessions(
    rng: random.Random, key: str, now: datetime, first_age: float, last_age: float, count: int
) -> list[SessionUpdate]:
    """`count` sessions started between first_age and last_age days ago (both ends included)."""
    platforms = rng.sample(PLATFORMS, rng.choice((1, 1, 1, 2, 3)))
    ages = [first_age, last_age]
    ages += [rng.uniform(last_age, first_age) for _ in range(count - 2)]
    return [
        SessionUpdate(
            session_key=f"i:{key}:s{number}",
            platform=rng.choice(platforms),
            start_time=now - timedelta(days=age),
            start_known=True,
            duration=timedelta(seconds=rng.randint(5, 1200)),
            ended=True,
            platform_time=now - timedelta(days=age),
        )
        for number, age in enumerate(sorted(ages[:count], reverse=True))
    ]


def template_activity(
    rng: random.Random, key: str, now: datetime
) -> tuple[ProfileActivity, str | None]:
    """A random history shaped like one of the smart segments (the stored classification is
    whatever the rules make of it), and the profile's time zone (None: UTC)."""
    shape = rng.choices(("new", "one_time", "engaged", "dormant"), (15, 20, 30, 35))[0]
    if shape == "new":
        first = rng.uniform(0, 7)
        sessions = _sessions(rng, key, now, first, rng.uniform(0, first), rng.randint(1, 6))
    elif shape == "one_time":
        sessions = _sessions(rng, key, now, rng.uniform(7, 300), 0, 1)
    elif shape == "engaged":
        last = rng.uniform(0, 10)
        sessions = _sessions(rng, key, now, rng.uniform(14, 200), last, rng.randint(3, 30))
    else:
        last = rng.uniform(14, 200)
        sessions = _sessions(rng, key, now, last + rng.uniform(1, 100), last, rng.randint(2, 15))
    activity = ProfileActivity(str(uuid.uuid4()), sessions=sessions)
    for session in sessions:
        activity.add_event_time(session.start_time + session.duration)
    zone = rng.choice(TIME_ZONES) if rng.random() < 0.3 else None
    return activity, zone


async def store_templates(
    database_url: str, redis_url: str, count: int, now: datetime
) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """Stores `count` template profiles in a project of their own through segments' service,
    classified as of `now`; returns the project and the template profile IDs. The membership
    changes they enqueued are dropped (they describe no real profile)."""
    project = await create_project(database_url, roles=())
    pool = await create_pool(database_url, max_size=2)
    bus = Bus.from_url(redis_url, "bench-templates")  # never used: no watcher here
    try:
        service = SegmentsService(
            SegmentsRepository(pool), TenancyRepository(pool), FrozenClock(now), ChangeStream(bus)
        )
        rng = random.Random(5)
        templates = [template_activity(rng, f"tpl-{n}", now) for n in range(count)]
        activities = [activity for activity, _ in templates]
        for activity, zone in templates:
            if zone is not None:  # stored as ingest would, where segments reads the zone
                first_start = activity.sessions[0].start_time
                await store_time_zone(
                    pool, project.project_id, activity.profile_id, zone, first_start
                )
        await service.record_activity(project.project_id, activities)
        await pool.execute("DELETE FROM outbox WHERE project_id = $1", project.project_id)
        return project.project_id, [uuid.UUID(a.profile_id) for a in activities]
    finally:
        await bus.aclose()
        await pool.close()


# --- bulk copies ---------------------------------------------------------------------------

CLONES_TABLE = "bench_clones"
CREATE_CLONES = f"""
    CREATE TEMP TABLE {CLONES_TABLE} (
        template_profile_id uuid NOT NULL, template_installation_id text NOT NULL,
        profile_id uuid NOT NULL, installation_id text NOT NULL
    )"""
# Clone n copies template n mod T; its sessions name installation inst-<n>.
FILL_CLONES = f"""
    INSERT INTO {CLONES_TABLE}
    SELECT t.profile_id, 'tpl-' || t.n, gen_random_uuid(), 'inst-' || g
    FROM generate_series($1::int, $2::int - 1) AS g
    JOIN unnest($3::uuid[]) WITH ORDINALITY AS t(profile_id, n) ON t.n - 1 = g % $4::int"""
SESSION_KEY = (
    "replace(x.session_key, 'i:' || m.template_installation_id || ':',"
    " 'i:' || m.installation_id || ':')"
)


async def load_profiles(
    conn: asyncpg.Connection,
    template_project: uuid.UUID,
    templates: Sequence[uuid.UUID],
    project_id: uuid.UUID,
    first: int,
    end: int,
) -> dict[str, int]:
    """Copies templates to profiles number first..end-1 of the project, CLONE_CHUNK per
    transaction, with the rows custom segment filters read (FILTER_ROWS); returns rows written
    per table."""
    written = dict.fromkeys(SEGMENT_TABLES, 0)
    now = datetime.now(UTC)
    await conn.execute(f"DROP TABLE IF EXISTS {CLONES_TABLE}")
    await conn.execute(CREATE_CLONES)
    for start in range(first, end, CLONE_CHUNK):
        async with conn.transaction():
            await conn.execute(f"TRUNCATE {CLONES_TABLE}")
            await conn.execute(
                FILL_CLONES, start, min(start + CLONE_CHUNK, end), list(templates), len(templates)
            )
            for table in SEGMENT_TABLES:
                expressions = {"session_key": SESSION_KEY} if table == "segment_sessions" else {}
                written[table] += await clone_profile_rows(
                    conn, table, template_project, project_id, CLONES_TABLE,
                    expressions=expressions,
                )  # fmt: skip
            for table, statement in zip(FILTER_TABLES, FILTER_ROWS, strict=True):
                status = await conn.execute(statement, project_id, now)
                written[table] = written.get(table, 0) + int(status.split()[-1])
    await conn.execute(f"VACUUM ANALYZE {', '.join((*SEGMENT_TABLES, *FILTER_TABLES))}")
    return written


# What custom segment filters read, for the clones of one chunk (bench_clones; clone g has
# installation inst-g): identity's profile and installation rows, an installation on platform
# 1 + g % 3 (iOS for a third), a custom attribute plan on every second profile ("pro" on every
# fourth), and g % 5 purchase events within the last 30 days on every third. $1 project, $2 now.
CLONE_G = "substr(c.installation_id, 6)::int"
FILTER_ROWS = (
    f"""INSERT INTO profiles (project_id, profile_id, create_time, update_time)
    SELECT $1, c.profile_id, $2::timestamptz, $2::timestamptz FROM {CLONES_TABLE} c""",
    f"""INSERT INTO installations (project_id, installation_id, profile_id, create_time)
    SELECT $1, c.installation_id, c.profile_id, $2::timestamptz FROM {CLONES_TABLE} c""",
    f"""INSERT INTO installation_details (project_id, installation_id, platform, app_version,
        first_seen, last_seen)
    SELECT $1, c.installation_id, 1 + {CLONE_G} % 3, '1.0',
           $2::timestamptz - interval '60 days', $2::timestamptz
    FROM {CLONES_TABLE} c""",
    f"""INSERT INTO profile_attributes (project_id, profile_id, native, name, value, value_type,
        update_time)
    SELECT $1, c.profile_id, false, 'plan', v.value, 'string', $2::timestamptz
    FROM {CLONES_TABLE} c
    CROSS JOIN LATERAL (SELECT jsonb_build_object('type', 'string', 'value',
        CASE WHEN {CLONE_G} % 4 = 0 THEN 'pro' ELSE 'free' END) AS value) v
    WHERE {CLONE_G} % 2 = 0""",
    f"""INSERT INTO events (project_id, installation_id, event_id, profile_id, kind, name,
        event_time, receive_time, platform, payload)
    SELECT $1, c.installation_id, 'p' || k, c.profile_id, 1, 'purchase',
           $2::timestamptz
               - make_interval(secs => ({CLONE_G}::bigint * 7919 + k * 104729) % 2592000),
           $2::timestamptz,
           1 + {CLONE_G} % 3, '{{"name": "purchase"}}'::jsonb
    FROM {CLONES_TABLE} c, generate_series(1, {CLONE_G} % 5) AS k
    WHERE {CLONE_G} % 3 = 0""",
)
FILTER_TABLES = ("profiles", "installations", "installation_details", "profile_attributes",
                 "events")  # fmt: skip


# --- distribution --------------------------------------------------------------------------

# The read contract (0005_segments.sql), called as query's overview calls it.
DISTRIBUTION = "SELECT segment, flag, profile_count FROM segment_distribution($1, 0::smallint, $2)"
# The same rows counted with nothing else: no time split, no schedule.
BARE_GROUP_BY = """
    SELECT segment, flag, count(*) AS profile_count FROM segment_states
    WHERE project_id = $1 AND platform = 0
    GROUP BY segment, flag"""


@dataclass(frozen=True, slots=True)
class DistributionTimes:
    profiles: int
    contract_s: list[float]
    bare_s: list[float]
    counts: dict[tuple[int, int], int]

    @property
    def contract_median_s(self) -> float:
        return statistics.median(self.contract_s)

    @property
    def bare_median_s(self) -> float:
        return statistics.median(self.bare_s)


async def _timed(
    conn: asyncpg.Connection, query: str, *args: object
) -> tuple[float, dict[tuple[int, int], int]]:
    started = time.perf_counter()
    rows = await conn.fetch(query, *args)
    elapsed = time.perf_counter() - started
    return elapsed, {(r["segment"], r["flag"]): r["profile_count"] for r in rows}


async def time_distribution(
    conn: asyncpg.Connection, project_id: uuid.UUID, profiles: int, repeats: int
) -> DistributionTimes:
    """Alternating runs after one warm-up each; checks both count every profile once."""
    contract: list[float] = []
    bare: list[float] = []
    counts: dict[tuple[int, int], int] = {}
    await _timed(conn, DISTRIBUTION, project_id, datetime.now(UTC))
    await _timed(conn, BARE_GROUP_BY, project_id)
    for run in range(repeats):
        for side in ("contract", "bare") if run % 2 == 0 else ("bare", "contract"):
            if side == "contract":
                elapsed, counts = await _timed(conn, DISTRIBUTION, project_id, datetime.now(UTC))
                contract.append(elapsed)
            else:
                elapsed, bare_counts = await _timed(conn, BARE_GROUP_BY, project_id)
                bare.append(elapsed)
    for label, found in (("segment_distribution", counts), ("bare GROUP BY", bare_counts)):
        if sum(found.values()) != profiles:
            raise BenchError(f"{label} counted {sum(found.values())} of {profiles} profiles")
    return DistributionTimes(profiles, contract, bare, counts)


async def explain(conn: asyncpg.Connection, project_id: uuid.UUID) -> list[str]:
    """The plans of both queries, run once more with EXPLAIN ANALYZE."""
    lines = []
    for label, query, args in (
        ("segment_distribution", DISTRIBUTION, (project_id, datetime.now(UTC))),
        ("bare GROUP BY", BARE_GROUP_BY, (project_id,)),
    ):
        rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {query}", *args)
        lines.append(f"  {label}:")
        lines += [f"    {r[0]}" for r in rows]
    return lines


@dataclass(frozen=True, slots=True)
class LoadOutcome:
    times: list[DistributionTimes]
    written: list[dict[str, int]]
    load_s: list[float]
    plans: list[str]


async def load_and_measure(
    database_url: str, redis_url: str, project_id: uuid.UUID, sizes: Sizes
) -> LoadOutcome:
    now = datetime.now(UTC)
    template_project, templates = await store_templates(
        database_url, redis_url, sizes.templates, now
    )
    conn = await asyncpg.connect(database_url)
    try:
        times, written, load_s = [], [], []
        loaded = 0
        for size in sizes.profiles:
            started = time.perf_counter()
            written.append(
                await load_profiles(conn, template_project, templates, project_id, loaded, size)
            )
            load_s.append(time.perf_counter() - started)
            loaded = size
            times.append(await time_distribution(conn, project_id, size, sizes.repeats))
        plans = await explain(conn, project_id)
    finally:
        await conn.close()
    return LoadOutcome(times, written, load_s, plans)


# --- engagement lag ------------------------------------------------------------------------


def session_batch(installation_id: str, session_id: str, now: datetime) -> list[ingest_pb.Event]:
    """A 30-second session that just ended: its start and its end."""
    start = ingest_pb.Event(
        event_id=uuid.uuid4().hex,
        installation_id=installation_id,
        platform=types_pb2.PLATFORM_IOS,
        session_id=session_id,
    )
    start.event_time.FromDatetime(now - timedelta(seconds=30))
    start.session_start.country = "FR"
    end = ingest_pb.Event(
        event_id=uuid.uuid4().hex,
        installation_id=installation_id,
        platform=types_pb2.PLATFORM_IOS,
        session_id=session_id,
    )
    end.event_time.FromDatetime(now)
    end.session_end.duration.FromSeconds(30)
    return [start, end]


@dataclass(frozen=True, slots=True)
class Stubs:
    ingest: ingest_grpc.IngestServiceStub
    segments: segments_grpc.SegmentsServiceStub
    echo: diagnostics_grpc.DiagnosticsServiceStub


async def track_session(stubs: Stubs, installation_id: str, session_id: str) -> str:
    """Tracks one session; returns the profile it went to."""
    events = session_batch(installation_id, session_id, datetime.now(UTC))
    reply = await stubs.ingest.TrackEvents(ingest_pb.TrackEventsRequest(events=events))
    if reply.accepted_count != len(events):
        raise BenchError(f"session events not accepted: {[r.reason for r in reply.results]}")
    return reply.results[0].profile_id


async def wait_sessions(stubs: Stubs, profile_id: str, sessions: int) -> float:
    """Polls GetEngagement until it counts `sessions`; returns when (perf_counter)."""
    request = segments_pb.GetEngagementRequest(profile_id=profile_id)
    deadline = time.perf_counter() + LAG_TIMEOUT_S
    while True:
        with contextlib.suppress(grpc.aio.AioRpcError):  # NOT_FOUND until segments knows it
            reply = await stubs.segments.GetEngagement(request)
            if reply.session_count >= sessions:
                return time.perf_counter()
        if time.perf_counter() > deadline:
            raise BenchError(f"GetEngagement did not count session {sessions} in 10 s")
        await asyncio.sleep(POLL_INTERVAL_S)


async def lag_once(stubs: Stubs, installation_id: str) -> float:
    """A second session of a known installation: seconds from TrackEvents returning to
    GetEngagement counting it."""
    profile_id = await track_session(stubs, installation_id, "s2")
    returned = time.perf_counter()
    return await wait_sessions(stubs, profile_id, 2) - returned


@dataclass(frozen=True, slots=True)
class LagOutcome:
    lags_s: list[float]
    echo: LoadResult


# The benchmark's custom segment, as CreateSegment takes it.
def engaged_ios_buyers() -> filters_pb2.FilterNode:
    def node(**condition: object) -> filters_pb2.FilterNode:
        return filters_pb2.FilterNode(condition=filters_pb2.Condition(**condition))  # type: ignore[arg-type]

    plan = filters_pb2.AttributeCondition(
        custom_attribute="plan",
        operator=filters_pb2.OPERATOR_EQUALS,
        value=types_pb2.AttributeValue(string_value="pro"),
    )
    return filters_pb2.FilterNode(
        group=filters_pb2.FilterGroup(
            operator=filters_pb2.GROUP_OPERATOR_AND,
            children=[
                node(
                    smart_segment=filters_pb2.SmartSegmentCondition(
                        segments=[types_pb2.SMART_SEGMENT_ENGAGED]
                    )
                ),
                node(platform=filters_pb2.PlatformCondition(platforms=[types_pb2.PLATFORM_IOS])),
                node(attribute=plan),
                node(
                    event_count=filters_pb2.EventCountCondition(
                        event_name="purchase",
                        operator=filters_pb2.OPERATOR_GREATER_THAN_OR_EQUAL,
                        count=3,
                        within_last_days=30,
                    )
                ),
            ],
        )
    )


# The same filter written by hand: the smart segment as of $2 from the stored state (the rule of
# segment_state_at), an iOS installation, plan = "pro", and 3 purchases in the 30 days to $2.
BARE_SEGMENT_COUNT = """
    SELECT count(*) FROM profiles p
    WHERE p.project_id = $1 AND p.merged_into IS NULL
      AND EXISTS (SELECT 1 FROM segment_states s
                  WHERE s.project_id = $1 AND s.profile_id = p.profile_id AND s.platform = 0
                    AND (segment_state_at(s.segment, s.flag, s.next_transition_time,
                         s.upcoming_times, s.upcoming_segments, s.upcoming_flags, $2))[1] = 3)
      AND EXISTS (SELECT 1 FROM installations i JOIN installation_details d
                      ON d.project_id = i.project_id AND d.installation_id = i.installation_id
                  WHERE i.project_id = $1 AND i.profile_id = p.profile_id AND d.platform = 1)
      AND EXISTS (SELECT 1 FROM profile_attributes a
                  WHERE a.project_id = $1 AND a.profile_id = p.profile_id AND NOT a.native
                    AND a.name = 'plan' AND a.value->>'value' = 'pro')
      AND (SELECT count(*) FROM events e
           WHERE e.project_id = $1 AND e.profile_id = p.profile_id AND e.kind = 1
             AND e.name = 'purchase' AND e.event_time > $2 - interval '30 days'
             AND e.event_time <= $2) >= 3"""


@dataclass(frozen=True, slots=True)
class SegmentSizeOutcome:
    size: int
    create_s: float
    rpc_s: list[float]
    bare_s: list[float]
    bare_count: int
    live_s: list[float]  # the compiled filter counted over every live profile (the old size)
    sweep_s: list[float]  # one evaluation's scans (SELECT_ENTERED + SELECT_LEFT), read only
    list_s: list[float]  # ListSegments (page of the one segment)

    @property
    def live_median_s(self) -> float:
        return statistics.median(self.live_s)

    @property
    def sweep_median_s(self) -> float:
        return statistics.median(self.sweep_s)

    @property
    def list_median_s(self) -> float:
        return statistics.median(self.list_s)

    @property
    def rpc_median_s(self) -> float:
        return statistics.median(self.rpc_s)

    @property
    def bare_median_s(self) -> float:
        return statistics.median(self.bare_s)


async def measure_segment_size(
    addresses: dict[str, str], api_key: str, database_url: str, project_id: uuid.UUID, repeats: int
) -> SegmentSizeOutcome:
    """Creates the benchmark's custom segment, then times GetSegment beside the bare count,
    alternating after one warm-up each; both must give the same number."""
    conn = await asyncpg.connect(database_url)
    try:
        async with open_channel(addresses["segments"], api_key) as channel:
            stub = segments_grpc.SegmentsServiceStub(channel)
            started = time.perf_counter()
            created = await stub.CreateSegment(
                segments_pb.CreateSegmentRequest(
                    display_name="Engaged iOS buyers", filter=engaged_ios_buyers()
                ),
                timeout=600,
            )
            create_s = time.perf_counter() - started
            request = segments_pb.GetSegmentRequest(segment_id=created.segment.segment_id)

            async def rpc() -> tuple[float, int]:
                started = time.perf_counter()
                reply = await stub.GetSegment(request, timeout=60)
                return time.perf_counter() - started, reply.segment.size

            async def bare() -> tuple[float, int]:
                started = time.perf_counter()
                count = await conn.fetchval(BARE_SEGMENT_COUNT, project_id, datetime.now(UTC))
                return time.perf_counter() - started, int(count)

            await rpc()
            await bare()
            rpc_s: list[float] = []
            bare_s: list[float] = []
            size = bare_count = 0
            for run in range(repeats):
                for side in ("rpc", "bare") if run % 2 == 0 else ("bare", "rpc"):
                    if side == "rpc":
                        elapsed, size = await rpc()
                        rpc_s.append(elapsed)
                    else:
                        elapsed, bare_count = await bare()
                        bare_s.append(elapsed)
            list_s = []
            for _ in range(repeats):
                started = time.perf_counter()
                await stub.ListSegments(segments_pb.ListSegmentsRequest(), timeout=60)
                list_s.append(time.perf_counter() - started)
            live_s, sweep_s, live_count = await measure_sweep(
                database_url, project_id, uuid.UUID(created.segment.segment_id), SWEEP_REPEATS
            )
    finally:
        await conn.close()
    # The size comes from the stored members (as of the last sweep), the bare count is live:
    # with time frozen for no one they may differ by what changed in between; report both.
    if abs(size - bare_count) > max(10, bare_count // 1000) or live_count != bare_count:
        raise BenchError(
            f"GetSegment counted {size} profiles, the live filter {live_count},"
            f" the bare SQL {bare_count}"
        )
    return SegmentSizeOutcome(size, create_s, rpc_s, bare_s, bare_count, live_s, sweep_s, list_s)


# The live count and a sweep's scans are seconds each at a million profiles: fewer runs.
SWEEP_REPEATS = 3


async def measure_sweep(
    database_url: str, project_id: uuid.UUID, segment_id: uuid.UUID, repeats: int
) -> tuple[list[float], list[float], int]:
    """Times the size as GetSegment computed it before sizes were stored (the compiled filter
    counted over every live profile), and the two scans one evaluation of the segment by the
    sweep runs (who entered, who left: what it does every 5 s for a time-dependent segment),
    read only, in a transaction rolled back; returns (live runs, sweep runs, live count)."""
    pool = await create_pool(database_url, max_size=2)
    repository = DefinitionsRepository(pool)
    try:
        (ref,) = [
            r for r in await repository.all_segments(project_id) if r.segment_id == segment_id
        ]
        live_s: list[float] = []
        sweep_s: list[float] = []
        live_count = 0
        for _ in range(repeats):
            now = datetime.now(UTC)
            started = time.perf_counter()
            live_count = await repository.count_matching(project_id, ref.filter, now)
            live_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            with contextlib.suppress(_RolledBack):
                async with repository.transaction() as tx:
                    await tx.entered(project_id, segment_id, ref.filter, now, EVALUATION_BATCH)
                    await tx.left(project_id, segment_id, ref.filter, now, EVALUATION_BATCH)
                    raise _RolledBack
            sweep_s.append(time.perf_counter() - started)
    finally:
        await pool.close()
    return live_s, sweep_s, live_count


class _RolledBack(Exception):
    """Ends a read-only transaction by rolling it back."""


# Every profile with an iOS installation: a segment of a third of the project, of the kind an
# operator creates first ("all iOS users"), whose members CreateSegment stores and announces as
# entries in its one transaction.
def ios_users() -> filters_pb2.FilterNode:
    return filters_pb2.FilterNode(
        condition=filters_pb2.Condition(
            platform=filters_pb2.PlatformCondition(platforms=[types_pb2.PLATFORM_IOS])
        )
    )


# The same members written by hand, as a bare INSERT ... SELECT into a table of their own.
BARE_IOS_MEMBERS = """
    INSERT INTO bench_ios_members (profile_id)
    SELECT p.profile_id FROM profiles p
    WHERE p.project_id = $1 AND p.merged_into IS NULL
      AND EXISTS (SELECT 1 FROM installations i JOIN installation_details d
                      ON d.project_id = i.project_id AND d.installation_id = i.installation_id
                  WHERE i.project_id = $1 AND i.profile_id = p.profile_id AND d.platform = 1)"""


@dataclass(frozen=True, slots=True)
class LargeSegmentOutcome:
    size: int
    create_s: float  # CreateSegment: members stored and their entries in the outbox, committed
    announced_s: float  # from the call to the last entry relayed out of the outbox
    bare_s: float  # the same members inserted by one bare statement
    bare_count: int
    delete_s: float  # DeleteSegment, right after (the sweep may be evaluating the new segment)
    sweep_s: list[float]  # one evaluation's scans of such a segment just created, read only

    @property
    def sweep_median_s(self) -> float:
        return statistics.median(self.sweep_s)


async def outbox_drained(conn: asyncpg.Connection) -> None:
    """Returns once the outbox is empty: the relay has put every row on the streams."""
    while await conn.fetchval("SELECT count(*) FROM outbox"):  # noqa: ASYNC110 (a table, polled)
        await asyncio.sleep(0.01)


async def measure_large_segment(
    addresses: dict[str, str], api_key: str, database_url: str, project_id: uuid.UUID
) -> LargeSegmentOutcome:
    """Creates "all iOS users" through CreateSegment, timed to its answer and to the last of its
    entries leaving the outbox (the relay's drain), beside the bare insert of the same members;
    then deletes it, so that the freshness part evaluates only the benchmark's segment. Last,
    times one sweep evaluation of such a segment just created (new_segment_sweep)."""
    conn = await asyncpg.connect(database_url)
    try:
        # The members' statistics as autovacuum keeps them in service: they know the segments
        # created before, never the one just created (taken for one member by the planner). The
        # sweep evaluates a new segment at once (it settles), holding its row meanwhile: a plan
        # that depends on the member count made DeleteSegment wait over 60 s (2026-12-07), or
        # not, as autovacuum happened to analyze the table between the two creations or not.
        await conn.execute("ANALYZE custom_segment_members")
        await conn.execute("CREATE TEMP TABLE bench_ios_members (profile_id uuid)")
        started = time.perf_counter()
        await conn.execute(BARE_IOS_MEMBERS, project_id)
        bare_s = time.perf_counter() - started
        bare_count = int(await conn.fetchval("SELECT count(*) FROM bench_ios_members"))
        async with open_channel(addresses["segments"], api_key) as channel:
            stub = segments_grpc.SegmentsServiceStub(channel)
            started = time.perf_counter()
            created = await stub.CreateSegment(
                segments_pb.CreateSegmentRequest(display_name="iOS users", filter=ios_users()),
                timeout=600,
            )
            create_s = time.perf_counter() - started
            await outbox_drained(conn)
            announced_s = time.perf_counter() - started
            started = time.perf_counter()
            await stub.DeleteSegment(
                segments_pb.DeleteSegmentRequest(segment_id=created.segment.segment_id),
                timeout=600,
            )
            delete_s = time.perf_counter() - started
    finally:
        await conn.close()
    if created.segment.size != bare_count:
        raise BenchError(
            f"CreateSegment stored {created.segment.size} members, the bare SQL {bare_count}"
        )
    sweep_s = await new_segment_sweep(database_url, project_id, bare_count, SWEEP_REPEATS)
    return LargeSegmentOutcome(
        bare_count, create_s, announced_s, bare_s, bare_count, delete_s, sweep_s
    )


async def new_segment_sweep(
    database_url: str, project_id: uuid.UUID, size: int, repeats: int
) -> list[float]:
    """Times the two scans of the sweep's first evaluation of "all iOS users" just created (what
    a DeleteSegment or UpdateSegment right after its creation may wait for): the segment and its
    members stored as CreateSegment stores them, then scanned, in one transaction rolled back, so
    that no statistics know it and nothing is announced."""
    pool = await create_pool(database_url, max_size=2)
    repository = DefinitionsRepository(pool)
    node = PlatformTest((types_pb2.PLATFORM_IOS,))
    try:
        sweep_s: list[float] = []
        for run in range(repeats):
            now = datetime.now(UTC)
            segment_id = uuid.uuid4()
            with contextlib.suppress(_RolledBack):
                async with repository.transaction() as tx:
                    definition = SegmentDefinition(f"iOS users, scanned {run}", "", node)
                    members = await tx.insert_segment(project_id, segment_id, definition, now)
                    if len(members) != size:
                        raise BenchError(f"{len(members)} iOS users stored, {size} before")
                    started = time.perf_counter()
                    entered = await tx.entered(project_id, segment_id, node, now, EVALUATION_BATCH)
                    left = await tx.left(project_id, segment_id, node, now, EVALUATION_BATCH)
                    sweep_s.append(time.perf_counter() - started)
                    if entered or left:
                        raise BenchError(f"the sweep would move {len(entered) + len(left)}")
                    raise _RolledBack
    finally:
        await pool.close()
    return sweep_s


async def measure_lag(
    addresses: dict[str, str], api_key: str, sizes: Sizes, segments: ChildProcess
) -> LagOutcome:
    installations = [f"lag-{n:04d}" for n in range(sizes.sessions)]
    echo_request = diagnostics_pb.EchoRequest(payload=os.urandom(64))
    async with (
        open_channel(addresses["ingest"], api_key) as ingest_channel,
        open_channel(addresses["segments"], api_key) as segments_channel,
    ):
        stubs = Stubs(
            ingest_grpc.IngestServiceStub(ingest_channel),
            segments_grpc.SegmentsServiceStub(segments_channel),
            diagnostics_grpc.DiagnosticsServiceStub(segments_channel),
        )
        for installation_id in installations:  # first sessions: every profile known
            profile_id = await track_session(stubs, installation_id, "s1")
            await wait_sessions(stubs, profile_id, 1)

        async def echo() -> object:
            return await stubs.echo.Echo(echo_request)

        per_round = -(-sizes.sessions // sizes.rounds)
        echo_plan = LoadPlan(ECHO_RATE, 1, ECHO_ROUND_S)
        lags: list[float] = []
        echoes: list[LoadResult] = []
        for round_no in range(sizes.rounds):
            batch = installations[round_no * per_round : (round_no + 1) * per_round]
            if round_no % 2:
                echoes.append(await drive(echo, echo_plan))
            lags += [await lag_once(stubs, i) for i in batch]
            if not round_no % 2:
                echoes.append(await drive(echo, echo_plan))
            segments.check_alive()
    return LagOutcome(lags, LoadResult.merged(echoes))


# --- report --------------------------------------------------------------------------------


def _verdict(ok: bool, quick: bool) -> str:
    word = "holds" if ok else "MISSED"
    return f"{word} (quick run: indicative, no verdict)" if quick else word


SEGMENT_NAMES = {0: "none", 1: "New", 2: "One-time", 3: "Engaged", 4: "Dormant"}
FLAG_NAMES = {0: "", 1: " + Promising New", 2: " + Promising Dormant", 3: " + Risky Engaged"}


def print_load(outcome: LoadOutcome, sizes: Sizes) -> None:
    print(
        f"\nloaded through the database: {sizes.templates:,} template profiles stored by"
        " SegmentsService.record_activity, copied with INSERT ... SELECT, then VACUUM ANALYZE"
    )
    for size, written, seconds in zip(sizes.profiles, outcome.written, outcome.load_s, strict=True):
        rows = ", ".join(f"{t} +{n:,}" for t, n in written.items())
        print(f"  up to {size:,} profiles in {seconds:.1f} s: {rows}")


def print_distribution(outcome: LoadOutcome, quick: bool) -> None:
    print(
        "\ndistribution over all profiles (platform 0), one connection, median of alternating"
        " runs (contract, bare, bare, contract, ...), warm"
    )
    print(f"  {'profiles':>10}{'contract s':>12}{'bare s':>10}{'ratio':>8}   runs contract / bare")
    for t in outcome.times:
        runs_c = " ".join(f"{s:.3f}" for s in t.contract_s)
        runs_b = " ".join(f"{s:.3f}" for s in t.bare_s)
        print(
            f"  {t.profiles:>10,}{t.contract_median_s:>12.3f}{t.bare_median_s:>10.3f}"
            f"{t.contract_median_s / t.bare_median_s:>8.2f}   {runs_c} / {runs_b}"
        )
    small, large = outcome.times
    growth = large.contract_median_s / small.contract_median_s
    print(
        f"  growth {small.profiles:,} -> {large.profiles:,} profiles"
        f" (x{large.profiles / small.profiles:g}): contract x{growth:.2f},"
        f" bare x{large.bare_median_s / small.bare_median_s:.2f}"
    )
    print(f"  distribution at {large.profiles:,}:")
    for (segment, flag), count in sorted(large.counts.items()):
        name = SEGMENT_NAMES.get(segment, str(segment)) + FLAG_NAMES.get(flag, f" flag {flag}")
        print(f"    {name:<30}{count:>10,}  {count / large.profiles:6.1%}")
    print(f"  plans at {large.profiles:,} (EXPLAIN ANALYZE, one more run each):")
    for line in outcome.plans:
        print(line)
    seconds, bare = large.contract_median_s, large.bare_median_s
    print(
        f"  goal distribution under {DISTRIBUTION_GOAL_S:g} s ({seconds:.3f} s): "
        + _verdict(seconds < DISTRIBUTION_GOAL_S, quick)
    )
    print(
        f"  goal within {DISTRIBUTION_BARE_RATIO_GOAL:g}x bare SQL ({seconds / bare:.2f}x): "
        + _verdict(seconds / bare <= DISTRIBUTION_BARE_RATIO_GOAL, quick)
    )


def print_lag(lag: LagOutcome, sizes: Sizes, quick: bool) -> None:
    s = LatencySummary.of(lag.lags_s)
    e = LatencySummary.of(lag.echo.latencies_s)
    print(
        f"\nengagement lag: TrackEvents returned -> GetEngagement counts the session;"
        f" {len(lag.lags_s)} sessions one at a time (concurrency 1), GetEngagement polled every"
        f" {POLL_INTERVAL_S * 1000:g} ms; {sizes.rounds} rounds alternating with Echo on segments"
        " (concurrency 1)"
    )
    print(f"  {'':<16}{'count':>7}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for label, x in (("lag", s), ("Echo", e)):
        print(
            f"  {label:<16}{x.count:>7}{x.p50_ms:>9.2f}{x.p90_ms:>9.2f}{x.p99_ms:>9.2f}"
            f"{x.max_ms:>9.2f}"
        )
    print(
        f"  goal lag p99 under {LAG_P99_GOAL_MS:g} ms ({s.p99_ms:.1f} ms): "
        + _verdict(s.p99_ms < LAG_P99_GOAL_MS, quick)
    )


def print_custom_segment(outcome: SegmentSizeOutcome, profiles: int, quick: bool) -> None:
    print(
        f'\ncustom segment size over {profiles:,} profiles: Engaged AND on iOS AND plan = "pro"'
        " AND at least 3 purchase in the last 30 days; GetSegment (size read from the counted"
        " members) beside the same filter as one bare SQL count, one in flight, alternating, warm"
    )
    print(
        f"  size {outcome.size:,} ({outcome.size / profiles:.2%}); CreateSegment (stores the"
        f" members) took {outcome.create_s:.3f} s"
    )
    runs_r = " ".join(f"{s:.3f}" for s in outcome.rpc_s)
    runs_b = " ".join(f"{s:.3f}" for s in outcome.bare_s)
    print(
        f"  GetSegment median {outcome.rpc_median_s:.3f} s, bare count median"
        f" {outcome.bare_median_s:.3f} s (x{outcome.rpc_median_s / outcome.bare_median_s:.2f});"
        f" runs {runs_r} / {runs_b}"
    )
    print(
        f"  ListSegments median {outcome.list_median_s:.3f} s; the live count of the compiled"
        f" filter (GetSegment's size before it was stored) median {outcome.live_median_s:.3f} s"
        f" (runs {' '.join(f'{s:.3f}' for s in outcome.live_s)})"
    )
    print(
        f"  one sweep evaluation of the segment (entered + left scans, every 30 s while the"
        f" filter depends on time) median {outcome.sweep_median_s:.3f} s"
        f" (runs {' '.join(f'{s:.3f}' for s in outcome.sweep_s)})"
    )
    print(
        f"  goal segment size under {SEGMENT_SIZE_GOAL_S:g} s ({outcome.rpc_median_s:.3f} s): "
        + _verdict(outcome.rpc_median_s < SEGMENT_SIZE_GOAL_S, quick)
    )


def print_large_segment(outcome: LargeSegmentOutcome, profiles: int) -> None:
    print(
        f"\na large custom segment over {profiles:,} profiles: all iOS users, through"
        " CreateSegment (members stored and each announced as an entry, in one transaction),"
        " beside the same members inserted by one bare INSERT ... SELECT"
    )
    print(
        f"  size {outcome.size:,} ({outcome.size / profiles:.1%}); CreateSegment"
        f" {outcome.create_s:.3f} s, its last entry out of the outbox {outcome.announced_s:.3f} s"
        f" after the call; bare insert {outcome.bare_s:.3f} s"
        f" (x{outcome.create_s / outcome.bare_s:.1f} and"
        f" x{outcome.announced_s / outcome.bare_s:.1f}); DeleteSegment {outcome.delete_s:.3f} s"
    )
    print(
        "  one sweep evaluation of such a segment just created (entered + left scans, before"
        " any statistics know it: what a DeleteSegment right after the creation may wait for)"
        f" median {outcome.sweep_median_s:.3f} s"
        f" (runs {' '.join(f'{s:.3f}' for s in outcome.sweep_s)})"
    )


def figures_of(
    load: LoadOutcome, size: SegmentSizeOutcome, large_segment: LargeSegmentOutcome, lag: LagOutcome
) -> list[Figure]:
    small, large = load.times
    s = LatencySummary.of(lag.lags_s)
    e = LatencySummary.of(lag.echo.latencies_s)
    return [
        Figure("distribution_s", large.contract_median_s, "s", "bare_group_by_s",
               large.bare_median_s),
        Figure("segment_size_s", size.rpc_median_s, "s", "bare_segment_count_s",
               size.bare_median_s),
        Figure("segment_list_s", size.list_median_s, "s", "bare_segment_count_s",
               size.bare_median_s),
        Figure("segment_live_count_s", size.live_median_s, "s", "bare_segment_count_s",
               size.bare_median_s),
        Figure("segment_sweep_s", size.sweep_median_s, "s", "bare_segment_count_s",
               size.bare_median_s),
        Figure(f"distribution_{small.profiles}_s", small.contract_median_s, "s",
               f"bare_group_by_{small.profiles}_s", small.bare_median_s),
        Figure("distribution_growth", large.contract_median_s / small.contract_median_s, "x",
               "profile_growth", large.profiles / small.profiles),
        Figure("large_segment_create_s", large_segment.create_s, "s", "bare_member_insert_s",
               large_segment.bare_s),
        Figure("large_segment_announced_s", large_segment.announced_s, "s",
               "bare_member_insert_s", large_segment.bare_s),
        Figure("large_segment_sweep_s", large_segment.sweep_median_s, "s",
               "bare_member_insert_s", large_segment.bare_s),
        Figure("engagement_lag_p99_ms", s.p99_ms, "ms", "echo_p99_ms", e.p99_ms),
        Figure("engagement_lag_p50_ms", s.p50_ms, "ms", "echo_p50_ms", e.p50_ms),
    ]  # fmt: skip


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.segments", description=__doc__.split("\n\n")[0]
    )
    add_backend_arguments(parser)
    parser.add_argument(
        "--sizes", help="the two profile counts, e.g. 100000,1000000 (quick: 20000,100000)"
    )
    parser.add_argument("--repeats", type=int, help="distribution runs per side (quick 5, full 7)")
    parser.add_argument("--sessions", type=int, help="engagement lag samples (quick 50, full 200)")
    parser.add_argument("--log-level", default="warning", help="services' log level")
    return parser.parse_args(argv)


def sizes_of(args: argparse.Namespace) -> Sizes:
    base = size_choice(args, SMOKE, QUICK, FULL)
    profiles = base.profiles
    if args.sizes:
        small, large = (int(v) for v in args.sizes.split(","))
        if not 0 < small < large:
            raise BenchError("--sizes needs two increasing counts")
        profiles = (small, large)
    sessions = args.sessions or base.sessions
    return Sizes(
        profiles=profiles,
        templates=base.templates,
        repeats=args.repeats or base.repeats,
        sessions=sessions,
        rounds=min(base.rounds, sessions),
    )


async def wait_all(processes: dict[str, ChildProcess], addresses: dict[str, str]) -> None:
    for name, process in processes.items():
        await wait_serving(addresses[name], process)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sizes_of(args)
    configure_logging("warning")
    names = ("identity", "ingest", "segments")
    with contextlib.ExitStack() as stack:
        work_dir = make_work_dir(stack)
        backends = start_backends(stack, work_dir, args.database_url, args.redis_url)
        project = asyncio.run(create_project(backends.database_url, roles=("admin",)))
        load = asyncio.run(
            load_and_measure(backends.database_url, backends.redis_url, project.project_id, sizes)
        )
        # Reported at once: a service failing to start later must not lose these figures.
        print_load(load, sizes)
        print_distribution(load, labelled_quick(args))
        settings = suite_settings(backends, names, work_dir, log_level=args.log_level)
        processes = {n: start_service_process(stack, n, settings, work_dir) for n in names}
        addresses = {n: settings.addresses[n] for n in names}
        asyncio.run(wait_all(processes, addresses))
        size = asyncio.run(
            measure_segment_size(
                addresses,
                project.keys["admin"],
                backends.database_url,
                project.project_id,
                sizes.repeats,
            )
        )
        print_custom_segment(size, sizes.profiles[-1], labelled_quick(args))
        large_segment = asyncio.run(
            measure_large_segment(
                addresses, project.keys["admin"], backends.database_url, project.project_id
            )
        )
        print_large_segment(large_segment, sizes.profiles[-1])
        lag = asyncio.run(
            measure_lag(addresses, project.keys["admin"], sizes, processes["segments"])
        )
    print_lag(lag, sizes, labelled_quick(args))
    print()
    ok = not lag.echo.error_count
    if not ok:
        print(f"INVALID: Echo errors {dict(lag.echo.errors)}")
    print_figures(BENCH, figures_of(load, size, large_segment, lag), quick=labelled_quick(args))
    return 0 if ok else 1


if __name__ == "__main__":
    run_main(main)
