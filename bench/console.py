"""Console benchmark: the profile page and the users table against the gRPC calls they make.

    python -m bench.console [--quick | --smoke] [--rate R] [--concurrency C] [--duration S]
                            [--profile-console FILE]

Bulk-loads a project as bench.query does (full: 100,000 profiles and 1,000,000 events; --quick:
10,000 and 100,000; --smoke: 500 and 2,500, a check that it runs), with the shop's two funnels,
and builds query's rollups. Starts query, segments and identity, and the console (`profiles
serve console`) as subprocesses, signs in with the read key over HTTP, then drives at the same
fixed rate and concurrency, in alternating rounds, from one client process:

- profile_page: GET /profiles/<random profile> (the console calls GetProfile, ListSessions,
  ListEvents and GetActivity concurrently, then renders);
- profile_calls: the same four calls made directly, one after the other (their sum);
- users_page: GET /users (ListSegments and ListProfiles concurrently, then renders);
- users_calls: the same two calls made directly, one after the other.

The aim is a page at most 1.5x the sum of its calls (the console's own cost: HTTP, session
lookup in Redis, rendering). Page weight (HTML plus the CSS and script it loads) is printed
beside it. Times are measured by this client on loopback, so they include the HTTP hop.
--profile-console FILE runs the console under cProfile (its main thread's CPU time) and writes
the stats to FILE for `python -m pstats FILE`: where the console's own share goes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.common import (
    BenchError,
    ChildProcess,
    Figure,
    LatencySummary,
    LoadPlan,
    LoadResult,
    add_backend_arguments,
    alternate,
    child_env,
    create_project,
    free_port,
    make_work_dir,
    print_figures,
    run_main,
    start_backends,
    start_process,
    start_service_process,
    suite_settings,
    wait_http,
    wait_serving,
)
from bench.query import define_funnels, load, profile_uuid, rebuild_rollups
from profiles.client import open_channel
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.query.v1 import query_service_pb2_grpc as query_grpc
from profiles.segments.v1 import segments_service_pb2 as segments_pb
from profiles.segments.v1 import segments_service_pb2_grpc as segments_grpc
from shared.logging import configure_logging

BENCH = "console"
SERVICES = ("query", "segments", "identity")
COOKIE = "profiles_console_session"
# The console under cProfile (--profile-console), timed by its main thread's CPU time (the
# event loop's waits are left out; gRPC's own threads are not seen): the stats are written when it
# stops. uvicorn re-raises the SIGTERM it caught once its graceful stop is done, which would end
# the process before they are: here that re-raise is a no-op, so the process returns normally.
PROFILED_CONSOLE = """
import cProfile, signal, sys, time
from services.console.app import run_console
from shared.settings import Settings
signal.raise_signal = lambda signum: None
profiler = cProfile.Profile(time.thread_time)
try:
    profiler.runcall(run_console, Settings.from_env())
finally:
    profiler.dump_stats(sys.argv[1])
"""


@dataclass(frozen=True, slots=True)
class Sizes:
    profiles: int
    events_per_profile: int
    rate: float
    concurrency: int
    duration_s: float
    rounds: int


FULL = Sizes(100_000, 10, 40, 8, 10.0, 3)
QUICK = Sizes(10_000, 10, 40, 8, 4.0, 2)
# Only checks that the bench runs end to end (the tests run it): a few calls per target.
SMOKE = Sizes(500, 5, 10, 2, 0.25, 1)


class Http:
    """A minimal HTTP/1.1 keep-alive client for GETs with the session cookie."""

    def __init__(self, host: str, port: int, cookie: str) -> None:
        self._host, self._port, self._cookie = host, port, cookie
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self, path: str) -> bytes:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {self._host}\r\nCookie: {COOKIE}={self._cookie}\r\n\r\n"
        )
        status = b""
        if self._idle:
            reader, writer = self._idle.pop()
            writer.write(request.encode())
            # The server closes connections idle longer than its keep-alive: open a new one.
            with contextlib.suppress(ConnectionError):
                status = await reader.readline()
        if not status:
            reader, writer = await asyncio.open_connection(self._host, self._port)
            writer.write(request.encode())
            status = await reader.readline()
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:
            body = b""
            while size := int((await reader.readline()).strip() or b"0", 16):
                body += (await reader.readexactly(size + 2))[:-2]
            await reader.readline()
        if b" 200 " not in status:
            raise BenchError(f"GET {path}: {status.decode().strip()}")
        self._idle.append((reader, writer))
        return body

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()


def sign_in(base_url: str, key: str) -> str:
    """Signs in through the form (CSRF cookie and token) and returns the session ID."""
    jar: dict[str, str] = {}

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    with opener.open(f"{base_url}/signin", timeout=10) as reply:
        page = reply.read().decode()
        for header in reply.headers.get_all("set-cookie") or []:
            name, _, rest = header.partition("=")
            jar[name] = rest.split(";")[0]
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    if found is None:
        raise BenchError("the sign-in form has no CSRF token")
    body = urllib.parse.urlencode({"key": key, "csrf_token": found.group(1), "next": "/users"})
    request = urllib.request.Request(
        f"{base_url}/signin",
        data=body.encode(),
        headers={"Cookie": "; ".join(f"{k}={v}" for k, v in jar.items())},
    )
    try:
        opener.open(request, timeout=10)
    except urllib.error.HTTPError as redirect:  # the 303 to the next page
        for header in redirect.headers.get_all("set-cookie") or []:
            if header.startswith(f"{COOKIE}="):
                return header.split("=", 1)[1].split(";")[0]
    raise BenchError("sign-in did not set a session cookie")


async def measure(
    base_url: str,
    session_id: str,
    addresses: dict[str, str],
    key: str,
    sizes: Sizes,
    console: ChildProcess,
) -> tuple[dict[str, list[LoadResult]], dict[str, int]]:
    rng = random.Random(7)
    parts = urllib.parse.urlsplit(base_url)
    http = Http(parts.hostname or "127.0.0.1", parts.port or 80, session_id)
    today = datetime.now(UTC).date()
    try:
        async with (
            open_channel(addresses["query"], key) as query_channel,
            open_channel(addresses["segments"], key) as segments_channel,
        ):
            query = query_grpc.QueryServiceStub(query_channel)
            segments = segments_grpc.SegmentsServiceStub(segments_channel)

            def some_profile() -> str:
                return profile_uuid(rng.randint(1, sizes.profiles))

            async def profile_page() -> object:
                return await http.get(f"/profiles/{some_profile()}")

            async def profile_calls() -> object:
                profile_id = some_profile()
                await query.GetProfile(query_pb.GetProfileRequest(profile_id=profile_id))
                await query.ListSessions(
                    query_pb.ListSessionsRequest(profile_id=profile_id, page_size=20)
                )
                await query.ListEvents(
                    query_pb.ListEventsRequest(profile_id=profile_id, page_size=50)
                )
                return await query.GetActivity(
                    query_pb.GetActivityRequest(
                        profile_id=profile_id,
                        start_date=(today - timedelta(days=29)).isoformat(),
                        end_date=today.isoformat(),
                    )
                )

            async def users_page() -> object:
                return await http.get("/users")

            async def users_calls() -> object:
                await segments.ListSegments(segments_pb.ListSegmentsRequest(page_size=100))
                return await query.ListProfiles(
                    query_pb.ListProfilesRequest(page_size=50, include_total_size=True)
                )

            weights = {
                "profile_page": len(await http.get(f"/profiles/{profile_uuid(1)}")),
                "users_page": len(await http.get("/users")),
                "assets": len(await http.get("/static/console.css"))
                + len(await http.get("/static/console.js")),
            }
            plan = LoadPlan(sizes.rate, sizes.concurrency, sizes.duration_s)
            warmup = LoadPlan(sizes.rate, sizes.concurrency, min(1.0, sizes.duration_s))
            results = await alternate(
                {
                    "profile_page": profile_page,
                    "profile_calls": profile_calls,
                    "users_page": users_page,
                    "users_calls": users_calls,
                },
                plan,
                sizes.rounds,
                warmup=warmup,
                # The console's CPU per page: steadier than latency on a busy machine.
                processes={"profile_page": console, "users_page": console},
            )
    finally:
        http.close()
    return results, weights


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.console", description=__doc__.split("\n\n")[0]
    )
    add_backend_arguments(parser)
    parser.add_argument("--rate", type=float, help="requests per second (40; smoke 10)")
    parser.add_argument("--concurrency", type=int, help="requests in flight at most (8)")
    parser.add_argument("--duration", type=float, help="seconds per round and target (10 / 4)")
    parser.add_argument("--rounds", type=int, help="rounds per target (3 / 2)")
    parser.add_argument(
        "--profile-console",
        metavar="FILE",
        help="run the console under cProfile and write its stats to FILE (read them with"
        " `python -m pstats FILE`); its figures are then slower than without",
    )
    return parser.parse_args(argv)


def sizes_of(args: argparse.Namespace) -> Sizes:
    base = SMOKE if args.smoke else QUICK if args.quick else FULL
    return Sizes(
        base.profiles,
        base.events_per_profile,
        args.rate or base.rate,
        args.concurrency or base.concurrency,
        args.duration or base.duration_s,
        args.rounds or base.rounds,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sizes_of(args)
    configure_logging("warning")
    with contextlib.ExitStack() as stack:
        work_dir = make_work_dir(stack)
        backends = start_backends(stack, work_dir, args.database_url, args.redis_url)
        project = asyncio.run(create_project(backends.database_url, roles=("admin", "read")))
        started = time.perf_counter()
        asyncio.run(
            load(
                backends.database_url,
                project.project_id,
                1,
                sizes.profiles,
                sizes.events_per_profile,
            )
        )
        asyncio.run(define_funnels(backends.database_url, project.project_id))
        rollup_s = asyncio.run(rebuild_rollups(backends.database_url, project.project_id))
        print(
            f"loaded {sizes.profiles} profiles, {sizes.profiles * sizes.events_per_profile} events"
            f" in {time.perf_counter() - started:.1f} s (rollups {rollup_s:.1f} s)"
        )
        settings = suite_settings(backends, SERVICES, work_dir).with_changes(
            console_port=free_port(), console_metrics_port=0
        )
        addresses = {name: f"127.0.0.1:{settings.ports[name]}" for name in SERVICES}
        # Every process starts at once (none needs another to start): their start-ups overlap.
        processes = {
            name: start_service_process(stack, name, settings, work_dir) for name in SERVICES
        }
        if args.profile_console:
            command = [
                sys.executable,
                "-c",
                PROFILED_CONSOLE,
                str(Path(args.profile_console).resolve()),
            ]
            console = start_process(
                stack,
                ChildProcess("console", command, child_env(settings), work_dir / "console.log"),
            )
        else:
            console = start_service_process(stack, "console", settings, work_dir)
        base_url = f"http://127.0.0.1:{settings.console_port}"
        for name, process in processes.items():
            asyncio.run(wait_serving(addresses[name], process))
        wait_http(f"{base_url}/healthz", console)
        session_id = sign_in(base_url, project.keys["read"])
        results, weights = asyncio.run(
            measure(base_url, session_id, addresses, project.keys["read"], sizes, console)
        )
    print(
        f"\n{sizes.profiles} profiles, at {sizes.rate:g} requests/s, concurrency"
        f" {sizes.concurrency}, {sizes.rounds} rounds x {sizes.duration_s:g} s, alternating"
    )
    print(
        f"  {'':<16}{'calls':>8}{'errors':>7}{'late':>6}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
        f"{'console cpu us':>16}"
    )
    s: dict[str, LatencySummary] = {}
    for label, rounds in results.items():
        merged = LoadResult.merged(rounds)
        summary = s[label] = LatencySummary.of(merged.latencies_s)
        print(
            f"  {label:<16}{merged.completed:>8}{merged.error_count:>7}{merged.late_starts:>6}"
            f"{summary.p50_ms:>9.2f}{summary.p90_ms:>9.2f}{summary.p99_ms:>9.2f}"
            f"{merged.server_cpu_us_per_call:>16.0f}"
        )
        if merged.error_count:
            raise BenchError(f"errors on {label}: {dict(merged.errors)}")
    print(
        f"  page weight: profile {weights['profile_page']} B, users {weights['users_page']} B,"
        f" CSS and script {weights['assets']} B"
    )
    print()
    print_figures(
        BENCH,
        [
            Figure(
                "profile_page_p50_ms",
                s["profile_page"].p50_ms,
                "ms",
                "profile_calls_sum_p50_ms",
                s["profile_calls"].p50_ms,
            ),
            Figure(
                "profile_page_p99_ms",
                s["profile_page"].p99_ms,
                "ms",
                "profile_calls_sum_p99_ms",
                s["profile_calls"].p99_ms,
            ),
            Figure(
                "users_page_p50_ms",
                s["users_page"].p50_ms,
                "ms",
                "users_calls_sum_p50_ms",
                s["users_calls"].p50_ms,
            ),
            Figure(
                "users_page_p99_ms",
                s["users_page"].p99_ms,
                "ms",
                "users_calls_sum_p99_ms",
                s["users_calls"].p99_ms,
            ),
            Figure(
                "profile_page_bytes",
                weights["profile_page"] + weights["assets"],
                "B",
                "page_budget_bytes",
                200_000,
            ),
        ],
        quick=args.quick or args.smoke,
    )
    return 0


if __name__ == "__main__":
    run_main(main)
