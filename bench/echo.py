"""Echo benchmark: the suite's bare cost of one RPC, as a ratio to a bare gRPC server.

    python -m bench.echo [--quick] [--rate R] [--concurrency C] [--duration S] [--rounds N]

Measures `profiles.diagnostics.v1.DiagnosticsService/Echo` on one suite service started as a
subprocess (`profiles serve query` by default) on embedded PostgreSQL and Redis: the real server
with its interceptor (admin-key authentication, authorization, error mapping, Prometheus metrics,
structlog), logging at `warning` so that log output does not dominate. In the same run, at the
same rate, concurrency and payload, from the same client (one process, one channel per server,
both opened by `profiles.client.open_channel` with the admin key), it measures the baseline:
`bench.bare_echo`, a bare grpc.aio server in a subprocess with the same servicer and server
options and no interceptors.

Two phases, each in alternating rounds (suite, bare, bare, suite, ...) after a warm-up of each
target, so that drift of this shared machine's load falls on both:
- fixed rate: open loop at --rate with at most --concurrency calls in flight; latency
  percentiles of all rounds of a side together, and the achieved rate (`echo_rps`, which only
  falls below the target if a server cannot keep up);
- closed loop at the same concurrency: throughput (`echo_max_rps`), bounded by the client and the
  server sharing this machine's cores, and the server process's CPU per call
  (`echo_cpu_us_per_call`), the figure least disturbed by other work on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from dataclasses import dataclass

import grpc

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
    create_project,
    labelled_quick,
    make_work_dir,
    print_figures,
    run_main,
    service_settings,
    size_choice,
    start_backends,
    start_bare_echo,
    start_service_process,
    wait_serving,
)
from profiles.client import open_channel
from profiles.diagnostics.v1 import diagnostics_service_pb2 as pb
from profiles.diagnostics.v1 import diagnostics_service_pb2_grpc as pb_grpc
from shared.logging import configure_logging

BENCH = "echo"
DIAGNOSTICS_SERVICE = pb.DESCRIPTOR.services_by_name["DiagnosticsService"].full_name
# Most errors we accept before the figures are declared void (exit code 1).
MAX_ERROR_FRACTION = 0.001


@dataclass(frozen=True, slots=True)
class Sizes:
    rate: float
    concurrency: int
    duration_s: float  # fixed-rate phase, per round and side
    rounds: int  # per side and phase
    warmup_s: float
    throughput_s: float  # closed-loop phase, per round and side


# The rate is well below what either server sustains here (see the throughput phase), so the
# latencies are per-call costs, not queueing.
QUICK = Sizes(rate=300, concurrency=8, duration_s=5.0, rounds=3, warmup_s=2.0, throughput_s=3.0)
FULL = Sizes(rate=300, concurrency=8, duration_s=20, rounds=5, warmup_s=5.0, throughput_s=10.0)
# Only checks that the bench runs end to end (the tests run it).
SMOKE = Sizes(rate=100, concurrency=2, duration_s=0.2, rounds=1, warmup_s=0.1, throughput_s=0.2)


@dataclass(frozen=True, slots=True)
class Target:
    label: str
    address: str
    process: ChildProcess


@dataclass(frozen=True, slots=True)
class Outcome:
    sizes: Sizes
    fixed: dict[str, list[LoadResult]]  # target label -> one result per round, at sizes.rate
    closed: dict[str, list[LoadResult]]  # the same, closed loop at sizes.concurrency


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.echo", description=__doc__.split("\n\n")[0]
    )
    add_backend_arguments(parser)
    parser.add_argument("--rate", type=float, help="calls per second (quick and full: 300)")
    parser.add_argument("--concurrency", type=int, help="calls in flight at most (default 8)")
    parser.add_argument(
        "--duration", type=float, help="seconds per round and side at the rate (quick 5, full 20)"
    )
    parser.add_argument("--rounds", type=int, help="rounds per side and phase (quick 3, full 5)")
    parser.add_argument(
        "--throughput-duration",
        type=float,
        help="seconds per round and side of the closed-loop phase (quick 3, full 10; 0: skip)",
    )
    parser.add_argument("--payload-bytes", type=int, default=64, help="Echo payload (64)")
    parser.add_argument("--service", default="query", help="suite service to measure (query)")
    parser.add_argument(
        "--log-level",
        default="warning",
        help="PROFILES_LOG_LEVEL of the service (warning: per-call logs dropped; info: written)",
    )
    return parser.parse_args(argv)


def sizes_of(args: argparse.Namespace) -> Sizes:
    base = size_choice(args, SMOKE, QUICK, FULL)
    return Sizes(
        rate=args.rate or base.rate,
        concurrency=args.concurrency or base.concurrency,
        duration_s=args.duration or base.duration_s,
        rounds=args.rounds or base.rounds,
        warmup_s=base.warmup_s,
        throughput_s=(
            base.throughput_s if args.throughput_duration is None else args.throughput_duration
        ),
    )


async def check_echo(label: str, stub: pb_grpc.DiagnosticsServiceStub, payload: bytes) -> None:
    """One call that must succeed and return the payload, so errors are not timed as answers."""
    try:
        reply = await stub.Echo(pb.EchoRequest(payload=payload))
    except grpc.aio.AioRpcError as exc:
        raise BenchError(f"Echo on {label} failed before measuring: {exc}") from exc
    if reply.payload != payload:
        raise BenchError(f"Echo on {label} returned another payload")


def echo_call(stub: pb_grpc.DiagnosticsServiceStub, request: pb.EchoRequest) -> Call:
    async def call() -> object:
        return await stub.Echo(request)

    return call


async def measure(targets: list[Target], sizes: Sizes, api_key: str, payload: bytes) -> Outcome:
    """Both phases, each in alternating rounds after a warm-up of each target."""
    for target in targets:
        await wait_serving(target.address, target.process, DIAGNOSTICS_SERVICE)
    processes = {t.label: t.process for t in targets}
    request = pb.EchoRequest(payload=payload)
    async with contextlib.AsyncExitStack() as stack:
        calls: dict[str, Call] = {}
        for target in targets:
            channel = await stack.enter_async_context(open_channel(target.address, api_key))
            stub = pb_grpc.DiagnosticsServiceStub(channel)
            await check_echo(target.label, stub, payload)
            calls[target.label] = echo_call(stub, request)
        fixed = await alternate(
            calls,
            LoadPlan(sizes.rate, sizes.concurrency, sizes.duration_s),
            sizes.rounds,
            warmup=LoadPlan(sizes.rate, sizes.concurrency, sizes.warmup_s),
            processes=processes,
        )
        closed: dict[str, list[LoadResult]] = {}
        if sizes.throughput_s > 0:
            closed = await alternate(
                calls,
                LoadPlan(None, sizes.concurrency, sizes.throughput_s),
                sizes.rounds,
                processes=processes,
            )
    return Outcome(sizes, fixed, closed)


def _row(label: str, result: LoadResult) -> str:
    s = LatencySummary.of(result.latencies_s)
    return (
        f"  {label:<20}{result.completed:>8}{result.error_count:>7}{result.late_starts:>6}"
        f"{result.achieved_rate:>9.1f}{s.p50_ms:>9.3f}{s.p90_ms:>9.3f}{s.p99_ms:>9.3f}"
        f"{s.max_ms:>9.2f}{result.server_cpu_us_per_call:>10.0f}"
    )


def _ratio_row(a: LoadResult, b: LoadResult) -> str:
    sa, sb = LatencySummary.of(a.latencies_s), LatencySummary.of(b.latencies_s)
    return (
        f"  {'ratio suite/bare':<20}{'':>21}{a.achieved_rate / b.achieved_rate:>9.3f}"
        f"{sa.p50_ms / sb.p50_ms:>9.2f}{sa.p90_ms / sb.p90_ms:>9.2f}"
        f"{sa.p99_ms / sb.p99_ms:>9.2f}{sa.max_ms / sb.max_ms:>9.2f}"
        f"{a.server_cpu_us_per_call / b.server_cpu_us_per_call:>10.2f}"
    )


def print_phase(title: str, results: dict[str, list[LoadResult]], suite: str, bare: str) -> None:
    merged = {label: LoadResult.merged(rs) for label, rs in results.items()}
    print(title)
    print(
        f"  {'':<20}{'calls':>8}{'errors':>7}{'late':>6}{'rate/s':>9}{'p50 ms':>9}"
        f"{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}{'cpu us':>10}"
    )
    print(_row(suite, merged[suite]))
    print(_row(bare, merged[bare]))
    print(_ratio_row(merged[suite], merged[bare]))
    for label in (suite, bare):
        p50s = ", ".join(f"{LatencySummary.of(r.latencies_s).p50_ms:.3f}" for r in results[label])
        rates = ", ".join(f"{r.achieved_rate:.0f}" for r in results[label])
        print(f"  per round, {label}: p50 ms {p50s}; calls/s {rates}")


def print_report(outcome: Outcome, suite: str, bare: str, args: argparse.Namespace) -> None:
    sizes = outcome.sizes
    print(
        f"\nEcho, payload {args.payload_bytes} B, concurrency {sizes.concurrency},"
        f" {sizes.rounds} rounds per side and phase, alternating (suite, bare, bare, suite, ...),"
        " one client process"
    )
    print(
        f"suite: `{args.service}` service subprocess: auth interceptor (admin key, cached),"
        f" metrics, structlog at PROFILES_LOG_LEVEL={args.log_level}"
    )
    print("bare:  bench.bare_echo subprocess: same servicer and server options, no interceptors")
    print(
        "late: calls started over 5 ms after their slot (all workers busy);"
        " cpu us: server process CPU per call\n"
    )
    print_phase(
        f"fixed rate {sizes.rate:g} calls/s, {sizes.duration_s:g} s per round",
        outcome.fixed,
        suite,
        bare,
    )
    if outcome.closed:
        print_phase(
            f"\nclosed loop (throughput at concurrency {sizes.concurrency}),"
            f" {sizes.throughput_s:g} s per round",
            outcome.closed,
            suite,
            bare,
        )
    print()


def figures_of(outcome: Outcome, suite: str, bare: str) -> list[Figure]:
    a, b = LoadResult.merged(outcome.fixed[suite]), LoadResult.merged(outcome.fixed[bare])
    sa, sb = LatencySummary.of(a.latencies_s), LatencySummary.of(b.latencies_s)
    figures = [
        Figure("echo_p50_ms", sa.p50_ms, "ms", "bare_echo_p50_ms", sb.p50_ms),
        Figure("echo_p90_ms", sa.p90_ms, "ms", "bare_echo_p90_ms", sb.p90_ms),
        Figure("echo_p99_ms", sa.p99_ms, "ms", "bare_echo_p99_ms", sb.p99_ms),
        Figure("echo_rps", a.achieved_rate, "calls/s", "bare_echo_rps", b.achieved_rate),
    ]
    if outcome.closed:
        ca, cb = LoadResult.merged(outcome.closed[suite]), LoadResult.merged(outcome.closed[bare])
        figures.append(
            Figure(
                "echo_max_rps", ca.achieved_rate, "calls/s", "bare_echo_max_rps", cb.achieved_rate
            )
        )
        figures.append(
            Figure(
                "echo_cpu_us_per_call",
                ca.server_cpu_us_per_call,
                "us",
                "bare_echo_cpu_us_per_call",
                cb.server_cpu_us_per_call,
            )
        )
    return figures


def errors_acceptable(outcome: Outcome) -> bool:
    ok = True
    for phase in (outcome.fixed, outcome.closed):
        for label, results in phase.items():
            merged = LoadResult.merged(results)
            if merged.error_count > MAX_ERROR_FRACTION * max(merged.completed, 1):
                print(f"too many errors on {label}: {dict(merged.errors)}")
                ok = False
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sizes_of(args)
    payload = os.urandom(args.payload_bytes)
    suite_label, bare_label = f"suite ({args.service})", "bare grpc.aio"
    configure_logging("warning")  # this process's own logs (migrations) are not the output
    with contextlib.ExitStack() as stack:
        work_dir = make_work_dir(stack)
        backends = start_backends(stack, work_dir, args.database_url, args.redis_url)
        project = asyncio.run(create_project(backends.database_url, roles=("admin",)))
        settings = service_settings(backends, args.service, work_dir, log_level=args.log_level)
        suite = start_service_process(stack, args.service, settings, work_dir)
        bare, bare_address = start_bare_echo(stack, work_dir)
        print(f"started {args.service} (pid {suite.pid}) and bare echo (pid {bare.pid})")
        targets = [
            Target(suite_label, f"127.0.0.1:{settings.ports[args.service]}", suite),
            Target(bare_label, bare_address, bare),
        ]
        outcome = asyncio.run(measure(targets, sizes, project.keys["admin"], payload))
    print_report(outcome, suite_label, bare_label, args)
    ok = errors_acceptable(outcome)
    print_figures(BENCH, figures_of(outcome, suite_label, bare_label), quick=labelled_quick(args))
    return 0 if ok else 1


if __name__ == "__main__":
    run_main(main)
