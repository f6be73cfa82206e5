"""Query benchmark: the profile view, the timeline's first page and the overview under load.

    python -m bench.query [--quick] [--rate R] [--concurrency C] [--duration S] [--rounds N]

Bulk-loads a project through SQL in the real tables' layout (identity's profiles and
installations, ingest's events, sessions, attributes, subscriptions and installation details,
segments' stored states), then builds query's rollups with the same recount the bus consumer
runs (RollupWrites.rebuild). Full: 100,000 profiles and 2,000,000 events; --quick: 10,000 and
200,000.

One more profile holds far more events than the others (full: 200,000; --quick: 20,000):
a heavy user, or a back-end sending on behalf of one account. Events carry a shop's names
(view_item, search, add_to_cart, app_open, purchase, share) and the project defines two
funnels over them (FUNNELS), so every profile view computes funnel progress from the events.

Then, from one client process (one channel, the admin key), at the same fixed rate and
concurrency and in alternating rounds: GetProfile of random profiles, GetProfile of the heavy
profile (its cost must not grow with the profile's events), ListEvents (first page)
of random profiles, GetOverview, the query service's own Echo (the baseline: the suite's bare
cost of one RPC), and a raw asyncpg primary-key lookup of a profile row from this process.
The query process's CPU per call is recorded beside each of its RPCs (Echo's is the bare cost
of a call through the suite's stack).
Finally a second project of 1,000,000 profiles (--quick: 100,000; one event each) is loaded and
its rollups built, and GetOverview of both projects is measured in alternating rounds from the
same client: its cost must not grow with the user base, and alternating puts this machine's
noise on both sides alike (measuring the large project in a later phase alone made the ratio
follow whatever else the machine was doing then). Last, on the large project and at a low rate
(USERS_TABLE_RATE, so calls do not queue), the users table's first page (ListProfiles)
unfiltered, by a common first name (one profile in 20; also sorted by name, where its matches
are one run of the name index) and by a rare family name (fewer matches than a page: walking
the sort order would read the whole project's index; query_name_tails, 0051, finds them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from bench.common import (
    Call,
    ChildProcess,
    Figure,
    LatencySummary,
    LoadPlan,
    LoadResult,
    add_backend_arguments,
    alternate,
    create_project,
    labelled_quick,
    make_work_dir,
    print_figures,
    run_main,
    service_settings,
    size_choice,
    start_backends,
    start_service_process,
    wait_serving,
)
from profiles.client import open_channel
from profiles.diagnostics.v1 import diagnostics_service_pb2 as diagnostics_pb
from profiles.diagnostics.v1 import diagnostics_service_pb2_grpc as diagnostics_grpc
from profiles.query.v1 import query_service_pb2 as pb
from profiles.query.v1 import query_service_pb2_grpc as pb_grpc
from services.query.repository import QueryRepository
from services.query.service import RollupService
from services.segments.filters import AttributeTest, Operand, Operator
from services.segments.funnels import FunnelStep, steps_to_json
from shared.clock import SystemClock
from shared.logging import configure_logging

BENCH = "query"
SERVICE = pb.DESCRIPTOR.services_by_name["QueryService"].full_name
MAX_ERROR_FRACTION = 0.001
# The calls the query process answers (pk_lookup goes from this process to PostgreSQL).
SERVER_LABELS = frozenset(
    {
        "echo",
        "getprofile",
        "getprofile_heavy",
        "listevents",
        "overview",
    }
)


@dataclass(frozen=True, slots=True)
class Sizes:
    profiles: int
    events: int
    large_profiles: int
    heavy_events: int
    rate: float
    concurrency: int
    duration_s: float
    rounds: int
    warmup_s: float


QUICK = Sizes(10_000, 200_000, 100_000, 20_000, 500, 16, 4.0, 2, 1.0)
FULL = Sizes(100_000, 2_000_000, 1_000_000, 200_000, 1000, 16, 10.0, 3, 3.0)
# Only checks that the bench runs end to end (the tests run it).
SMOKE = Sizes(200, 2_000, 1_000, 500, 50, 2, 0.15, 1, 0.05)

# --- bulk load -------------------------------------------------------------------------------
# Profile n (1-based) has ID profile_uuid(n), installation "inst-n" on platform 1 + n % 3, one
# session, events / profiles events (one session start in 20), an email on every second
# profile, a first and last name on every other one, a language, an email marketing
# subscription on every third, a push token on every second installation, and a stored smart
# segment. Rows are generated in the database.

PROFILE_ID = "('00000000-0000-4000-8000-' || lpad(to_hex({n}), 12, '0'))::uuid"

# Every second profile has a name: one of these first names (so one profile in 20 has each)
# and the family name "Family<n / 20, 7 digits>" (10 profiles have each: a search for one of
# them matches fewer profiles than a page holds, so walking the sort order would read the whole
# project's index).
FIRST_NAMES_LIST = (
    "Ana",
    "Bruno",
    "Chloé",
    "David",
    "Élodie",
    "Farid",
    "Greta",
    "Hugo",
    "Inès",
    "Jonas",
)
FIRST_NAMES = "ARRAY[" + ", ".join(f"'{name}'" for name in FIRST_NAMES_LIST) + "]"
# The users table's calls per second: low, so that a call's latency is its own cost (before
# 0051 a rare name's page read the whole project's index).
USERS_TABLE_RATE = 10.0

LOAD_STATEMENTS = (
    f"""INSERT INTO profiles (project_id, profile_id, custom_id, create_time, update_time)
    SELECT $1, {PROFILE_ID.format(n="n")}, CASE WHEN n % 4 = 0 THEN 'user-' || n END,
           $4::timestamptz, $4::timestamptz
    FROM generate_series($2::int, $3::int) AS n""",
    f"""INSERT INTO installations (project_id, installation_id, profile_id, create_time)
    SELECT $1, 'inst-' || n, {PROFILE_ID.format(n="n")}, $4::timestamptz
    FROM generate_series($2::int, $3::int) AS n""",
    """INSERT INTO installation_details (project_id, installation_id, platform, app_version,
        os_version, device_model, push_token, push_opt_in, language, timezone, first_seen,
        last_seen)
    SELECT $1, 'inst-' || n, 1 + n % 3, '1.' || n % 5, '17.0', 'Model' || n % 7,
           CASE WHEN n % 2 = 0 THEN 'token-' || n END, n % 4 = 0,
           (ARRAY['fr', 'en', 'de'])[1 + n % 3], 'Europe/Paris',
           $4::timestamptz - interval '30 days', $4::timestamptz
    FROM generate_series($2::int, $3::int) AS n""",
    f"""INSERT INTO sessions (project_id, installation_id, session_id, profile_id, platform,
        country, start_time, last_activity_time, end_time, duration, event_count, started,
        ended, closed)
    SELECT $1, 'inst-' || n, 's1', {PROFILE_ID.format(n="n")}, 1 + n % 3,
           (ARRAY['FR', 'US', 'DE', 'ES'])[1 + n % 4], $4::timestamptz - interval '1 day',
           $4::timestamptz - interval '1 day' + interval '5 minutes',
           $4::timestamptz - interval '1 day' + interval '5 minutes', interval '5 minutes', 10,
           true, true, true
    FROM generate_series($2::int, $3::int) AS n""",
    f"""INSERT INTO profile_attributes (project_id, profile_id, native, name, value, value_type,
        update_time)
    SELECT $1, {PROFILE_ID.format(n="n")}, true, a.name, a.value, 'string', $4::timestamptz
    FROM generate_series($2::int, $3::int) AS n
    CROSS JOIN LATERAL (
        SELECT 'language' AS name,
               jsonb_build_object('type', 'string', 'value',
                                  (ARRAY['fr', 'en', 'de'])[1 + n % 3]) AS value
        UNION ALL
        SELECT 'email', jsonb_build_object('type', 'string', 'value', 'u' || n || '@example.com')
        WHERE n % 2 = 0
        UNION ALL
        SELECT 'first_name',
               jsonb_build_object('type', 'string', 'value',
                                  ({FIRST_NAMES})[1 + n / 2 % {len(FIRST_NAMES_LIST)}])
        WHERE n % 2 = 1
        UNION ALL
        SELECT 'last_name', jsonb_build_object('type', 'string', 'value',
                                               'Family' || lpad((n / 20)::text, 7, '0'))
        WHERE n % 2 = 1
    ) a""",
    f"""INSERT INTO profile_subscriptions (project_id, profile_id, channel, kind, subscribed,
        change_time)
    SELECT $1, {PROFILE_ID.format(n="n")}, 'email', 'marketing', true, $4::timestamptz
    FROM generate_series($2::int, $3::int) AS n WHERE n % 3 = 0""",
    f"""INSERT INTO segment_states (project_id, profile_id, platform, segment, flag,
        update_time)
    SELECT $1, {PROFILE_ID.format(n="n")}, 0, 1 + n % 4, 0, $4::timestamptz
    FROM generate_series($2::int, $3::int) AS n""",
)

# A shop's custom event names, by k % 100 (a session start replaces one event in 20).
EVENT_NAME = """CASE WHEN k % 100 < 5 THEN 'app_open' WHEN k % 100 < 65 THEN 'view_item'
    WHEN k % 100 < 85 THEN 'search' WHEN k % 100 < 95 THEN 'add_to_cart'
    WHEN k % 100 < 97 THEN 'purchase' ELSE 'share' END"""

# Events of profiles $2..$3: $5 per profile, spread over the last 30 days.
LOAD_EVENTS = f"""
    INSERT INTO events (project_id, installation_id, event_id, profile_id, kind, name,
        event_time, receive_time, session_id, platform, payload)
    SELECT $1, 'inst-' || n, 'e' || k, {PROFILE_ID.format(n="n")},
           CASE WHEN k % 20 = 0 THEN 2 ELSE 1 END,
           CASE WHEN k % 20 = 0 THEN NULL ELSE {EVENT_NAME} END,
           $4::timestamptz
               - make_interval(secs => (n::bigint * 7919 + k::bigint * 104729) % 2592000),
           $4::timestamptz, 's1', 1 + n % 3,
           CASE WHEN k % 20 = 0 THEN '{{"country": "FR"}}'::jsonb
                ELSE jsonb_build_object(
                    'name', {EVENT_NAME}, 'label', 'item ' || k,
                    'attributes', jsonb_build_object(
                        'price', jsonb_build_object('number_value', k % 40))) END
    FROM generate_series($2::int, $3::int) AS n, generate_series(1, $5::int) AS k"""

# The funnels a shop defines (segments' stored form), so every profile view computes progress.
FUNNELS = (
    (
        "Checkout",
        (
            FunnelStep("app_open"),
            FunnelStep("view_item"),
            FunnelStep(
                "add_to_cart",
                AttributeTest(
                    False, "price", Operator.GREATER_THAN_OR_EQUAL, Operand("number", 10.0)
                ),
            ),
            FunnelStep("purchase"),
        ),
        timedelta(hours=1),
    ),
    ("Search", (FunnelStep("search"), FunnelStep("view_item")), timedelta(minutes=10)),
)
INSERT_FUNNEL = """
    INSERT INTO funnels (project_id, funnel_id, display_name, steps, conversion_window_ms,
        definition_hash, create_time)
    VALUES ($1, $2, $3, $4, $5, '', now())"""

CHUNK = 50_000


async def load(
    database_url: str, project_id: uuid.UUID, first: int, last: int, events: int
) -> None:
    """Loads profiles first..last with `events` events each, in chunks, then ANALYZEs."""
    now = datetime.now(UTC)
    conn = await asyncpg.connect(database_url)
    try:
        for start in range(first, last + 1, CHUNK):
            end = min(start + CHUNK - 1, last)
            async with conn.transaction():
                for statement in LOAD_STATEMENTS:
                    await conn.execute(statement, project_id, start, end, now)
                await conn.execute(LOAD_EVENTS, project_id, start, end, now, events)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def define_funnels(database_url: str, project_id: uuid.UUID) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.set_type_codec(
            "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )
        for name, steps, window in FUNNELS:
            await conn.execute(
                INSERT_FUNNEL,
                project_id,
                uuid.uuid4(),
                name,
                steps_to_json(steps),
                window // timedelta(milliseconds=1),
            )
    finally:
        await conn.close()


async def rebuild_rollups(database_url: str, project_id: uuid.UUID) -> float:
    """Builds query's projection of the project as the bus consumer would; returns seconds."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        started = time.perf_counter()
        await RollupService(QueryRepository(pool), SystemClock()).rebuild(project_id)
        async with pool.acquire() as conn:
            await conn.execute(
                "ANALYZE query_profiles, query_name_tails, query_installations, query_counters"
            )
        return time.perf_counter() - started
    finally:
        await pool.close()


def profile_uuid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012x}"


# --- measuring -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.query", description=__doc__.split("\n\n")[0]
    )
    add_backend_arguments(parser)
    parser.add_argument("--rate", type=float, help="calls per second (quick 500, full 1000)")
    parser.add_argument("--concurrency", type=int, help="calls in flight at most (16)")
    parser.add_argument("--duration", type=float, help="seconds per round and RPC (4 / 10)")
    parser.add_argument("--rounds", type=int, help="rounds per RPC (2 / 3)")
    return parser.parse_args(argv)


def sizes_of(args: argparse.Namespace) -> Sizes:
    base = size_choice(args, SMOKE, QUICK, FULL)
    return Sizes(
        base.profiles,
        base.events,
        base.large_profiles,
        base.heavy_events,
        args.rate or base.rate,
        args.concurrency or base.concurrency,
        args.duration or base.duration_s,
        args.rounds or base.rounds,
        base.warmup_s,
    )


async def measure(
    address: str,
    api_key: str,
    database_url: str,
    project_id: uuid.UUID,
    profiles: int,
    sizes: Sizes,
    labels: tuple[str, ...],
    server: ChildProcess,
) -> dict[str, list[LoadResult]]:
    rng = random.Random(7)
    heavy_profile = profile_uuid(profiles + 1)
    pool = await asyncpg.create_pool(database_url, min_size=sizes.concurrency, max_size=32)
    try:
        async with open_channel(address, api_key) as channel:
            query = pb_grpc.QueryServiceStub(channel)
            diagnostics = diagnostics_grpc.DiagnosticsServiceStub(channel)
            echo_request = diagnostics_pb.EchoRequest(payload=b"x" * 64)

            def some_profile() -> str:
                return profile_uuid(rng.randint(1, profiles))

            async def echo() -> object:
                return await diagnostics.Echo(echo_request)

            async def get_profile() -> object:
                return await query.GetProfile(pb.GetProfileRequest(profile_id=some_profile()))

            async def get_heavy_profile() -> object:
                return await query.GetProfile(pb.GetProfileRequest(profile_id=heavy_profile))

            async def list_events() -> object:
                return await query.ListEvents(pb.ListEventsRequest(profile_id=some_profile()))

            async def overview() -> object:
                return await query.GetOverview(pb.GetOverviewRequest())

            async def primary_key() -> object:
                async with pool.acquire() as conn:
                    return await conn.fetchrow(
                        "SELECT * FROM profiles WHERE project_id = $1 AND profile_id = $2",
                        project_id,
                        uuid.UUID(some_profile()),
                    )

            every: dict[str, Call] = {
                "echo": echo,
                "getprofile": get_profile,
                "getprofile_heavy": get_heavy_profile,
                "listevents": list_events,
                "overview": overview,
                "pk_lookup": primary_key,
            }
            for label in labels:  # each must answer before it is timed
                await every[label]()
            return await alternate(
                {label: every[label] for label in labels},
                LoadPlan(sizes.rate, sizes.concurrency, sizes.duration_s),
                sizes.rounds,
                warmup=LoadPlan(sizes.rate, sizes.concurrency, sizes.warmup_s),
                # The query process's CPU per call: Echo's is the suite's bare cost of an RPC.
                processes={label: server for label in labels if label in SERVER_LABELS},
            )
    finally:
        await pool.close()


async def measure_overview_growth(
    address: str, small_key: str, large_key: str, sizes: Sizes, server: ChildProcess
) -> dict[str, list[LoadResult]]:
    """GetOverview of the small and the large project, alternating, one channel per project's
    key (a key names its project)."""
    async with (
        open_channel(address, small_key) as small_channel,
        open_channel(address, large_key) as large_channel,
    ):
        small = pb_grpc.QueryServiceStub(small_channel)
        large = pb_grpc.QueryServiceStub(large_channel)

        async def small_overview() -> object:
            return await small.GetOverview(pb.GetOverviewRequest())

        async def large_overview() -> object:
            return await large.GetOverview(pb.GetOverviewRequest())

        calls: dict[str, Call] = {
            "overview_small": small_overview,
            "overview_large": large_overview,
        }
        for call in calls.values():  # each must answer before it is timed
            await call()
        return await alternate(
            calls,
            LoadPlan(sizes.rate, sizes.concurrency, sizes.duration_s),
            sizes.rounds,
            warmup=LoadPlan(sizes.rate, sizes.concurrency, sizes.warmup_s),
            processes={label: server for label in calls},
        )


async def measure_users_table(
    address: str, api_key: str, profiles: int, sizes: Sizes, server: ChildProcess
) -> dict[str, list[LoadResult]]:
    """The users table's first page (ListProfiles): unfiltered, by a common first name (by last
    seen, and by name A to Z), by a rare family name, alternating, at USERS_TABLE_RATE: slow
    enough that a call does not queue behind the others, so its latency is its own cost."""
    rng = random.Random(11)
    async with open_channel(address, api_key) as channel:
        query = pb_grpc.QueryServiceStub(channel)

        async def unfiltered() -> object:
            return await query.ListProfiles(pb.ListProfilesRequest())

        async def common_name() -> object:
            first = rng.choice(FIRST_NAMES_LIST).lower()
            return await query.ListProfiles(pb.ListProfilesRequest(name_prefix=first))

        async def common_name_by_name() -> object:
            first = rng.choice(FIRST_NAMES_LIST).lower()
            return await query.ListProfiles(
                pb.ListProfilesRequest(
                    name_prefix=first,
                    order_by=pb.PROFILE_ORDER_BY_NAME,
                    sort_order=pb.SORT_ORDER_ASCENDING,
                )
            )

        async def rare_name() -> object:
            family = f"family{rng.randrange(1, profiles // 20):07d}"
            reply = await query.ListProfiles(pb.ListProfilesRequest(name_prefix=family))
            assert len(reply.profiles) == 10, (family, len(reply.profiles))
            return reply

        calls: dict[str, Call] = {
            "listprofiles": unfiltered,
            "listprofiles_name_common": common_name,
            "listprofiles_name_common_by_name": common_name_by_name,
            "listprofiles_name_rare": rare_name,
        }
        for call in calls.values():  # each must answer before it is timed
            await call()
        plan = LoadPlan(min(sizes.rate, USERS_TABLE_RATE), 2, sizes.duration_s)
        return await alternate(
            calls,
            plan,
            sizes.rounds,
            warmup=LoadPlan(plan.rate, plan.concurrency, sizes.warmup_s),
            processes={label: server for label in calls},
        )


def print_table(title: str, results: dict[str, list[LoadResult]]) -> dict[str, LatencySummary]:
    print(title)
    print(
        f"  {'':<16}{'calls':>8}{'errors':>7}{'late':>6}{'rate/s':>9}{'p50 ms':>9}"
        f"{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}{'cpu us':>9}"
    )
    summaries = {}
    for label, rounds in results.items():
        merged = LoadResult.merged(rounds)
        s = summaries[label] = LatencySummary.of(merged.latencies_s)
        print(
            f"  {label:<16}{merged.completed:>8}{merged.error_count:>7}{merged.late_starts:>6}"
            f"{merged.achieved_rate:>9.1f}{s.p50_ms:>9.3f}{s.p90_ms:>9.3f}{s.p99_ms:>9.3f}"
            f"{s.max_ms:>9.2f}{merged.server_cpu_us_per_call:>9.0f}"
        )
        if merged.error_count > MAX_ERROR_FRACTION * max(merged.completed, 1):
            raise SystemExit(f"too many errors on {label}: {dict(merged.errors)}")
    return summaries


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sizes_of(args)
    configure_logging("warning")
    per_profile = sizes.events // sizes.profiles
    with contextlib.ExitStack() as stack:
        work_dir = make_work_dir(stack)
        backends = start_backends(stack, work_dir, args.database_url, args.redis_url)
        project = asyncio.run(create_project(backends.database_url, roles=("admin",)))
        started = time.perf_counter()
        asyncio.run(load(backends.database_url, project.project_id, 1, sizes.profiles, per_profile))
        heavy = sizes.profiles + 1
        asyncio.run(
            load(backends.database_url, project.project_id, heavy, heavy, sizes.heavy_events)
        )
        asyncio.run(define_funnels(backends.database_url, project.project_id))
        loaded_s = time.perf_counter() - started
        rollup_s = asyncio.run(rebuild_rollups(backends.database_url, project.project_id))
        print(
            f"loaded {sizes.profiles} profiles, {sizes.profiles * per_profile} events in"
            f" {loaded_s:.1f} s (and one profile of {sizes.heavy_events} events);"
            f" rollups built in {rollup_s:.1f} s"
        )
        settings = service_settings(backends, "query", work_dir, log_level="warning")
        process = start_service_process(stack, "query", settings, work_dir)
        address = f"127.0.0.1:{settings.ports['query']}"
        asyncio.run(wait_serving(address, process, SERVICE))
        key = project.keys["admin"]
        small = asyncio.run(
            measure(
                address,
                key,
                backends.database_url,
                project.project_id,
                sizes.profiles,
                sizes,
                (
                    "echo",
                    "getprofile",
                    "getprofile_heavy",
                    "listevents",
                    "overview",
                    "pk_lookup",
                ),
                process,
            )
        )
        large_project = asyncio.run(create_project(backends.database_url, roles=("admin",)))
        started = time.perf_counter()
        asyncio.run(
            load(backends.database_url, large_project.project_id, 1, sizes.large_profiles, 1)
        )
        large_loaded_s = time.perf_counter() - started
        rollup_large_s = asyncio.run(
            rebuild_rollups(backends.database_url, large_project.project_id)
        )
        print(
            f"loaded a second project of {sizes.large_profiles} profiles in"
            f" {large_loaded_s:.1f} s; rollups built in {rollup_large_s:.1f} s"
        )
        growth = asyncio.run(
            measure_overview_growth(address, key, large_project.keys["admin"], sizes, process)
        )
        users_table = asyncio.run(
            measure_users_table(
                address, large_project.keys["admin"], sizes.large_profiles, sizes, process
            )
        )
    header = (
        f"at {sizes.rate:g} calls/s, concurrency {sizes.concurrency},"
        f" {sizes.rounds} rounds x {sizes.duration_s:g} s, alternating, one client process"
    )
    s = print_table(f"\n{sizes.profiles} profiles, {header}", small)
    cpu = {
        label: LoadResult.merged(rounds).server_cpu_us_per_call for label, rounds in small.items()
    }
    g = print_table(
        f"\nGetOverview, {sizes.profiles} against {sizes.large_profiles} profiles, {header}",
        growth,
    )
    u = print_table(
        f"\nListProfiles' first page, {sizes.large_profiles} profiles, at"
        f" {min(sizes.rate, USERS_TABLE_RATE):g} calls/s, concurrency 2, {sizes.rounds} rounds x"
        f" {sizes.duration_s:g} s, alternating",
        users_table,
    )
    print()
    print_figures(
        BENCH,
        [
            Figure(
                "getprofile_p99_ms", s["getprofile"].p99_ms, "ms", "echo_p99_ms", s["echo"].p99_ms
            ),
            Figure(
                "getprofile_heavy_p99_ms",
                s["getprofile_heavy"].p99_ms,
                "ms",
                "getprofile_p99_ms",
                s["getprofile"].p99_ms,
            ),
            Figure(
                "listevents_p99_ms", s["listevents"].p99_ms, "ms", "echo_p99_ms", s["echo"].p99_ms
            ),
            Figure(
                "overview_p99_ms_1m",
                g["overview_large"].p99_ms,
                "ms",
                "overview_p99_ms_100k",
                g["overview_small"].p99_ms,
            ),
            Figure(
                "pk_lookup_p99_ms", s["pk_lookup"].p99_ms, "ms", "echo_p99_ms", s["echo"].p99_ms
            ),
            *(
                Figure(
                    f"{label}_p99_ms",
                    u[label].p99_ms,
                    "ms",
                    "listprofiles_p99_ms",
                    u["listprofiles"].p99_ms,
                )
                for label in (
                    "listprofiles_name_common",
                    "listprofiles_name_common_by_name",
                    "listprofiles_name_rare",
                )
            ),
            *(
                Figure(
                    f"{label}_cpu_us_per_call",
                    cpu[label],
                    "us",
                    "echo_cpu_us_per_call",
                    cpu["echo"],
                )
                for label in ("getprofile", "listevents")
            ),
        ],
        quick=labelled_quick(args),
    )
    return 0


if __name__ == "__main__":
    run_main(main)
